"""Feature flags through the real path: a pipeline variant checked on the tiny model, packed by `slipway build`,
switched on for one tenant only after a reviewer's approval, and served by `slipway serve` on 127.0.0.1 to that
tenant alone, with the flag in every response's version block and in the trace. The refusals are walk-around
attempts: approving or switching on an unchecked variant, switching on without approval, approving your own
switch, and a forged line typed into the flags file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROLES, act_as, edit_toml, write_signers
from tests.conftest import cli_ok as ok
from tests.e2e.test_build_serve import _free_port, _stop, _wait_ready, loosen_latency

VARIANT = "terse_prompt=on"


def refused(args: list[str]) -> str:
    from typer.testing import CliRunner

    from framework.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0, result.output
    return " ".join(result.output.split())   # as one line: the terminal width wraps it


@pytest.mark.model
def test_a_flag_serves_its_checked_variant_to_one_approved_tenant(tiny_project, tiny_model_present, keys,
                                                                  monkeypatch):
    loosen_latency(tiny_project)
    edit_toml(tiny_project, '[serve]\nauth = "none"\n', "[serve]\n")   # callers are tenants: keys required
    edit_toml(tiny_project, "\n[contract]\n", "\n[tenants.beta]\n\n[contract]\n")
    write_signers(tiny_project.parent, keys, {**ROLES, "carol": [*ROLES["carol"], "keys", "flags"],
                                              "bob": ["approve", "flags"]})
    ok(["check", "ticket-triage"])
    unchecked = json.loads(ok(["build", "ticket-triage", "--json"]).stdout)["variants"]
    assert unchecked == [{"flag": "terse_prompt", "variant": "on", "packed": False,
                          "why": "no check has been run for this content "
                                 "(`slipway check ticket-triage --variant terse_prompt=on`)"}]

    act_as(monkeypatch, keys, "bob")   # a variant nobody checked cannot be approved: reviewers approve checks
    assert "no check has been run for this content" in refused(
        ["flags", "approve", "ticket-triage", VARIANT, "--tenant", "acme"])
    act_as(monkeypatch, keys, "alice")
    checked = json.loads(ok(["check", "ticket-triage", "--variant", VARIANT, "--json"]).stdout)
    assert checked["passed"] and checked["meta"]["variant"] == VARIANT
    assert checked["meta"]["program_hash"] != json.loads(ok(["check", "ticket-triage", "--json"]).stdout)[
        "meta"]["program_hash"]
    built = json.loads(ok(["build", "ticket-triage", "--json"]).stdout)
    assert built["variants"] == [{"flag": "terse_prompt", "variant": "on", "packed": True,
                                  "check_id": checked["check_id"]}]

    act_as(monkeypatch, keys, "carol")
    why = refused(["flags", "on", "ticket-triage", VARIANT, "--tenant", "acme"])
    assert "switch terse_prompt=on for tenant 'acme' at 100% on: rule approvals: 0 of the 1 approval" in why
    act_as(monkeypatch, keys, "bob")   # bob approves, and cannot then switch on his own approval
    ok(["flags", "approve", "ticket-triage", VARIANT, "--tenant", "acme", "--reason", "shorter prompts"])
    assert "rule approvals" in refused(["flags", "on", "ticket-triage", VARIANT, "--tenant", "acme"])
    act_as(monkeypatch, keys, "carol")
    ok(["flags", "on", "ticket-triage", VARIANT, "--tenant", "acme"])
    made = {t: json.loads(ok(["keys", "create", "ticket-triage", "--tenant", t, "--json"]).stdout)["key"]
            for t in ("acme", "beta")}

    # a line typed into the file by someone with write access but no signature: switches nothing on for beta
    flags_file = tiny_project.parent / ".slipway" / "flags.jsonl"
    lines = flags_file.read_text().splitlines()
    forged = json.loads(lines[-1])
    forged["statement"]["details"]["tenant"] = "beta"
    with flags_file.open("a") as out:
        out.write(json.dumps(forged) + "\n")

    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "slipway"), "serve", built["tag"],
                               "--port", str(port)], env=os.environ.copy(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"

    def ask(tenant: str, rid: str):
        return httpx.post(f"{base}/triage", json={"ticket": "I was charged twice on invoice INV-2231, refund one."},
                          headers={"Authorization": f"Bearer {made[tenant]}", "X-Request-ID": rid}, timeout=120)

    try:
        _wait_ready(base, server)
        acme, beta = ask("acme", "f-acme"), ask("beta", "f-beta")
        assert acme.status_code == 200 and beta.status_code == 200, (acme.text, beta.text)
        assert acme.json()["version"]["flags"] == {"terse_prompt": "on"}
        assert acme.json()["version"]["program_hash"] == checked["meta"]["program_hash"]   # the variant answered
        assert beta.json()["version"]["flags"] == {}
        assert beta.json()["version"]["program_hash"] == built["labels"]["slipway.program_hash"]

        flags_file.write_text("\n".join(lines) + "\n")   # remove the forged line, then switch off
        ok(["flags", "off", "ticket-triage", "terse_prompt", "--tenant", "acme", "--reason", "done"])
        after = ask("acme", "f-acme-off")
        assert after.status_code == 200 and after.json()["version"]["flags"] == {}   # the live file: at once
    finally:
        _stop(server)

    listed = json.loads(ok(["flags", "list", "ticket-triage", "--json"]).stdout)
    assert listed["active"] == [] and [r["action"] for r in listed["history"]] == [
        "flag-approve", "flag-on", "flag-off"]
    traces = {row["request_id"]: row for row in json.loads(ok(["traces", "ticket-triage", "--json"]).stdout)}
    assert traces["f-acme"]["flags"] == {"terse_prompt": "on"}
    assert traces["f-acme"]["program_hash"] == checked["meta"]["program_hash"]
    assert traces["f-beta"]["flags"] == {} and traces["f-acme-off"]["flags"] == {}
    actions = [row["action"] for row in json.loads(ok(["audit", "list", "ticket-triage", "--json"]).stdout)]
    assert {"flag-approve", "flag-on", "flag-off"} <= set(actions)
    ok(["audit", "verify", "ticket-triage"])
