"""Review and release through the CLI on a real check, real bentos and the real store."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from framework.cli import app
from tests.conftest import cli_ok as ok
from tests.conftest import edit_toml

runner = CliRunner()


@pytest.mark.model
def test_check_build_approve_deploy_rollback_audit(tiny_project, tiny_model_present, keys, tmp_path):
    """The whole release through the CLI, each person signing with their own key; then the attacks a
    reviewer worries about, each refused naming the rule."""
    for key in ("latency_p95_ms", "latency_p99_ms"):  # two checks here; do not fail on a busy machine
        edit_toml(tiny_project, f"{key} = 60000", f"{key} = 600000")
    as_ = {name: ["--key", str(path)] for name, path in keys.items()}
    ok(["check", "ticket-triage"])  # alice (SLIPWAY_SIGNING_KEY in tests)
    first = json.loads(ok(["build", "ticket-triage", "--json"]).stdout)
    v1 = first["tag"]

    refused = runner.invoke(app, ["deploy", v1, "--channel", "prod", *as_["carol"]])
    assert refused.exit_code == 1
    assert "rule approvals: 0 of 1" in refused.output and "rule check" not in refused.output
    self_approval = runner.invoke(app, ["approve", v1, "--note", "mine"])
    assert self_approval.exit_code == 1 and "rule role: alice lacks the role 'approve'" in self_approval.output
    impostor = runner.invoke(app, ["approve", v1, *as_["mallory"]])
    assert impostor.exit_code == 1 and "rule known-key" in impostor.output
    ok(["approve", v1, *as_["bob"], "--note", "reviewed"])
    ok(["deploy", v1, "--channel", "prod", *as_["carol"]])

    # A second version: a contract change gives new bento content that needs its own check.
    edit_toml(tiny_project, "max_input_chars = ", "max_input_chars = 7999\n# was: max_input_chars = ")
    unchecked = runner.invoke(app, ["build", "ticket-triage"])
    assert unchecked.exit_code == 1 and "contract changed since" in unchecked.output
    ok(["check", "ticket-triage"])
    v2 = json.loads(ok(["build", "ticket-triage", "--json"]).stdout)["tag"]
    assert v2 != v1
    ok(["approve", v2, *as_["bob"]])
    ok(["deploy", v2, "--channel", "prod", *as_["carol"]])
    status = json.loads(ok(["status", "ticket-triage", "--json"]).stdout)
    assert f"ticket-triage:{status['prod']['version']}" == v2 and status["prod"]["actor"] == "carol"
    assert status["prod"]["verified"] is True and status["staging"] is None

    nobody = runner.invoke(app, ["rollback", "ticket-triage", "--channel", "prod", *as_["mallory"]])
    assert nobody.exit_code == 1 and "rule known-key" in nobody.output
    ok(["rollback", "ticket-triage", "--channel", "prod", *as_["dave"]])
    status = json.loads(ok(["status", "ticket-triage", "--json"]).stdout)
    assert f"ticket-triage:{status['prod']['version']}" == v1 and status["prod"]["action"] == "rollback"

    out = tmp_path / "audit.jsonl"
    ok(["audit", "export", "ticket-triage", "--format", "jsonl", "-o", str(out), *as_["root"]])
    rows = [json.loads(line) for line in out.read_text().splitlines() if "head" not in json.loads(line)]
    assert [r["action"] for r in rows] == ["check", "build", "approve", "deploy", "check", "build", "approve",
                                           "deploy", "rollback"]
    assert [r["actor"] for r in rows if r["action"] in ("approve", "deploy", "rollback")] == [
        "bob", "carol", "bob", "carol", "dave"]
    assert json.loads(ok(["audit", "verify", "ticket-triage", "--json"]).stdout)["rows"] == 9
    assert json.loads(ok(["audit", "verify", "ticket-triage", "--file", str(out), "--json"]).stdout)["rows"] == 9
    ok(["audit", "anchor", "ticket-triage", *as_["root"]])
    listed = json.loads(ok(["audit", "list", "ticket-triage", "--json"]).stdout)
    assert [r["action"] for r in listed] == [r["action"] for r in rows]

    import duckdb

    from framework import audit

    store_file = str(tiny_project.parent / ".slipway" / "store.duckdb")
    con = duckdb.connect(store_file)
    con.execute("UPDATE audit SET actor = 'mallory' WHERE seq = 3")
    con.close()
    broken = runner.invoke(app, ["audit", "verify", "ticket-triage"])
    assert broken.exit_code == 1
    assert "audit.seq=3" in broken.output and "edited" in broken.output

    # Mallory re-hashes the whole chain after her edit, and fixes the stored head: only the anchor in git,
    # signed by root, still tells.
    con = duckdb.connect(store_file)
    rows = [dict(zip([d[0] for d in con.description], r, strict=True))
            for r in con.execute("SELECT * FROM audit ORDER BY seq").fetchall()]
    prev = audit.GENESIS
    for row in rows:
        row["prev_hash"] = prev
        row["hash"] = prev = audit.row_hash(prev, row)
        con.execute("UPDATE audit SET prev_hash = ?, hash = ? WHERE seq = ?", [row["prev_hash"], row["hash"],
                                                                              row["seq"]])
    con.execute("UPDATE meta SET value = ? WHERE key = 'audit_head'", [f"{rows[-1]['seq']}:{prev}"])
    con.close()
    rewritten = runner.invoke(app, ["audit", "verify", "ticket-triage"])
    assert rewritten.exit_code == 1 and "audit-anchor.json" in rewritten.output, rewritten.output


@pytest.mark.model
def test_serve_channel_follows_a_rollback_without_downtime(tiny_project, tiny_model_present, tmp_path, keys):
    """`slipway serve --channel prod` keeps answering through a rollback: every request during the
    switch gets a 200 (from the old version until the new one is ready, then from the new one), both
    for a client opening a connection per request and for one keep-alive client reusing its connection,
    whose requests must also switch to the new version (not stay pinned to the old server).
    Prints how long the rolled-back version took to answer."""
    import os
    import subprocess
    import sys
    import threading
    import time
    from pathlib import Path

    import httpx

    from tests.e2e.test_build_serve import _free_port, _stop, _wait_ready

    ok(["check", "ticket-triage"])
    v1 = json.loads(ok(["build", "ticket-triage", "--json"]).stdout)["tag"]
    edit_toml(tiny_project, "timeout_s = 60", "timeout_s = 45")  # a serve setting: a new version, same check
    v2 = json.loads(ok(["build", "ticket-triage", "--json"]).stdout)["tag"]
    for version in (v1, v2):
        ok(["approve", version, "--key", str(keys["bob"])])
        ok(["deploy", version, "--channel", "prod", "--key", str(keys["carol"])])

    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([str(Path(sys.executable).parent / "slipway"), "serve", "ticket-triage",
                               "--channel", "prod", "--port", str(port)], env=os.environ.copy(),
                              stdout=log, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    seen: list[tuple[float, int | str, str | None]] = []  # (request start, status, version), new connections
    kept: list[tuple[float, int | str, str | None]] = []  # the same from one keep-alive client
    done = threading.Event()

    def traffic(record, post):  # one client, a request every ~0.5 s, bounded in count and time
        deadline = time.monotonic() + 200
        while not done.is_set() and len(record) < 500 and time.monotonic() < deadline:
            start = time.monotonic()
            try:
                r = post(f"{base}/triage", json={"ticket": "I was charged twice"}, timeout=60)
                record.append((start, r.status_code,
                               r.json().get("version", {}).get("bento") if r.status_code == 200 else r.text[:200]))
            except httpx.TransportError as exc:
                record.append((start, type(exc).__name__, None))
            # Not back to back: on 2 cores a saturating client starves the new server's start-up (llama.cpp
            # threads of both servers spin on the same cores); BENCHMARKS.md has that case measured.
            time.sleep(0.5)

    try:
        _wait_ready(base, server)
        assert httpx.post(f"{base}/triage", json={"ticket": "hi"}, timeout=60).json()["version"]["bento"] == v2
        keep_alive = httpx.Client()
        client = threading.Thread(target=traffic, args=(seen, httpx.post))
        client.start()
        time.sleep(0.25)  # the two clients' requests interleave, 0.25 s apart
        kept_client = threading.Thread(target=traffic, args=(kept, keep_alive.post))
        kept_client.start()
        time.sleep(1)
        ok(["rollback", "ticket-triage", "--channel", "prod", "--key", str(keys["dave"])])
        rolled_back = time.monotonic()
        while time.monotonic() - rolled_back < 150 and not any(v == v1 for _, _, v in seen):
            time.sleep(0.2)
        time.sleep(1)  # a few answers from the new version, then stop
        done.set()
        client.join(timeout=70)
        kept_client.join(timeout=70)
        keep_alive.close()
        first_v1 = next((t for t, _, v in seen if v == v1), None)
        assert first_v1 is not None, f"still serving {v2} 150 s after the rollback: {seen[-3:]}"
        print(f"\nswitch: first answer from {v1} {first_v1 - rolled_back:.1f} s after the rollback; "
              f"{len(seen)} requests on new connections and {len(kept)} on one kept-alive connection during the test, "
              f"statuses {sorted({str(s) for _, s, _ in seen + kept})}")
        assert {s for _, s, _ in seen} == {200}, [x for x in seen if x[1] != 200][:5]  # nothing refused or failed
        assert {s for _, s, _ in kept} == {200}, [x for x in kept if x[1] != 200][:5]
        assert kept[-1][2] == v1, f"the keep-alive client still gets {kept[-1][2]} after the switch"
        # Both clients, by the time each request was sent: once one request got the new version, no later
        # request (on any connection) may get the old one.
        versions = [v for _, _, v in sorted(seen + kept)]
        assert versions == sorted(versions, key=lambda v: v == v1), "answers went back to the old version"
        assert server.poll() is None
    finally:
        done.set()
        _stop(server, timeout=90)
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert "is live; draining the previous server" in text, text[-2000:]
