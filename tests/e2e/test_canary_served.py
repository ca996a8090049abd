"""A canary through the real path: real bentos of the tiny model behind `slipway serve --channel prod` on
127.0.0.1, `slipway deploy --canary`, traffic from clients, decisions signed by the front.

One test, two rollouts on one warm front (each start of a server costs tens of seconds on 2 cores):
a good canary is promoted through every step to the channel; a canary that answers 5 s slower (a sleep
planted in its notebook, read only when served) breaks the contract's p50 clause and is rolled back
automatically; no client request fails during either."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from scipy.stats import binom

from tests.conftest import cli_ok as ok
from tests.conftest import edit_toml
from tests.e2e.test_build_serve import _free_port, _stop, _wait_ready


def slow_when_served(notebook: Path, variable: str) -> None:
    """The program sleeps `$variable` seconds per ticket when that variable is set (only the front's
    environment sets it): the check, run without it, passes, so the version builds and is approved."""
    edit_toml(notebook, "    def forward(self, ticket: str):\n",
              "    def forward(self, ticket: str):\n        import os\n        import time\n\n"
              f"        time.sleep(float(os.environ.get('{variable}', '0')))\n")


def _wait_for(log: Path, text: str, timeout: float, server) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text():
            return
        assert server.poll() is None, log.read_text()[-3000:]
        time.sleep(0.5)
    pytest.fail(f"{text!r} not in the front's log after {timeout} s:\n{log.read_text()[-4000:]}")


@pytest.mark.model
def test_a_good_canary_is_promoted_and_a_slow_one_rolled_back_with_no_failed_request(
        tiny_project, tiny_model_present, tmp_path, keys):
    text = tiny_project.read_text()   # quick steps: a few requests each on the tiny model
    start = text.index("[release]\n")
    tiny_project.write_text(text[:start] + '[release]\nsteps = [25, 50, 100]\nmin_requests = 6\nmin_seconds = 5\n'
                            'sticky = "none"' + text[text.index("\n\n", start):])
    # a p50 clause the tiny model keeps (~0.5-2 s here, even on a busy machine) and the canary slowed by 5 s breaks
    edit_toml(tiny_project, "latency_p50_ms = 60000", "latency_p50_ms = 4000")
    ok(["check", "ticket-triage"])
    v1 = json.loads(ok(["build", "ticket-triage", "--json"]).stdout)["tag"]
    edit_toml(tiny_project, "timeout_s = 60", "timeout_s = 45")  # a serve setting: a new version, same check
    v2 = json.loads(ok(["build", "ticket-triage", "--json"]).stdout)["tag"]
    slow_when_served(Path("notebooks/ticket_triage.py"), "TRIAGE_SLOW_ON_PURPOSE")
    ok(["check", "ticket-triage"])
    v3 = json.loads(ok(["build", "ticket-triage", "--json"]).stdout)["tag"]
    for version in (v1, v2, v3):
        ok(["approve", version, "--key", str(keys["bob"])])
    ok(["deploy", v1, "--channel", "prod", "--key", str(keys["carol"])])

    port = _free_port()
    log_path = tmp_path / "serve.log"
    log = log_path.open("w")
    front = subprocess.Popen([str(Path(sys.executable).parent / "slipway"), "serve", "ticket-triage", "--channel",
                              "prod", "--port", str(port), "--key", str(keys["carol"])],
                             env={**os.environ, "TRIAGE_SLOW_ON_PURPOSE": "5"}, stdout=log, stderr=subprocess.STDOUT,
                             text=True)
    base = f"http://127.0.0.1:{port}"
    answers: list[tuple[float, int | str, str | None]] = []
    done = threading.Event()

    rows = (tiny_project.parent / "data" / "dev.jsonl").read_text().splitlines()
    tickets = [json.loads(line)["inputs"]["ticket"] for line in rows]   # the model answers, not only the cache

    def traffic(offset: int) -> None:   # one of three clients, bounded in count and time
        deadline = time.monotonic() + 600
        with httpx.Client(base_url=base, timeout=90) as client:
            while not done.is_set() and len(answers) < 2000 and time.monotonic() < deadline:
                try:
                    ticket = tickets[(offset + len(answers)) % len(tickets)]
                    r = client.post("/triage", json={"ticket": ticket})
                    answers.append((time.monotonic(), r.status_code,
                                    r.json()["version"]["bento"] if r.status_code == 200 else r.text[:300]))
                except httpx.TransportError as exc:
                    answers.append((time.monotonic(), type(exc).__name__, None))
                time.sleep(0.2)

    clients = [threading.Thread(target=traffic, args=(i * 37,)) for i in range(3)]
    try:
        _wait_ready(base, front)
        for client in clients:
            client.start()
        started = time.monotonic()
        ok(["deploy", v2, "--channel", "prod", "--canary", "25", "--key", str(keys["carol"])])
        _wait_for(log_path, "all steps passed", 400, front)
        _wait_for(log_path, f"{v2} is live; draining the previous server", 60, front)
        promoted_after = time.monotonic() - started
        status = json.loads(ok(["status", "ticket-triage", "--json"]).stdout)
        assert f"ticket-triage:{status['prod']['version']}" == v2 and status["prod"]["actor"] == "carol"
        canary = status["canaries"]["prod"]
        assert canary["state"] == "complete"
        assert [e["action"] for e in canary["events"]] == ["canary-start", "canary-step", "canary-complete"]
        assert [e["weight"] for e in canary["events"]] == [25, 50, 100]
        # the first step's share, counted by the front: inside the central 99.9% of Binomial(n, 0.25)
        sent = canary["events"][1]["details"]["sent"]
        n = sent.get("canary", 0) + sent.get("stable", 0)
        low, high = binom.interval(0.999, n, 0.25)
        assert n >= 6 and low <= sent.get("canary", 0) <= high, sent
        good_share = [v for t, _, v in answers if t > started and v in (v1, v2)]

        rolled_from = time.monotonic()
        ok(["deploy", v3, "--channel", "prod", "--canary", "25", "--key", str(keys["carol"])])
        _wait_for(log_path, "rolled back", 400, front)
        recovered_after = time.monotonic() - rolled_from
        time.sleep(3)
        done.set()
        for client in clients:
            client.join(timeout=120)
        assert front.poll() is None
    finally:
        done.set()
        _stop(front, timeout=120)
        log.close()

    failed = [a for a in answers if a[1] != 200]
    assert not failed, failed[:5]                                # zero failed client requests, both rollouts
    assert v2 in good_share and v1 in good_share
    after_rollback = [v for t, _, v in answers if t > rolled_from + recovered_after + 1]
    assert after_rollback and set(after_rollback) == {v2}, set(after_rollback)
    assert any(v == v3 for _, _, v in answers)                  # the slow canary did take its share first

    status = json.loads(ok(["status", "ticket-triage", "--history", "--json"]).stdout)
    assert f"ticket-triage:{status['prod']['version']}" == v2   # the channel never moved
    incident = status["incidents"]["prod"][-1]
    assert incident["version"] == v3.partition(":")[2] and incident["by"] == "carol"
    assert "clause latency_p50_ms" in incident["reason"] and "<= 4,000 ms" in incident["reason"], incident["reason"]
    assert incident["detect_s"] >= 5 and incident["recover_s"] >= 0
    rolled = status["canaries"]["prod"]["events"][-1]
    figures = rolled["details"]["analysis"]
    assert figures["canary"]["latency_p50_ms"] > figures["stable"]["latency_p50_ms"] + 3000, figures
    audit_rows = json.loads(ok(["audit", "list", "ticket-triage", "--json"]).stdout)
    logged = [r for r in audit_rows if r["action"] == "canary-rollback"][-1]
    details = logged["details"] if isinstance(logged["details"], dict) else json.loads(logged["details"])
    assert "clause latency_p50_ms" in details["reason"] and details["analysis"]["canary"]["requests"] >= 6
    clause = next(f for f in details["analysis"]["findings"] if f["name"] == "latency_p50_ms")
    assert clause["failed"] and clause["canary"] > 4000      # the audit row carries the figure that broke it
    assert ok(["audit", "verify", "ticket-triage"]).exit_code == 0
    print(f"\ncanary: promoted through 25/50/100 in {promoted_after:.0f} s; the slow one rolled back "
          f"{recovered_after:.0f} s after its deploy (detect {incident['detect_s']:.1f} s, recover "
          f"{incident['recover_s']:.1f} s); {len(answers)} requests, none failed")
