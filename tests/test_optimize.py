"""`slipway optimize`: DSPy optimiser on train, dev scores before/after, DSPy save format."""

from __future__ import annotations

import json

import dspy
import pytest
from typer.testing import CliRunner

from framework import load_program, load_project
from framework.cli import app
from framework.notebook import program_hash
from tests.conftest import TINY, edit_toml


@pytest.mark.model
def test_optimize_saves_a_program_that_eval_then_uses(toml_path, tiny_model_present):
    edit_toml(toml_path, 'optimizer = "BootstrapFewShot"', 'optimizer = "LabeledFewShot"')
    edit_toml(toml_path, "params = { max_bootstrapped_demos = 4, max_labeled_demos = 0, max_rounds = 1 }",
              "params = { k = 3 }")
    project = load_project(str(toml_path))
    before_hash = program_hash(load_program(project))
    result = CliRunner().invoke(app, ["optimize", str(toml_path), "--model", TINY, "--dev-limit", "3", "--force",
                                      "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["demos"] == 3 and data["saved"] is True
    assert set(data["dev_before"]) == set(data["dev_after"]) >= {"category_accuracy", "category_macro_f1"}
    saved = json.loads(project.saved_program_path.read_text())
    assert len(saved["triage"]["demos"]) == 3  # DSPy's own save format
    assert program_hash(load_program(project)) != before_hash


class FakeLabelledTriage(dspy.Module):
    """Answers each dev ticket from its labels (`wrong=True`: with a wrong category); never calls a model."""

    def __init__(self, inner, answers: dict[str, dict], wrong: bool = False):
        super().__init__()
        self.inner = inner  # the notebook's program, so predictors() and the output fields are the real ones
        self.answers = answers
        self.wrong = wrong

    def forward(self, ticket):
        answer = dict(self.answers[ticket])
        if self.wrong:
            answer["category"] = "abuse" if answer["category"] != "abuse" else "billing"
        return dspy.Prediction(**answer, reason="from the labels")


class FakeOptimizer:
    """Compiles the student into a program that is worse on dev (or `as good`)."""

    def __init__(self, answers, worse: bool):
        self.answers, self.worse = answers, worse

    def compile(self, student, trainset):
        return FakeLabelledTriage(student.inner, self.answers, wrong=self.worse)


@pytest.mark.parametrize("worse", [True, False])
def test_a_compiled_program_worse_on_dev_is_not_saved(toml_path, monkeypatch, worse):
    """The rule, without --force: save only when the optimiser's objective on dev does not drop."""
    import importlib

    from framework.dataset import load_examples

    # framework/__init__ re-exports functions named like these modules; patch the modules themselves
    optimize_module = importlib.import_module("framework.optimize")
    evaluate = importlib.import_module("framework.evaluate")

    project = load_project(str(toml_path))
    answers = {ex.inputs["ticket"]: ex.expected
               for ex in load_examples(project.split_path("dev"), input_fields=("ticket",))}
    real_load_program = optimize_module.load_program
    monkeypatch.setattr(optimize_module, "load_program", lambda p, saved=True: FakeLabelledTriage(
        real_load_program(p, saved=False), answers))
    monkeypatch.setattr(optimize_module, "_make_optimizer", lambda p, metric: FakeOptimizer(answers, worse))
    monkeypatch.setattr(optimize_module, "language_model", lambda *a, **k: None)  # the fakes never call it
    monkeypatch.setattr(evaluate, "language_model", lambda *a, **k: None)
    outcome = optimize_module.optimize(project, dev_limit=4)
    assert outcome.objective_before == 1.0
    assert outcome.objective_after == (0.0 if worse else 1.0)
    assert outcome.saved is (not worse)
    assert project.saved_program_path.exists() is (not worse)
