"""Model tiers with escalation: answer on the cheapest model that answers well enough.

`[pipeline] tiers` lists model keys cheapest first, ending on `pipeline.model`. A request runs on tier 1;
its answer is *escalated* to the next tier when (in this order, each only when `[routing] escalate_on`
names it):

- `invalid`: the program raised, or a model call's raw output failed its response schema;
- `rule`: an output guardrail (a business rule or the blocklist) fired with action `block` or `human`:
  the model contradicted a rule the business wrote down, which a stronger model may not (`flag` only
  reports, so it does not escalate; input guardrails ran once, before routing, and see no model);
- `confidence`: the answer's confidence (framework/confidence.py: the lowest probability the model gave
  any of its chosen enum/boolean values, among the allowed values) is under `min_confidence`. An answer
  with no closed-set value measured (no enum or boolean field, or no skeleton decoding) has no
  confidence, and this reason does not apply to it.

The last tier is the reference the bar was calibrated against, so only `invalid` fails it: then the
request is *exhausted* (code `tiers-exhausted`; the service's `[fallback]` answers it, framework/fallback.py
maps the code to `exhausted`). A rule that fires on the last tier acts as declared, as in an unrouted
pipeline (`human` answers with `human_field` set, `block` refuses), and a low confidence there is recorded,
not acted on. A timeout is never escalated: the deadline covers the whole request, so it propagates.

`route` runs one request; every attempt keeps its calls, tokens, latency and cost priced with its own
tier's prices. `summary` turns routed eval records into per-tier figures for the check report, and
`calibrate` scores candidate bars on the dev split. Everything but `route`, `attempt` and `calibrate`
is pure.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from framework.metrics import metric_name, percentile, quality, request_cost

if TYPE_CHECKING:
    from framework.guardrails import Blocked, Decision, Guard
    from framework.lm import CallStats
    from framework.spec import ModelSpec, Project, RoutingSpec

EXHAUSTED = "tiers-exhausted"       # the error code of a request no tier could answer
ESCALATING_ACTIONS = ("block", "human")
DEFAULT_BARS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99)


@dataclass(frozen=True)
class Tier:
    """One rung: the model key, its `dspy.LM` (framework/lm.py `make_lm`, or a test's fake) and its spec,
    whose prices cost the tier's calls."""

    key: str
    lm: Any
    model: ModelSpec


@dataclass
class Attempt:
    """One tier's try at one request: its answer after the output guardrails, or its error."""

    tier: str
    index: int                          # 0-based position in the tiers
    output: dict[str, Any] | None       # the answer's fields (None: it raised, or an output check blocked it)
    error: str | None
    calls: list[CallStats]
    decisions: list[Decision]           # this answer's output guardrail decisions
    blocked: Blocked | None
    latency_ms: float
    cost: float
    prediction: Any = None
    reason: str | None = None           # why it was not kept: invalid | rule | confidence; None: kept
    detail: str = ""

    @property
    def confidence(self) -> float | None:
        return answer_confidence(self.calls)

    @property
    def tokens_in_new(self) -> int:
        return sum(c.tokens_in_new for c in self.calls)

    @property
    def tokens_in_cached(self) -> int:
        return sum(c.tokens_in_cached for c in self.calls)

    @property
    def tokens_out(self) -> int:
        return sum(c.tokens_out for c in self.calls)

    def to_dict(self) -> dict[str, Any]:
        """The stored form (results.routing.attempts[]): figures and the decision, never text."""
        return {"tier": self.tier, "index": self.index, "reason": self.reason, "detail": self.detail[:300],
                "confidence": self.confidence, "latency_ms": self.latency_ms,
                "tokens_in": self.tokens_in_new + self.tokens_in_cached, "tokens_cached": self.tokens_in_cached,
                "tokens_out": self.tokens_out, "cost": self.cost, "error": self.error}


@dataclass
class Routed:
    """A routed request: every attempt in order and how it ended (`answered` or `exhausted`)."""

    outcome: str
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def answer(self) -> Attempt | None:
        """The attempt whose answer the request gets (None when exhausted)."""
        return self.attempts[-1] if self.outcome == "answered" and self.attempts else None

    @property
    def tier(self) -> str | None:
        return self.answer.tier if self.answer else None

    @property
    def escalated(self) -> bool:
        return len(self.attempts) > 1

    @property
    def calls(self) -> list[CallStats]:
        return [c for a in self.attempts for c in a.calls]

    @property
    def cost(self) -> float:
        return sum(a.cost for a in self.attempts)

    @property
    def error(self) -> str | None:
        """For an exhausted request, `tiers-exhausted: …` with the last tier's reason; else None."""
        if self.outcome != "exhausted":
            return None
        last = self.attempts[-1]
        return f"{EXHAUSTED}: every tier failed ({len(self.attempts)} tried); last, {last.tier}: {last.detail}"

    def raise_if_exhausted(self) -> None:
        """Raise `TiersExhausted` (code `tiers-exhausted`) for an exhausted request: the service's error path,
        where `[fallback]` maps the code to the failure `exhausted`."""
        if self.outcome == "exhausted":
            from framework.errors import TiersExhausted

            raise TiersExhausted(self.error or EXHAUSTED, field="pipeline.tiers",
                                 hint="see the request's routing attempts; declare [fallback] on = [\"exhausted\"] "
                                      "to answer such requests")

    def to_dict(self) -> dict[str, Any]:
        answer = self.answer
        return {"outcome": self.outcome, "tier": answer.tier if answer else None,
                "tier_index": answer.index if answer else None,
                "escalations": [{"tier": a.tier, "reason": a.reason, "detail": a.detail[:300]}
                                for a in self.attempts if a.reason],
                "attempts": [a.to_dict() for a in self.attempts]}


# -- decisions: pure ---------------------------------------------------------------------------------------

def answer_confidence(calls: Iterable[CallStats]) -> float | None:
    """The lowest closed-set value probability over every call of an answer; None when none was measured."""
    values = [v for c in calls for v in (c.confidence or {}).values()]
    return min(values) if values else None


def invalid(attempt: Attempt) -> str | None:
    """Why the attempt's output failed validation (it raised, or a call's raw output broke its schema)."""
    if attempt.error is not None:
        return attempt.error
    for call in attempt.calls:
        if call.raw_valid is False:
            return "; ".join((call.format_problems or [])[:3])
    return None


def rule_fired(decisions: Iterable[Decision]) -> str | None:
    """The output checks that fired with an escalating action, as `rule:name=human, blocklist=block`."""
    fired = [f"{d.check}={d.action}" for d in decisions if d.stage == "output" and d.action in ESCALATING_ACTIONS]
    return ", ".join(fired) or None


def judge(attempt: Attempt, routing: RoutingSpec, *, last: bool) -> tuple[str | None, str]:
    """(reason, detail) why `attempt` is not kept, or (None, "") when it is. On the last tier only
    `invalid` counts (see the module doc). The reasons are tried in the order invalid, rule, confidence."""
    reasons = routing.escalate_on
    problem = invalid(attempt)
    if "invalid" in reasons and problem is not None:
        return "invalid", problem
    if last:
        return None, ""
    fired = rule_fired(attempt.decisions)
    if "rule" in reasons and fired is not None:
        return "rule", fired
    score = attempt.confidence
    if "confidence" in reasons and routing.min_confidence is not None and score is not None \
            and score < routing.min_confidence:
        return "confidence", f"confidence {score:.3f} < min_confidence {routing.min_confidence:g}"
    return None, ""


# -- running a request ------------------------------------------------------------------------------------

def attempt(program, inputs: dict[str, Any], tier: Tier, index: int, *, guard: Guard, outputs: Sequence[str],
            adapter=None, earlier: Sequence[Decision] = ()) -> Attempt:
    """Run the program on one tier and its answer through the output guardrails (`earlier`: the input
    decisions, so an input `human` still sets `human_field`). A `ModelTimeout` propagates."""
    import dspy

    from framework.errors import ModelTimeout
    from framework.lm import metering, root_cause

    error = prediction = output = blocked = None
    decisions: list = []
    settings = {"lm": tier.lm, **({"adapter": adapter} if adapter is not None else {})}
    with metering() as calls:
        start = time.perf_counter()
        try:
            with dspy.context(**settings):
                prediction = program(**inputs)
            checked = guard.check_output({name: prediction.get(name) for name in outputs}, earlier)
            decisions, blocked = checked.decisions, checked.blocked
            output = checked.values if blocked is None else None
        except Exception as exc:  # noqa: BLE001 - a failing tier is a reason to escalate, not a crash
            if isinstance(root_cause(exc), ModelTimeout):
                raise
            error = f"{type(exc).__name__}: {str(exc)[:500]}"
        latency_ms = (time.perf_counter() - start) * 1000
    new, cached = sum(c.tokens_in_new for c in calls), sum(c.tokens_in_cached for c in calls)
    return Attempt(tier=tier.key, index=index, output=output, error=error, calls=list(calls), decisions=decisions,
                   blocked=blocked, latency_ms=latency_ms, prediction=prediction,
                   cost=request_cost(tier.model, new, cached, sum(c.tokens_out for c in calls)))


def route(program, inputs: dict[str, Any], tiers: Sequence[Tier], routing: RoutingSpec, *, guard: Guard,
          outputs: Sequence[str], adapter=None, earlier: Sequence[Decision] = ()) -> Routed:
    """Answer one request (inputs already through the input guardrails) on the cheapest tier whose
    answer `judge` keeps; `exhausted` when the last tier's output is invalid too."""
    if not tiers:
        raise ValueError("route needs at least one tier")
    routed = Routed(outcome="exhausted")
    for index, tier in enumerate(tiers):
        tried = attempt(program, inputs, tier, index, guard=guard, outputs=outputs, adapter=adapter,
                        earlier=earlier)
        tried.reason, tried.detail = judge(tried, routing, last=index == len(tiers) - 1)
        routed.attempts.append(tried)
        if tried.reason is None:
            routed.outcome = "answered"
            break
    return routed


def tiers_for(project: Project, *, gpu_layers: int | None = None) -> list[Tier]:
    """The project's tiers with their models loaded (each verified GGUF once per process)."""
    from framework.evaluate import language_model

    return [Tier(key, language_model(project, key, gpu_layers=gpu_layers), project.model(key))
            for key in project.tier_keys]


# -- figures for the report: pure --------------------------------------------------------------------------

def wilson(successes: int, n: int) -> tuple[float, float]:
    from framework.guardrails import wilson as interval

    return interval(successes, n)


def summary(records: Sequence[dict], metric_items: Sequence[str], *, bootstrap_samples: int = 1000,
            seed: int = 0) -> dict[str, Any]:
    """Per-tier and overall routing figures of routed eval records (each with `routing`, see `Routed.to_dict`).

    Per tier: `attempts` (requests it ran), `answered` (requests whose answer it gave), the reasons it
    escalated, its attempts' latency p50/p95, tokens and cost per attempt, and each quality metric over
    the requests it answered (with intervals). Overall: the share escalated and exhausted (Wilson 95%).
    """
    routed = [r for r in records if r.get("routing")]
    n = len(routed)
    tiers: dict[str, dict[str, Any]] = {}
    order: list[tuple[int, str]] = []
    for record in routed:
        for a in record["routing"]["attempts"]:
            label = f"{a['index'] + 1}:{a['tier']}"
            if label not in tiers:
                tiers[label] = {"tier": a["tier"], "index": a["index"], "attempts": 0, "answered": 0,
                                "reasons": {}, "_latency": [], "_tokens": [], "_cost": [], "_records": []}
                order.append((a["index"], label))
            row = tiers[label]
            row["attempts"] += 1
            row["_latency"].append(a["latency_ms"])
            row["_tokens"].append(a["tokens_in"] - (a.get("tokens_cached") or 0) + a["tokens_out"])
            row["_cost"].append(a["cost"])
            if a["reason"]:
                row["reasons"][a["reason"]] = row["reasons"].get(a["reason"], 0) + 1
        info = record["routing"]
        if info["outcome"] == "answered":
            label = f"{info['tier_index'] + 1}:{info['tier']}"
            tiers[label]["answered"] += 1
            tiers[label]["_records"].append(record)
    out = []
    for _, label in sorted(order):
        row = tiers[label]
        answered = row.pop("_records")
        metrics, intervals = quality(answered, metric_items, bootstrap_samples=bootstrap_samples, seed=seed) \
            if answered else ({metric_name(m): math.nan for m in metric_items}, {})
        latency, tokens, cost = row.pop("_latency"), row.pop("_tokens"), row.pop("_cost")
        out.append({**row, "answered_share": row["answered"] / n if n else math.nan,
                    "latency_p50_ms": percentile(latency, 50), "latency_p95_ms": percentile(latency, 95),
                    "tokens_per_attempt": sum(tokens) / len(tokens) if tokens else math.nan,
                    "cost_per_attempt": sum(cost) / len(cost) if cost else math.nan,
                    "metrics": metrics, "intervals": {k: list(v) for k, v in intervals.items()}})
    escalated = sum(1 for r in routed if len(r["routing"]["attempts"]) > 1)
    exhausted = sum(1 for r in routed if r["routing"]["outcome"] == "exhausted")
    return {"n": n, "tiers": out, "escalated": escalated, "escalated_share": escalated / n if n else math.nan,
            "escalated_interval": list(wilson(escalated, n)), "exhausted": exhausted,
            "exhausted_share": exhausted / n if n else math.nan, "exhausted_interval": list(wilson(exhausted, n))}


# -- calibration ---------------------------------------------------------------------------------------------

@dataclass
class Calibration:
    """Candidate bars for `[routing] min_confidence`, scored on the dev split (see `calibrate`)."""

    metric: str
    n: int
    first: str                      # tier 1's model key
    top: str                        # the last tier's model key
    top_value: float                # the metric on the top tier's dev answers
    rows: list[dict[str, Any]]      # one per bar: escalated share, kept n, kept metric, routed estimate
    recommended: float | None       # the lowest bar meeting the rule; None: none does
    rule: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def bar_table(first: Sequence[dict], top: Sequence[dict], metric: str, bars: Sequence[float],
              routing: RoutingSpec) -> list[dict[str, Any]]:
    """For each bar, what routing with it would have done on these examples: tier-1 records `first` (each with
    `confidence`, `scores`, `error`, `guardrails`) beside the top tier's `top` on the same examples in the
    same order. The routed estimate sends every escalation straight to the top tier."""
    rows = []
    for bar in bars:
        spec = routing.model_copy(update={"min_confidence": bar})
        kept, routed_scores, routed_cost = [], [], []
        for low, high in zip(first, top, strict=True):
            escalates = _escalates(low, spec)
            if not escalates:
                kept.append(low["scores"].get(metric, 0.0))
            chosen = high if escalates else low
            routed_scores.append(chosen["scores"].get(metric, 0.0))
            routed_cost.append(low["cost"] + (high["cost"] if escalates else 0.0))
        n = len(first)
        rows.append({"bar": bar, "escalated_share": (n - len(kept)) / n if n else math.nan, "kept": len(kept),
                     "kept_value": sum(kept) / len(kept) if kept else math.nan,
                     "routed_value": sum(routed_scores) / n if n else math.nan,
                     "routed_cost": sum(routed_cost) / n if n else math.nan})
    return rows


def _escalates(record: dict, routing: RoutingSpec) -> bool:
    """Would `judge` escalate this tier-1 eval record (an unrouted record: error, calls' validity as
    format_validity, guardrail decisions, confidence)?"""
    reasons = routing.escalate_on
    if "invalid" in reasons and (record["error"] or record.get("raw_valid") is False):
        return True
    if "rule" in reasons and any(d.get("stage") == "output" and d.get("action") in ESCALATING_ACTIONS
                                 for d in record.get("guardrails") or ()):
        return True
    score = record.get("confidence")
    return ("confidence" in reasons and routing.min_confidence is not None and score is not None
            and score < routing.min_confidence)


def recommend(rows: Sequence[dict], top_value: float) -> float | None:
    """The lowest bar whose kept tier-1 answers score at least the top tier's (and keep some)."""
    for row in sorted(rows, key=lambda r: r["bar"]):
        if row["kept"] and row["kept_value"] >= top_value:
            return row["bar"]
    return None


def default_metric(project: Project) -> str:
    """The first exact_match metric the project declares (category_accuracy in the demo)."""
    for item in project.spec.eval.metrics:
        if item.startswith("exact_match:"):
            return metric_name(item)
    return metric_name(project.spec.eval.metrics[0])


def calibrate(project: Project, *, limit: int | None = None, metric: str | None = None,
              bars: Sequence[float] = DEFAULT_BARS, progress: Callable[[int, int], None] | None = None
              ) -> Calibration:
    """Run tier 1 and the top tier, unrouted, on the dev split (never eval: a bar tuned on eval would make
    the check judge its own training data), and score each candidate bar. Records nothing, writes nothing:
    a person copies the recommended bar into `[routing] min_confidence`."""
    from framework.errors import SpecError
    from framework.evaluate import run_eval

    keys = project.tier_keys
    if len(keys) < 2:
        raise SpecError("calibrate needs a tiered pipeline", path=str(project.toml_path), field="pipeline.tiers",
                        hint='set [pipeline] tiers = ["<cheap model>", "<pipeline.model>"]')
    metric = metric or default_metric(project)
    runs = [run_eval(project, split="dev", limit=limit, model_key=key, record=False, routed=False,
                     progress=progress) for key in (keys[0], keys[-1])]
    first, top = runs[0].records, runs[1].records
    per_example = sorted({name for r in first for name in r["scores"]})
    if metric not in per_example:
        raise SpecError(f"no per-example metric {metric!r}; scored per example: {', '.join(per_example)}",
                        field="eval.metrics", path=str(project.toml_path),
                        hint="pass an exact_match or notebook metric (macro-F1 is a whole-run figure)")
    top_value = runs[1].metrics[metric]
    rows = bar_table(first, top, metric, sorted(set(bars)), project.routing)
    rule = (f"the lowest bar at which tier 1's kept answers score {metric} >= the top tier's on the same dev "
            f"examples ({top_value:.3f})")
    return Calibration(metric=metric, n=len(first), first=keys[0], top=keys[-1], top_value=top_value, rows=rows,
                       recommended=recommend(rows, top_value), rule=rule)
