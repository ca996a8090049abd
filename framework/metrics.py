"""Metric functions, percentiles and bootstrap intervals: pure, no I/O.

Per-example scores are floats in [0, 1]; a run's metric is their mean, except
macro-F1 which is computed over the whole run. Quality numbers come with a
95% percentile-bootstrap interval, because 200 examples leave real
uncertainty and a contract should not pass on noise.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


def metric_name(item: str) -> str:
    """The name a metric declaration gets in results and in [contract.eval]."""
    kind, _, arg = item.partition(":")
    return {"exact_match": f"{arg}_accuracy", "macro_f1": f"{arg}_macro_f1"}.get(kind, arg or kind)


def normalise(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip().lower()
        return {"true": True, "false": False}.get(text, text)
    return value


def exact_match(expected: Any, predicted: Any) -> float:
    return float(normalise(expected) == normalise(predicted))


def macro_f1(y_true: Sequence[Any], y_pred: Sequence[Any]) -> float:
    """Unweighted mean of per-class F1 over the classes seen in y_true (sklearn's 'macro' on those labels).

    A missing prediction (None) counts as wrong for its true class.
    """
    if not y_true:
        return 0.0
    truth = [normalise(v) for v in y_true]
    pred = [normalise(v) for v in y_pred]
    scores = []
    for label in sorted(set(truth), key=str):
        tp = sum(1 for t, p in zip(truth, pred, strict=True) if t == label and p == label)
        fp = sum(1 for t, p in zip(truth, pred, strict=True) if t != label and p == label)
        fn = sum(1 for t, p in zip(truth, pred, strict=True) if t == label and p != label)
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return sum(scores) / len(scores)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def bootstrap_interval(rows: Sequence[Any], statistic: Callable[[Sequence[Any]], float], *,
                       samples: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` over resampled rows (seeded: reproducible)."""
    if not rows:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    n = len(rows)
    estimates = sorted(statistic([rows[rng.randrange(n)] for _ in range(n)]) for _ in range(samples))
    tail = (1 - level) / 2 * 100
    return (percentile(estimates, tail), percentile(estimates, 100 - tail))


@dataclass
class Measurements:
    """Everything a contract can be judged on, measured over one run."""

    n: int
    metrics: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    error_rate: float
    tokens_per_request: float
    tokens_per_request_p95: float
    cost_per_request: float

    def projected_monthly_cost(self, requests_per_day: float) -> float:
        return self.cost_per_request * requests_per_day * 30

    def to_dict(self) -> dict:
        return {**self.__dict__, "intervals": {k: list(v) for k, v in self.intervals.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> Measurements:
        data = dict(data)
        data["intervals"] = {k: tuple(v) for k, v in data.get("intervals", {}).items()}
        return cls(**data)


def measure(records: Sequence[dict], metric_items: Sequence[str], *, bootstrap_samples: int = 1000,
            seed: int = 0) -> Measurements:
    """Aggregate per-example records (see evaluate.score_example) into `Measurements`."""
    metrics: dict[str, float] = {}
    intervals: dict[str, tuple[float, float]] = {}
    for item in metric_items:
        name = metric_name(item)
        kind, _, field = item.partition(":")
        if kind == "macro_f1":
            pairs = [(r["expected"].get(field), (r["output"] or {}).get(field)) for r in records]

            def stat(rows, _f=macro_f1):
                return _f([t for t, _ in rows], [p for _, p in rows])
        else:
            pairs = [r["scores"].get(name, 0.0) for r in records]

            def stat(rows):
                return sum(rows) / len(rows) if rows else math.nan
        metrics[name] = stat(pairs)
        intervals[name] = bootstrap_interval(pairs, stat, samples=bootstrap_samples, seed=seed)
    latencies = [r["latency_ms"] for r in records]
    tokens = [r["tokens_in"] + r["tokens_out"] for r in records]
    n = len(records)
    return Measurements(
        n=n, metrics=metrics, intervals=intervals,
        latency_p50_ms=percentile(latencies, 50), latency_p95_ms=percentile(latencies, 95),
        latency_p99_ms=percentile(latencies, 99),
        error_rate=sum(1 for r in records if r["error"]) / n if n else math.nan,
        tokens_per_request=sum(tokens) / n if n else math.nan,
        tokens_per_request_p95=percentile(tokens, 95),
        cost_per_request=sum(r["cost"] for r in records) / n if n else math.nan,
    )
