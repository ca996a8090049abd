"""Metric functions, percentiles and bootstrap intervals: pure, no I/O.

Per-example scores are floats in [0, 1]; a run's metric is their mean, except
macro-F1 which is computed over the whole run. Quality numbers come with a
95% percentile-bootstrap interval, because 200 examples leave real
uncertainty and a contract should not pass on noise.

Tokens and cost count what the model did (framework/lm.py `CallStats`): a
request's prompt tokens are *cached* (their KV state reused from the previous
call, no compute) or *new* (evaluated, including the JSON skeleton the
framework forces), and its *generated* tokens are those sampled one by one.
`request_cost` is the one cost formula:

    cost = (new × price_per_1k_input + cached × price_per_1k_cached_input
            + generated × price_per_1k_output) / 1000

`price_per_1k_cached_input` defaults to 0: a cached prefix is free.
`tokens_per_request` is new + generated (what the model evaluated and
generated); cached tokens are reported beside it, not in it.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from framework.spec import ModelSpec


def request_cost(model: ModelSpec, new: int, cached: int, generated: int) -> float:
    """Cost of one request from its token counts (see the module docstring), in the prices' currency."""
    return (new * model.price_per_1k_input + cached * model.price_per_1k_cached_input
            + generated * model.price_per_1k_output) / 1000


def metric_name(item: str) -> str:
    """The name a metric declaration gets in results and in [contract.eval]."""
    kind, _, arg = item.partition(":")
    return {"exact_match": f"{arg}_accuracy", "macro_f1": f"{arg}_macro_f1"}.get(kind, arg or kind)


_SLICE_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\[([A-Za-z0-9_.-]+)\]$")


def split_slice_name(name: str) -> tuple[str, str | None]:
    """`category_accuracy[non_english]` → ("category_accuracy", "non_english"); a plain name → (name, None)."""
    found = _SLICE_RE.match(name)
    return (found.group(1), found.group(2)) if found else (name, None)


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
    tp: dict[Any, int] = {}
    fp: dict[Any, int] = {}
    fn: dict[Any, int] = {}
    for t, p in zip(y_true, y_pred, strict=True):  # one pass: the review's resampling calls this thousands of times
        t, p = normalise(t), normalise(p)
        if t == p:
            tp[t] = tp.get(t, 0) + 1
        else:
            fn[t] = fn.get(t, 0) + 1
            fp[p] = fp.get(p, 0) + 1
    labels = set(tp) | set(fn)
    scores = [2 * tp.get(c, 0) / (2 * tp.get(c, 0) + fp.get(c, 0) + fn.get(c, 0)) for c in labels]
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


@dataclass(frozen=True)
class PairedDelta:
    """One metric compared on the same examples under two builds (new − old)."""

    n: int
    old: float
    new: float
    delta: float
    interval: tuple[float, float]  # percentile-bootstrap interval of delta, pairs resampled together
    p_value: float                 # paired permutation test of "no difference"
    level: float = 0.95

    @property
    def significant(self) -> bool:
        return self.p_value < 1 - self.level

    def to_dict(self) -> dict:
        return {**self.__dict__, "interval": list(self.interval), "significant": self.significant}


