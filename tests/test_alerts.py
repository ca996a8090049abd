"""Contract → Prometheus alerting rules (framework/alerts.py).

With promtool on PATH (`make promtool`: Debian's prometheus package) the written file is checked by
`promtool check rules`, and `promtool test rules` replays synthetic /metrics series through the rules, so
the PromQL is shown to fire on a broken clause and stay quiet on healthy traffic; without it, a structure
check stands in."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from framework.alerts import alert_rules, cost_buckets, latency_buckets, token_buckets, write_alert_rules
from framework.spec import ContractSpec, load_project
from tests.conftest import REPO, edit_toml

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (make promtool)")
DEMO = load_project(str(REPO / "projects" / "ticket-triage")).spec
CLAUSES = ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "error_rate_max", "cost_per_request_max",
           "tokens_per_request_max", "monthly_budget")


def with_contract(**clauses):
    """The demo spec with only these contract clauses (the budget brings its volume along)."""
    if clauses.get("monthly_budget") is not None:
        clauses.setdefault("expected_requests_per_day", 1000)
    return DEMO.model_copy(update={"contract": ContractSpec(**clauses)})


def check_structure(rules: dict) -> list[dict]:
    """What Prometheus requires of a rule file, for machines without promtool."""
    assert set(rules) == {"groups"} and len(rules["groups"]) == 1
    group = rules["groups"][0]
    assert set(group) == {"name", "rules"} and isinstance(group["rules"], list)
    for rule in group["rules"]:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"]) and re.fullmatch(r"\d+[smh]", rule["for"])
        assert rule["expr"].count("(") == rule["expr"].count(")") and rule["expr"].count("{") == rule["expr"].count("}")
        assert {"severity", "project", "clause"} <= set(rule["labels"]) and {"summary", "description"} <= set(
            rule["annotations"])
        assert all(isinstance(v, str) for v in (*rule["labels"].values(), *rule["annotations"].values()))
    return group["rules"]


def test_the_demo_contract_gives_a_rule_per_clause_and_promtool_accepts_the_file(tmp_path):
    path = tmp_path / "alerts.yml"
    assert write_alert_rules(DEMO, path) == 7
    rules = check_structure(yaml.safe_load(path.read_text()))
    assert [r["labels"]["clause"] for r in rules] == [f"contract.{c}" for c in CLAUSES]
    assert all('bento_version=~"ticket-triage:.*"' in r["expr"] for r in rules)   # this project's series only
    if PROMTOOL:
        checked = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "SUCCESS: 7 rules found" in checked.stdout


def test_thresholds_come_from_the_contract(project_root):
    toml = project_root / "projects" / "ticket-triage" / "project.toml"
    edit_toml(toml, "latency_p95_ms = 16000", "latency_p95_ms = 2500")
    edit_toml(toml, "error_rate_max = 0.01", "# no error clause")
    spec = load_project(str(toml)).spec
    rules = {r["alert"]: r for r in alert_rules(spec)["groups"][0]["rules"]}
    assert rules["SlipwayLatencyP95"]["expr"].endswith(" > 2.5")          # 2500 ms, in seconds
    assert rules["SlipwayLatencyP99"]["expr"].endswith(" > 20")
    assert "2500 ms" in rules["SlipwayLatencyP95"]["annotations"]["summary"]
    assert "SlipwayErrorRate" not in rules                                  # not declared: not watched
    assert rules["SlipwayCostPerRequest"]["expr"].endswith(" > 2e-05")
    assert rules["SlipwayMonthlyBudgetBurn"]["expr"].endswith("* 2592000 > 5")


def test_a_contract_without_slos_gives_an_empty_group(tmp_path):
    path = tmp_path / "alerts.yml"
    assert write_alert_rules(with_contract(), path) == 0
    assert check_structure(yaml.safe_load(path.read_text())) == []
    if PROMTOOL:
        assert subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, timeout=60).returncode == 0


def test_the_clauses_are_histogram_bucket_bounds():
    contract = with_contract(latency_p95_ms=1234, tokens_per_request_max=333, cost_per_request_max=0.00002).contract
    assert 1.234 in latency_buckets(contract) and 64 in latency_buckets(contract)
    assert 333 in token_buckets(contract) and 2e-05 in cost_buckets(contract)
    assert list(latency_buckets(contract)) == sorted(set(latency_buckets(contract)))


positive = st.floats(min_value=1e-6, max_value=1e9, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(clauses=st.fixed_dictionaries({}, optional={
    "latency_p50_ms": positive, "latency_p95_ms": positive, "latency_p99_ms": positive,
    "error_rate_max": st.floats(min_value=0, max_value=1), "cost_per_request_max": st.floats(0, 1e6),
    "tokens_per_request_max": positive, "monthly_budget": st.floats(0, 1e9)}))
def test_any_contract_gives_well_formed_rules_with_its_own_thresholds(clauses):
    rules = check_structure(yaml.safe_load(yaml.safe_dump(alert_rules(with_contract(**clauses)))))
    assert sorted(r["labels"]["clause"] for r in rules) == sorted(f"contract.{c}" for c in clauses)
    for rule in rules:
        clause = rule["labels"]["clause"].removeprefix("contract.")
        threshold = float(rule["expr"].rsplit(" > ", 1)[1])
        expected = clauses[clause] / 1000 if clause.startswith("latency") else clauses[clause]
        assert threshold == pytest.approx(expected, rel=1e-12, abs=0)


def unit_test(rules_file: str) -> dict:
    """`promtool test rules` input: synthetic scrapes of two versions, each breaking or keeping clauses."""
    v1, v2 = 'bento_version="ticket-triage:v1",tenant=""', 'bento_version="ticket-triage:v2",tenant=""'
    other = 'bento_version="other-project:v1",tenant=""'
    series = [
        # v1: 100 answered a minute, all between 16 and 32 s; 5 a minute fail with 503
        (f'slipway_request_seconds_bucket{{{v1},outcome="ok",le="16.0"}}', "0+0x120"),
        (f'slipway_request_seconds_bucket{{{v1},outcome="ok",le="32.0"}}', "0+100x120"),
        (f'slipway_request_seconds_bucket{{{v1},outcome="ok",le="+Inf"}}', "0+100x120"),
        (f'slipway_request_seconds_count{{{v1},outcome="ok"}}', "0+100x120"),
        (f'slipway_request_seconds_count{{{v1},outcome="error"}}', "0+5x120"),
        (f'slipway_errors_total{{{v1},status="503"}}', "0+5x120"),
        # v2: 100 answered a minute under 1 s, and 50 callers' mistakes (413): no 5xx at all
        (f'slipway_request_seconds_bucket{{{v2},outcome="ok",le="1.0"}}', "0+100x120"),
        (f'slipway_request_seconds_bucket{{{v2},outcome="ok",le="+Inf"}}', "0+100x120"),
        (f'slipway_request_seconds_count{{{v2},outcome="ok"}}', "0+100x120"),
        (f'slipway_request_seconds_count{{{v2},outcome="rejected"}}', "0+50x120"),
        (f'slipway_errors_total{{{v2},status="413"}}', "0+50x120"),
        # v1 spends 500 tokens a request (contract: 200), v2 100
        (f"slipway_request_tokens_sum{{{v1}}}", "0+50000x120"), (f"slipway_request_tokens_count{{{v1}}}", "0+100x120"),
        (f"slipway_request_tokens_sum{{{v2}}}", "0+10000x120"), (f"slipway_request_tokens_count{{{v2}}}", "0+100x120"),
        # cost: 0.00001 a request on both (contract: 0.00002); spend 0.001 a minute each = 86 a month (budget: 5)
        (f"slipway_request_cost_sum{{{v1}}}", "0+0.001x120"), (f"slipway_request_cost_count{{{v1}}}", "0+100x120"),
        (f"slipway_request_cost_sum{{{v2}}}", "0+0.001x120"), (f"slipway_request_cost_count{{{v2}}}", "0+100x120"),
        (f"slipway_cost_total{{{v1}}}", "0+0.001x120"), (f"slipway_cost_total{{{v2}}}", "0+0.001x120"),
        # another project's failures are not this contract's business
        (f'slipway_errors_total{{{other},status="503"}}', "0+100x120"),
        (f'slipway_request_seconds_count{{{other},outcome="error"}}', "0+100x120"),
    ]

    def firing(alert: str, versions=("v1",), labels=None):
        clause = {"SlipwayLatencyP50": "latency_p50_ms", "SlipwayLatencyP95": "latency_p95_ms",
                  "SlipwayLatencyP99": "latency_p99_ms", "SlipwayErrorRate": "error_rate_max",
                  "SlipwayCostPerRequest": "cost_per_request_max", "SlipwayTokensPerRequest": "tokens_per_request_max",
                  "SlipwayMonthlyBudgetBurn": "monthly_budget"}[alert]
        base = {"project": "ticket-triage", "clause": f"contract.{clause}",
                "severity": "critical" if alert == "SlipwayErrorRate" else "warning"}
        return {"eval_time": "100m", "alertname": alert,
                "exp_alerts": [{"exp_labels": {**base, **({"bento_version": f"ticket-triage:{v}"} if v else {})}}
                               for v in versions]}

    return {"rule_files": [rules_file], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": name, "values": values} for name, values in series],
        "alert_rule_test": [
            firing("SlipwayLatencyP50"), firing("SlipwayLatencyP95"), firing("SlipwayLatencyP99"),
            firing("SlipwayErrorRate"),                 # 5 / 105 > 1%; v2's 413s are the callers' and not counted
            firing("SlipwayTokensPerRequest"),          # v1 only
            firing("SlipwayCostPerRequest", versions=()),
            firing("SlipwayMonthlyBudgetBurn", versions=(None,)),   # both versions' spend, one project
            {"eval_time": "3m", "alertname": "SlipwayErrorRate", "exp_alerts": []},   # not yet `for` 5m
        ]}]}


@needs_promtool
def test_the_rules_fire_on_broken_clauses_and_stay_quiet_otherwise(tmp_path):
    """Synthetic scrapes through the real rules (annotations dropped: promtool would compare their text)."""
    rules = alert_rules(DEMO)
    for rule in rules["groups"][0]["rules"]:
        del rule["annotations"]
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False, width=1000))
    (tmp_path / "test.yml").write_text(yaml.safe_dump(unit_test("alerts.yml"), sort_keys=False, width=1000))
    tested = subprocess.run([PROMTOOL, "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert tested.returncode == 0, tested.stdout + tested.stderr
