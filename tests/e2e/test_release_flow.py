"""Review and release through the CLI on a real check, real bentos and the real store."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from framework.cli import app
from tests.conftest import edit_toml

runner = CliRunner()


def ok(args: list[str]):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.model
def test_check_build_approve_deploy_rollback_audit(tiny_project, tiny_model_present, monkeypatch, tmp_path):
    edit_toml(tiny_project, "[contract]\n", "[contract]\napprovals_required = 1\n")
    for key in ("latency_p95_ms", "latency_p99_ms"):  # two checks here; do not fail on a busy machine
        edit_toml(tiny_project, f"{key} = 60000", f"{key} = 600000")
    monkeypatch.setenv("SLIPWAY_USER", "alice")
    ok(["check", "ticket-triage"])
    first = json.loads(ok(["build", "ticket-triage", "--json"]).stdout)
    assert first["labels"]["slipway.author"] == "alice"
    v1 = first["tag"]

    refused = runner.invoke(app, ["deploy", v1, "--channel", "prod"])
    assert refused.exit_code == 1
    assert "0 of 1 approvals" in refused.output and "no passing check" not in refused.output
    self_approval = runner.invoke(app, ["approve", v1, "--note", "mine"])
    assert self_approval.exit_code == 1 and "alice built" in self_approval.output
    ok(["approve", v1, "--as", "bob", "--note", "reviewed"])
    ok(["deploy", v1, "--channel", "prod", "--as", "carol"])

    # A second version: a contract change gives new bento content that needs its own check.
    edit_toml(tiny_project, "max_input_chars = ", "max_input_chars = 7999\n# was: max_input_chars = ")
    unchecked = runner.invoke(app, ["build", "ticket-triage"])
    assert unchecked.exit_code == 1
    ok(["check", "ticket-triage"])
    v2 = json.loads(ok(["build", "ticket-triage", "--json"]).stdout)["tag"]
    assert v2 != v1
    ok(["approve", v2, "--as", "bob"])
    ok(["deploy", v2, "--channel", "prod", "--as", "carol"])
    status = json.loads(ok(["status", "ticket-triage", "--json"]).stdout)
    assert f"ticket-triage:{status['prod']['version']}" == v2 and status["prod"]["actor"] == "carol"
    assert status["staging"] is None

    ok(["rollback", "ticket-triage", "--channel", "prod", "--as", "dave"])
    status = json.loads(ok(["status", "ticket-triage", "--json"]).stdout)
    assert f"ticket-triage:{status['prod']['version']}" == v1 and status["prod"]["action"] == "rollback"

    out = tmp_path / "audit.jsonl"
    ok(["audit", "export", "ticket-triage", "--format", "jsonl", "-o", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["action"] for r in rows] == ["check", "build", "approve", "deploy", "check", "build", "approve",
                                           "deploy", "rollback"]
    assert json.loads(ok(["audit", "verify", "ticket-triage", "--json"]).stdout)["rows"] == 9

    import duckdb

    con = duckdb.connect(str(tiny_project.parent / ".slipway" / "store.duckdb"))
    con.execute("UPDATE audit SET actor = 'mallory' WHERE seq = 3")
    con.close()
    broken = runner.invoke(app, ["audit", "verify", "ticket-triage"])
    assert broken.exit_code == 1
    assert "audit.seq=3" in broken.output and "edited" in broken.output
