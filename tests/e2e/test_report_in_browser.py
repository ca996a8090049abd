"""The HTML check report and review page, opened in a real headless Chromium: what a reviewer sees.

Needs Playwright (the dev extra) and Debian's chromium (`make test` installs it where it can; CI always
does). Without either, the tests are skipped on a developer machine and fail under CI, so the browser
checks never silently disappear from the pipeline.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
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


def _missing(message: str) -> None:
    """A browser test cannot run: skip on a developer machine, fail under CI."""
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(message)
    pytest.skip(message)


def _sync_api():
    import importlib

    try:   # import_module, not `from playwright import sync_api`: the latter finds an already imported module
        sync_api = importlib.import_module("playwright.sync_api")   # even when it is hidden in sys.modules
    except ImportError:
        _missing("Playwright is not installed: `pip install -e '.[dev]'` (it drives Debian's chromium)")
    return sync_api


def _browser(playwright):
    if not Path(CHROMIUM).exists():
        _missing(f"no Chromium at {CHROMIUM}: `apt-get install chromium` or set SLIPWAY_CHROMIUM")
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_missing_playwright_fails_under_ci_and_skips_elsewhere(monkeypatch, ci, outcome):
    monkeypatch.setitem(sys.modules, "playwright.sync_api", None)  # import raises ImportError
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="Playwright is not installed"):
        _sync_api()


@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_missing_chromium_fails_under_ci_and_skips_elsewhere(monkeypatch, ci, outcome):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", "/nonexistent/chromium")
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="no Chromium"):
        _browser(None)


def _open(sync_api, path: Path, check):
    """Open `path` and run `check(page)`; no script may run and nothing may be fetched from outside."""
    with sync_api.sync_playwright() as playwright:
        browser = _browser(playwright)
        page = browser.new_page()
        requests, errors = [], []
        page.on("request", lambda request: requests.append(request.url))
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(path.as_uri())
        check(page)
        assert page.title() != "pwned" and not errors
        assert page.locator("body script, body img").count() == 0  # injected tags stay text
        assert all(url.startswith("file://") for url in requests), requests  # self-contained: no fetches
        browser.close()


def test_injected_markup_in_every_field_shows_as_text(tmp_path):
    """No model needed: both pages rendered from fake data with a payload in each free-text field."""
    from framework import report
    from tests.test_report import fake_review

    sync_api = _sync_api()
    data = {"verdict": {"passed": False, "failed": ["acc"], "n": 1, "meta": {"model_name": PAYLOAD},
                        "clauses": [{"name": "acc", "target": ">= 0.5", "measured": 0.1, "passed": False, "unit": "",
                                     "interval": None, "note": PAYLOAD}]},
            "run": {"run_id": "run-1", "split": "eval", "model": "m", "n": 2, "reused": False, "hashes": {}},
            "measurements": {"metrics": {"acc": 0.5}, "intervals": {}},
            "errors": [{"example_id": "err-1", "error": PAYLOAD}],
            "misses": [{"example_id": "html-1", "inputs": {"ticket": PAYLOAD}, "expected": {"category": "abuse"},
                        "output": {"category": PAYLOAD}, "scores": {"acc": 0.0}}]}
    check_page = tmp_path / "check.html"
    check_page.write_text(report.render_html("ticket-triage", "chk-1", data))

    def check_report(page):
        assert page.locator("h1 .badge").inner_text() == "FAIL"
        assert PAYLOAD in page.locator("#misses tr", has_text="html-1").locator("pre").inner_text()
        assert PAYLOAD in page.locator("#errors tr", has_text="err-1").inner_text()
        assert PAYLOAD in page.locator("#contract tr", has_text="acc").inner_text()
    _open(sync_api, check_page, check_report)

    review = fake_review()
    review["overrides"][0]["reason"] = PAYLOAD
    review["regressed"][0]["inputs"]["ticket"] = review["approvals"][0]["note"] = PAYLOAD
    review_page = tmp_path / "review.html"
    review_page.write_text(report.render_review_html(review))

    def check_review(page):
        assert PAYLOAD in page.locator(".override").inner_text()
        assert PAYLOAD in page.locator("#regressed pre").inner_text()
        assert PAYLOAD in page.locator("#approvals").inner_text()
        assert page.locator("#changes .diff ins").first.inner_text() == "request"
    _open(sync_api, review_page, check_review)


@pytest.mark.model
def test_report_renders_the_verdict_and_escapes_ticket_text(tiny_project, tiny_model_present):
    sync_api = _sync_api()
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

    def check(page):
        assert page.locator("h1 .badge").inner_text() == "FAIL"
        rows = page.locator("#contract tr")
        assert rows.count() == 1 + len(verdict["clauses"])
        failing = page.locator("#contract tr", has_text="category_accuracy")
        assert failing.locator("td.fail").inner_text() == "FAIL"
        assert page.locator("#metrics tr", has_text="category_macro_f1").count() == 1
        # "abuse" is no category the program can answer, so the example is always a miss; its ticket
        # text, tags and all, must show as text.
        miss = page.locator("#misses tr", has_text="html-1")
        assert miss.count() == 1, ("html-1 is not among the misses; errors: "
                                   f"{page.locator('#errors').inner_text()}")
        assert miss.locator("pre").inner_text() == PAYLOAD
    _open(sync_api, report, check)
