"""[release] + [contract] → Argo Rollouts manifests (framework/argo.py).

The manifests are validated against Argo Rollouts' own CRD schemas (tests/data/argo/, vendored from the
argo-rollouts repository), closed the way the API server closes them: `kubectl apply` rejects unknown fields
by default (`--validate=strict`), so a misspelt key fails here as it would on a cluster."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest
import yaml

from framework.alerts import alert_rules
from framework.argo import rollout_manifests, write_manifests
from framework.errors import SpecError
from framework.spec import load_project
from tests.conftest import REPO, edit_toml

DATA = REPO / "tests" / "data" / "argo"
DEMO = load_project(str(REPO / "projects" / "ticket-triage"))
VERSION = "3f2a9c0d1e4b5a6c7d8e"
CANARY = 'bento_version="{{args.bento-version}}"'


def closed(schema: dict) -> dict:
    """`schema` with unknown fields refused wherever Kubernetes would refuse them (an object that lists its
    properties and does not say x-kubernetes-preserve-unknown-fields)."""
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {name: closed(sub) for name, sub in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = closed(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            schema[key] = [closed(sub) for sub in schema[key]]
    return schema


VALIDATORS = {kind: jsonschema.Draft7Validator(closed(json.loads((DATA / f"{file}.schema.json").read_text())))
              for kind, file in (("AnalysisTemplate", "analysis-template"), ("Rollout", "rollout"))}


def problems(manifest: dict) -> list[str]:
    assert manifest["apiVersion"] == "argoproj.io/v1alpha1"
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in VALIDATORS[manifest["kind"]].iter_errors(manifest)]


def metrics(manifests: list[dict]) -> dict[str, dict]:
    return {m["name"]: m for m in manifests[0]["spec"]["metrics"]}


def test_the_demo_manifests_validate_against_argos_schemas():
    template, rollout = manifests = rollout_manifests(DEMO, VERSION)
    assert [m["kind"] for m in manifests] == ["AnalysisTemplate", "Rollout"]
    for manifest in manifests:
        assert problems(manifest) == []
    analysis = rollout["spec"]["strategy"]["canary"]["analysis"]
    assert analysis["templates"] == [{"templateName": template["metadata"]["name"]}]
    assert analysis["args"] == [{"name": "bento-version", "value": f"ticket-triage:{VERSION}"}]
    assert template["spec"]["args"] == [{"name": "bento-version"}]   # the Rollout must supply it
    (container,) = rollout["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"ticket-triage:{VERSION}"           # what `bentoml containerize` tags
    assert rollout_manifests(DEMO, VERSION, image="registry.example/tt:1")[1]["spec"]["template"]["spec"][
        "containers"][0]["image"] == "registry.example/tt:1"


def _set_weight_as_string(template, rollout):
    rollout["spec"]["strategy"]["canary"]["steps"][0]["setWeight"] = "10"


def _no_provider(template, rollout):
    del template["spec"]["metrics"][0]["provider"]


def _misspelt_step(template, rollout):
    steps = rollout["spec"]["strategy"]["canary"]["steps"]
    steps[0] = {"setweight": steps[0]["setWeight"]}


def _pause_as_list(template, rollout):
    rollout["spec"]["strategy"]["canary"]["steps"][1]["pause"]["duration"] = ["60s"]


@pytest.mark.parametrize("mutate", [_set_weight_as_string, _no_provider, _misspelt_step, _pause_as_list])
def test_a_broken_manifest_fails_the_schema(mutate):
    manifests = copy.deepcopy(rollout_manifests(DEMO, VERSION))
    mutate(*manifests)
    assert [p for m in manifests for p in problems(m)], f"{mutate.__name__} passed the schema"


def test_steps_and_pauses_follow_release(project_root):
    toml = project_root / "projects" / "ticket-triage" / "project.toml"
    edit_toml(toml, "steps = [10, 50, 100]", "steps = [5, 25, 60, 100]")
    edit_toml(toml, "min_seconds = 60", "min_seconds = 90")
    manifests = rollout_manifests(load_project(str(toml)), VERSION)
    canary = manifests[1]["spec"]["strategy"]["canary"]
    assert canary["steps"] == [step for weight in (5, 25, 60)
                               for step in ({"setWeight": weight}, {"pause": {"duration": "90s"}})]
    assert canary["analysis"]["startingStep"] == 1            # from the first weighted step
    assert {m["interval"] for m in manifests[0]["spec"]["metrics"]} == {"90s"}
    assert all(problems(m) == [] for m in manifests)


def test_straight_to_100_has_no_steps_and_still_validates(project_root):
    toml = project_root / "projects" / "ticket-triage" / "project.toml"
    edit_toml(toml, "steps = [10, 50, 100]", "steps = [100]")
    manifests = rollout_manifests(load_project(str(toml)), VERSION)
    canary = manifests[1]["spec"]["strategy"]["canary"]
    assert canary["steps"] == [] and "startingStep" not in canary["analysis"]
    assert all(problems(m) == [] for m in manifests)


def test_one_metric_per_contract_alert_with_the_alerts_own_expression():
    rules = alert_rules(DEMO.spec)["groups"][0]["rules"]
    found = metrics(rollout_manifests(DEMO, VERSION, prometheus="http://prom:9090"))
    assert list(found) == [r["labels"]["clause"].removeprefix("contract.") for r in rules]
    assert len(found) == 7
    for rule in rules:
        metric = found[rule["labels"]["clause"].removeprefix("contract.")]
        query = metric["provider"]["prometheus"]["query"]
        assert metric["provider"]["prometheus"]["address"] == "http://prom:9090"
        # The same PromQL as the alert, narrowed from every version of the project to the canary's
        assert query.replace(CANARY, 'bento_version=~"ticket-triage:.*"') == rule["expr"]
        assert (CANARY in query) == (metric["name"] != "monthly_budget")   # the budget is the project's
        assert metric["successCondition"] == "len(result) == 0" and metric["failureLimit"] == 0
    template = rollout_manifests(DEMO, VERSION)[0]
    assert template["spec"]["dryRun"] == [{"metricName": "monthly_budget"}]


def test_a_contract_without_latency_clauses_gets_no_latency_metric(project_root):
    toml = project_root / "projects" / "ticket-triage" / "project.toml"
    for clause in ("latency_p50_ms = 6000", "latency_p95_ms = 16000", "latency_p99_ms = 20000"):
        edit_toml(toml, clause, "# " + clause)
    manifests = rollout_manifests(load_project(str(toml)), VERSION)
    assert list(metrics(manifests)) == ["error_rate_max", "cost_per_request_max", "tokens_per_request_max",
                                        "monthly_budget"]
    assert all(problems(m) == [] for m in manifests)


def test_write_manifests_gives_the_same_documents_as_yaml(tmp_path):
    path = write_manifests(DEMO, VERSION, tmp_path / "k8s" / "rollout.yaml", replicas=4)
    assert path == tmp_path / "k8s" / "rollout.yaml"
    assert list(yaml.safe_load_all(path.read_text())) == rollout_manifests(DEMO, VERSION, replicas=4)


@pytest.mark.parametrize("version", ["", "Not-Lower", "ends-", 'x"} or vector(1) #', "abc\n", "a" * 64])
def test_a_version_that_is_no_bento_version_is_refused(version):
    with pytest.raises(SpecError, match="expected a bento version"):
        rollout_manifests(DEMO, version)
