"""Model tiers with escalation (issue 16): framework/routing.py.

Unit tests run the real `route` over named fake tiers: `FakeTierEngine` answers fixed raw text through
`lm.respond` (as the real engine ends every call) with the confidence a real engine would have measured,
or raises. The real-path tests run the tiny GGUF as both tiers, with a bar no answer can clear.
"""

from __future__ import annotations

import json
import math
from typing import Literal

import dspy
import pytest

from framework.dataset import Example
from framework.errors import ModelTimeout
from framework.evaluate import _run_routed
from framework.guardrails import Guard
from framework.lm import CallStats, json_adapter, respond
from framework.metrics import measure
from framework.routing import EXHAUSTED, Tier, answer_confidence, bar_table, recommend, route, summary
from framework.spec import GuardrailsSpec, ModelSpec, RoutingSpec
from tests.conftest import TINY, edit_toml

SHA = "0" * 64
OUTPUTS = ("category", "needs_human", "reason")


class Triage(dspy.Signature):
    """Triage a ticket."""

    ticket: str = dspy.InputField()
    category: Literal["billing", "bug", "abuse"] = dspy.OutputField()
    needs_human: bool = dspy.OutputField()
    reason: str = dspy.OutputField(max_length=20)


class FakeTierEngine:
    """One tier's model: answers `text` (a JSON answer, or an exception to raise) with `confidence` on its
    call stats, and counts its calls. 100 new prompt tokens and 10 generated per call."""

    supports_response_schema = True
    supports_function_calling = False
    supports_reasoning = False
    supported_params = frozenset({"response_format", "temperature", "max_tokens", "stop", "seed", "top_p"})

    def __init__(self, text: str | BaseException, confidence: dict[str, float] | None = None):
        self.text, self.confidence, self.calls = text, confidence, 0

    def complete(self, request):
        self.calls += 1
        if isinstance(self.text, BaseException):
            raise self.text
        fmt = request.config.response_format or {}
        schema = fmt.get("schema") if fmt.get("type") == "json_schema" else None
        stats = CallStats(latency_ms=1.0, tokens_in_new=100, tokens_in_cached=0, tokens_out=10, finish_reason="stop",
                          confidence=self.confidence)
        return respond("fake", self.text, stats, schema)

    def stream(self, request):
        from dspy.lm15 import response_to_events

        return response_to_events(self.complete(request))

    def close(self):
        pass


def answer(category="billing", needs_human=False, reason="double charge") -> str:
    return json.dumps({"category": category, "needs_human": needs_human, "reason": reason})


def tier(key: str, text, confidence=None, *, price_in=1.0, price_out=2.0) -> Tier:
    engine = FakeTierEngine(text, confidence)
    lm = dspy.LM(model=f"fake/{key}", engine=engine, cache=False, num_retries=0)
    model = ModelSpec(name=key, sha256=SHA, source={"path": f"{key}.gguf"}, price_per_1k_input=price_in,
                      price_per_1k_output=price_out)
    return Tier(key, lm, model)


RULE = {"name": "abuse_goes_to_a_person", "when": 'category == "abuse"', "require": "needs_human", "action": "human"}


def guard(rules=(RULE,), human_field="needs_human") -> Guard:
    spec = GuardrailsSpec(human_field=human_field, empty=None, rules=list(rules))
    return Guard(spec, text_fields=("ticket",), output_types={"category": str, "needs_human": bool, "reason": str})


def run(tiers, routing=None, rules=(RULE,)):
    return route(dspy.Predict(Triage), {"ticket": "charged twice"}, tiers, routing or RoutingSpec(min_confidence=0.6),
                 guard=guard(rules), outputs=OUTPUTS, adapter=json_adapter())


def test_a_confident_valid_answer_stays_on_the_first_tier():
    cheap, top = tier("cheap", answer(), {"category": 0.9, "needs_human": 0.8}), tier("top", answer("bug"))
    routed = run([cheap, top])
    assert routed.outcome == "answered" and routed.tier == "cheap" and not routed.escalated
    assert routed.answer.output["category"] == "billing" and routed.answer.confidence == 0.8
    assert top.lm.engine.calls == 0
    assert routed.to_dict()["escalations"] == []