def paired_delta(old_rows: Sequence[Any], new_rows: Sequence[Any],
                 statistic: Callable[[Sequence[Any]], float] | None = None, *, samples: int = 1000,
                 level: float = 0.95, seed: int = 0) -> PairedDelta:
    """Did the metric move, beyond what re-drawing the same examples would do?

    Rows are aligned: `old_rows[i]` and `new_rows[i]` are one example under both builds. Pairing
    matters: most examples get the same answer from both builds, so the delta's noise is far
    smaller than either run's own interval suggests. The interval resamples examples (keeping
    each pair together); the p-value swaps old/new within randomly chosen pairs, which under
    "no difference" leaves the statistic's distribution unchanged (so identical runs give p = 1).
    `statistic` defaults to the mean of per-example scores; pass e.g. macro-F1 over
    (expected, predicted) rows for run-level metrics.
    """
    import numpy as np

    if len(old_rows) != len(new_rows):
        raise ValueError(f"paired rows differ in length: {len(old_rows)} vs {len(new_rows)}")
    n = len(old_rows)
    if n == 0:
        return PairedDelta(0, math.nan, math.nan, math.nan, (math.nan, math.nan), 1.0, level)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=(samples, n))
    swaps = rng.random((samples, n)) < 0.5
    if statistic is None:
        old = np.asarray(old_rows, dtype=float)
        new = np.asarray(new_rows, dtype=float)
        observed_old, observed_new = float(old.mean()), float(new.mean())
        boot = new[picks].mean(axis=1) - old[picks].mean(axis=1)
        diff = new - old
        perm = np.where(swaps, -diff, diff).mean(axis=1)
    else:
        observed_old, observed_new = statistic(old_rows), statistic(new_rows)
        boot = np.array([statistic([new_rows[i] for i in row]) - statistic([old_rows[i] for i in row])
                         for row in picks])
        perm = np.array([statistic([o if s else w for o, w, s in zip(old_rows, new_rows, swap, strict=True)])
                         - statistic([w if s else o for o, w, s in zip(old_rows, new_rows, swap, strict=True)])
                         for swap in swaps])
    observed = observed_new - observed_old
    tail = (1 - level) / 2 * 100
    interval = (float(np.percentile(boot, tail)), float(np.percentile(boot, 100 - tail)))
    # Ties count as "as extreme" (with a float tolerance), so no difference at all gives p = 1.
    extreme = int(np.sum(np.abs(perm) >= abs(observed) - 1e-12))
    return PairedDelta(n, observed_old, observed_new, observed, interval, (extreme + 1) / (samples + 1), level)


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
    tokens_per_request: float        # mean new prompt + generated tokens (what the model evaluated and generated)
    tokens_per_request_p95: float
    cost_per_request: float
    tokens_cached_per_request: float = 0.0  # mean prompt tokens reused from the KV cache (not in the above)
    guardrail_p99_ms: float = math.nan      # p99 of the time all guardrail checks took on one example
    blocked_rate: float = 0.0               # examples refused by a guardrail (answered 4xx when served)
    # per tag: {"n", "metrics", "intervals"} (framework.metrics.slices); empty when no example has a tag
    slices: dict[str, dict[str, Any]] = field(default_factory=dict)
    confusion: dict[str, dict] = field(default_factory=dict)   # closed-set field → expected → predicted → n
    routing: dict[str, Any] = field(default_factory=dict)      # a tiered pipeline's per-tier figures (routing.summary)

    def projected_monthly_cost(self, requests_per_day: float) -> float:
        return self.cost_per_request * requests_per_day * 30

    def to_dict(self) -> dict:
        return {**self.__dict__, "intervals": {k: list(v) for k, v in self.intervals.items()},
                "slices": {tag: {**s, "intervals": {k: list(v) for k, v in s["intervals"].items()}}
                           for tag, s in self.slices.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> Measurements:
        data = dict(data)
        data["intervals"] = {k: tuple(v) for k, v in data.get("intervals", {}).items()}
        data["slices"] = {tag: {**s, "intervals": {k: tuple(v) for k, v in s["intervals"].items()}}
                          for tag, s in (data.get("slices") or {}).items()}
        return cls(**data)

    def slice_metric(self, name: str) -> tuple[float, tuple[float, float] | None, int]:
        """`metric[tag]` → (value, interval, n); NaN and n = 0 when no example carries the tag."""
        metric, tag = split_slice_name(name)
        found = self.slices.get(tag or "")
        if found is None or metric not in found["metrics"]:
            return math.nan, None, 0
        return found["metrics"][metric], found["intervals"].get(metric), found["n"]


UNTAGGED = "untagged"   # the slice of examples that carry no tag, so tag slices + it cover every example


def quality(records: Sequence[dict], metric_items: Sequence[str], *, bootstrap_samples: int = 1000,
            seed: int = 0) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """Each declared metric over `records`, with its 95% bootstrap interval."""
    metrics: dict[str, float] = {}
    intervals: dict[str, tuple[float, float]] = {}
    for item in metric_items:
        name = metric_name(item)
        kind, _, key = item.partition(":")
        if kind == "macro_f1":
            pairs = [(r["expected"].get(key), (r["output"] or {}).get(key)) for r in records]

            def stat(rows, _f=macro_f1):
                return _f([t for t, _ in rows], [p for _, p in rows])
        else:
            pairs = [r["scores"].get(name, 0.0) for r in records]

            def stat(rows):
                return sum(rows) / len(rows) if rows else math.nan
        metrics[name] = stat(pairs) if pairs else math.nan
        intervals[name] = bootstrap_interval(pairs, stat, samples=bootstrap_samples, seed=seed)
    return metrics, intervals


def slice_tags(record: dict) -> tuple[str, ...]:
    """The slices an example belongs to: its tags, or `untagged`."""
    return tuple(record.get("tags") or ()) or (UNTAGGED,)


def slices(records: Sequence[dict], metric_items: Sequence[str], *, bootstrap_samples: int = 1000,
           seed: int = 0) -> dict[str, dict[str, Any]]:
    """Every metric per tag (an example with two tags counts in both), with intervals.

    The overall figure hides where a pipeline fails: 0.65 overall can be 0.9 on English tickets and 0.3
    on the non-English third. Intervals matter more here than overall: a slice of 10 examples moves by
    0.1 per example, and a reader (or a contract clause `@ lower95`) must see that.
    """
    groups: dict[str, list[dict]] = {}
    for record in records:
        for tag in slice_tags(record):
            groups.setdefault(tag, []).append(record)
    out = {}
    for tag in sorted(groups):
        metrics, intervals = quality(groups[tag], metric_items, bootstrap_samples=bootstrap_samples, seed=seed)
        out[tag] = {"n": len(groups[tag]), "metrics": metrics, "intervals": intervals}
    return out


NONE_LABEL = "(no answer)"
# A routed run's share of requests escalated past tier 1, among its metrics (Wilson 95% interval), so a
# contract can bound it: [contract.eval] escalated_share = "<= 0.4 @ upper95".
ROUTING_METRIC = "escalated_share"


def closed_set_fields(metric_items: Sequence[str]) -> list[str]:
    """Fields scored by label (exact_match / macro_f1): the ones a confusion matrix explains."""
    fields: list[str] = []
    for item in metric_items:
        kind, _, key = item.partition(":")
        if kind in ("exact_match", "macro_f1") and key not in fields:
            fields.append(key)
    return fields


def _label(value: Any) -> str:
    value = normalise(value)
    return NONE_LABEL if value is None else str(value).lower()


def confusion(records: Sequence[dict], fields: Sequence[str], *, max_labels: int = 20) -> dict[str, dict]:
    """{field: {expected label: {predicted label: count}}} for each closed-set field.

    A field with more than `max_labels` distinct expected values is free text, not a label: skipped.
    """
    out: dict[str, dict] = {}
    for key in fields:
        matrix: dict[str, dict[str, int]] = {}
        for r in records:
            row = matrix.setdefault(_label(r["expected"].get(key)), {})
            predicted = _label((r["output"] or {}).get(key))
            row[predicted] = row.get(predicted, 0) + 1
        if 0 < len(matrix) <= max_labels:
            out[key] = {k: dict(sorted(v.items())) for k, v in sorted(matrix.items())}
    return out


def measure(records: Sequence[dict], metric_items: Sequence[str], *, bootstrap_samples: int = 1000,
            seed: int = 0) -> Measurements:
    """Aggregate per-example records (see evaluate.score_example) into `Measurements`."""
    metrics, intervals = quality(records, metric_items, bootstrap_samples=bootstrap_samples, seed=seed)
    routed: dict[str, Any] = {}
    if any(r.get("routing") for r in records):   # a tiered pipeline: per-tier figures, the share escalated
        from framework.routing import summary

        routed = summary(records, metric_items, bootstrap_samples=bootstrap_samples, seed=seed)
        metrics[ROUTING_METRIC] = routed["escalated_share"]
        intervals[ROUTING_METRIC] = tuple(routed["escalated_interval"])
    latencies = [r["latency_ms"] for r in records]
    # tokens_in counts the whole prompt; a record without tokens_cached (older stores) had none measured
    cached = [r.get("tokens_cached") or 0 for r in records]
    tokens = [r["tokens_in"] - c + r["tokens_out"] for r, c in zip(records, cached, strict=True)]
    n = len(records)
    return Measurements(
        n=n, metrics=metrics, intervals=intervals,
        latency_p50_ms=percentile(latencies, 50), latency_p95_ms=percentile(latencies, 95),
        latency_p99_ms=percentile(latencies, 99),
        error_rate=sum(1 for r in records if r["error"]) / n if n else math.nan,
        tokens_per_request=sum(tokens) / n if n else math.nan,
        tokens_per_request_p95=percentile(tokens, 95),
        cost_per_request=sum(r["cost"] for r in records) / n if n else math.nan,
        tokens_cached_per_request=sum(cached) / n if n else math.nan,
        guardrail_p99_ms=percentile([sum(d.get("ms", 0.0) for d in r.get("guardrails") or ()) for r in records],
                                    99) if any(r.get("guardrails") for r in records) else math.nan,
        blocked_rate=sum(1 for r in records if r.get("blocked")) / n if n else math.nan,
        slices=slices(records, metric_items, bootstrap_samples=bootstrap_samples, seed=seed)
        if any(r.get("tags") for r in records) else {},
        confusion=confusion(records, closed_set_fields(metric_items)),
        routing=routed,
    )
