"""Cost and latency controls through the real path: a bento built from a check on the tiny model, served by
`slipway serve` on 127.0.0.1: load shedding (429 + Retry-After, never a 5xx), degradation under load, and
the streaming endpoint (server-sent events)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import cli_ok as ok
from tests.conftest import edit_toml
from tests.e2e.test_build_serve import _free_port, _stop, _wait_ready, loosen_latency

TICKETS = [f"Order {n}: the parcel arrived with a cracked screen, please send a replacement" for n in range(12)]


def sse(text: str) -> list[tuple[str, dict]]:
    """(event, data) pairs of a server-sent-events body."""
    found = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        found.append((lines["event"], json.loads(lines["data"])))
    return found


def serving(toml: Path) -> tuple[subprocess.Popen, str]:
    built = json.loads(ok(["build", "ticket-triage", "--json"]).stdout)
    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "slipway"), "serve", built["tag"],
                               "--port", str(port)], env=os.environ.copy(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    _wait_ready(base, server)
    return server, base


@pytest.mark.model
def test_a_burst_over_the_queue_is_shed_with_429_and_admitted_ones_degrade_and_stream(tiny_project,
                                                                                       tiny_model_present):
    loosen_latency(tiny_project)
    # one answer at a time (the sequential engine streams values one by one), one waiting, the waiting one degraded
    edit_toml(tiny_project, 'origin = "HuggingFaceTB/SmolLM2-135M-Instruct',
              'parallel = 1\norigin = "HuggingFaceTB/SmolLM2-135M-Instruct')
    edit_toml(tiny_project, "[serve]\n", '[serve]\nmax_queue = 1\ndegrade_at = 1\ndegrade = ["max_tokens=24"]\n')
    assert json.loads(ok(["check", "ticket-triage", "--json"]).stdout)["passed"]
    server, base = serving(tiny_project)
    try:
        # streaming: closed-set values as they complete, then the whole answer
        t0 = time.perf_counter()
        with httpx.stream("POST", f"{base}/triage/stream", json={"ticket": TICKETS[0]},
                          headers={"X-Request-ID": "c-stream"}, timeout=120) as streamed:
            assert streamed.status_code == 200
            assert streamed.headers["content-type"].startswith("text/event-stream")
            arrivals, body = [], ""
            for chunk in streamed.iter_text():
                arrivals.append(time.perf_counter() - t0)
                body += chunk
        events = sse(body)
        kinds = [kind for kind, _ in events]
        assert kinds[-1] == "answer" and kinds.count("field") >= 2, kinds
        fields = {data["name"]: data["value"] for kind, data in events if kind == "field"}
        answer = events[-1][1]
        assert set(fields) <= {"category", "priority", "needs_human"} and "reason" not in fields
        assert fields["category"] == answer["category"]
        assert answer["request_id"] == "c-stream" and answer["version"]["bento"].startswith("ticket-triage:")
        assert answer["served"]["first_field_ms"] > 0
        assert len(arrivals) >= 2   # more than one chunk reached the client before the stream ended

        # refused before the model: the plain status and JSON body, not an event stream
        empty = httpx.post(f"{base}/triage/stream", json={"ticket": "  ?! "}, timeout=60)
        assert empty.status_code == 400 and empty.headers["content-type"].startswith("application/json")

        # a burst of 12 at once into 1 answering + 1 waiting: the rest are shed at once, none is a 5xx
        def ask(i: int) -> httpx.Response:
            return httpx.post(f"{base}/triage", json={"ticket": TICKETS[i]}, headers={"X-Request-ID": f"c-burst-{i}"},
                              timeout=120)

        with ThreadPoolExecutor(max_workers=12) as pool:
            answers = list(pool.map(ask, range(12)))
        statuses = [a.status_code for a in answers]
        assert set(statuses) <= {200, 429}, [(a.status_code, a.text[:200]) for a in answers]
        shed = [a for a in answers if a.status_code == 429]
        assert len(shed) >= 8, statuses
        for refused in shed:
            assert int(refused.headers["retry-after"]) >= 1
            assert "serve.max_queue" in refused.json()["error"] and refused.json()["request_id"].startswith("c-burst-")
        done = [a.json() for a in answers if a.status_code == 200]
        assert done and any(a["served"].get("degraded") == ["max_tokens=24"] for a in done), done
    finally:
        _stop(server)

    traces = json.loads(ok(["traces", "ticket-triage", "--json", "--limit", "1000"]).stdout)
    overloaded = [t for t in traces if t.get("error_code") == "overloaded"]
    assert len(overloaded) == len(shed) and all(t["status"] == 429 for t in overloaded)