def test_low_confidence_escalates_and_the_next_tier_answers():
    cheap = tier("cheap", answer(), {"category": 0.41, "needs_human": 0.95})
    top = tier("top", answer("bug"), {"category": 0.99, "needs_human": 0.99})
    routed = run([cheap, top])
    assert routed.tier == "top" and routed.answer.output["category"] == "bug"
    assert [(a.tier, a.reason) for a in routed.attempts] == [("cheap", "confidence"), ("top", None)]
    assert "0.410 < min_confidence 0.6" in routed.attempts[0].detail
    assert routed.to_dict()["escalations"] == [{"tier": "cheap", "reason": "confidence",
                                                "detail": routed.attempts[0].detail}]


def test_an_answer_without_a_measured_confidence_is_not_escalated_for_confidence():
    routed = run([tier("cheap", answer(), None), tier("top", answer("bug"))])
    assert routed.tier == "cheap"


def test_confidence_escalates_only_when_escalate_on_names_it():
    cheap = tier("cheap", answer(), {"category": 0.1})
    routed = run([cheap, tier("top", answer("bug"))], RoutingSpec(min_confidence=0.6, escalate_on=["invalid", "rule"]))
    assert routed.tier == "cheap"


def test_an_output_breaking_its_schema_escalates_as_invalid():
    too_long = answer(reason="a reason far longer than twenty characters")   # DSPy parses it; the schema says no
    routed = run([tier("cheap", too_long, {"category": 0.99}), tier("top", answer())])
    assert [(a.tier, a.reason) for a in routed.attempts] == [("cheap", "invalid"), ("top", None)]
    assert "maxLength" in routed.attempts[0].detail


def test_a_program_that_raises_escalates_as_invalid():
    routed = run([tier("cheap", RuntimeError("llama.cpp decode failed")), tier("top", answer())])
    assert routed.attempts[0].reason == "invalid" and "decode failed" in routed.attempts[0].detail
    assert routed.tier == "top"


def test_a_business_rule_with_action_human_escalates():
    """The cheap model called it abuse without a person: the rule fires (human), so the next tier answers."""
    cheap = tier("cheap", answer("abuse", needs_human=False), {"category": 0.99, "needs_human": 0.99})
    routed = run([cheap, tier("top", answer("billing"))])
    assert routed.attempts[0].reason == "rule"
    assert routed.attempts[0].detail == "rule:abuse_goes_to_a_person=human"
    assert routed.tier == "top" and routed.answer.output["category"] == "billing"


def test_a_flag_does_not_escalate_but_block_does():
    flag = {**RULE, "action": "flag"}
    cheap = tier("cheap", answer("abuse"), {"category": 0.99})
    assert run([cheap, tier("top", answer())], rules=(flag,)).tier == "cheap"
    block = {**RULE, "action": "block"}
    routed = run([tier("cheap", answer("abuse"), {"category": 0.99}), tier("top", answer())], rules=(block,))
    assert routed.attempts[0].reason == "rule" and routed.tier == "top" and routed.answer.blocked is None


def test_on_the_last_tier_a_rule_acts_as_declared_and_low_confidence_is_kept():
    cheap = tier("cheap", answer(), {"category": 0.2})
    top = tier("top", answer("abuse", needs_human=False), {"category": 0.3})
    routed = run([cheap, top])
    assert routed.outcome == "answered" and routed.tier == "top"
    assert routed.answer.output["needs_human"] is True    # the rule's `human` set human_field, as unrouted
    assert routed.answer.confidence == 0.3 and routed.attempts[-1].reason is None


def test_every_tier_invalid_is_exhausted():
    routed = run([tier("cheap", RuntimeError("boom")), tier("top", answer(reason="x" * 40))])
    assert routed.outcome == "exhausted" and routed.answer is None and routed.tier is None
    assert [a.reason for a in routed.attempts] == ["invalid", "invalid"]
    assert routed.error.startswith(f"{EXHAUSTED}: every tier failed (2 tried); last, top:")
    assert routed.to_dict()["outcome"] == "exhausted" and routed.to_dict()["tier"] is None


