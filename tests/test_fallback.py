"""A failed served request → the declared fallback (framework/fallback.py): the `[fallback]` table, `decide()`
per action and failure, and `check_answer()` against the program's output fields, as `slipway check`,
`slipway build` and the service at start run it. The human queue it feeds is tests/test_handoff.py."""

from __future__ import annotations

from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from framework.cli import app
from framework.errors import SpecError
from framework.fallback import (
    CODE_FAILURES,
    FAILURES,
    Fallback,
    check_answer,
    coerce_labels,
    decide,
    failure_of,
    output_fields,
    validate,
    validate_project,
)
from framework.spec import FallbackSpec, load_project, parse_spec
from tests.conftest import drop_table, edit_toml

ANSWER = {"category": "billing", "priority": "medium", "needs_human": True, "reason": "Handed to a person"}
TYPES = {"category": Literal["billing", "bug", "account", "feature_request", "outage", "abuse"], "reason": str,
         "priority": Literal["low", "medium", "high", "urgent"], "needs_human": bool}
runner = CliRunner()


def flat(output: str) -> str:
    return " ".join(output.split())


# -- [fallback] in project.toml ---------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _undeclared(toml_path):
    """These tests declare their own [fallback]: take the demo's out."""
    drop_table(toml_path, "[fallback]")


def test_the_default_is_todays_error_on_every_failure(toml_path):
    spec = load_project(str(toml_path)).spec.fallback
    assert (spec.action, spec.on, spec.answer, spec.message) == ("error", list(FAILURES), {}, "")


def _with(toml_path, table: str):
    return parse_spec(toml_path.read_text() + "\n" + table, str(toml_path))


def test_a_human_fallback_parses(toml_path):
    spec = _with(toml_path, '[fallback]\naction = "human"\non = ["timeout", "model-error", "timeout"]\n'
                            'answer = { category = "billing", priority = "medium", needs_human = true, '
                            'reason = "Handed to a person" }\nmessage = "A person will answer you."\n').fallback
    assert spec.action == "human" and spec.on == ["timeout", "model-error"] and spec.answer == ANSWER
    assert spec.message == "A person will answer you."


@pytest.mark.parametrize(("table", "said"), [
    ('action = "static"', 'action = "static" answers `answer`'),
    ('action = "human"\nanswer = {}', 'action = "human" answers `answer`'),
    ('answer = { category = "billing" }', 'answer is given only by action = "static" or "human"'),
    ('action = "static"\nanswer = { category = "billing" }\non = []', "an empty list falls back on nothing"),
    ('on = ["crash"]', "fallback.on.0"),
    ('action = "page-someone"', "fallback.action"),
    ('action = "static"\nanswer = { category = "billing" }\nmesage = "typo"', "unknown key"),
])
def test_a_fallback_that_cannot_work_is_a_spec_error_naming_file_and_field(toml_path, table, said):
    with pytest.raises(SpecError) as info:
        _with(toml_path, "[fallback]\n" + table + "\n")
    assert said in info.value.render() and "project.toml" in info.value.render()


# -- decide: per action and failure ---------------------------------------------------------------------------
@pytest.mark.parametrize(("code", "failure"), [("model-timeout", "timeout"), ("model-error", "model-error"),
                                               ("model-invalid", "model-error"), ("notebook-invalid", "model-error"),
                                               ("tiers-exhausted", "exhausted"), ("timeout", "timeout"),
                                               ("exhausted", "exhausted")])
def test_service_error_codes_map_to_failures(code, failure):
    assert failure_of(code) == failure


def test_human_answers_200_with_the_answer_and_a_queue_entry():
    spec = FallbackSpec(action="human", answer=ANSWER, message="A person will answer you.")
    found = decide(spec, "model-timeout")
    assert found == Fallback(action="human", failure="timeout", code="model-timeout", status=200, answer=ANSWER,
                             message="A person will answer you.", handoff=True)
    assert found.answers and found.marker == {"action": "human", "reason": "timeout",
                                              "message": "A person will answer you."}
    body = found.body(request_id="r-1", version={"bento": "p:v1"}, guardrails={"pii": "redact"})
    assert body == {**ANSWER, "guardrails": {"pii": "redact"}, "request_id": "r-1", "version": {"bento": "p:v1"},
                    "served": {"fallback": found.marker}}


def test_static_answers_200_without_a_queue_entry_and_says_so_by_default():
    found = decide(FallbackSpec(action="static", answer=ANSWER), "model-error")
    assert (found.status, found.answer, found.handoff, found.failure) == (200, ANSWER, False, "model-error")
    assert found.marker["action"] == "static" and "default answer" in found.marker["message"]


