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


def test_the_cache_figures_inputs_move_the_hash_and_serving_settings_do_not(project_root):
    """A check's cache_hit_rate and cache_wrong_hit_rate depend on the paraphrase file, the embedder and the
    threshold: a change to any of them makes the verdict stale. TTL and size change serving only."""
    toml = project_root / "projects" / "ticket-triage" / "project.toml"
    project = load_project("ticket-triage", root=project_root)
    assert project.spec.cache.paraphrases, "the demo measures its cache"
    base = content.cache_hash(project)
    text = toml.read_text()
    for old, new in (("threshold = ", "threshold = 0.5  # was "), ("pooling = ", 'pooling = "mean"  # was ')):
        toml.write_text(text.replace(old, new, 1))
        assert content.cache_hash(load_project("ticket-triage", root=project_root)) != base, new
    toml.write_text(text.replace("ttl_s = ", "ttl_s = 5  # was ", 1).replace("max_entries = ", "max_entries = 3  # ", 1)
                    .replace("semantic = false", "semantic = true", 1))
    assert content.cache_hash(load_project("ticket-triage", root=project_root)) == base
    toml.write_text(text)
    pairs = project.dir / project.spec.cache.paraphrases
    pairs.write_text(pairs.read_text() + '{"a": "x", "b": "y", "same": false, "lang": "en", "tags": ["t"]}\n')
    assert content.cache_hash(project) != base


def test_a_project_without_a_paraphrase_set_has_no_cache_part(project_root):
    toml = project_root / "projects" / "ticket-triage" / "project.toml"
    text = toml.read_text()
    start = text.index("\n[cache]")
    toml.write_text(text[:start] + text[text.index("\n[", start + 1):])
    assert content.cache_hash(load_project("ticket-triage", root=project_root)) is None
