"""A channel's version → plain Kubernetes manifests (framework/kube.py).

Every object is validated against the Kubernetes API's own OpenAPI schemas (the `kubernetes-validate`
package), in strict mode, which refuses unknown fields as `kubectl apply --validate=strict` does, for the
oldest Kubernetes the export targets (1.30) and the newest schema the package carries. Mutated manifests
must fail the same validation, so a pass means something."""

from __future__ import annotations

import copy
import importlib.util
import os
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from framework import kube
from framework.alerts import REQUEST_SECONDS
from framework.errors import SpecError
from framework.serve import serve_env
from framework.spec import Project, load_project, parse_spec
from tests.conftest import REPO, edit_toml

DEMO = load_project(str(REPO / "projects" / "ticket-triage"))
VERSION = "3f2a9c0d1e4b5a6c7d8e"
OLDEST = "1.30"   # the oldest Kubernetes these manifests are promised for (pyproject: kubernetes-validate>=1.30)
K8S = (OLDEST, kubernetes_validate.latest_version())
OPTIONS = {
    "defaults": {},
    "cpu-autoscaling": {"autoscale": "cpu", "replicas": 1, "max_replicas": 3},
    "namespaced-with-claim": {"namespace": "triage", "channel": "staging", "traces_claim": "triage-traces",
                              "image": "registry.example/ticket-triage:1", "measured_rss_bytes": 2_000_000_000},
}


def by_kind(manifests: list[dict]) -> dict[str, dict]:
    return {m["kind"]: m for m in manifests}


def pod(manifests: list[dict]) -> dict:
    return by_kind(manifests)["Deployment"]["spec"]["template"]["spec"]


def bento(manifests: list[dict]) -> dict:
    (container,) = pod(manifests)["containers"]
    return container


def with_spec(text: str, project: Project = DEMO) -> Project:
    return Project(spec=parse_spec(text), dir=project.dir, root=project.root)


def demo_text() -> str:
    return DEMO.toml_path.read_text(encoding="utf-8")


def memory_mib(manifests: list[dict]) -> int:
    value = bento(manifests)["resources"]["requests"]["memory"]
    assert value.endswith("Mi")
    return int(value[:-2])


@pytest.mark.parametrize("version", K8S)
@pytest.mark.parametrize("options", OPTIONS, ids=list(OPTIONS))
def test_every_manifest_validates_strictly_against_the_kubernetes_schema(options, version):
    manifests = kube.manifests(DEMO, VERSION, **OPTIONS[options])
    assert [m["kind"] for m in manifests] == ["ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler"]
    for manifest in manifests:
        kubernetes_validate.validate(manifest, version, strict=True)


def _port_as_text(manifests):
    bento(manifests)["ports"][0]["containerPort"] = "3000"


def _min_replicas_as_text(manifests):
    by_kind(manifests)["HorizontalPodAutoscaler"]["spec"]["minReplicas"] = "2"


def _misspelt_probe(manifests):
    bento(manifests)["readinessProbes"] = bento(manifests).pop("readinessProbe")


def _unknown_service_field(manifests):
    by_kind(manifests)["Service"]["spec"]["targetPort"] = 3000


def _no_container_name(manifests):
    del bento(manifests)["name"]


def _no_selector(manifests):
    del by_kind(manifests)["Deployment"]["spec"]["selector"]


@pytest.mark.parametrize(("mutate", "why"), [
    (_port_as_text, "'3000' is not of type 'integer'"),
    (_min_replicas_as_text, "'2' is not of type 'integer'"),
    (_misspelt_probe, "'readinessProbes' was unexpected"),
    (_unknown_service_field, "'targetPort' was unexpected"),
    (_no_container_name, "'name' is a required property"),
    (_no_selector, "'selector' is a required property"),
])
def test_a_broken_manifest_fails_the_same_validation(mutate, why):
    manifests = copy.deepcopy(kube.manifests(DEMO, VERSION))
    mutate(manifests)
    failures = []
    for manifest in manifests:
        try:
            kubernetes_validate.validate(manifest, OLDEST, strict=True)
        except kubernetes_validate.ValidationError as exc:
            failures.append(exc.message)
    assert len(failures) == 1 and why in failures[0], failures


def _routes_in(path: Path) -> set[str]:
    return set(re.findall(r"/(?:readyz|livez|healthz)\b", path.read_text(encoding="utf-8")))