def test_a_timeout_is_not_escalated():
    top = tier("top", answer())
    with pytest.raises(Exception) as raised:
        run([tier("cheap", ModelTimeout("model call timed out")), top])
    from framework.lm import root_cause

    assert isinstance(root_cause(raised.value), ModelTimeout) and top.lm.engine.calls == 0


def test_each_tier_is_priced_at_its_own_prices_and_the_request_costs_their_sum():
    cheap = tier("cheap", answer(), {"category": 0.1}, price_in=1.0, price_out=2.0)
    mid = tier("mid", answer(), {"category": 0.2}, price_in=3.0, price_out=5.0)
    top = tier("top", answer(), None, price_in=10.0, price_out=20.0)
    routed = run([cheap, mid, top])
    assert [a.tier for a in routed.attempts] == ["cheap", "mid", "top"] and routed.tier == "top"
    costs = [a.cost for a in routed.attempts]
    assert costs == pytest.approx([(100 * 1 + 10 * 2) / 1000, (100 * 3 + 10 * 5) / 1000, (100 * 10 + 10 * 20) / 1000])
    assert routed.cost == pytest.approx(sum(costs))
    assert [a["tokens_in"] for a in routed.to_dict()["attempts"]] == [100, 100, 100]


def test_answer_confidence_is_the_lowest_over_every_call():
    calls = [CallStats(1, 1, 0, 1, "stop", confidence={"a": 0.9, "b": 0.7}),
             CallStats(1, 1, 0, 1, "stop", confidence={"c": 0.8}), CallStats(1, 1, 0, 1, "stop")]
    assert answer_confidence(calls) == 0.7
    assert answer_confidence([CallStats(1, 1, 0, 1, "stop")]) is None


def _routed_record(cheap, top, expected="billing"):
    example = Example(id="e1", inputs={"ticket": "charged twice"}, expected={"category": expected})
    return _run_routed(dspy.Predict(Triage), example, 0, OUTPUTS, ["exact_match:category", "format_validity"], {},
                       [cheap, top], RoutingSpec(min_confidence=0.6), guard(), json_adapter())


def test_a_routed_eval_record_carries_the_tier_the_escalations_and_every_attempts_cost():
    record = _routed_record(tier("cheap", answer("bug"), {"category": 0.3}, price_in=1.0),
                            tier("top", answer(), {"category": 0.9}, price_in=10.0))
    assert record["routing"]["tier"] == "top" and record["routing"]["tier_index"] == 1
    assert record["routing"]["escalations"][0]["reason"] == "confidence"
    assert record["output"]["category"] == "billing" and record["scores"]["category_accuracy"] == 1.0
    assert record["tokens_in"] == 200 and record["tokens_out"] == 20
    assert record["cost"] == pytest.approx((100 * 1 + 10 * 2 + 100 * 10 + 10 * 2) / 1000)
    assert record["error"] is None and record["confidence"] == 0.9


def test_an_exhausted_example_is_an_error_scoring_zero():
    record = _routed_record(tier("cheap", RuntimeError("boom")), tier("top", RuntimeError("boom too")))
    assert record["error"].startswith(EXHAUSTED) and record["output"] is None
    assert record["scores"] == {"category_accuracy": 0.0, "format_validity": 0.0}
    assert record["routing"]["outcome"] == "exhausted"


def _record(tier_names, reasons, outcome="answered", correct=1.0, latency=10.0, cost=0.001):
    attempts = [{"tier": name, "index": i, "reason": reason, "detail": "", "confidence": 0.5, "latency_ms": latency,
                 "tokens_in": 100, "tokens_cached": 20, "tokens_out": 10, "cost": cost, "error": None}
                for i, (name, reason) in enumerate(zip(tier_names, reasons, strict=True))]
    answered = outcome == "answered"
    return {"expected": {"category": "billing"}, "output": {"category": "billing"} if answered else None,
            "scores": {"category_accuracy": correct}, "latency_ms": latency * len(attempts), "tokens_in": 100,
            "tokens_cached": 20, "tokens_out": 10, "cost": cost * len(attempts), "error": None if answered else "x",
            "routing": {"outcome": outcome, "tier": tier_names[-1] if answered else None,
                        "tier_index": len(tier_names) - 1 if answered else None, "escalations": [],
                        "attempts": attempts}}


