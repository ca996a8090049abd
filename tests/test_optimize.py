"""`slipway optimize`: DSPy optimiser on train, dev scores before/after, DSPy save format."""

from __future__ import annotations

import json

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