def test_probes_ask_routes_the_served_bento_has():
    service = REPO / "framework" / "service.py"
    source = service.read_text(encoding="utf-8")
    named = _routes_in(service)
    # BentoML's own system routes, read from its source (importing bentoml would take seconds)
    base_app = Path(importlib.util.find_spec("bentoml").origin).parent / "_internal" / "server" / "base_app.py"
    bentoml_routes = set(re.findall(r'join_paths\(path_prefix, "(/\w+)"\)', base_app.read_text(encoding="utf-8")))
    assert {"/readyz", "/livez"} <= bentoml_routes   # the regex still finds BentoML's routes
    container = bento(kube.manifests(DEMO, VERSION))
    probes = ("startupProbe", "readinessProbe", "livenessProbe")
    paths = {probe: container[probe]["httpGet"]["path"] for probe in probes}
    for probe, path in paths.items():
        assert path in named and path in bentoml_routes, (probe, path)
    # readiness is the route the service itself holds at 503 until its warm-up answer (NotReadyAnswers)
    assert f'"{paths["readinessProbe"]}"' in source.split("class NotReadyAnswers", 1)[1].split("\nclass ", 1)[0]
    assert paths["startupProbe"] == paths["readinessProbe"] != paths["livenessProbe"]
    for probe in paths:
        assert container[probe]["httpGet"]["port"] == container["ports"][0]["name"]


def test_the_pod_gets_every_variable_slipway_serve_sets(monkeypatch):
    for key in list(os.environ):
        if key not in ("HOME", "PATH"):
            monkeypatch.delenv(key)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)   # so that serve_env adds its conditional variables too
    workers = DEMO.spec.serve.workers
    wanted = {k: v for k, v in serve_env(DEMO, workers, "prod").items() if k not in ("HOME", "PATH")}
    env = {item["name"]: item["value"] for item in bento(kube.manifests(DEMO, VERSION, channel="prod"))["env"]}
    assert set(wanted) <= set(env)
    for key in ("SLIPWAY_CHANNEL", "BENTOML_CONFIG_OPTIONS", "BENTOML_DO_NOT_TRACK", "OMP_WAIT_POLICY"):
        assert env[key] == wanted[key]
    mounts = {m["mountPath"] for m in bento(kube.manifests(DEMO, VERSION))["volumeMounts"]}
    for key in ("SLIPWAY_TRACE_DIR", "SLIPWAY_STATE_DIR", "PYTHONPYCACHEPREFIX"):
        assert any(env[key].startswith(mount + "/") for mount in mounts), key   # on a writable volume


def test_resource_requests_grow_with_the_model_file():
    sizes = [200_000_000, 1_117_320_768, 4_000_000_000, 9_000_000_000]
    memory = []
    for size in sizes:
        project = with_spec(demo_text().replace("size_bytes = 1117320768", f"size_bytes = {size}"))
        assert kube.model_bytes(project) == {"qwen15": size}
        manifests = kube.manifests(project, VERSION)
        resources = bento(manifests)["resources"]
        assert resources["requests"] == resources["limits"]   # Guaranteed QoS
        memory.append(memory_mib(manifests))
    assert memory == sorted(memory) and len(set(memory)) == len(memory)
    assert memory[1] * (1 << 20) >= 1_117_320_768 * (1 + kube.CONTEXT_FACTOR)   # the weights and a context fit
    assert bento(kube.manifests(DEMO, VERSION))["resources"]["requests"]["cpu"] == str(
        DEMO.spec.serve.workers * DEMO.model().threads)


def test_more_workers_more_memory_and_cores():
    two = with_spec(demo_text().replace("workers = 1", "workers = 2"))
    one_pod = bento(kube.manifests(DEMO, VERSION))["resources"]
    two_pod = bento(kube.manifests(two, VERSION))["resources"]
    assert int(two_pod["requests"]["cpu"]) == 2 * int(one_pod["requests"]["cpu"])
    assert memory_mib(kube.manifests(two, VERSION)) > memory_mib(kube.manifests(DEMO, VERSION))


