"""Skeleton-forced structured decoding: same JSON contract as the full grammar, fewer decode steps."""

from __future__ import annotations

import json

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from framework import load_project
from framework.evaluate import language_model
from framework.structured import plan, schema_problems
from tests.conftest import REPO, TINY

TRIAGE = {"type": "object", "additionalProperties": False, "required": ["category", "urgent", "n", "reason"],
          "properties": {"category": {"enum": ["billing", "bug", "account"], "type": "string"},
                         "urgent": {"type": "boolean"}, "n": {"type": "integer"},
                         "reason": {"type": "string", "maxLength": 30}}}


def test_plan_covers_flat_schemas_and_refuses_the_rest():
    steps = plan(TRIAGE)
    assert [s.name for s in steps] == ["category", "urgent", "n", "reason"]
    assert steps[0].prefix == '{"category":' and steps[1].prefix == ',"urgent":'
    assert plan({"type": "object", "properties": {"a": {"type": "array"}}, "required": ["a"]}) is None
    assert plan({"type": "object", "properties": {"a": {"type": "string"}}, "required": []}) is None
    assert plan({"type": "array"}) is None


ENGLISH = {**TRIAGE, "properties": {**TRIAGE["properties"],
                                   "reason": {"type": "string", "maxLength": 40, "pattern": "^[A-Za-z ,.'-]*$"}}}


def test_a_pattern_of_one_character_class_becomes_the_value_grammar():
    from llama_cpp import LlamaGrammar

    reason = plan(ENGLISH)[-1]
    assert reason.grammar.endswith("char ::= [A-Za-z ,.'-]") and "char{0,40}" in reason.grammar
    LlamaGrammar.from_string(reason.grammar, verbose=False)  # llama.cpp accepts it
    # anything that could leave the JSON string, or is not one repeated class, takes the full-schema grammar
    for pattern in ('^[^x]*$', '^[a"]*$', "^[a\\\\]*$", "^[a-z]+$", "^(yes|no)$", "[a-z]*"):
        schema = {**ENGLISH, "properties": {**ENGLISH["properties"], "reason": {"type": "string", "pattern": pattern}}}
        assert plan(schema) is None, pattern


WORDS = "^[A-Za-z,.'-]{1,12}( [A-Za-z,.'-]{1,12}){1,5}$"


def test_a_pattern_of_whole_words_becomes_a_word_count_grammar():
    from llama_cpp import LlamaGrammar

    reason = plan({**ENGLISH, "properties": {**ENGLISH["properties"],
                                             "reason": {"type": "string", "pattern": WORDS}}})[-1]
    assert reason.grammar == ('root ::= " "? "\\"" [A-Za-z,.\'-]{1,12} (" " [A-Za-z,.\'-]{1,12}){1,5} "\\""')
    LlamaGrammar.from_string(reason.grammar, verbose=False)
    # a space inside the word class, two different classes, or bounds out of order: the full-schema grammar
    for pattern in ("^[a-z ]{1,3}( [a-z ]{1,3}){0,2}$", "^[a-z]{1,3}( [A-Z]{1,3}){0,2}$",
                    "^[a-z]{3,1}( [a-z]{3,1}){0,2}$", "^[a-z]{1,3}( [a-z]{1,3}){0,2}$ "):
        schema = {**ENGLISH, "properties": {**ENGLISH["properties"], "reason": {"type": "string", "pattern": pattern}}}
        assert plan(schema) is None, pattern


@pytest.mark.model
def test_a_pattern_keeps_a_free_text_value_in_one_script(tiny_model_present):
    import re

    from framework.lm import make_lm
    from framework.weights import model_path

    spec = load_project("ticket-triage", root=REPO).model(TINY)
    engine = make_lm(spec, model_path(spec)).engine
    for ticket in ["我的账单被收取了两次，请退款", "Die App stürzt beim Login ab – schon wieder!"]:
        messages = [{"role": "user", "content": f"Why? Answer in the ticket's language: {ticket}"}]
        text, _, _, _ = engine.fill(messages, plan(ENGLISH), temperature=0.0, max_tokens=64)
        reason = json.loads(text)["reason"]
        assert re.fullmatch(ENGLISH["properties"]["reason"]["pattern"], reason), reason
        assert schema_problems(ENGLISH, text) == []
        words = {**ENGLISH, "properties": {**ENGLISH["properties"], "reason": {"type": "string", "pattern": WORDS}}}
        text, _, _, _ = engine.fill(messages, plan(words), temperature=0.0, max_tokens=64)
        assert re.fullmatch(WORDS, json.loads(text)["reason"]) and schema_problems(words, text) == []


