"""Tokens, cost and format validity as the model produced them (issue 11, items 2 and 3).

Unit tests use `FakeEngine`, a DSPy engine that answers fixed raw text and ends every call through
`lm.respond` like the real engine; the real-path tests run the tiny GGUF.
"""

from __future__ import annotations

from typing import Literal

import dspy
import duckdb
import pytest

from framework import load_project
from framework.dataset import Example
from framework.evaluate import _run_one, language_model, score_example
from framework.lm import CallStats, json_adapter, respond
from framework.metrics import measure, request_cost
from framework.spec import ModelSpec
from framework.store import Store
from tests.conftest import REPO, TINY

SHA = "0" * 64


def _model(**prices) -> ModelSpec:
    return ModelSpec(name="m", sha256=SHA, source={"path": "m.gguf"}, **prices)


def test_request_cost_is_the_one_formula_and_a_cached_prefix_is_free_by_default():
    model = _model(price_per_1k_input=2.0, price_per_1k_output=10.0)
    assert model.price_per_1k_cached_input == 0.0
    assert request_cost(model, new=500, cached=1500, generated=100) == pytest.approx(1.0 + 0.0 + 1.0)
    charged = _model(price_per_1k_input=2.0, price_per_1k_cached_input=0.5, price_per_1k_output=10.0)
    assert request_cost(charged, new=500, cached=1500, generated=100) == pytest.approx(1.0 + 0.75 + 1.0)


def test_tokens_per_request_counts_new_prompt_and_generated_with_cached_beside_it():
    records = [{"expected": {}, "output": {}, "scores": {}, "latency_ms": 1.0, "tokens_in": 300, "tokens_cached": 250,
                "tokens_out": 20, "cost": 0.0, "error": None},
               {"expected": {}, "output": {}, "scores": {}, "latency_ms": 1.0, "tokens_in": 300, "tokens_cached": 0,
                "tokens_out": 40, "cost": 0.0, "error": None}]
    m = measure(records, [], bootstrap_samples=100)
    assert m.tokens_per_request == ((50 + 20) + (300 + 40)) / 2
    assert m.tokens_cached_per_request == 125
    legacy = [{k: v for k, v in r.items() if k != "tokens_cached"} for r in records]  # rows from older stores
    assert measure(legacy, [], bootstrap_samples=100).tokens_per_request == (320 + 340) / 2


def _result(i, cached):
    return {"example_id": f"e{i}", "position": i, "inputs": {}, "expected": {}, "output": {}, "scores": {},
            "latency_ms": 1.0, "tokens_in": 100, "tokens_cached": cached, "tokens_out": 5, "cost": 0.0, "error": None}


def test_store_records_cached_tokens_and_upgrades_an_older_results_table(tmp_path):
    path = tmp_path / "store.duckdb"
    Store(path).close()
    con = duckdb.connect(str(path))
    con.execute("ALTER TABLE results DROP COLUMN tokens_cached")  # a store written before the column existed
    con.close()
    with Store(path) as store:
        store.start_run({"run_id": "r1", "project": "p", "split": "eval", "n_examples": 2})
        store.add_result("r1", _result(0, 80))
        store.add_result("r1", _result(1, None))
        assert [r["tokens_cached"] for r in store.results("r1")] == [80, None]


class Triage(dspy.Signature):
    """Triage a ticket."""

    ticket: str = dspy.InputField()
    category: Literal["billing", "bug"] = dspy.OutputField()
    reason: str = dspy.OutputField(max_length=20)


class FakeEngine:
    """Answers each call with the next raw text; accounts like the real engine (a fixed token split)."""

    supports_response_schema = True
    supports_function_calling = False
    supports_reasoning = False
    supported_params = frozenset({"response_format", "temperature", "max_tokens", "stop", "seed", "top_p"})

    def __init__(self, *texts: str):
        self.texts = list(texts)

    def complete(self, request):
        fmt = request.config.response_format or {}
        schema = fmt.get("schema") if fmt.get("type") == "json_schema" else None
        stats = CallStats(latency_ms=1.0, tokens_in_new=30, tokens_in_cached=70, tokens_out=12, finish_reason="stop")
        return respond("fake", self.texts.pop(0), stats, schema)

    def stream(self, request):
        from dspy.lm15 import response_to_events

        return response_to_events(self.complete(request))

    def close(self):
        pass


