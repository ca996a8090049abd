"""Served traces → the same contract's SLO and cost clauses, judged live over a window.

`slipway check` judges the contract once, offline, on the eval split; this judges the clauses that
served traffic can measure (latency percentiles, error rate, tokens and cost per request, the
monthly budget) on what the service actually answered, with `framework.contract.judge`, so "p95"
means the same thing in both places. Quality clauses need labels, which traffic does not have; they
are listed as offline-only (feedback and `slipway harvest` bring labels back into the eval set).

Error-budget burn says how fast each clause's allowance is being spent: 1.0 is exactly the rate the
contract allows (error_rate_max errors; 5% of requests over the p95 target; 1% over the p99 target;
the monthly budget spread evenly over 30 days), 2.0 spends it twice as fast.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from framework.contract import Clause, judge
from framework.metrics import Measurements
from framework.spec import Project

# Share of answered requests each latency clause allows over its target.
ALLOWED_SLOW = {"latency_p50_ms": 0.50, "latency_p95_ms": 0.05, "latency_p99_ms": 0.01}
LIVE_CLAUSES = ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "error_rate_max", "cost_per_request_max",
                "tokens_per_request_max", "monthly_budget")


@dataclass(frozen=True)
class LiveClause:
    clause: Clause
    burn_rate: float | None       # allowance spent per unit of allowance the contract gives; None: no budget
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self.clause), "interval": None, "burn_rate": self.burn_rate,
                "verdict": "PASS" if self.clause.passed else "FAIL", "live_note": self.note}


@dataclass
class SloReport:
    project: str
    window: timedelta
    since: datetime
    until: datetime
    channel: str | None
    version: str | None
    figures: dict[str, Any]
    clauses: list[LiveClause] = field(default_factory=list)
    offline_only: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return int(self.figures.get("n") or 0)

    @property
    def passed(self) -> bool:
        return all(c.clause.passed for c in self.clauses)

    @property
    def breached(self) -> list[str]:
        return [c.clause.name for c in self.clauses if not c.clause.passed]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: a figure that could not be measured (NaN) or an infinite burn is null."""
        return _finite({"project": self.project, "window_s": self.window.total_seconds(),
                "since": self.since.isoformat(),
                "until": self.until.isoformat(), "channel": self.channel, "version": self.version,
                "n": self.n, "passed": self.passed, "breached": self.breached,
                "figures": {k: v.isoformat() if isinstance(v, datetime) else v for k, v in self.figures.items()},
                "clauses": [c.to_dict() for c in self.clauses], "offline_only": self.offline_only})


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _nan(value) -> float:
    return math.nan if value is None else float(value)


def slo(project: Project, window: timedelta, *, channel: str | None = None, version: str | None = None,
        store=None, now: datetime | None = None, ingest: bool = True) -> SloReport:
    """Judge the contract's live clauses on traces of the last `window` (ingesting new segments first)."""
    from framework import traces
    from framework.evaluate import store_path
    from framework.store import Store

    if store is None:
        if ingest:
            traces.ingest(project)
        with Store(store_path(project), read_only=True) as opened:
            return slo(project, window, channel=channel, version=version, store=opened, now=now, ingest=False)
    until = now or traces.utc_now()
    since = until - window
    contract = project.spec.contract
    targets = {name: getattr(contract, name) for name in ALLOWED_SLOW if getattr(contract, name) is not None}
    figures = store.slo_figures(since=since, channel=channel, version=version, latency_targets=targets)
    report = SloReport(project=project.name, window=window, since=since, until=until, channel=channel,
                       version=version, figures=figures, offline_only=sorted(contract.eval))
    n, answered = int(figures["n"] or 0), int(figures["answered"] or 0)
    if n == 0:
        return report
    error_rate = figures["errors"] / n
    measured = Measurements(
        n=n, metrics={}, intervals={}, latency_p50_ms=_nan(figures["p50"]), latency_p95_ms=_nan(figures["p95"]),
        latency_p99_ms=_nan(figures["p99"]), error_rate=error_rate, tokens_per_request=_nan(figures["tokens"]),
        tokens_per_request_p95=_nan(figures["tokens_p95"]), cost_per_request=_nan(figures["cost"]),
        tokens_cached_per_request=_nan(figures["tokens_cached"]), guardrail_p99_ms=_nan(figures["guardrail_p99"]))
    verdict = judge(contract.model_copy(update={"eval": {}}), measured)
    for clause in verdict.clauses:
        if clause.name == "guardrail_latency_p99_ms" and math.isnan(clause.measured):
            continue   # traces of a version without guardrails carry no decisions: nothing to judge
        burn, note = None, ""
        if clause.name in ALLOWED_SLOW and answered:
            slow = figures[f"slow.{clause.name}"] / answered
            burn = slow / ALLOWED_SLOW[clause.name]
            note = f"{slow:.1%} of {answered} answered requests over target"
        elif clause.name == "error_rate_max":
            burn = error_rate / contract.error_rate_max if contract.error_rate_max else (
                math.inf if error_rate else 0.0)
            note = f"{figures['errors']} of {n} requests failed (5xx)"
        elif clause.name == "monthly_budget":
            # Live: what the window's actual spend would come to over 30 days, not the offline projection.
            spent = float(figures["spent"] or 0.0)
            monthly = spent * (timedelta(days=30) / window)
            ok = monthly <= contract.monthly_budget
            clause = Clause(name=clause.name, target=clause.target, measured=monthly, passed=ok, unit="$",
                            note=f"spent ${spent:.6f} in the window, x {timedelta(days=30) / window:,.0f} for 30 days")
            burn = monthly / contract.monthly_budget if contract.monthly_budget else None
        if clause.name == "latency_p99_ms" and answered < 100:
            note += f"; p99 of {answered} requests is a rough estimate"
        report.clauses.append(LiveClause(clause=clause, burn_rate=burn, note=note.lstrip("; ")))
    return report
