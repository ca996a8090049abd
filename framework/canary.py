"""A canary step's live figures → promote or roll back (pure: figures in, a decision out).

Two questions, both asked of the same window of served traffic (framework/rollout.py gathers it):

1. Does the canary keep the contract? Its latency percentiles, error rate, cost and tokens per request
   are judged clause by clause with `framework.contract.judge`, the same rules `slipway check` and
   `slipway slo` use. A breached clause rolls it back, whatever the stable version does.
2. Is it worse than the stable version right beside it? Each comparison is a one-sided test that the
   canary is worse, on the requests of the same window (so a busy machine slows both arms alike):

   | figure | test |
   |---|---|
   | latency of requests the model answered | Mann-Whitney U, and the median over the stable's by > `margin` |
   | cost per request (model answers, failures) | Mann-Whitney U, and the mean over the stable's by > `margin` |
   | failures (5xx, or a fallback answered for the model) | Fisher's exact test on the 2×2 table |
   | guardrail blocks | Fisher's exact test |
   | negative feedback (of the requests that got feedback) | Fisher's exact test |
   | wrong answers where feedback carries the correct labels | Fisher's exact test |

   Answers from the answer cache count as requests but not in latency or cost: the stable's cache is warm
   and a new canary's is cold, so comparing them would judge the cache, not the version. A test runs only
   when both arms have data for it; each is held to `alpha / tests run` (Bonferroni), so
   a step's false-rollback rate stays at most `alpha`. Mann-Whitney needs no normality (latencies are
   skewed); Fisher is exact at the small counts a canary step sees.

Rank and exact tests from scipy, which the drift checks already use.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from framework.contract import judge
from framework.metrics import Measurements
from framework.spec import ContractSpec, ReleaseSpec

PROMOTE, ROLLBACK, WAIT = "promote", "rollback", "wait"
BASELINE = 5   # requests each arm's model must have answered (or failed) before a step may be promoted


@dataclass
class Arm:
    """One version's served requests in the window (4xx, the caller's own mistakes, left out but blocks)."""

    version: str
    n: int = 0                                  # requests answered or failed (not the caller's 4xx)
    failures: int = 0                           # 5xx, or a fallback answered in the model's place
    latencies_ms: list[float] = field(default_factory=list)  # answered requests
    costs: list[float] = field(default_factory=list)         # answered by the model, or failed
    cache_hits: int = 0                         # answered from the answer cache: in n, not in latency or cost
    tokens: list[float] = field(default_factory=list)        # answered requests: new prompt + generated
    blocked: int = 0                            # refused by a guardrail (a 4xx the service chose)
    requests: int = 0                           # n + blocked: what the front sent it
    feedback: int = 0                           # requests with feedback
    negative: int = 0
    labelled: int = 0                           # feedback with correct labels
    wrong: int = 0                              # of those, answers that differ on a labelled field

    def summary(self) -> dict[str, Any]:
        return {"version": self.version, "requests": self.requests, "n": self.n, "failures": self.failures,
                "latency_p50_ms": _pct(self.latencies_ms, 0.5), "latency_p95_ms": _pct(self.latencies_ms, 0.95),
                "latency_p99_ms": _pct(self.latencies_ms, 0.99),
                "cost_per_request": statistics.fmean(self.costs) if self.costs else None,
                "cache_hits": self.cache_hits, "blocked": self.blocked, "feedback": self.feedback,
                "negative": self.negative, "labelled": self.labelled, "wrong": self.wrong}


@dataclass
class Finding:
    """One clause or comparison: `failed` means it alone would roll the canary back."""

    name: str
    kind: str                    # clause | regression
    canary: float | None
    stable: float | None
    failed: bool
    p_value: float | None = None
    target: Any = None           # a clause's target as the contract writes it ("<= 6000"); a threshold
    note: str = ""


@dataclass
class Analysis:
    decision: str                # promote | rollback | wait
    reason: str
    canary: dict[str, Any]
    stable: dict[str, Any]
    findings: list[Finding]
    alpha_each: float | None = None

    @property
    def failed(self) -> list[Finding]:
        return [f for f in self.findings if f.failed]

    def to_dict(self) -> dict[str, Any]:
        return {"decision": self.decision, "reason": self.reason, "canary": self.canary, "stable": self.stable,
                "alpha_each": self.alpha_each,
                "findings": [{k: _plain(v) for k, v in asdict(f).items()} for f in self.findings]}


def _plain(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _pct(values: list[float], q: float) -> float | None:
    """Linear-interpolated quantile, as DuckDB's quantile_cont (so `slipway slo` and a step agree)."""
    if not values:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def clauses(contract: ContractSpec, arm: Arm) -> list[Finding]:
    """The contract's live clauses on one arm (eval thresholds are offline-only: labels come later)."""
    if arm.n == 0:
        return []
    nan = math.nan
    answered = bool(arm.latencies_ms)
    measured = Measurements(
        n=arm.n, metrics={}, intervals={},
        latency_p50_ms=_pct(arm.latencies_ms, 0.5) if answered else nan,
        latency_p95_ms=_pct(arm.latencies_ms, 0.95) if answered else nan,
        latency_p99_ms=_pct(arm.latencies_ms, 0.99) if answered else nan,
        error_rate=arm.failures / arm.n,
        tokens_per_request=statistics.fmean(arm.tokens) if arm.tokens else nan,
        tokens_per_request_p95=_pct(arm.tokens, 0.95) if arm.tokens else nan,
        cost_per_request=statistics.fmean(arm.costs) if arm.costs else nan)
    live = contract.model_copy(update={"eval": {}, "monthly_budget": None, "expected_requests_per_day": None,
                                       "guardrail_latency_p99_ms": None})
    out = []
    for clause in judge(live, measured).clauses:
        if isinstance(clause.measured, float) and math.isnan(clause.measured):
            continue   # nothing answered: the failure count speaks for it
        out.append(Finding(name=clause.name, kind="clause", canary=clause.measured, stable=None,
                           failed=not clause.passed, target=clause.target, note=clause.note or ""))
    return out


