"""Traces through the real path: a bento served by `slipway serve` with 2 workers on 127.0.0.1, one
worker killed mid-run, then `slipway traces`, `slipway trace`, `slipway slo` and POST /feedback."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from typer.testing import CliRunner

from framework.cli import app
from tests.conftest import ROLES, act_as, edit_toml, write_signers
from tests.conftest import cli_ok as ok
from tests.e2e.test_build_serve import _free_port, _stop, _wait_ready, loosen_latency

runner = CliRunner()
EMAILS = [f"jane.doe{i}@example.com" for i in range(4)]
CARDS = ["4111 1111 1111 1111", "5500-0000-0000-0004", "340000000000009"]
N = 24


def ticket(i: int) -> str:
    base = f"Ticket {i}: I was charged twice on invoice INV-{1000 + i}, please refund."
    if i % 3 == 0:
        base += f" Reach me at {EMAILS[i % len(EMAILS)]}."
    if i % 4 == 1:
        base += f" My card {CARDS[i % len(CARDS)]} shows both charges."
    return base


def workers_of(server: subprocess.Popen) -> list[psutil.Process]:
    """BentoML's worker processes under `slipway serve` (each loads the model and answers requests)."""
    found = []
    for child in psutil.Process(server.pid).children(recursive=True):
        try:
            if "worker" in " ".join(child.cmdline()) and "--worker-id" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.mark.model