def test_error_is_a_503_without_an_answer():
    found = decide(FallbackSpec(), "model-timeout")
    assert (found.status, found.answer, found.handoff, found.answers) == (503, None, False, False)
    assert found.marker == {"action": "error", "reason": "timeout"}
    with pytest.raises(ValueError, match="no answer body"):
        found.body(request_id="r", version={})


def test_a_failure_not_named_in_on_answers_the_service_error():
    spec = FallbackSpec(action="static", answer=ANSWER, on=["timeout"])
    assert decide(spec, "model-error") is None and decide(spec, "model-invalid") is None
    assert decide(spec, "model-timeout").status == 200
    assert decide(FallbackSpec(action="human", answer=ANSWER, on=["exhausted"]), "tiers-exhausted").handoff


def test_the_answer_returned_is_a_copy():
    spec = FallbackSpec(action="static", answer=ANSWER)
    decide(spec, "model-error").answer["category"] = "abuse"
    assert decide(spec, "model-error").answer["category"] == "billing"


specs = st.builds(
    lambda action, on, answer, message: FallbackSpec(action=action, on=on, message=message,
                                                     answer=answer if action != "error" else {}),
    st.sampled_from(["human", "static", "error"]), st.lists(st.sampled_from(FAILURES), min_size=1, max_size=3),
    st.dictionaries(st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True),
                    st.one_of(st.text(max_size=10), st.booleans(), st.integers()), min_size=1, max_size=4),
    st.text(max_size=40))
codes = st.one_of(st.sampled_from([*FAILURES, *CODE_FAILURES, "model-error", "model-invalid"]), st.text(max_size=20))


@given(specs, codes)
@settings(max_examples=300, deadline=None)
def test_decide_never_fails_and_keeps_its_promises(spec, code):
    found = decide(spec, code)
    failure = failure_of(code)
    assert failure in FAILURES
    if failure not in spec.on:
        assert found is None
        return
    assert found.failure == failure and found.code == code and found.action == spec.action
    assert found.status == (503 if spec.action == "error" else 200)
    assert found.answers == (spec.action != "error") and found.handoff == (spec.action == "human")
    assert found.answer == (None if spec.action == "error" else spec.answer)
    assert found.marker["action"] == spec.action and found.marker["reason"] == failure
    if found.answers:
        body = found.body(request_id="r", version={"bento": "b"})
        assert body["served"]["fallback"] == found.marker and body["request_id"] == "r"


# -- check_answer: does the answer fit the program? -------------------------------------------------------------
def test_an_answer_of_every_field_with_its_type_fits():
    assert check_answer(ANSWER, TYPES) == []


def test_every_problem_is_named_at_once():
    problems = check_answer({"category": "other", "needs_human": "true", "priority": "medium", "mood": "calm"}, TYPES)
    assert problems[0].startswith("fallback.answer.mood: not an output field of the program (its fields: category")
    assert "fallback.answer.reason: missing" in problems[1]
    assert problems[2].startswith("fallback.answer.category: Input should be 'billing'") and "'other'" in problems[2]
    assert problems[3].startswith("fallback.answer.needs_human: Input should be a valid boolean, got 'true'")
    assert len(problems) == 4


def test_the_programs_own_constraints_count(project_root):
    """DSPy output fields carry pydantic constraints (the demo's reason: 64 characters, a pattern)."""
    from framework.notebook import load_program

    fields = output_fields(load_program(load_project(str(project_root / "projects" / "ticket-triage")), saved=False))
    assert list(fields) == ["category", "reason", "priority", "needs_human"]
    assert check_answer(ANSWER, fields) == []
    long = check_answer({**ANSWER, "reason": "x" * 65}, fields)
    assert long == [f"fallback.answer.reason: String should have at most 64 characters, got {'x' * 65!r}"]
    assert "should match pattern" in check_answer({**ANSWER, "reason": "Übergeben"}, fields)[0]
    # the brief's example answer: "other" is not a category of the demo program
    assert check_answer({**ANSWER, "category": "other"}, fields)[0].startswith("fallback.answer.category:")


VALUES = {str: st.text(max_size=12), bool: st.booleans(), int: st.integers(), float: st.floats(allow_nan=False),
          Literal["a", "b"]: st.sampled_from(["a", "b"]), list[str]: st.lists(st.text(max_size=5), max_size=3)}
names = st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True)
schemas = st.dictionaries(names, st.sampled_from(list(VALUES)), max_size=5)
anything = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                   max_size=3), max_leaves=6)