def test_without_size_bytes_the_pulled_file_sizes_the_pod(project_root):
    toml = project_root / "projects" / "ticket-triage" / "project.toml"
    model = project_root / "qwen15.gguf"
    text = toml.read_text()
    start = text.index("size_bytes = 1117320768\n")
    edit_toml(toml, text[start:text.index("\n", text.index("source = ", start))], f'source = {{ path = "{model}" }}')
    project = load_project(str(toml), project_root)
    with pytest.raises(SpecError) as refused:
        kube.manifests(project, VERSION)
    assert refused.value.field == "models.qwen15.size_bytes" and "slipway models pull" in refused.value.hint
    with open(model, "wb") as handle:   # a sparse file: only its size matters here
        handle.truncate(3_000_000_000)
    assert kube.model_bytes(project) == {"qwen15": 3_000_000_000}
    assert memory_mib(kube.manifests(project, VERSION)) > memory_mib(kube.manifests(DEMO, VERSION))


def test_a_measured_rss_replaces_the_factor():
    rss = 1_500_000_000
    memory = memory_mib(kube.manifests(DEMO, VERSION, measured_rss_bytes=rss))
    expected = (rss * DEMO.spec.serve.workers * kube.RSS_HEADROOM + kube.SUPERVISOR_BYTES) / (1 << 20)
    assert expected <= memory < expected + 64


def test_unset_threads_are_refused():
    project = with_spec(demo_text().replace("threads = 2\ngpu_layers = 0", "gpu_layers = 0", 1))
    with pytest.raises(SpecError) as refused:
        kube.manifests(project, VERSION)
    assert refused.value.field == "models.qwen15.threads"


def test_secrets_are_referenced_never_written(project_root):
    state = project_root / "projects" / "ticket-triage" / ".slipway"
    state.mkdir()
    marker = "sk-slipway-THIS-MUST-NOT-LEAK"
    (state / "api-keys.jsonl").write_text(f'{{"key": "{marker}"}}\n')
    project = load_project(str(project_root / "projects" / "ticket-triage"), project_root)
    manifests = kube.manifests(project, VERSION, api_keys_secret="triage-keys")
    text = yaml.safe_dump_all(manifests)
    assert marker not in text and "sk-slipway-" not in text
    assert "Secret" not in {m["kind"] for m in manifests}
    assert not any("stringData" in m or ("data" in m and m["kind"] != "ConfigMap") for m in manifests)
    volumes = {v["name"]: v for v in pod(manifests)["volumes"]}
    assert volumes["api-keys"]["secret"]["secretName"] == "triage-keys"
    assert set(volumes["api-keys"]["secret"]) == {"secretName", "defaultMode", "items"}   # a reference only
    for item in bento(manifests)["env"]:
        assert set(item) == {"name", "value"} and "KEY" not in item["name"]
    # keyless projects reference no Secret at all
    open_project = with_spec(demo_text().replace('timeout_s = 60\n', 'timeout_s = 60\nauth = "none"\n', 1))
    assert "secret" not in yaml.safe_dump_all(kube.manifests(open_project, VERSION)).lower()


def test_the_keys_link_lands_where_the_service_reads_keys():
    from framework.apikeys import KEYS_FILE

    manifests = kube.manifests(DEMO, VERSION)
    env = {item["name"]: item["value"] for item in bento(manifests)["env"]}
    (init,) = pod(manifests)["initContainers"]
    secret = next(v for v in pod(manifests)["volumes"] if v["name"] == "api-keys")["secret"]
    script = init["command"][-1]
    assert f"{kube.KEYS_MOUNT}/{secret['items'][0]['path']} {env['SLIPWAY_STATE_DIR']}/{KEYS_FILE}" in script
    assert {m["mountPath"] for m in init["volumeMounts"]} == {kube.DATA_DIR}
    # the demo declares [flags.terse_prompt]: its flags file is linked likewise, from an optional ConfigMap
    from framework.flags import FLAGS_FILE

    flags = next(v for v in pod(manifests)["volumes"] if v["name"] == "flags")["configMap"]
    assert flags["optional"] is True and flags["name"] == "ticket-triage-prod-flags"
    assert f"{kube.FLAGS_MOUNT}/{FLAGS_FILE} {env['SLIPWAY_STATE_DIR']}/{FLAGS_FILE}" in script
    table = demo_text().index("[flags.terse_prompt]")
    unflagged = with_spec(demo_text()[:table] + demo_text()[demo_text().index("\n[", table):])
    assert "flags" not in {v["name"] for v in pod(kube.manifests(unflagged, VERSION))["volumes"]}


def test_the_configmap_holds_the_project_spec():
    config = by_kind(kube.manifests(DEMO, VERSION))["ConfigMap"]
    assert parse_spec(config["data"]["project.toml"]) == DEMO.spec
    assert yaml.safe_load(config["data"]["alerts.yml"])["groups"][0]["name"] == "slipway-ticket-triage"