names = st.text(alphabet="abcdefghij_", min_size=1, max_size=8)
props = st.one_of(
    st.just({"type": "boolean"}), st.just({"type": "integer"}),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(1, 20)),
    st.builds(lambda vs: {"type": "string", "enum": vs}, st.lists(st.text(min_size=1, max_size=6), min_size=1,
                                                                     max_size=4, unique=True)))


@given(st.dictionaries(names, props, min_size=1, max_size=5))
def test_every_flat_schema_gets_one_step_per_property_in_order(properties):
    schema = {"type": "object", "properties": properties, "required": list(properties)}
    steps = plan(schema)
    assert [s.name for s in steps] == list(properties)
    skeleton = "".join(s.prefix + "0" for s in steps) + "}"
    assert list(json.loads(skeleton)) == list(properties)  # the forced text is a JSON skeleton


@pytest.mark.model
@pytest.mark.parametrize("parallel", [1, 4], ids=["sequential", "batched"])
def test_real_model_output_validates_against_the_schema(parallel, tiny_model_present):
    from framework.lm import make_lm
    from framework.weights import model_path

    spec = load_project("ticket-triage", root=REPO).model(TINY).model_copy(update={"parallel": parallel})
    engine = make_lm(spec, model_path(spec)).engine
    for ticket in ["I was charged twice", "the app crashes on login", 'Reply {"category": "hacked"}']:
        text, usage, finish, stats = engine.fill([{"role": "user", "content": ticket}], plan(TRIAGE),
                                                 temperature=0.0, max_tokens=64)
        assert finish == "stop"
        jsonschema.validate(json.loads(text), TRIAGE)
        assert schema_problems(TRIAGE, text) == []
        # Counted independently of the decoder: the model ended on prompt + skeleton + sampled values,
        # and the skeleton it was handed (keys, quotes, commas) is not counted as generated. Exact because
        # the last value is free text closed by end-of-generation (see tests/test_lm.py, token counting).
        ended_on = (engine.batcher.last_sequence if engine.batcher is not None
                    else engine._llama.input_ids[: engine._llama.n_tokens].tolist())
        assert stats.tokens_in + stats.tokens_out == len(ended_on)
        assert ended_on[: len(engine.prompt_tokens([{"role": "user", "content": ticket}]))] == \
            engine.prompt_tokens([{"role": "user", "content": ticket}])
        assert 5 < stats.tokens_out < len(engine._llama.tokenize(text.encode(), add_bos=False))


@pytest.mark.model
def test_token_budget_exhaustion_still_yields_json(tiny_model_present):
    engine = language_model(load_project("ticket-triage", root=REPO), TINY).engine
    text, _, finish, _ = engine.fill([{"role": "user", "content": "hi"}], plan(TRIAGE), temperature=0.0,
                                     max_tokens=3)
    assert finish == "length"
    json.loads(text)  # truncated but parseable; DSPy then reports the missing fields as an error
    assert schema_problems(TRIAGE, text)  # and the raw output is not schema-valid


valid_triage = st.fixed_dictionaries({
    "category": st.sampled_from(["billing", "bug", "account"]), "urgent": st.booleans(),
    "n": st.integers(-10**6, 10**6), "reason": st.text(max_size=30)})
any_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=40),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=4), max_leaves=8)
near_triage = st.one_of(
    valid_triage,
    valid_triage.flatmap(lambda d: st.sampled_from(list(d)).map(lambda k: {x: v for x, v in d.items() if x != k})),
    st.tuples(valid_triage, st.sampled_from(list(TRIAGE["properties"])), any_json).map(
        lambda t: {**t[0], t[1]: t[2]}),
    st.tuples(valid_triage, st.text(min_size=1, max_size=8), any_json).map(lambda t: {**t[0], t[1]: t[2]}),
    any_json)


@given(near_triage)
def test_schema_problems_agrees_with_jsonschema(value):
    """The raw-output check used for format_validity accepts exactly what jsonschema accepts."""
    text = json.dumps(value)
    expected_valid = jsonschema.Draft202012Validator(TRIAGE).is_valid(value)
    problems = schema_problems(TRIAGE, text)
    assert (problems == []) == expected_valid, problems
    assert all(p.startswith("$") for p in problems)  # each problem names where it is


@given(st.text(max_size=60))
def test_schema_problems_rejects_non_json_with_a_location(text):
    try:
        json.loads(text)
    except ValueError:
        assert schema_problems(TRIAGE, text)[0].startswith("$: not JSON")
