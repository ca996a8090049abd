"""A running `slipway check` does not lock the store: approve, deploy, rollback and status work during it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_ok, edit_toml


@pytest.mark.model
def test_release_commands_work_while_a_check_runs(tiny_project, tiny_model_present, keys, tmp_path):
    as_ = {name: ["--key", str(path)] for name, path in keys.items()}
    for key in ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms"):  # a busy 2-core machine must not fail it
        edit_toml(tiny_project, f"{key} = 60000", f"{key} = 6000000")
    cli_ok(["check", "ticket-triage"])
    v1 = json.loads(cli_ok(["build", "ticket-triage", "--json"]).stdout)["tag"]
    edit_toml(tiny_project, "timeout_s = 60", "timeout_s = 45")  # a serve setting: new version, same check
    v2 = json.loads(cli_ok(["build", "ticket-triage", "--json"]).stdout)["tag"]
    for version in (v1, v2):
        cli_ok(["approve", version, *as_["bob"]])
    cli_ok(["deploy", v1, "--channel", "prod", *as_["carol"]])

    # A longer eval set, so the check is still running while the release commands go through.
    eval_path = tiny_project.parent / "data" / "eval.jsonl"
    full = (REPO / "projects" / "ticket-triage" / "data" / "eval.jsonl").read_text().splitlines()
    eval_path.write_text("\n".join(full[:80]) + "\n")
    store = tiny_project.parent / ".slipway" / "store.duckdb"
    log = (tmp_path / "check.log").open("w")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    checker = subprocess.Popen([str(Path(sys.executable).parent / "slipway"), "check", "ticket-triage", "--fresh"],
                               cwd=tiny_project.parent.parent.parent, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while "check: " not in (tmp_path / "check.log").read_text() and time.monotonic() < deadline:
            assert checker.poll() is None, (tmp_path / "check.log").read_text()
            time.sleep(0.5)
        started = time.monotonic()
        cli_ok(["deploy", v2, "--channel", "prod", *as_["carol"]])
        cli_ok(["rollback", "ticket-triage", "--channel", "prod", *as_["carol"]])
        status = json.loads(cli_ok(["status", "ticket-triage", "--json"]).stdout)
        took = time.monotonic() - started
        assert checker.poll() is None, "the check ended before the release commands ran: lengthen the eval set"
        assert f"ticket-triage:{status['prod']['version']}" == v1 and status["prod"]["action"] == "rollback"
        print(f"\ndeploy + rollback + status during a running check: {took:.1f} s")
    finally:
        checker.wait(timeout=900)
        log.close()
    assert checker.returncode in (0, 1), (tmp_path / "check.log").read_text()[-2000:]
    import duckdb

    con = duckdb.connect(str(store), read_only=True)
    assert con.execute("SELECT count(*) FROM checks").fetchone()[0] == 2  # the long check was recorded too
    con.close()