def test_two_workers_one_killed_every_answer_traced_once_and_the_slo_matches(tiny_project, tiny_model_present,
                                                                             keys, monkeypatch):
    loosen_latency(tiny_project)
    first_check = json.loads(ok(["check", "ticket-triage", "--json"]).stdout)
    built = json.loads(runner.invoke(app, ["build", "ticket-triage", "--json"]).stdout)
    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "slipway"), "serve", built["tag"],
                               "--port", str(port), "--workers", "2"], env=os.environ.copy(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    answered: dict[str, int] = {}
    try:
        _wait_ready(base, server)
        workers = workers_of(server)
        assert len(workers) == 2, [w.cmdline() for w in workers]
        killed_after = N // 3

        def ask(i: int):
            try:
                response = httpx.post(f"{base}/triage", json={"ticket": ticket(i)},
                                      headers={"X-Request-ID": f"req-{i:03d}"}, timeout=120)
            except httpx.TransportError:
                return i, None   # its worker was killed under it: not answered
            return i, response

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(ask, i) for i in range(N)]
            done = 0
            for future in concurrent.futures.as_completed(futures):
                i, response = future.result()
                if response is not None:
                    answered[f"req-{i:03d}"] = response.status_code
                done += 1
                if done == killed_after:
                    os.kill(workers[0].pid, signal.SIGKILL)   # mid-run, requests in flight on both workers
        with pytest.raises(psutil.NoSuchProcess):
            workers[0].cmdline()   # it is gone (BentoML starts a new one in its place)
        # Client errors are traced too, and left out of the SLO figures.
        huge = httpx.post(f"{base}/triage", json={"ticket": "x" * 9000}, headers={"X-Request-ID": "req-huge"},
                          timeout=30)
        assert huge.status_code == 413
        answered["req-huge"] = 413
        typo = httpx.post(f"{base}/triage", json={"tickt": "typo"}, headers={"X-Request-ID": "req-typo"}, timeout=30)
        assert typo.status_code == 422
        answered["req-typo"] = 422
        assert sum(1 for s in answered.values() if s == 200) >= N // 2, answered

        # Feedback on an answered request: recorded once, attributed to its version.
        first_ok = next(r for r, s in sorted(answered.items()) if s == 200)
        body = {"request_id": first_ok, "score": -1, "comment": "wrong, mail me at jane.doe0@example.com",
                "correct_labels": {"category": "billing", "priority": "high", "needs_human": True}}
        sent = httpx.post(f"{base}/feedback", json=body, timeout=30)
        assert sent.status_code == 200, sent.text
        assert sent.json()["bento"] == built["tag"] and sent.json()["duplicate"] is False
        again = httpx.post(f"{base}/feedback", json=body, timeout=30)
        assert again.status_code == 200 and again.json()["duplicate"] is True
        assert again.json()["feedback_id"] == sent.json()["feedback_id"]
        assert httpx.post(f"{base}/feedback", json={**body, "request_id": "never-sent"}, timeout=30).status_code == 404
        assert httpx.post(f"{base}/feedback", json={**body, "score": 7}, timeout=30).status_code == 422
        assert httpx.post(f"{base}/feedback", json={**body, "correct_labels": {"category": "weather"}},
                          timeout=30).status_code == 422
    finally:
        _stop(server)

    # Exactly one trace per answered request, through `slipway traces`.
    listed = json.loads(ok(["traces", "ticket-triage", "--json", "--limit", "1000"]).stdout)
    by_request: dict[str, list[dict]] = {}
    for row in listed:
        by_request.setdefault(row["request_id"], []).append(row)
    for request_id, status in answered.items():
        assert len(by_request.get(request_id, [])) == 1, (request_id, status, by_request.get(request_id))
        assert by_request[request_id][0]["status"] == status
    unanswered = set(by_request) - set(answered)
    sent_ids = {f"req-{i:03d}" for i in range(N)}
    assert unanswered <= sent_ids   # traced, but the killed worker never got the answer out
    assert len(listed) == len(by_request)
    assert ok(["traces", "ticket-triage", "--json"]).stdout == ok(["traces", "ticket-triage", "--json"]).stdout

    one = json.loads(ok(["trace", first_ok, "--json"]).stdout)
    assert one["bento"] == built["tag"] and one["model_sha256"] == built["labels"]["slipway.model_sha256"]
    assert [s["name"] for s in one["stages"]][0] == "validation"
    assert any(s["name"].startswith("model_call_") for s in one["stages"])
    assert one["calls"][0]["messages"] and one["tokens_out"] > 0 and one["cost"] > 0
    assert "model_call_0" in ok(["trace", first_ok]).stdout

    # No email or card number in any stored trace: segment files, the store, feedback comments.
    trace_dir = tiny_project.parent / ".slipway" / "traces"
    stored = "\n".join(p.read_text() for p in trace_dir.rglob("*.jsonl"))
    stored += ok(["traces", "ticket-triage", "--json", "--limit", "1000"]).stdout
    for secret in [*EMAILS, *CARDS, *(c.replace(" ", "").replace("-", "") for c in CARDS)]:
        assert secret not in stored
    assert "[EMAIL]" in stored and "[CARD]" in stored

    # `slipway slo` against an independent computation over the raw segment lines.
    raw = [json.loads(line) for p in sorted((trace_dir / "traces").glob("*.jsonl"))
           for line in p.read_text().splitlines() if line.strip()]
    counted = [t for t in raw if not 400 <= t["status"] < 500]
    ok_rows = [t for t in counted if t["status"] < 400]
    durations = np.array([t["duration_ms"] for t in ok_rows])
    live = json.loads(ok(["slo", "ticket-triage", "--window", "1h", "--json"]).stdout)
    clauses = {c["name"]: c for c in live["clauses"]}
    assert live["n"] == len(counted)
    for q, name in ((50, "latency_p50_ms"), (95, "latency_p95_ms"), (99, "latency_p99_ms")):
        assert clauses[name]["measured"] == pytest.approx(np.percentile(durations, q), rel=1e-9)
    errors = sum(1 for t in counted if t["status"] >= 500)
    assert clauses["error_rate_max"]["measured"] == pytest.approx(errors / len(counted))
    tokens = np.mean([t["tokens_in_new"] + t["tokens_out"] for t in ok_rows])
    assert clauses["tokens_per_request_max"]["measured"] == pytest.approx(tokens)
    assert clauses["cost_per_request_max"]["measured"] == pytest.approx(np.mean([t["cost"] for t in counted]))
    assert live["passed"] is True

    # A clause breached over the window exits 1 and names it.
    edit_toml(tiny_project, "latency_p50_ms = 600000", "latency_p50_ms = 1")
    breached = runner.invoke(app, ["slo", "ticket-triage", "--window", "1h"])
    assert breached.exit_code == 1, breached.output
    assert re.search(r"latency_p50_ms\s.*FAIL", breached.output)
    edit_toml(tiny_project, "latency_p50_ms = 1", "latency_p50_ms = 600000")

    # Feedback → harvest → accept (signed, curate role) → the next check measures the new eval set.
    write_signers(tiny_project.parent, keys, {**ROLES, "carol": ["curate"]})
    harvested = json.loads(ok(["harvest", "ticket-triage", "--json"]).stdout)
    candidate = f"served-{first_ok}"
    assert candidate in harvested["added"], harvested
    refused = runner.invoke(app, ["harvest", "accept", "ticket-triage", "--id", candidate])   # alice: no role
    assert refused.exit_code == 1 and "curate" in refused.output
    act_as(monkeypatch, keys, "carol")
    accepted = json.loads(ok(["harvest", "accept", "ticket-triage", "--id", candidate, "--json"]).stdout)
    assert accepted["ok"] and [row["id"] for row in accepted["added"]] == [candidate]
    eval_rows = [json.loads(x) for x in (tiny_project.parent / "data" / "eval.jsonl").read_text().splitlines()]
    row = eval_rows[-1]
    assert row["expected"] == {"category": "billing", "priority": "high", "needs_human": True}
    assert row["provenance"]["request_id"] == first_ok and row["provenance"]["bento"] == built["tag"]
    assert row["provenance"]["accepted_by"] == "carol"
    assert "[EMAIL]" not in json.dumps(row) or "@" not in row["inputs"]["ticket"]
    second_check = runner.invoke(app, ["check", "ticket-triage", "--json"])
    assert second_check.exit_code == 0, second_check.output
    second = json.loads(second_check.stdout)
    assert second["n"] == first_check["n"] + 1
    hashes = [json.loads(Path(c["report_json"]).read_text())["run"]["hashes"]["dataset_hash"]
              for c in (first_check, second)]
    assert hashes[0] != hashes[1]
    assert "harvest-accept" in ok(["audit", "list", "ticket-triage"]).stdout