def test_the_summary_reports_each_tier_and_the_share_escalated_with_its_interval():
    records = [_record(["cheap"], [None], correct=1.0), _record(["cheap"], [None], correct=0.0),
               _record(["cheap", "top"], ["confidence", None], correct=1.0),
               _record(["cheap", "top"], ["rule", "invalid"], outcome="exhausted", correct=0.0)]
    found = summary(records, ["exact_match:category"], bootstrap_samples=100)
    cheap, top = found["tiers"]
    assert (cheap["tier"], cheap["attempts"], cheap["answered"]) == ("cheap", 4, 2)
    assert cheap["reasons"] == {"confidence": 1, "rule": 1}
    assert cheap["metrics"]["category_accuracy"] == 0.5
    assert (top["tier"], top["attempts"], top["answered"], top["reasons"]) == ("top", 2, 1, {"invalid": 1})
    assert top["tokens_per_attempt"] == 90 and top["cost_per_attempt"] == 0.001
    assert found["escalated"] == 2 and found["escalated_share"] == 0.5 and found["exhausted"] == 1
    low, high = found["escalated_interval"]
    assert 0 < low < 0.5 < high < 1
    m = measure(records, ["exact_match:category"], bootstrap_samples=100)
    assert m.metrics["escalated_share"] == 0.5 and m.routing["n"] == 4
    assert m.intervals["escalated_share"] == (low, high)


def test_an_unrouted_run_has_no_routing_figures():
    records = [{k: v for k, v in _record(["cheap"], [None]).items() if k != "routing"}]
    m = measure(records, ["exact_match:category"], bootstrap_samples=100)
    assert m.routing == {} and "escalated_share" not in m.metrics


def _dev(confidence, correct, cost=0.001, **extra):
    return {"confidence": confidence, "scores": {"category_accuracy": correct}, "error": None, "raw_valid": True,
            "guardrails": [], "cost": cost, **extra}


def test_bars_are_scored_on_kept_answers_and_the_lowest_bar_matching_the_top_tier_is_recommended():
    first = [_dev(0.95, 1.0), _dev(0.9, 1.0), _dev(0.55, 0.0), _dev(0.4, 0.0), _dev(None, 1.0),
             _dev(0.99, 1.0, raw_valid=False)]
    top = [_dev(0.9, 1.0, cost=0.01)] * 5 + [_dev(0.9, 0.0, cost=0.01)]
    rows = bar_table(first, top, "category_accuracy", [0.0, 0.5, 0.6, 0.95], RoutingSpec())
    by_bar = {row["bar"]: row for row in rows}
    assert by_bar[0.0]["kept"] == 5 and by_bar[0.0]["kept_value"] == 0.6   # the invalid one always escalates
    assert by_bar[0.6]["kept"] == 3 and by_bar[0.6]["kept_value"] == 1.0
    assert by_bar[0.6]["escalated_share"] == pytest.approx(0.5)
    assert by_bar[0.6]["routed_value"] == pytest.approx(5 / 6)
    assert by_bar[0.6]["routed_cost"] == pytest.approx((6 * 0.001 + 3 * 0.01) / 6)
    top_value = 5 / 6
    assert recommend(rows, top_value) == 0.6
    assert recommend(rows, 1.01) is None


def test_a_rule_that_fired_on_tier_1_counts_as_escalated_in_calibration():
    fired = _dev(0.99, 1.0, guardrails=[{"check": "rule:x", "stage": "output", "action": "human"}])
    rows = bar_table([fired], [_dev(0.9, 1.0)], "category_accuracy", [0.0], RoutingSpec())
    assert rows[0]["kept"] == 0 and math.isnan(rows[0]["kept_value"])


# -- the real path: the tiny model as both tiers ------------------------------------------------------------