@given(schemas, st.dictionaries(names, anything, max_size=6))
@settings(max_examples=300, deadline=None)
def test_check_answer_never_fails_and_names_only_real_fields(types, answer):
    problems = check_answer(answer, types)
    for problem in problems:
        field = problem.split(":", 1)[0].removeprefix("fallback.answer.")
        assert problem.startswith("fallback.answer.") and (field in answer or field in types)
    missing = [name for name in types if name not in answer]
    assert sum(": missing;" in p for p in problems) == len(missing)
    assert sum("not an output field" in p for p in problems) == len(set(answer) - set(types))


@given(st.data(), schemas)
@settings(max_examples=200, deadline=None)
def test_a_well_typed_complete_answer_fits_and_each_break_is_named(data, types):
    answer = {name: data.draw(VALUES[kind]) for name, kind in types.items()}
    assert check_answer(answer, types) == []
    assert check_answer({**answer, "zz_extra": 1}, types) == [
        f"fallback.answer.zz_extra: not an output field of the program (its fields: {', '.join(types) or 'none'})"]
    if types:
        dropped = data.draw(st.sampled_from(sorted(types)))
        partial = {k: v for k, v in answer.items() if k != dropped}
        assert [p.split(":")[0] for p in check_answer(partial, types)] == [f"fallback.answer.{dropped}"]
        assert check_answer(partial, types, complete=False) == []


def test_labels_a_person_typed_are_read_as_their_types():
    values, problems = coerce_labels({"category": "billing", "needs_human": "true", "priority": "soon", "x": "1"},
                                     TYPES)
    assert values == {"category": "billing", "needs_human": True}
    assert problems[0].startswith("labels.x: not an output field")
    assert problems[1].startswith("labels.priority: Input should be 'low'") and "'soon'" in problems[1]
    assert coerce_labels({"tags": '["a", "b"]'}, {"tags": list[str]}) == ({"tags": ["a", "b"]}, [])


# -- where the program is known: validate, check, build -----------------------------------------------------------
def test_validate_names_project_toml_line_and_field(toml_path):
    text = toml_path.read_text() + '\n[fallback]\naction = "static"\nanswer = { category = "other" }\n'
    spec = parse_spec(text, str(toml_path)).fallback
    with pytest.raises(SpecError) as info:
        validate(spec, TYPES, path=toml_path, text=text)
    rendered = info.value.render()
    line = text.splitlines().index('answer = { category = "other" }') + 1
    assert f"{toml_path}:{line}: fallback.answer.category: Input should be" in rendered
    assert "4 problems" in rendered and "fallback.answer.needs_human: missing" in rendered
    validate(FallbackSpec(), TYPES)   # action error: nothing to check


def _declare(toml_path, answer: str) -> None:
    edit_toml(toml_path, "[tracing]\n", f'[fallback]\naction = "human"\nanswer = {answer}\n\n[tracing]\n')


def test_check_refuses_an_answer_that_does_not_fit_before_running_anything(toml_path, monkeypatch):
    import sys

    def no_model(*args, **kwargs):
        raise AssertionError("the eval ran: the fallback answer should have been refused first")

    monkeypatch.setattr(sys.modules["framework.check"], "run_eval", no_model)   # `framework.check` is the function
    _declare(toml_path, '{ category = "other", priority = "medium", needs_human = true, reason = "Handed over" }')
    result = runner.invoke(app, ["check", str(toml_path)])
    assert result.exit_code == 2, result.output
    assert "project.toml" in flat(result.output) and "fallback.answer.category: Input should be" in flat(result.output)


def test_build_refuses_an_answer_that_does_not_fit(toml_path):
    _declare(toml_path, '{ category = "billing", priority = "medium", needs_human = "yes", reason = "x" }')
    result = runner.invoke(app, ["build", str(toml_path)])
    assert result.exit_code == 2, result.output
    assert "fallback.answer.needs_human: Input should be a valid boolean" in flat(result.output)


def test_a_fitting_answer_passes_validation(toml_path):
    _declare(toml_path, '{ category = "billing", priority = "medium", needs_human = true, reason = "Handed over" }')
    validate_project(load_project(str(toml_path)))


def test_every_key_and_the_error_code_are_documented():
    from pathlib import Path

    from framework.errors import HandoffError

    docs = Path(__file__).resolve().parents[1] / "docs"
    reference = (docs / "project-toml.md").read_text()
    assert "## [fallback]" in reference
    for key in FallbackSpec.model_fields:
        assert f"`{key}`" in reference.split("## [fallback]")[1], f"fallback.{key} missing from project-toml.md"
    assert f"`{HandoffError.code}`" in (docs / "errors.md").read_text()
    assert "`queue`" in (docs / "trust.md").read_text()
