"""The dashboard's plain functions (framework/dashboard.py, framework/dashboard_launch.py) and the store
queries it reads, without a browser: traces come from the service's own `Tracer`, as in test_traces.py.
The page itself, served by marimo and opened in Chromium, is tests/e2e/test_dashboard_in_browser.py."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from datetime import timedelta

import pytest

from framework import dashboard
from framework.dashboard_launch import Dashboard, command
from framework.evaluate import store_path
from framework.slo import slo
from framework.spec import TracingSpec, load_project
from framework.store import Store
from framework.traces import Tracer, feedback_id, ingest, is_negative, iso, utc_now
from tests.test_traces import FakeCall


def identity(version: str) -> dict:
    return {"project": "ticket-triage", "channel": "prod", "bento": f"ticket-triage:{version}", "version": version,
            "model_sha256": "ab" * 32, "program_hash": "cd" * 32}


def served(tracer: Tracer, request_id: str, started_at, duration_ms: float, status: int) -> dict:
    """One request answered (or failed) at `started_at`, taking `duration_ms`, as the service traces it."""
    t0 = time.perf_counter()
    calls = [FakeCall(latency_ms=duration_ms * 0.9, started=t0 + 0.001)] if status != 413 else []
    return tracer.record(request_id=request_id, started_at=started_at, t0=t0, t_valid=t0 + 0.0005,
                         t_end=t0 + duration_ms / 1000, status=status, inputs={"ticket": "My invoice is wrong"},
                         outputs={"category": "billing"} if status == 200 else None, calls=calls,
                         error_code={500: "model-error", 413: "input-too-large"}.get(status))


def synthetic_traffic(project, n: int = 200, hours: float = 4.0, seed: int = 12) -> None:
    """`n` requests over the last `hours`: v1 until half-way, then v2 (slower, a 5xx in every 11th request),
    a 413 in every 37th, and thumbs up/down on every 4th answer, written to segment files as served workers
    write them (traces and feedback)."""
    rng = random.Random(seed)
    tracers = {v: Tracer(TracingSpec(), project.trace_dir, identity(v), project.model()) for v in ("v1", "v2")}
    now = utc_now()
    for i in range(n):
        started = now - timedelta(hours=hours) + timedelta(hours=hours) * i / n
        version = "v1" if i < n // 2 else "v2"
        status = 413 if i % 37 == 0 else 500 if version == "v2" and i % 11 == 0 else 200
        duration = rng.lognormvariate(6.5 if version == "v1" else 7.0, 0.5)
        tracer = tracers[version]
        trace = served(tracer, f"req-{i}", started, duration, status)
        if status == 200 and i % 4 == 0:
            score = -1.0 if rng.random() < (0.2 if version == "v1" else 0.5) else 1.0
            tracer.feedback_writer.append({
                "feedback_id": feedback_id(trace["request_id"], score, None, None),
                "request_id": trace["request_id"], "trace_id": trace["trace_id"], "bento": trace["bento"],
                "version": version, "score": score, "negative": is_negative(score), "comment": None,
                "correct_labels": None, "received_at": iso(started + timedelta(seconds=30))})


@pytest.fixture
def project(project_root):
    return load_project(str(project_root / "projects" / "ticket-triage"))


@pytest.fixture
def traffic(project):
    synthetic_traffic(project)
    ingest(project)
    return project


# -- the store queries the dashboard reads (framework/store.py) ------------------------------------------
def test_served_over_time_buckets_per_version_and_leaves_4xx_out(traffic):
    with Store(store_path(traffic), read_only=True) as store:
        rows = store.served_over_time(since=utc_now() - timedelta(days=1), bucket=timedelta(hours=1))
        figures = store.slo_figures(since=utc_now() - timedelta(days=1))
    assert {r["version"] for r in rows} == {"v1", "v2"}
    assert sum(r["n"] for r in rows) == figures["n"] == 200 - 6      # requests 0, 37, … 185 got 413
    assert sum(r["errors"] for r in rows) == figures["errors"] > 0
    assert all(r["errors"] == 0 for r in rows if r["version"] == "v1")
    assert all(r["p50"] <= r["p95"] <= r["p99"] for r in rows)
    assert [r["bucket"] for r in rows] == sorted(r["bucket"] for r in rows)
    assert all(r["bucket"].minute == 0 and r["bucket"].second == 0 for r in rows)


def test_feedback_by_version_counts_thumbs(traffic):
    with Store(store_path(traffic), read_only=True) as store:
        rows = store.feedback_by_version(since=utc_now() - timedelta(days=1))
        every = store.feedback_rows()
    assert [r["version"] for r in rows] == ["v1", "v2"]
    assert sum(r["n"] for r in rows) == len(every)
    assert all(r["positive"] + r["negative"] == r["n"] for r in rows)
    assert sum(r["negative"] for r in rows) == sum(1 for r in every if r["negative"])


# -- the verdict --------------------------------------------------------------------------------------------
def test_the_live_verdict_is_slipway_slos(traffic):
    rows, source = dashboard.live_verdict(traffic, store_path(traffic), timedelta(days=1))
    assert "194 requests" in source
    verdicts = {r["clause"]: r["verdict"] for r in rows}
    assert verdicts["error_rate_max"] == "FAIL" and verdicts["latency_p95_ms"] == "PASS"
    live = slo(traffic, timedelta(days=1), ingest=False)
    assert [r["clause"] for r in rows] == [c.clause.name for c in live.clauses]


def test_the_verdict_table_escapes_what_it_shows():
    table = dashboard.html_table([{"clause": "<img src=x>", "verdict": "FAIL"}], table_id="contract",
                                 columns=("clause", "verdict"))
    assert "<img" not in table and "&lt;img src=x&gt;" in table and '<td class="fail">FAIL</td>' in table


# -- where the dashboard looks, and how it is started ----------------------------------------------------------
def test_the_target_comes_from_cli_args_or_the_environment(project):
    found, store_file = dashboard.dashboard_target({}, {dashboard.PROJECT_ENV: str(project.dir)})
    assert found.dir == project.dir and store_file == store_path(project)
    _, other = dashboard.dashboard_target({"project": str(project.dir), "store": "/tmp/x.duckdb"}, {})
    assert str(other) == "/tmp/x.duckdb"
    with pytest.raises(ValueError, match="slipway dashboard <project>"):
        dashboard.dashboard_target({}, {})


def test_marimo_runs_the_notebook_read_only_without_a_browser_when_headless():
    line = command("127.0.0.1", 8123, headless=True)
    assert line[1:4] == ["-m", "marimo", "run"] and line[4].endswith("framework/dashboard.py")
    assert line[line.index("--port") + 1] == "8123" and "--headless" in line and "--no-token" in line
    assert "--headless" not in command("127.0.0.1", 8123, headless=False)


def test_a_served_dashboard_keeps_ingesting_until_the_server_exits(project):
    """What `slipway dashboard` blocks in: new segment lines reach the store while the page is up."""
    synthetic_traffic(project, n=20)
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])   # stands in for marimo
    warnings = []
    assert Dashboard(process=server, url="http://127.0.0.1:1/").serve(
        project, ingest_every_s=0.3, warn=warnings.append) == 0
    with Store(store_path(project), read_only=True) as store:
        assert len(store.traces(limit=None)) == 20
    assert warnings == []