@pytest.fixture
def tiered_tiny(tiny_project):
    """The tiny project with tiers = [tiny, tiny] and a bar above 1: every answer tier 1 gives escalates."""
    edit_toml(tiny_project, 'model = "tiny"', f'model = "{TINY}"\ntiers = ["{TINY}", "{TINY}"]')
    tiny_project.write_text(tiny_project.read_text() + "\n[routing]\nmin_confidence = 1.01\n")
    return tiny_project


@pytest.mark.model
def test_a_routed_check_with_a_bar_above_1_escalates_every_example_and_reports_per_tier(tiered_tiny,
                                                                                       tiny_model_present):
    from framework import load_project
    from framework.check import check
    from framework.content import content_hashes
    from framework.notebook import load_program
    from framework.report import tier_rows

    project = load_project("ticket-triage", root=tiered_tiny.parents[2])
    result = check(project, limit=3)
    records = result.run.records
    assert len(records) == 3
    assert all(r["routing"]["escalations"][0]["tier"] == TINY and r["routing"]["escalations"][0]["reason"] in
               ("confidence", "invalid", "rule") for r in records)
    assert all(len(r["routing"]["attempts"]) == 2 for r in records)
    m = result.run.measurements
    assert m.metrics["escalated_share"] == 1.0
    first, second = m.routing["tiers"]
    assert (first["index"], first["attempts"], first["answered"]) == (0, 3, 0)
    assert second["index"] == 1 and second["attempts"] == 3
    assert second["answered"] + m.routing["exhausted"] == 3
    assert all(0.0 <= a["confidence"] <= 1.0 for r in records for a in r["routing"]["attempts"]
               if a["confidence"] is not None)
    # the stored run carries the routing, the JSON and HTML reports show the tiers
    from framework.evaluate import load_run

    stored = load_run(project, result.run.run_id)
    assert [r["routing"] for r in stored.records] == [r["routing"] for r in records]
    data = json.loads(open(result.report_json).read())
    assert data["measurements"]["routing"]["escalated"] == 3 and len(data["routing"]) == 3
    assert 'id=tiers' in open(result.report_html).read()
    assert [row["tier"] for row in tier_rows(data["measurements"])["rows"]] == ["1. tiny", "2. tiny",
                                                                                "overall (routed)"]
    # tiers and the bar are in the content hash
    program = load_program(project)
    routed_hash = content_hashes(project, program, "eval", TINY, 3)["content_hash"]
    assert routed_hash == result.run.content_hash
    assert content_hashes(project, program, "eval", TINY, 3, routed=False)["content_hash"] != routed_hash


@pytest.mark.model
def test_calibration_runs_tier_1_and_the_top_tier_on_dev_and_scores_each_bar(tiered_tiny, tiny_model_present):
    from framework import load_project
    from framework.routing import calibrate

    project = load_project("ticket-triage", root=tiered_tiny.parents[2])
    cal = calibrate(project, limit=3, bars=[0.0, 0.5, 1.01])
    assert cal.n == 3 and cal.metric == "category_accuracy" and (cal.first, cal.top) == (TINY, TINY)
    assert [row["bar"] for row in cal.rows] == [0.0, 0.5, 1.01]
    assert cal.rows[-1]["kept"] == 0 and cal.rows[-1]["escalated_share"] == 1.0
    assert cal.recommended == recommend(cal.rows, cal.top_value)
    assert not (project.state_dir / "store.duckdb").exists()   # calibration records nothing


def test_the_calibration_printout_names_the_recommended_bar_and_the_rule():
    from rich.console import Console

    from framework.report import print_calibration
    from framework.routing import Calibration

    rows = bar_table([_dev(0.9, 1.0), _dev(0.4, 0.0)], [_dev(0.9, 1.0), _dev(0.9, 1.0)], "category_accuracy",
                     [0.0, 0.5], RoutingSpec())
    cal = Calibration(metric="category_accuracy", n=2, first="qwen05", top="qwen15", top_value=1.0, rows=rows,
                      recommended=recommend(rows, 1.0), rule="the lowest bar at which …")
    console = Console(record=True, width=160)
    print_calibration(console, cal)
    out = console.export_text()
    assert cal.recommended == 0.5 and "min_confidence = 0.5" in out and "qwen05" in out
    assert json.loads(json.dumps(cal.to_dict()))["recommended"] == 0.5
