"""The HTML check report, opened in a real headless Chromium: what a reviewer sees.

Needs Debian's chromium (`make test` installs it where it can; CI always does). Without it the
test is skipped on a developer machine and fails under CI, so the browser check never silently
disappears from the pipeline.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from framework.cli import app

runner = CliRunner()
CHROMIUM = os.environ.get("SLIPWAY_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Chromium's own background traffic is refused on a closed network; keep it quiet and local.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PAYLOAD = '<img src=x onerror="document.title=\'pwned\'"><script>document.title="pwned"</script> refund me'


def _browser(playwright):
    if not Path(CHROMIUM).exists():
        message = f"no Chromium at {CHROMIUM}: `apt-get install chromium` or set SLIPWAY_CHROMIUM"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


@pytest.mark.model
def test_report_renders_the_verdict_and_escapes_ticket_text(tiny_project, tiny_model_present):
    sync_api = pytest.importorskip("playwright.sync_api")
    eval_path = tiny_project.parent / "data" / "eval.jsonl"
    row = {"id": "html-1", "inputs": {"ticket": PAYLOAD},
           "expected": {"category": "abuse", "priority": "urgent", "needs_human": True}, "tags": ["injection"]}
    eval_path.write_text(eval_path.read_text() + json.dumps(row) + "\n")
    edit = tiny_project.read_text().replace('category_accuracy = ">= 0.0"', 'category_accuracy = ">= 0.999"')
    tiny_project.write_text(edit)

    result = runner.invoke(app, ["check", "ticket-triage", "--json"])
    assert result.exit_code == 1, result.output
    verdict = json.loads(result.stdout)
    report = Path(verdict["report_html"])

    with sync_api.sync_playwright() as playwright:
        browser = _browser(playwright)
        page = browser.new_page()
        requests = []
        page.on("request", lambda request: requests.append(request.url))
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(report.as_uri())

        assert page.locator("h1 .badge").inner_text() == "FAIL"
        rows = page.locator("#contract tr")
        assert rows.count() == 1 + len(verdict["clauses"])
        failing = page.locator("#contract tr", has_text="category_accuracy")
        assert failing.locator("td.fail").inner_text() == "FAIL"
        assert page.locator("#metrics tr", has_text="category_macro_f1").count() == 1
        assert page.title() != "pwned" and not errors
        assert all(url.startswith("file://") for url in requests), requests  # self-contained: no fetches
        if page.locator("#misses tr", has_text="html-1").count():
            assert "<script>" in page.locator("#misses tr", has_text="html-1").inner_text()
        browser.close()