def _fake_run(*texts: str) -> dict:
    lm = dspy.LM(model="fake/fake", engine=FakeEngine(*texts), cache=False, num_retries=0)
    example = Example(id="e1", inputs={"ticket": "charged twice"}, expected={"category": "billing"})
    model = _model(price_per_1k_input=1.0, price_per_1k_output=2.0)
    with dspy.context(lm=lm, adapter=json_adapter()):
        return _run_one(dspy.Predict(Triage), example, 0, ("category", "reason"),
                        ["exact_match:category", "format_validity"], {}, model)


def test_valid_raw_output_scores_format_validity_and_records_the_token_split():
    record = _fake_run('{"category": "billing", "reason": "double charge"}')
    assert record["error"] is None and record["scores"] == {"category_accuracy": 1.0, "format_validity": 1.0}
    assert (record["tokens_in"], record["tokens_cached"], record["tokens_out"]) == (100, 70, 12)
    assert record["cost"] == pytest.approx((30 * 1.0 + 70 * 0.0 + 12 * 2.0) / 1000)


@pytest.mark.parametrize("raw", [
    'Sure! Here is the JSON: {"category": "billing", "reason": "double charge"}',  # prose around it
    '{"category": "billing", "reason": "a reason far longer than twenty characters"}',  # past maxLength
    '{"category": "billing", "reason": 7}',  # a number where the schema wants a string
])
def test_raw_output_dspy_still_parses_but_the_schema_rejects_scores_zero(raw):
    record = _fake_run(raw)
    assert record["error"] is None and record["output"]["category"] == "billing"  # DSPy accepted it
    assert record["scores"]["category_accuracy"] == 1.0
    assert record["scores"]["format_validity"] == 0.0


def test_one_invalid_call_among_several_makes_the_example_invalid():
    valid = CallStats(1.0, 1, 0, 1, "stop", raw_text="{}", format_problems=[])
    invalid = CallStats(1.0, 1, 0, 1, "stop", raw_text="{", format_problems=["$: not JSON"])
    unchecked = CallStats(1.0, 1, 0, 1, "stop", raw_text="[[ ## category ## ]]")  # no schema asked for
    example = Example(id="e", inputs={}, expected={})
    items = ["format_validity"]
    assert score_example(example, {}, None, items, {}, calls=[valid, unchecked]) == {"format_validity": 1.0}
    assert score_example(example, {}, None, items, {}, calls=[valid, invalid]) == {"format_validity": 0.0}
    assert score_example(example, None, "ValueError", items, {}, calls=[valid]) == {"format_validity": 0.0}


@pytest.mark.model
def test_real_model_raw_output_validity_and_token_split(tiny_model_present):
    project = load_project("ticket-triage", root=REPO)
    from framework.evaluate import adapter, output_fields
    from framework.notebook import load_program

    program = load_program(project, saved=False)
    # the sequential engine: its cache reuses everything the previous call shares with this one
    project.spec.models[TINY] = project.model(TINY).model_copy(update={"parallel": 1})
    lm = language_model(project, TINY)
    model = project.model(TINY)
    example = Example(id="e1", inputs={"ticket": "I was charged twice for invoice INV-2231"},
                      expected={"category": "billing", "priority": "medium", "needs_human": True})
    items = ["exact_match:category", "format_validity"]
    with dspy.context(lm=lm, adapter=adapter(project)):
        ok = _run_one(program, example, 0, output_fields(program), items, {}, model)
        again = _run_one(program, example, 1, output_fields(program), items, {}, model)
    with dspy.context(lm=lm.copy(max_tokens=3), adapter=adapter(project)):
        cut = _run_one(program, example, 2, output_fields(program), items, {}, model)
    assert ok["error"] is None and ok["scores"]["format_validity"] == 1.0
    assert 0 < ok["tokens_out"] < 60 and ok["tokens_in"] > ok["tokens_cached"]
    # the same ticket again: same prompt and skeleton, all but the last prompt token reused from the cache
    assert again["tokens_in"] == ok["tokens_in"] and again["tokens_cached"] > ok["tokens_cached"]
    assert again["cost"] < ok["cost"]
    assert cut["scores"]["format_validity"] == 0.0  # truncated at max_tokens: the raw JSON lacks fields
