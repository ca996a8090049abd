"""A channel's version → plain Kubernetes manifests, for projects that run on a cluster (docs/kubernetes.md).

`slipway serve` runs one bento on one host; on Kubernetes the same container (`bentoml containerize`) runs as a
`Deployment` whose pods become ready only after their warm-up answer (/readyz, framework/service.py), sized
from the GGUF files they map and the workers and threads project.toml declares, scaled by a
`HorizontalPodAutoscaler` on the request rate the bento's /metrics reports, behind a `Service`. A `ConfigMap`
carries the project.toml the version runs, for people and tools in the cluster. API keys are a `Secret` the
pods *reference* by name: the export never writes a Secret, so applying it can never overwrite the live keys.
The manifests are plain dicts, so a test validates them against Kubernetes' schemas without a cluster.
framework/argo.py writes the canary of the same version as Argo Rollouts objects instead.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any, Literal

from framework.argo import PORT
from framework.errors import SpecError

MiB = 1 << 20
# Kubernetes' name rules (k8s.io/apimachinery validation): most objects are DNS-1123 labels or subdomains,
# a Service is a DNS-1035 label (it becomes a DNS name, so it starts with a letter).
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
# a BentoML version that is also a label value (as framework/argo.py requires: it labels the pods)
_VERSION = re.compile(r"[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?")

READY_PATH = "/readyz"   # 200 only after the warm-up answer succeeded (framework/service.py, NotReadyAnswers)
LIVE_PATH = "/livez"     # BentoML's: the worker's HTTP server answers
METRICS_PATH = "/metrics"

# Where the pod writes (an emptyDir, or a claim for traces): the bento's own files stay read as built.
DATA_DIR = "/var/lib/slipway"
TRACE_DIR = f"{DATA_DIR}/traces"
STATE_DIR = f"{DATA_DIR}/state"
PYCACHE_DIR = f"{DATA_DIR}/pycache"
KEYS_MOUNT = "/etc/slipway/api-keys"
FLAGS_MOUNT = "/etc/slipway/flags"
BENTO_UID = 1034         # the `bentoml` user `bentoml containerize` images run as (bentoml/_internal/container)

# Memory, when no measured RSS is given (none is in bench/results yet). Unmeasured estimates, stated here:
# the GGUFs are memory-mapped once per pod (workers share the page cache, charged once to the pod's cgroup);
# each worker adds its own llama.cpp context (KV cache, compute buffers: about half the weights' size at a
# 4096-token context for the 0.5-1.5B Q4 models the demo ships) and its Python runtime (BentoML, DSPy,
# pydantic, llama-cpp-python); BentoML's supervisor process comes on top, once per pod.
CONTEXT_FACTOR = 0.5
RUNTIME_BYTES = 768 * MiB
SUPERVISOR_BYTES = 256 * MiB
RSS_HEADROOM = 1.25      # over a measured per-worker RSS (which counts the shared weights in every worker)
# A pod is sized for, and the autoscaler aims at, this share of what it can answer: the rest is the room that
# keeps latency inside the contract while a new pod loads its model and warms up.
UTILISATION = 0.7
DEFAULT_ANSWER_S = 5.0   # seconds per answer without a latency clause: framework/admission.py's first guess
RATE_WINDOW = "2m"       # the adapter's rate window: four 30 s scrapes, steady enough to scale on
REQUEST_RATE = "slipway_requests_per_second"   # the custom metric prometheus-adapter serves (adapter_rule)
IMAGE_PULL_S = 300       # the rollout's deadline allows this for scheduling and pulling a multi-GB image


def model_bytes(project) -> dict[str, int]:
    """The size of every GGUF a served pod maps, by model key: the pipeline's model, its `[pipeline] tiers`
    and the semantic cache's embedder (what framework/build.py packs). `size_bytes` in project.toml, else
    the file's size where `slipway models pull` put it. Raises SpecError naming the model when neither is
    known: a pod cannot be sized without it."""
    from framework.weights import model_path

    spec = project.spec
    keys = [*project.tier_keys, *([spec.cache.embedding_model] if spec.cache.semantic else [])]
    sizes = {}
    for key in dict.fromkeys(keys):
        model = project.model(key)
        if model.remote is not None:
            sizes[key] = 0   # served by its own server: the pod maps no weights for it
            continue
        if model.size_bytes is not None:
            sizes[key] = model.size_bytes
            continue
        path = model_path(model, project.dir)
        if not path.exists():
            raise SpecError(f"the size of {model.name} is unknown: no size_bytes and no file at {path}",
                            path=str(project.toml_path), field=f"models.{key}.size_bytes",
                            hint=f"run `slipway models pull {project.name}`, or set size_bytes = <the GGUF's "
                                 f"size in bytes> under [models.{key}]")
        sizes[key] = path.stat().st_size
    return sizes


def resources(project, *, measured_rss_bytes: int | None = None) -> dict[str, dict[str, str]]:
    """Requests and limits of the serving container, equal to each other (the Guaranteed QoS class).

    CPU: `[serve] workers` × the served models' `threads`, whole cores, so the kubelet's static CPU manager
    can pin them as on the host where the contract's latency was measured; a limit above the threads would
    buy nothing, and llama.cpp with more threads than its quota is throttled mid-step. Memory: the mapped
    GGUFs once, plus a context and a runtime per worker (constants above), or `measured_rss_bytes` (one
    worker's peak RSS after warm-up) × workers × RSS_HEADROOM; a limit below the weights would evict their
    pages and read them back from disk on every token, so the limit is the request."""
    spec = project.spec
    workers = spec.serve.workers
    threads = []
    for key in project.tier_keys:
        if project.model(key).threads is None:
            raise SpecError("threads is not set: in a container llama.cpp would start one thread per two of the "
                            "node's cores, whatever the pod's CPU limit, and be throttled",
                            path=str(project.toml_path), field=f"models.{key}.threads",
                            hint=f"set threads = <cores per worker> under [models.{key}] (the demo uses 2)")
        threads.append(project.model(key).threads)
    cpu = workers * max(threads)
    if measured_rss_bytes is not None:
        if measured_rss_bytes <= 0:
            raise SpecError(f"expected a positive number of bytes, got {measured_rss_bytes}",
                            field="measured_rss_bytes", hint="pass one worker's RSS after warm-up, in bytes")
        memory = measured_rss_bytes * workers * RSS_HEADROOM + SUPERVISOR_BYTES
    else:
        weights = sum(model_bytes(project).values())
        memory = weights + workers * (weights * CONTEXT_FACTOR + RUNTIME_BYTES) + SUPERVISOR_BYTES
    amount = {"cpu": str(cpu), "memory": f"{math.ceil(memory / (64 * MiB)) * 64}Mi"}
    return {"requests": dict(amount), "limits": dict(amount)}


def target_request_rate(project) -> float:
    """Requests per second per pod the autoscaler aims at: what the pod answers at the contract's p50 latency
    with every worker's `parallel` sequences busy (the concurrency the latency clauses are judged at,
    docs/engine.md), × UTILISATION. The p50 is the contract's bound, not a measurement: on a faster host
    pods are added earlier than needed, never later."""
    spec = project.spec
    p50 = spec.contract.latency_p50_ms
    answer_s = p50 / 1000 if p50 else DEFAULT_ANSWER_S
    capacity = spec.serve.workers * project.model().parallel / answer_s
    return capacity * UTILISATION


def adapter_rule() -> dict[str, Any]:
    """The prometheus-adapter rule that serves `slipway_requests_per_second` per pod from the bento's
    `slipway_request_seconds_count` (framework/alerts.py: one count per request, any outcome, so requests
    shed with 429 when a worker's queue is full count too). Goes into the adapter's own configuration
    (its `rules.custom` Helm value), not into these manifests: the adapter is the cluster's, not the project's."""
    from framework.alerts import REQUEST_SECONDS

    return {
        "seriesQuery": f'{REQUEST_SECONDS}_count{{namespace!="",pod!=""}}',
        "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
        "name": {"matches": f"^{REQUEST_SECONDS}_count$", "as": REQUEST_RATE},
        "metricsQuery": f"sum(rate(<<.Series>>{{<<.LabelMatchers>>}}[{RATE_WINDOW}])) by (<<.GroupBy>>)",
    }


def manifests(project, version: str, *, channel: str = "prod", image: str | None = None, replicas: int = 2,
              max_replicas: int = 8, namespace: str | None = None,
              autoscale: Literal["requests", "cpu"] = "requests", measured_rss_bytes: int | None = None,
              api_keys_secret: str | None = None, traces_claim: str | None = None) -> list[dict]:
    """[ConfigMap, Deployment, Service, HorizontalPodAutoscaler] serving `project` at `version` as `channel`.

    Objects are named `<project>-<channel>`, so staging and prod can share a namespace. `image` defaults to
    the tag `bentoml containerize <project>:<version>` gives. `replicas`..`max_replicas` bound the autoscaler,
    which scales on the request rate (needs prometheus-adapter with `adapter_rule()`) or, with
    `autoscale="cpu"`, on CPU use (needs only metrics-server). The API keys file is mounted from the Secret
    `api_keys_secret` (default `<project>-<channel>-api-keys`) when `[serve] auth = "api_key"`, and a project
    with `[flags.*]` reads its flags file from the optional ConfigMap `<project>-<channel>-flags`. Traces and
    the human queue go to the PersistentVolumeClaim `traces_claim` (ReadWriteMany) when given, else to a
    pod-local emptyDir that goes with the pod. Raises SpecError naming the argument for a name Kubernetes
    would refuse, and for a project whose pods cannot be sized (see `resources`)."""
    import yaml

    from framework.alerts import alert_rules
    from framework.apikeys import KEYS_FILE
    from framework.flags import FLAGS_FILE
    from framework.release import CHANNELS

    if not _VERSION.fullmatch(version):
        raise SpecError(f"expected a bento version (lowercase letters, digits, '.', '_', '-', at most 63), got "
                        f"{version!r}", field="version", hint=f"`slipway build {project.name}` prints the version")
    if channel not in CHANNELS:
        raise SpecError(f"unknown channel {channel!r}", field="channel", hint=f"use one of: {', '.join(CHANNELS)}")
    if replicas < 1 or max_replicas < replicas:
        raise SpecError(f"expected 1 <= replicas <= max_replicas, got replicas={replicas}, "
                        f"max_replicas={max_replicas}", field="max_replicas" if replicas >= 1 else "replicas",
                        hint="the autoscaler keeps between replicas and max_replicas pods")
    if autoscale not in ("requests", "cpu"):
        raise SpecError(f"unknown autoscale metric {autoscale!r}", field="autoscale", hint="requests or cpu")
    name = f"{project.name}-{channel}"
    _check(name, _DNS1035_LABEL, 63, "project.name", "a Deployment and Service name (`<project>-<channel>`)",
           path=str(project.toml_path), hint="a project name of at most 54 characters that starts with a letter "
                                              "and does not end with '-'")
    if namespace is not None:
        _check(namespace, _DNS1123_LABEL, 63, "namespace", "a namespace")
    secret = api_keys_secret or f"{name}-api-keys"
    _check(secret, _DNS1123_SUBDOMAIN, 253, "api_keys_secret", "a Secret name")
    if traces_claim is not None:
        _check(traces_claim, _DNS1123_SUBDOMAIN, 253, "traces_claim", "a PersistentVolumeClaim name")

    spec = project.spec
    selector = {"app.kubernetes.io/name": project.name, "app.kubernetes.io/instance": name}
    labels = {**selector, "app.kubernetes.io/version": version, "app.kubernetes.io/managed-by": "slipway"}

    def metadata(object_name: str) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": object_name, "labels": dict(labels)}
        if namespace is not None:
            meta["namespace"] = namespace
        return meta

    config = {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata(f"{name}-project"),
        # For people and tools: the service reads the copy inside its bento, covered by the signed manifest.
        "data": {"project.toml": project.toml_path.read_text(encoding="utf-8"),
                 "alerts.yml": yaml.safe_dump(alert_rules(spec), sort_keys=False, width=1000)},
    }
    keyed, flagged = spec.serve.auth == "api_key", bool(spec.flags)
    container = _container(project, version, channel, image, resources(project, measured_rss_bytes=measured_rss_bytes),
                           keyed=keyed, flagged=flagged, claim=traces_claim is not None)
    state = ["mkdir -p " + " ".join((STATE_DIR, TRACE_DIR, PYCACHE_DIR))]
    if keyed:
        # The keys file must sit in SLIPWAY_STATE_DIR, which must be writable (tenants' budgets); a Secret volume
        # is read-only, and a subPath mount of it never sees an update. A link into the mounted Secret follows
        # kubelet's atomic swap of its files, and the service's stat (inode) notices: a revoked key is refused
        # once the kubelet has synced the Secret (about a minute), with no restart.
        state.append(f"ln -sfn {KEYS_MOUNT}/{KEYS_FILE} {STATE_DIR}/{KEYS_FILE}")
    if flagged:
        state.append(f"ln -sfn {FLAGS_MOUNT}/{FLAGS_FILE} {STATE_DIR}/{FLAGS_FILE}")   # the same, for the flags file
    tiny = {"cpu": "50m", "memory": "32Mi"}
    init = {"name": "state", "image": container["image"], "command": ["sh", "-c", " && ".join(state)],
            "volumeMounts": [dict(m) for m in container["volumeMounts"] if m["name"] in ("data", "traces")],
            "resources": {"requests": dict(tiny), "limits": dict(tiny)},
            "securityContext": copy.deepcopy(container["securityContext"])}
    volumes: list[dict[str, Any]] = [{"name": "data", "emptyDir": {}}]
    if traces_claim is not None:
        volumes.append({"name": "traces", "persistentVolumeClaim": {"claimName": traces_claim}})
    if keyed:
        # required (not optional): without the keys every call would be refused 401; a pod that cannot start
        # says "secret not found" instead, and the old version keeps serving
        volumes.append({"name": "api-keys", "secret": {"secretName": secret, "defaultMode": 0o440,
                                                       "items": [{"key": KEYS_FILE, "path": KEYS_FILE}]}})
    if flagged:
        # optional: with no flags file every flag is off, which is how a project starts (docs/flags.md)
        volumes.append({"name": "flags", "configMap": {"name": f"{name}-flags", "optional": True,
                                                       "items": [{"key": FLAGS_FILE, "path": FLAGS_FILE}]}})
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata(name),
        "spec": {
            # no `replicas`: the autoscaler owns the count, and each apply would reset it (Kubernetes' HPA docs)
            "selector": {"matchLabels": selector},
            # a new pod takes traffic only once warm, and the old ones leave only then: no drop in capacity,
            # and a version that never becomes ready leaves the old one serving (`slipway serve --channel` too)
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "progressDeadlineSeconds": spec.serve.startup_timeout_s + IMAGE_PULL_S,
            "template": {
                "metadata": {
                    "labels": dict(labels),
                    # the convention most Prometheus setups scrape pods by (as framework/argo.py's pods)
                    "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(PORT),
                                    "prometheus.io/path": METRICS_PATH},
                },
                "spec": {
                    # fsGroup: the Secret's files are root's otherwise, and mode 0440 would shut the user out
                    "securityContext": {"runAsNonRoot": True, "runAsUser": BENTO_UID, "runAsGroup": BENTO_UID,
                                        "fsGroup": BENTO_UID, "seccompProfile": {"type": "RuntimeDefault"}},
                    # in-flight answers finish after SIGTERM (BentoML drains), as `slipway serve` waits for them
                    "terminationGracePeriodSeconds": spec.serve.timeout_s + 30,
                    "initContainers": [init],
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": metadata(name),
        "spec": {"type": "ClusterIP", "selector": selector,
                 "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}]},
    }
    if autoscale == "requests":
        metric = {"type": "Pods", "pods": {"metric": {"name": REQUEST_RATE}, "target": {
            "type": "AverageValue", "averageValue": f"{math.ceil(target_request_rate(project) * 1000)}m"}}}
    else:
        metric = {"type": "Resource", "resource": {"name": "cpu", "target": {
            "type": "Utilization", "averageUtilization": round(UTILISATION * 100)}}}
    autoscaler = {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": metadata(name),
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                 "minReplicas": replicas, "maxReplicas": max_replicas, "metrics": [metric]},
    }
    return [config, deployment, service, autoscaler]


def _container(project, version: str, channel: str, image: str | None, sized: dict, *, keyed: bool,
               flagged: bool, claim: bool) -> dict[str, Any]:
    spec = project.spec
    env = {
        # what framework/serve.py's serve_env gives `bentoml serve`, with the pod's paths
        "BENTOML_DO_NOT_TRACK": "true",
        "PYTHONPYCACHEPREFIX": PYCACHE_DIR,     # never a .pyc beside the bento's verified sources
        "SLIPWAY_TRACE_DIR": TRACE_DIR,
        "SLIPWAY_STATE_DIR": STATE_DIR,
        "SLIPWAY_CHANNEL": channel,
        "BENTOML_CONFIG_OPTIONS": f"services.{project.name.replace('-', '_')}.workers={spec.serve.workers}",
        # serve_env sets it only when threads outnumber the host's cores, which a container cannot tell
        # (os.cpu_count() is the node's); under a CFS quota a spinning OpenMP thread spends the pod's CPU time
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    mounts = [{"name": "data", "mountPath": DATA_DIR}]
    if claim:
        mounts.append({"name": "traces", "mountPath": TRACE_DIR})
    if keyed:
        mounts.append({"name": "api-keys", "mountPath": KEYS_MOUNT, "readOnly": True})
    if flagged:
        mounts.append({"name": "flags", "mountPath": FLAGS_MOUNT, "readOnly": True})
    period = 5
    return {
        "name": "bento",
        "image": image or f"{project.name}:{version}",
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "env": [{"name": key, "value": value} for key, value in env.items()] + model_key_refs(project),
        "resources": sized,
        # Ready within [serve] startup_timeout_s or restarted, as `slipway serve` gives up on a version then;
        # readiness and liveness start after it.
        "startupProbe": {"httpGet": {"path": READY_PATH, "port": "http"}, "periodSeconds": period,
                         "failureThreshold": math.ceil(spec.serve.startup_timeout_s / period)},
        # A loaded pod may answer a probe slowly: it must not leave the Service for that (its load would go to
        # the others) nor be killed (/livez asks only whether the server answers), hence the generous timeouts
        # and three misses in a row.
        "readinessProbe": {"httpGet": {"path": READY_PATH, "port": "http"}, "periodSeconds": period,
                           "timeoutSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": LIVE_PATH, "port": "http"}, "periodSeconds": 10,
                          "timeoutSeconds": 5, "failureThreshold": 3},
        # the Service stops sending requests while the pod still answers, so none meets a closed port
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", "5"]}}},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": mounts,
    }


def model_key_refs(project) -> list[dict[str, Any]]:
    """A remote model's API key (`api_key_env`), from the Secret `<project>-model-api-keys` by reference: like
    the callers' keys, the export never writes a Secret."""
    refs = {}
    for key in project.tier_keys:
        remote = project.model(key).remote
        if remote is not None and remote.api_key_env:
            refs[remote.api_key_env] = {"name": remote.api_key_env, "valueFrom": {"secretKeyRef": {
                "name": f"{project.name}-model-api-keys", "key": remote.api_key_env}}}
    return list(refs.values())


def _check(value: str, pattern: re.Pattern, limit: int, field: str, what: str, *, path: str | None = None,
           hint: str | None = None) -> None:
    if not (len(value) <= limit and pattern.fullmatch(value)):
        rule = ("lowercase letters, digits and '-', starting with a letter" if pattern is _DNS1035_LABEL else
                "lowercase letters, digits, '-' and '.'" if pattern is _DNS1123_SUBDOMAIN else
                "lowercase letters, digits and '-'")
        raise SpecError(f"{value!r} is not valid as {what}: Kubernetes needs {rule}, ending with a letter or digit, "
                        f"at most {limit} characters", path=path, field=field,
                        hint=hint or f"pass a {field} that follows that rule")


def write_manifests(project, version: str, out_dir: Path, **kw: Any) -> list[Path]:
    """Write `manifests(project, version, **kw)` into `out_dir`, one YAML file per object, and return the paths.

    One file per object because `kubectl apply -f DIR` takes them all, a review shows which object changed,
    and a cluster that scales another way (KEDA) or keeps its own Service drops one file, not an edit in a
    long one. Files are named `<object name>.<kind>.yaml`, so staging and prod may share a folder."""
    import yaml

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = (f"# Kubernetes {{kind}} of {project.name}:{version}, from projects/{project.name}/project.toml\n"
              "# (written by slipway, framework/kube.py; change the project, not this file)\n")
    paths = []
    for document in manifests(project, version, **kw):
        path = out_dir / f"{document['metadata']['name']}.{document['kind'].lower()}.yaml"
        path.write_text(header.format(kind=document["kind"]) + yaml.safe_dump(document, sort_keys=False, width=1000),
                        encoding="utf-8")
        paths.append(path)
    return paths
