"""`slipway dashboard`, end to end: traces written by the service's own Tracer, ingested, served by
`marimo run` on 127.0.0.1 and opened in Debian's headless Chromium with the network cut off.

Needs Playwright and chromium, like tests/e2e/test_report_in_browser.py (skipped on a developer machine
without them, failed under CI). The page's screenshot is kept as tests/artifacts/dashboard.png; with
SLIPWAY_UPDATE_SCREENSHOTS=1 it also replaces docs/img/dashboard.png, the one the README shows.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from framework.dashboard_launch import launch
from framework.spec import load_project
from tests.e2e.test_report_in_browser import _browser, _sync_api
from tests.test_dashboard import synthetic_traffic

REPO = Path(__file__).resolve().parents[2]
# Read at import: the autouse clean_environ fixture removes SLIPWAY_* variables before each test.
UPDATE_SCREENSHOTS = os.environ.get("SLIPWAY_UPDATE_SCREENSHOTS") == "1"
CHARTS = ("latency", "errors", "cost", "feedback")
SLO_CLAUSES = ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "error_rate_max", "cost_per_request_max",
               "tokens_per_request_max", "monthly_budget")


@pytest.fixture
def project(project_root):
    return load_project(str(project_root / "projects" / "ticket-triage"))


def test_the_dashboard_shows_charts_feedback_and_the_live_contract(project, tmp_path):
    sync_api = _sync_api()
    synthetic_traffic(project)
    log = open(tmp_path / "marimo.log", "w")  # noqa: SIM115 - closed after the server stops
    dashboard = launch(project, headless=True, output=log)   # ingests first
    try:
        dashboard.wait_ready(timeout_s=90)
        with sync_api.sync_playwright() as playwright:
            browser = _browser(playwright)
            # Tall enough for the whole page: marimo scrolls inside its own container, not the document.
            page = browser.new_page(viewport={"width": 1400, "height": 2150})
            outside, errors = [], []

            def local_only(route):
                """The page must render with no internet: anything not on the dashboard's address is refused."""
                if route.request.url.startswith(dashboard.url):
                    return route.continue_()
                outside.append(route.request.url)
                return route.abort()

            page.route("**/*", local_only)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(dashboard.url)
            page.wait_for_selector("#contract", timeout=90_000)
            for chart in CHARTS:   # altair → vega-embed, drawn as canvas (or svg)
                page.wait_for_selector(f"#{chart} .vega-embed canvas, #{chart} .vega-embed svg", timeout=60_000)

            table = page.locator("#contract-verdict #contract")
            for clause in SLO_CLAUSES:
                assert table.locator("tr", has_text=clause).count() == 1, clause
            verdicts = table.locator("td.pass, td.fail").all_inner_texts()
            assert set(verdicts) <= {"PASS", "FAIL"} and len(verdicts) == len(SLO_CLAUSES)
            # v2 answers 5xx to ~1 in 11 of its requests: over 1% of all traffic, so error_rate_max fails.
            assert table.locator("tr", has_text="error_rate_max").locator("td.fail").inner_text() == "FAIL"
            assert table.locator("tr", has_text="latency_p95_ms").locator("td.pass").inner_text() == "PASS"
            feedback = page.locator("#feedback #feedback-table")
            assert feedback.locator("tr", has_text="v1").count() == 1
            assert feedback.locator("tr", has_text="v2").count() == 1
            drift = page.locator("#drift #drift-table")
            drift.wait_for(timeout=30_000)
            for test in ("input_length", "language", "predicted_label"):
                assert drift.locator("tr", has_text=test).count() == 1, test
            page.wait_for_timeout(500)   # let vega finish its transitions before the picture
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot))

            # Another window re-reads the store: the header and the verdict follow it.
            page.locator("select").first.select_option("1h")
            page.get_by_text("last 1h").wait_for(timeout=30_000)
            assert page.locator("#contract tr", has_text="latency_p95_ms").count() == 1
            browser.close()
        assert not outside, f"the page fetched from outside: {outside}"
        assert not errors, errors
        artefacts = REPO / "tests" / "artifacts"   # git-ignored; CI keeps it with the run
        artefacts.mkdir(exist_ok=True)
        shutil.copyfile(shot, artefacts / "dashboard.png")
        if UPDATE_SCREENSHOTS:
            (REPO / "docs" / "img").mkdir(exist_ok=True)
            shutil.copyfile(shot, REPO / "docs" / "img" / "dashboard.png")
    finally:
        dashboard.stop()
        log.close()
        print((tmp_path / "marimo.log").read_text()[-3000:])


def test_slipway_dashboard_serves_until_interrupted(project):
    """The CLI command a user runs: it prints the address, answers there, and stops on Ctrl-C (SIGINT)."""
    import signal
    import socket
    import subprocess
    import sys
    import threading
    import time

    import httpx

    synthetic_traffic(project)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # As a terminal starts it: SIGINT at its default. A suite launched with `&` from a script (CI) runs with
    # SIGINT ignored, which children inherit, and Python then leaves Ctrl-C ignored.
    process = subprocess.Popen([str(Path(sys.executable).parent / "slipway"), "dashboard", str(project.dir),
                                "--port", str(port), "--no-browser"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}/"
    try:
        # Ctrl-C only once the command said it is ready (it prints the address after marimo answers).
        deadline = time.monotonic() + 90
        while not any(url in line for line in lines):
            assert process.poll() is None, "".join(lines)
            if time.monotonic() > deadline:
                pytest.fail("the dashboard never said it was ready: " + "".join(lines))
            time.sleep(0.2)
        assert httpx.get(url, timeout=5).status_code == 200
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
        reader.join(timeout=5)
        assert any(url in line and "dashboard" in line for line in lines), "".join(lines)
    finally:
        if process.poll() is None:
            process.kill()
