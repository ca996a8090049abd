"""A canary step's decision (framework/canary.py) on figures made here: waits, clause breaches, the
regression tests and their guards against noise."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from framework.canary import PROMOTE, ROLLBACK, WAIT, Arm, analyse, compare
from framework.spec import ContractSpec, ReleaseSpec

CONTRACT = ContractSpec(latency_p95_ms=3000, error_rate_max=0.05, cost_per_request_max=0.01)
RELEASE = ReleaseSpec(steps=[10, 50, 100], min_requests=20, min_seconds=30)


def arm(version: str, latencies: list[float], *, failures: int = 0, cost: float = 0.001, blocked: int = 0,
        negative: int = 0, feedback: int = 0) -> Arm:
    out = Arm(version=version, n=len(latencies) + failures, failures=failures, latencies_ms=list(latencies),
              costs=[cost] * (len(latencies) + failures), tokens=[100.0] * len(latencies), blocked=blocked,
              feedback=feedback, negative=negative)
    out.requests = out.n + blocked
    return out


def steady(version: str, n: int, *, centre: float = 1000, seed: int = 0, **kw) -> Arm:
    rng = random.Random(seed)
    return arm(version, [rng.lognormvariate(0, 0.3) * centre for _ in range(n)], **kw)


def test_a_step_waits_for_its_requests_and_its_time():
    canary, stable = steady("v2", 19), steady("v1", 200, seed=1)
    assert analyse(CONTRACT, RELEASE, canary, stable, elapsed_s=600).decision == WAIT
    canary = steady("v2", 40)
    waited = analyse(CONTRACT, RELEASE, canary, stable, elapsed_s=29)
    assert waited.decision == WAIT and "29/30 s" in waited.reason
    assert analyse(CONTRACT, RELEASE, canary, stable, elapsed_s=31).decision == PROMOTE


def test_a_canary_like_its_stable_is_promoted_with_every_test_stated():
    found = analyse(CONTRACT, RELEASE, steady("v2", 40, seed=2), steady("v1", 300, seed=3), elapsed_s=60)
    assert found.decision == PROMOTE, found.reason
    names = {f.name for f in found.findings}
    assert {"latency_p95_ms", "error_rate_max", "cost_per_request_max", "latency", "cost_per_request",
            "failures", "guardrail_blocks"} <= names
    assert found.alpha_each == pytest.approx(0.01 / 4)   # latency, cost, failures, blocks: Bonferroni over 4


def test_a_breached_clause_rolls_back_naming_it_whatever_the_stable_does():
    slow = steady("v2", 40, centre=5000)
    also_slow = steady("v1", 300, centre=5000, seed=5)
    found = analyse(CONTRACT, RELEASE, slow, also_slow, elapsed_s=60)
    assert found.decision == ROLLBACK
    assert "clause latency_p95_ms" in found.reason and "<= 3,000 ms" in found.reason
    assert not any(f.failed for f in found.findings if f.kind == "regression")   # no worse than stable


def test_a_significant_large_latency_regression_rolls_back_inside_the_contract():
    canary, stable = steady("v2", 40, centre=1800, seed=6), steady("v1", 300, centre=1000, seed=7)
    found = analyse(CONTRACT, RELEASE, canary, stable, elapsed_s=60)
    assert found.decision == ROLLBACK and "regression latency" in found.reason, found.reason
    assert not [f for f in found.failed if f.kind == "clause"]


def test_a_significant_but_small_slowdown_is_not_a_regression():
    """5% slower on thousands of requests is significant and below the 20% margin."""
    canary, stable = steady("v2", 3000, centre=1050, seed=8), steady("v1", 3000, centre=1000, seed=9)
    found = analyse(CONTRACT, RELEASE, canary, stable, elapsed_s=60)
    latency = next(f for f in found.findings if f.name == "latency")
    assert latency.p_value < 1e-4 and not latency.failed and found.decision == PROMOTE


def test_more_failures_than_stable_rolls_back_within_the_error_clause():
    canary = steady("v2", 100, seed=10, failures=4)         # 3.8%: inside error_rate_max 5%
    stable = steady("v1", 1000, seed=11, failures=0)
    found = analyse(CONTRACT, RELEASE, canary, stable, elapsed_s=60)
    assert found.decision == ROLLBACK and "regression failures" in found.reason and "4/104 vs 0/1000" in found.reason


def test_negative_feedback_and_blocks_are_compared_when_both_arms_have_them():
    canary = steady("v2", 60, seed=12, feedback=30, negative=20)
    stable = steady("v1", 600, seed=13, feedback=300, negative=30)
    found = analyse(CONTRACT, RELEASE, canary, stable, elapsed_s=60)
    assert found.decision == ROLLBACK and "negative_feedback" in found.reason
    no_feedback = steady("v2", 60, seed=12)
    names = {f.name for f in analyse(CONTRACT, RELEASE, no_feedback, stable, elapsed_s=60).findings}
    assert "negative_feedback" not in names and "wrong_labels" not in names


def test_no_baseline_means_no_promotion_but_a_breach_still_rolls_back():
    """A step whose stable version answered nothing with its model (no traffic, or every answer from its
    warm cache) waits: there is nothing to compare the canary with. A breached clause needs no baseline."""
    cached = steady("v1", 0)
    cached.n = cached.requests = cached.cache_hits = 300
    for stable in (Arm(version="v1"), cached):
        found = analyse(CONTRACT, RELEASE, steady("v2", 40), stable, elapsed_s=60)
        assert found.decision == WAIT and "waiting for a baseline" in found.reason, found.reason
        slow = analyse(CONTRACT, RELEASE, steady("v2", 40, centre=9000), stable, elapsed_s=60)
        assert slow.decision == ROLLBACK and "clause latency_p95_ms" in slow.reason


def test_a_canary_that_only_fails_breaches_the_error_clause():
    found = analyse(CONTRACT, RELEASE, arm("v2", [], failures=25), steady("v1", 100), elapsed_s=60)
    assert found.decision == ROLLBACK and "clause error_rate_max" in found.reason


def test_the_analysis_serialises_to_plain_json():
    import json

    found = analyse(CONTRACT, RELEASE, steady("v2", 40), steady("v1", 300), elapsed_s=60)
    again = json.loads(json.dumps(found.to_dict()))
    assert again["decision"] == PROMOTE and again["canary"]["requests"] == 40 and again["findings"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=1, max_value=20000), min_size=25, max_size=80), st.integers(0, 5),
       st.floats(min_value=0.0, max_value=0.9))
def test_a_canary_never_worse_than_stable_is_never_rolled_back_for_a_regression(latencies, failures, faster):
    """Property: the same requests, or faster and no more failures, is never a regression."""
    stable = arm("v1", latencies, failures=failures)
    canary = arm("v2", [x * (1 - faster) for x in latencies], failures=failures)
    found, _ = compare(RELEASE, canary, stable)
    assert not [f.name for f in found if f.failed]


def test_false_rollbacks_on_identical_distributions_stay_under_alpha():
    """200 pairs of draws from one distribution: a regression is found in at most the 99.9% binomial bound
    of alpha (0.01, family-wise over the step's tests)."""
    from scipy.stats import binom

    false = sum(any(f.failed for f in compare(RELEASE, steady("v2", 30, seed=s), steady("v1", 200, seed=s + 10**6))[0])
                for s in range(200))
    assert false <= binom.ppf(0.999, 200, RELEASE.alpha), false
