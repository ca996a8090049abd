"""Contract clauses → verdict. Pure: measurements in, verdict out.

Every clause the project declares becomes one row: what was promised, what was
measured, and pass/fail. SLO and cost clauses are upper bounds; quality
clauses use the operator written in [contract.eval] and are judged on the basis
written there: the point estimate (default), or with `@ lower95` / `@ upper95`
the end of the 95% bootstrap interval, so a clause can demand that the metric
clears the bar beyond sampling noise. A clause named `metric[tag]` judges the
metric on the eval examples carrying that tag (a slice), so a team can promise
a floor on non-English tickets that the overall figure would hide. The interval is shown beside every
quality clause so a reviewer sees the margin.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from framework.metrics import Measurements, split_slice_name
from framework.spec import ContractSpec, Threshold


@dataclass(frozen=True)
class Clause:
    name: str
    target: str
    measured: float
    passed: bool
    unit: str = ""
    interval: tuple[float, float] | None = None
    note: str = ""

    def measured_text(self) -> str:
        if math.isnan(self.measured):
            return "not measured"
        value = _fmt(self.measured, self.unit)
        if self.interval and not any(math.isnan(x) for x in self.interval):
            value += f"  [{_fmt(self.interval[0], self.unit)}, {_fmt(self.interval[1], self.unit)}]"
        return value


@dataclass(frozen=True)
class Verdict:
    clauses: tuple[Clause, ...]
    n: int
    meta: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.clauses)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.clauses if not c.passed]

    def table_rows(self) -> list[dict]:
        return [{"clause": c.name, "target": c.target, "measured": c.measured_text(),
                 "verdict": "PASS" if c.passed else "FAIL", "note": c.note} for c in self.clauses]

    def to_dict(self) -> dict:
        return {"passed": self.passed, "failed": self.failed, "n": self.n, "meta": self.meta,
                "clauses": [{**asdict(c), "interval": list(c.interval) if c.interval else None}
                            for c in self.clauses]}


def _fmt(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value:,.0f} ms" if value >= 100 else f"{value:.2f} ms"
    if unit == "$":
        return f"${value:.6f}" if value < 1 else f"${value:,.2f}"
    if unit == "tokens":
        return f"{value:,.0f}"
    if unit == "%":
        return f"{value * 100:.1f}%"
    return f"{value:.3f}"


def _upper(name: str, limit: float | None, measured: float, unit: str, note: str = "") -> Clause | None:
    if limit is None:
        return None
    ok = not math.isnan(measured) and measured <= limit
    return Clause(name=name, target=f"<= {_fmt(limit, unit)}", measured=measured, passed=ok, unit=unit, note=note)


def judge(contract: ContractSpec, m: Measurements) -> Verdict:
    """One clause per declared contract key, in a stable order."""
    clauses: list[Clause | None] = [
        _upper("latency_p50_ms", contract.latency_p50_ms, m.latency_p50_ms, "ms"),
        _upper("latency_p95_ms", contract.latency_p95_ms, m.latency_p95_ms, "ms"),
        _upper("latency_p99_ms", contract.latency_p99_ms, m.latency_p99_ms, "ms"),
        _upper("error_rate_max", contract.error_rate_max, m.error_rate, "%"),
        _upper("cost_per_request_max", contract.cost_per_request_max, m.cost_per_request, "$", "mean"),
        _upper("tokens_per_request_max", contract.tokens_per_request_max, m.tokens_per_request, "tokens",
               f"mean; p95 {m.tokens_per_request_p95:,.0f}"),
    ]
    clauses.append(_upper("guardrail_latency_p99_ms", contract.guardrail_latency_p99_ms, m.guardrail_p99_ms,
                          "ms", "all guardrail checks on one example"))
    if contract.monthly_budget is not None and contract.expected_requests_per_day is not None:
        projected = m.projected_monthly_cost(contract.expected_requests_per_day)
        clauses.append(_upper("monthly_budget", contract.monthly_budget, projected, "$",
                              f"{contract.expected_requests_per_day:,.0f} req/day x 30 x mean cost"))
    for name, threshold in contract.eval.items():
        clauses.append(_quality(name, threshold, m))
    return Verdict(clauses=tuple(c for c in clauses if c is not None), n=m.n)


def _quality(name: str, threshold: Threshold, m: Measurements) -> Clause:
    metric, tag = split_slice_name(name)
    if tag is not None:   # `category_accuracy[non_english]`: the metric on the examples with that tag
        measured, interval, n = m.slice_metric(name)
        if metric not in m.metrics:
            return Clause(name=name, target=threshold.describe(), measured=math.nan, passed=False,
                          note=f"metric {metric!r} not computed: declare it in [eval].metrics")
        if n == 0:
            return Clause(name=name, target=threshold.describe(), measured=math.nan, passed=False,
                          note=f"no eval example is tagged {tag!r}: tag some, or remove the clause")
        return _judged(name, threshold, measured, interval, f"{n} examples tagged {tag}")
    measured = m.metrics.get(name, math.nan)
    interval = m.intervals.get(name)
    if name not in m.metrics:
        return Clause(name=name, target=threshold.describe(), measured=measured, passed=False, interval=interval,
                      note="metric not computed: declare it in [eval].metrics")
    return _judged(name, threshold, measured, interval)


def _judged(name: str, threshold: Threshold, measured: float, interval: tuple[float, float] | None,
            prefix: str = "") -> Clause:
    if threshold.basis == "point":
        judged, note = measured, ""
    else:
        judged = interval[0 if threshold.basis == "lower95" else 1] if interval else math.nan
        bound = "lower" if threshold.basis == "lower95" else "upper"
        note = (f"judged on the 95% {bound} bound {judged:.3f}" if not math.isnan(judged) else
                "no 95% interval was measured (no examples?)")
    note = "; ".join(x for x in (prefix, note) if x)
    ok = not math.isnan(judged) and threshold.holds(judged)
    return Clause(name=name, target=threshold.describe(), measured=measured, passed=ok, interval=interval, note=note)
