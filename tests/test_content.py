"""The content hash changes whenever what the model sees or how answers are scored can change, so a
check is never reused after a framework, DSPy or adapter change."""

from __future__ import annotations

import pytest

from framework import content
from framework.check import check
from framework.notebook import load_program
from framework.spec import load_project


def _hash(project) -> str:
    return content.content_hashes(project, load_program(project), "eval", project.spec.pipeline.model,
                                  None)["content_hash"]


def _louder_adapter(monkeypatch):
    """The JSON adapter with one formatting change: a different instruction line before the fields."""
    from framework import lm

    original = lm.json_adapter

    def patched():
        adapter = original()
        base = type(adapter)

        class Reformatted(base):
            def format_field_structure(self, signature):
                return "Answer in JSON.\n" + super().format_field_structure(signature)

        return Reformatted()

    monkeypatch.setattr(lm, "json_adapter", patched)


def test_every_named_part_moves_the_hash(project_root, monkeypatch):
    project = load_project("ticket-triage", root=project_root)
    base = _hash(project)
    assert _hash(project) == base  # stable when nothing changed

    real = content.versions()
    with monkeypatch.context() as patch:
        patch.setattr(content, "versions", lambda: {**real, "dspy": "9.9.9"})
        assert _hash(project) != base
    with monkeypatch.context() as patch:
        _louder_adapter(patch)
        assert _hash(project) != base
    with monkeypatch.context() as patch:
        patch.setattr(content, "ANSWER_PATH_MODULES", (*content.ANSWER_PATH_MODULES, "report.py"))
        assert _hash(project) != base


def test_prompt_hash_sees_demos_and_instructions(project_root):
    from framework.evaluate import adapter

    project = load_project("ticket-triage", root=project_root)
    program = load_program(project)
    before = content.prompt_hash(program, adapter(project))
    predictor = program.predictors()[0]
    predictor.signature = predictor.signature.with_instructions("Triage the ticket.")
    assert content.prompt_hash(program, adapter(project)) != before


@pytest.mark.model
def test_check_reuses_nothing_after_an_adapter_or_dspy_change(tiny_project, tiny_model_present, monkeypatch):
    project = load_project(str(tiny_project))
    first = check(project, limit=2)
    assert not first.run.reused
    assert check(project, limit=2).run.reused  # identical content: the run is reused
    with monkeypatch.context() as patch:
        _louder_adapter(patch)
        assert not check(project, limit=2).run.reused
    real = content.versions()
    with monkeypatch.context() as patch:
        patch.setattr(content, "versions", lambda: {**real, "dspy": "3.99.0"})
        assert not check(project, limit=2).run.reused
