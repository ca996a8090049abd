"""The `[release]` canary → Argo Rollouts manifests, for projects that ship to Kubernetes (docs/kubernetes.md).

`slipway deploy --canary` moves a channel's requests step by step in its own front; on Kubernetes the same
rollout is an Argo Rollouts `Rollout` whose canary steps are `[release] steps`, watched by an
`AnalysisTemplate` that asks Prometheus the contract's own alert expressions (framework/alerts.py), narrowed
to the canary's `bento_version`. A query that returns a series is a breach, as it is for the alert, and one
breach aborts the rollout (the budget's metric only reports). The manifests are plain dicts, so a test
validates them against Argo's CRD schemas without a cluster.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from framework.alerts import alert_rules
from framework.errors import SpecError

API_VERSION = "argoproj.io/v1alpha1"
VERSION_ARG = "bento-version"   # the AnalysisTemplate's argument: the canary's "project:version" label
PORT = 3000                     # BentoML's serving port inside the image `bentoml containerize` builds
# Prometheus scrapes every 15-30 s in most setups: measuring more often only re-reads the same samples.
MIN_INTERVAL_S = 30
# The budget clause is the project's spend, not the canary's: its metric is shown in the AnalysisRun but
# does not abort a rollout (Argo's dryRun), since rolling back the canary would not bring the spend down.
REPORT_ONLY = ("monthly_budget",)
# a BentoML version that is also a Kubernetes label value (it labels the pods and goes into the queries)
_VERSION = re.compile(r"[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?")


def _seconds(value: float) -> str:
    return f"{math.ceil(value)}s"


def analysis_template(project, *, prometheus: str, interval_s: float) -> dict[str, Any]:
    """One metric per contract clause, named for the clause; every query is the clause's alert expression
    for the version in `{{args.bento-version}}`, so the canary is held to exactly what pages on it later."""
    rules = alert_rules(project.spec, bento_version=f"{{{{args.{VERSION_ARG}}}}}")["groups"][0]["rules"]
    metrics = [{
        "name": rule["labels"]["clause"].removeprefix("contract."),
        "interval": _seconds(interval_s),
        # The expression keeps only breaching series (`... > limit`): no series is a pass, and so is no
        # traffic yet (a histogram_quantile over nothing is NaN, and NaN > limit keeps nothing).
        "successCondition": "len(result) == 0",
        "failureLimit": 0,
        "provider": {"prometheus": {"address": prometheus, "query": rule["expr"]}},
    } for rule in rules]
    spec: dict[str, Any] = {"args": [{"name": VERSION_ARG}], "metrics": metrics}
    report_only = [{"metricName": m["name"]} for m in metrics if m["name"] in REPORT_ONLY]
    if report_only:
        spec["dryRun"] = report_only
    return {"apiVersion": API_VERSION, "kind": "AnalysisTemplate",
            "metadata": {"name": f"{project.name}-contract", "labels": _labels(project)}, "spec": spec}


def rollout_manifests(project, version: str, *, image: str | None = None, replicas: int = 2,
                      prometheus: str = "http://prometheus.monitoring:9090") -> list[dict]:
    """[AnalysisTemplate, Rollout] rolling `project` out at `version` by its `[release]` steps.

    `image` defaults to the tag `bentoml containerize <project>:<version>` gives its image. Without a traffic
    router Argo splits traffic by pods, so `replicas` bounds how closely a step's percentage is met.
    Raises SpecError when `version` is not a lowercase BentoML version (it becomes a label and a query)."""
    if not _VERSION.fullmatch(version):
        raise SpecError(f"expected a bento version (lowercase letters, digits, '.', '_', '-'), got {version!r}",
                        field="version", hint=f"`slipway build {project.name}` prints the version it built")
    release = project.spec.release
    template = analysis_template(project, prometheus=prometheus,
                                 interval_s=max(release.min_seconds, MIN_INTERVAL_S))
    steps: list[dict[str, Any]] = []
    for weight in release.steps[:-1]:   # the last step is 100: promotion, which Argo does after the steps
        steps += [{"setWeight": weight}, {"pause": {"duration": _seconds(release.min_seconds)}}]
    # background analysis, from the first weighted step on: one breach at any time aborts, as in Slipway
    analysis: dict[str, Any] = {"templates": [{"templateName": template["metadata"]["name"]}],
                                "args": [{"name": VERSION_ARG, "value": f"{project.name}:{version}"}]}
    if steps:
        analysis["startingStep"] = 1
    # The pods are plain Kubernetes' (framework/kube.py): the environment serve_env gives a version (trace and
    # state folders, the channel), the API keys Secret, resources from the model size, and the probes.
    from framework import kube

    deployment = next(m for m in kube.manifests(project, version, channel="prod", image=image)
                      if m["kind"] == "Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]
    pod = deployment["spec"]["template"]
    rollout = {
        "apiVersion": API_VERSION, "kind": "Rollout",
        "metadata": {"name": project.name, "labels": _labels(project)},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector},
            "template": pod,
            "strategy": {"canary": {
                "steps": steps,
                "analysis": analysis,
            }},
        },
    }
    return [template, rollout]


def _labels(project) -> dict[str, str]:
    return {"app.kubernetes.io/name": project.name}


def write_manifests(project, version: str, path: Path, **kw: Any) -> Path:
    """Write `rollout_manifests(project, version, **kw)` as one multi-document YAML for `kubectl apply -f`."""
    import yaml

    header = (f"# Argo Rollouts canary of {project.name}:{version}, from [release] and [contract] in "
              f"projects/{project.name}/project.toml\n# (written by slipway, framework/argo.py; change the "
              "project, not this file)\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    documents = rollout_manifests(project, version, **kw)
    path.write_text(header + yaml.safe_dump_all(documents, sort_keys=False, width=1000), encoding="utf-8")
    return path