def _fisher(name: str, bad_c: int, n_c: int, bad_s: int, n_s: int) -> Finding | None:
    from scipy.stats import fisher_exact

    if n_c == 0 or n_s == 0:
        return None
    p = float(fisher_exact([[bad_c, n_c - bad_c], [bad_s, n_s - bad_s]], alternative="greater").pvalue)
    return Finding(name=name, kind="regression", canary=bad_c / n_c, stable=bad_s / n_s, failed=False, p_value=p,
                   note=f"{bad_c}/{n_c} vs {bad_s}/{n_s}, Fisher exact, one-sided")


def _ranks(name: str, canary: list[float], stable: list[float], centre, margin: float) -> Finding | None:
    from scipy.stats import mannwhitneyu

    if len(canary) < 2 or len(stable) < 2:
        return None
    c, s = centre(canary), centre(stable)
    if c == s and len(set(canary) | set(stable)) == 1:
        p = 1.0   # identical constants (e.g. a free model's zero cost): nothing to rank
    else:
        p = float(mannwhitneyu(canary, stable, alternative="greater").pvalue)
    large = c > s * (1 + margin) if s > 0 else c > 0
    return Finding(name=name, kind="regression", canary=c, stable=s, failed=False, p_value=p,
                   note=f"n {len(canary)} vs {len(stable)}, Mann-Whitney U, one-sided; matters only above "
                        f"{1 + margin:.2f}x the stable's ({'above' if large else 'not above'})",
                   target=s * (1 + margin))


def compare(release: ReleaseSpec, canary: Arm, stable: Arm) -> tuple[list[Finding], float | None]:
    """The regression tests that have data in both arms, each judged at alpha / (tests run)."""
    tests = [
        _ranks("latency", canary.latencies_ms, stable.latencies_ms, statistics.median, release.margin),
        _ranks("cost_per_request", canary.costs, stable.costs, statistics.fmean, release.margin),
        _fisher("failures", canary.failures, canary.n, stable.failures, stable.n),
        _fisher("guardrail_blocks", canary.blocked, canary.requests, stable.blocked, stable.requests),
        _fisher("negative_feedback", canary.negative, canary.feedback, stable.negative, stable.feedback),
        _fisher("wrong_labels", canary.wrong, canary.labelled, stable.wrong, stable.labelled),
    ]
    found = [t for t in tests if t is not None]
    if not found:
        return [], None
    each = release.alpha / len(found)
    for finding in found:
        significant = finding.p_value is not None and finding.p_value < each
        large = finding.target is None or (finding.canary or 0) > finding.target
        finding.failed = significant and large
    return found, each


def analyse(contract: ContractSpec, release: ReleaseSpec, canary: Arm, stable: Arm, *,
            elapsed_s: float) -> Analysis:
    """Judge one step. `wait` until it has run `min_seconds` and the canary has `min_requests` requests;
    then `rollback` on any breached clause; `wait` again until both versions have a baseline of requests
    their model answered; then `rollback` on a significant regression, else `promote`."""
    if elapsed_s < release.min_seconds or canary.requests < release.min_requests:
        reason = (f"waiting: {canary.requests}/{release.min_requests} canary requests, "
                  f"{elapsed_s:.0f}/{release.min_seconds:.0f} s")
        return Analysis(WAIT, reason, canary.summary(), stable.summary(), [])
    findings = clauses(contract, canary)
    if any(f.failed for f in findings):
        failed = [f for f in findings if f.failed]
        return Analysis(ROLLBACK, "; ".join(_describe(f) for f in failed), canary.summary(), stable.summary(),
                        findings)
    # No promotion without a baseline: a step with no comparison (e.g. every stable answer a cache hit) would
    # pass a canary whatever it does, as long as the contract's clauses are loose.
    need = min(BASELINE, release.min_requests)
    if (stable.n - stable.cache_hits) < need or (canary.n - canary.cache_hits) < need:
        return Analysis(WAIT, f"waiting for a baseline: {stable.n - stable.cache_hits} stable and "
                              f"{canary.n - canary.cache_hits} canary requests answered by the model (cache hits "
                              f"are not compared), {need} each needed", canary.summary(), stable.summary(), findings)
    regressions, each = compare(release, canary, stable)
    findings += regressions
    failed = [f for f in findings if f.failed]
    if failed:
        reason = "; ".join(_describe(f) for f in failed)
        return Analysis(ROLLBACK, reason, canary.summary(), stable.summary(), findings, each)
    reason = f"{len(findings)} clauses and comparisons hold over {canary.requests} canary requests"
    return Analysis(PROMOTE, reason, canary.summary(), stable.summary(), findings, each)


def _describe(f: Finding) -> str:
    if f.kind == "clause":
        return f"clause {f.name}: canary {_fmt(f.canary)}, contract {f.target}"
    return (f"regression {f.name}: canary {_fmt(f.canary)} vs stable {_fmt(f.stable)} "
            f"(p = {f.p_value:.2g}; {f.note})")


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.4g}"
