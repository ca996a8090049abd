"""Contract clauses → verdict: pure arithmetic over measurements."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from framework.contract import judge
from framework.metrics import Measurements
from framework.spec import ContractSpec


def _m(**overrides) -> Measurements:
    base = dict(n=200, metrics={"category_macro_f1": 0.9}, intervals={"category_macro_f1": (0.85, 0.94)},
                latency_p50_ms=1000, latency_p95_ms=2000, latency_p99_ms=3000, error_rate=0.0,
                tokens_per_request=700, tokens_per_request_p95=900, cost_per_request=0.0001)
    return Measurements(**{**base, **overrides})


CONTRACT = ContractSpec(latency_p50_ms=1500, latency_p95_ms=2500, latency_p99_ms=4000, error_rate_max=0.01,
                        cost_per_request_max=0.001, tokens_per_request_max=1000, monthly_budget=10,
                        expected_requests_per_day=1000, eval={"category_macro_f1": ">= 0.8"})


def test_all_clauses_pass_when_within_bounds():
    verdict = judge(CONTRACT, _m())
    assert verdict.passed, verdict.table_rows()
    assert [c.name for c in verdict.clauses] == [
        "latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "error_rate_max", "cost_per_request_max",
        "tokens_per_request_max", "monthly_budget", "category_macro_f1"]


def test_each_failing_clause_is_named():
    verdict = judge(CONTRACT, _m(latency_p95_ms=2600, metrics={"category_macro_f1": 0.79}))
    assert not verdict.passed
    assert verdict.failed == ["latency_p95_ms", "category_macro_f1"]


def test_a_metric_the_run_did_not_measure_fails_with_a_note():
    contract = ContractSpec(eval={"rouge": 0.5})
    verdict = judge(contract, _m())
    assert verdict.failed == ["rouge"]
    assert "declare it in [eval].metrics" in verdict.clauses[0].note


@given(cost=st.floats(min_value=0, max_value=1, allow_nan=False),
       per_day=st.floats(min_value=0, max_value=1e6, allow_nan=False),
       budget=st.floats(min_value=0, max_value=1e6, allow_nan=False))
def test_budget_clause_is_cost_times_volume_times_thirty(cost, per_day, budget):
    contract = ContractSpec(monthly_budget=budget, expected_requests_per_day=per_day)
    verdict = judge(contract, _m(cost_per_request=cost))
    (clause,) = verdict.clauses
    assert clause.measured == cost * per_day * 30
    assert clause.passed == (cost * per_day * 30 <= budget)


@given(limit=st.floats(min_value=1, max_value=1e5), measured=st.floats(min_value=0, max_value=1e5))
def test_latency_clause_is_an_upper_bound(limit, measured):
    verdict = judge(ContractSpec(latency_p99_ms=limit), _m(latency_p99_ms=measured))
    assert verdict.passed == (measured <= limit)


@given(threshold=st.floats(min_value=0, max_value=1), measured=st.floats(min_value=0, max_value=1),
       op=st.sampled_from([">=", "<=", ">", "<"]))
def test_quality_clause_follows_its_operator(threshold, measured, op):
    verdict = judge(ContractSpec(eval={"q": f"{op} {threshold!r}"}), _m(metrics={"q": measured}))
    expected = {">=": measured >= threshold, "<=": measured <= threshold,
                ">": measured > threshold, "<": measured < threshold}[op]
    assert verdict.passed == expected


def test_a_lower95_clause_is_judged_on_the_interval_not_the_point():
    contract = ContractSpec(eval={"category_macro_f1": ">= 0.86 @ lower95"})
    (clause,) = judge(contract, _m()).clauses  # point 0.90, interval [0.85, 0.94]
    assert not clause.passed and clause.measured == 0.9
    assert clause.target == ">= 0.86 (95% lower bound)" and "lower bound 0.850" in clause.note
    assert judge(ContractSpec(eval={"category_macro_f1": ">= 0.86"}), _m()).passed  # the point alone passes
    assert judge(ContractSpec(eval={"category_macro_f1": ">= 0.84 @ lower95"}), _m()).passed


@given(lo=st.floats(0, 1), width=st.floats(0, 1), bar=st.floats(0, 1),
       basis=st.sampled_from(["point", "lower95", "upper95"]))
def test_quality_clause_uses_the_number_its_basis_names(lo, width, bar, basis):
    hi = min(lo + width, 1.0)
    point = (lo + hi) / 2
    op = "<=" if basis == "upper95" else ">="
    suffix = "" if basis == "point" else f" @ {basis}"
    verdict = judge(ContractSpec(eval={"q": f"{op} {bar!r}{suffix}"}),
                    _m(metrics={"q": point}, intervals={"q": (lo, hi)}))
    judged = {"point": point, "lower95": lo, "upper95": hi}[basis]
    assert verdict.passed == (judged >= bar if op == ">=" else judged <= bar)


def test_a_bound_without_an_interval_fails_with_a_note():
    verdict = judge(ContractSpec(eval={"q": ">= 0.5 @ lower95"}),
                    _m(metrics={"q": 0.9}, intervals={"q": (math.nan, math.nan)}))
    assert not verdict.passed and "no 95% interval" in verdict.clauses[0].note


def test_demo_contract_judges_quality_on_the_lower_bound_with_headroom():
    """The measured qwen15 figures (README) pass the demo contract, each on its 95% lower bound."""
    from framework import load_project
    from tests.conftest import REPO

    contract = load_project("ticket-triage", root=REPO).spec.contract
    measured = {"category_accuracy": (0.655, (0.590, 0.720)), "category_macro_f1": (0.650, (0.568, 0.715)),
                "priority_band_match": (0.720, (0.655, 0.785)), "format_validity": (1.0, (1.0, 1.0))}
    m = _m(metrics={k: v for k, (v, _) in measured.items()}, intervals={k: i for k, (_, i) in measured.items()})
    quality = [c for c in judge(contract, m).clauses if c.name in measured]
    assert [c.name for c in quality] and all(c.passed for c in quality), [c.note for c in quality]
    bases = {name: contract.eval[name].basis for name in measured}
    assert bases["category_accuracy"] == bases["category_macro_f1"] == bases["priority_band_match"] == "lower95"


def _sliced(value, interval, n=20, tag="non_english"):
    return _m(slices={tag: {"n": n, "metrics": {"category_macro_f1": value},
                            "intervals": {"category_macro_f1": interval}}})


def test_a_slice_clause_is_judged_on_the_examples_with_that_tag():
    contract = ContractSpec(eval={"category_macro_f1": ">= 0.8", "category_macro_f1[non_english]": ">= 0.5 @ lower95"})
    passed = judge(contract, _sliced(0.7, (0.55, 0.85)))
    assert passed.passed, passed.table_rows()
    clause = passed.clauses[-1]
    assert clause.name == "category_macro_f1[non_english]" and clause.measured == 0.7
    assert "20 examples tagged non_english" in clause.note
    # the overall figure (0.9) clears its bar; the slice's lower bound does not clear its own
    failed = judge(contract, _sliced(0.7, (0.45, 0.85)))
    assert failed.failed == ["category_macro_f1[non_english]"]


def test_a_slice_no_example_carries_fails_and_says_so():
    contract = ContractSpec(eval={"category_macro_f1[angry]": ">= 0.5"})
    clause = judge(contract, _sliced(0.9, (0.8, 1.0))).clauses[-1]
    assert not clause.passed and "no eval example is tagged 'angry'" in clause.note
    undeclared = judge(ContractSpec(eval={"priority_accuracy[non_english]": ">= 0.5"}), _sliced(0.9, (0.8, 1.0)))
    assert "declare it in [eval].metrics" in undeclared.clauses[-1].note


@given(st.floats(0, 1), st.floats(0, 0.5), st.floats(0, 1))
def test_a_slice_clause_passes_exactly_when_its_bound_clears_the_bar(lo, width, bar):
    contract = ContractSpec(eval={"category_macro_f1[short]": f">= {bar} @ lower95"})
    verdict = judge(contract, _sliced(min(lo + width / 2, 1), (lo, min(lo + width, 1)), tag="short"))
    assert verdict.passed == (lo >= bar)


def test_an_at_most_clause_holds_zero_wrong_hits_to_zero():
    """`cache_wrong_hit_rate = "<= 0.0"`: one wrong hit on the paraphrase set fails the contract."""
    contract = ContractSpec(eval={"cache_wrong_hit_rate": "<= 0.0"})
    ok = judge(contract, _m(metrics={"cache_wrong_hit_rate": 0.0}, intervals={"cache_wrong_hit_rate": (0, 0.07)}))
    bad = judge(contract, _m(metrics={"cache_wrong_hit_rate": 1 / 51},
                             intervals={"cache_wrong_hit_rate": (0.003, 0.10)}))
    assert ok.passed and ok.clauses[0].target == "<= 0" and ok.clauses[0].interval == (0, 0.07)
    assert not bad.passed and bad.failed == ["cache_wrong_hit_rate"]