def test_the_autoscaler_asks_the_adapters_metric():
    manifests = kube.manifests(DEMO, VERSION, replicas=3, max_replicas=5)
    hpa = by_kind(manifests)["HorizontalPodAutoscaler"]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 5)
    assert hpa["scaleTargetRef"]["name"] == by_kind(manifests)["Deployment"]["metadata"]["name"]
    assert "replicas" not in by_kind(manifests)["Deployment"]["spec"]   # the autoscaler owns the count
    (metric,) = hpa["metrics"]
    rule = kube.adapter_rule()
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert rule["seriesQuery"].startswith(f"{REQUEST_SECONDS}_count{{")   # a series service.py exports
    # 1 worker x parallel 1 / the contract's 6 s p50, x 0.7: about 0.117 requests per second per pod
    assert metric["pods"]["target"]["averageValue"] == "117m"
    (cpu,) = by_kind(kube.manifests(DEMO, VERSION, autoscale="cpu"))["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert cpu["resource"] == {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"version": "V1"}, "version"),
    ({"version": "a" * 64}, "version"),
    ({"channel": "canary"}, "channel"),
    ({"namespace": "Triage"}, "namespace"),
    ({"namespace": "triage-"}, "namespace"),
    ({"replicas": 0}, "replicas"),
    ({"replicas": 4, "max_replicas": 3}, "max_replicas"),
    ({"api_keys_secret": "keys_file"}, "api_keys_secret"),
    ({"traces_claim": "Traces"}, "traces_claim"),
    ({"autoscale": "memory"}, "autoscale"),
    ({"measured_rss_bytes": 0}, "measured_rss_bytes"),
])
def test_bad_input_is_refused_naming_the_field(kwargs, field):
    kwargs = {"version": VERSION, **kwargs}
    with pytest.raises(SpecError) as refused:
        kube.manifests(DEMO, **kwargs)
    assert refused.value.field == field and refused.value.hint


def test_a_project_name_kubernetes_cannot_take_is_refused():
    for name in ("a" * 60, "9lives"):
        project = with_spec(demo_text().replace('name = "ticket-triage"', f'name = "{name}"', 1))
        with pytest.raises(SpecError) as refused:
            kube.manifests(project, VERSION)
        assert refused.value.field == "project.name"


def test_write_manifests_writes_one_file_per_object(tmp_path):
    paths = kube.write_manifests(DEMO, VERSION, tmp_path / "k8s", channel="staging")
    assert [p.name for p in paths] == ["ticket-triage-staging-project.configmap.yaml",
                                       "ticket-triage-staging.deployment.yaml", "ticket-triage-staging.service.yaml",
                                       "ticket-triage-staging.horizontalpodautoscaler.yaml"]
    written = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        assert text.startswith("# Kubernetes ") and "&id" not in text   # no YAML anchors for people to untangle
        (document,) = list(yaml.safe_load_all(text))
        written.append(document)
    assert written == kube.manifests(DEMO, VERSION, channel="staging")


@pytest.mark.parametrize("version", K8S)
def test_a_remote_models_api_key_comes_from_a_secret_by_reference(version, monkeypatch):
    monkeypatch.setenv("TRIAGE_MODEL_KEY", "sk-remote-THIS-MUST-NOT-LEAK")
    text = demo_text().replace('model = "qwen15"', 'model = "remote"', 1).replace("[models.tiny]", (
        '[models.remote]\nname = "qwen15 on the fleet"\nfingerprint = "' + "d" * 64 + '"\nsource = { '
        'openai_compatible = { base_url = "http://10.0.0.7:8000/v1", model = "qwen15", api_key_env = '
        '"TRIAGE_MODEL_KEY" } }\nthreads = 2\n\n[models.tiny]'), 1)
    manifests = kube.manifests(with_spec(text), VERSION)
    for manifest in manifests:
        kubernetes_validate.validate(manifest, version, strict=True)
    assert "sk-remote-" not in yaml.safe_dump_all(manifests)
    (ref,) = [item for item in bento(manifests)["env"] if item["name"] == "TRIAGE_MODEL_KEY"]
    assert ref == {"name": "TRIAGE_MODEL_KEY", "valueFrom": {"secretKeyRef": {
        "name": "ticket-triage-model-api-keys", "key": "TRIAGE_MODEL_KEY"}}}
    assert memory_mib(manifests) < memory_mib(kube.manifests(DEMO, VERSION))   # no weights in the pod
