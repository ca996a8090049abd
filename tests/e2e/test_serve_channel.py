"""`slipway serve --channel` through the real path: it never switches to a version that does not become ready."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import cli_ok as ok
from tests.e2e.test_build_serve import _free_port, _stop, _wait_ready, break_when_served, loosen_latency


@pytest.mark.model
def test_channel_keeps_the_old_version_when_the_new_one_fails_its_warm_up(tiny_project, tiny_model_present,
                                                                            tmp_path, keys):
    loosen_latency(tiny_project)
    ok(["check", "ticket-triage"])
    v1 = json.loads(ok(["build", "ticket-triage", "--json"]).stdout)["tag"]
    ok(["approve", v1, "--key", str(keys["bob"])])
    ok(["deploy", v1, "--channel", "prod", "--key", str(keys["carol"])])
    break_when_served(Path("notebooks/ticket_triage.py"))  # v2 passes its check, then cannot answer when served
    ok(["check", "ticket-triage"])
    v2 = json.loads(ok(["build", "ticket-triage", "--json"]).stdout)["tag"]
    ok(["approve", v2, "--key", str(keys["bob"])])

    port = _free_port()
    log_path = tmp_path / "serve.log"
    log = log_path.open("w")
    server = subprocess.Popen([str(Path(sys.executable).parent / "slipway"), "serve", "ticket-triage",
                               "--channel", "prod", "--port", str(port)],
                              env={**os.environ, "TRIAGE_FAIL_ON_PURPOSE": "1"}, stdout=log, stderr=subprocess.STDOUT,
                              text=True)
    base = f"http://127.0.0.1:{port}"
    answers: list[tuple[int, str | None]] = []
    try:
        _wait_ready(base, server)
        ok(["deploy", v2, "--channel", "prod", "--key", str(keys["carol"])])
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and "still serving" not in log_path.read_text():
            r = httpx.post(f"{base}/triage", json={"ticket": "I was charged twice"}, timeout=60)
            answers.append((r.status_code, r.json().get("version", {}).get("bento")))
            time.sleep(1)
        text = log_path.read_text()
        assert "still serving" in text, text[-3000:]
        assert f"{v2} did not become ready" in text and "broken on purpose" in text, text[-3000:]
        after = httpx.post(f"{base}/triage", json={"ticket": "The dashboard is down"}, timeout=60)
        assert after.status_code == 200 and after.json()["version"]["bento"] == v1, after.text
        assert answers and all(a == (200, v1) for a in answers), answers
        assert server.poll() is None
    finally:
        _stop(server, timeout=90)
        log.close()
