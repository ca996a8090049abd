"""`slipway review` on two real builds, its HTML page opened in a real headless Chromium.

The second build changes one word of the prompt in the notebook and gives the model too few
tokens to finish an answer, so its check fails (errors) and an admin builds it past the gate with
--override: the page must show the prompt diff, the settings change, every example that lost a
metric, and the override in red.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from framework.cli import app
from tests.conftest import cli_ok as ok
from tests.conftest import edit_toml
from tests.e2e.test_report_in_browser import _browser, _sync_api

runner = CliRunner()


@pytest.mark.model
def test_review_page_shows_diff_regressions_and_override(tiny_project, tiny_model_present, keys):
    sync_api = _sync_api()
    ok(["check", "ticket-triage"])
    v1 = json.loads(ok(["build", "ticket-triage", "--json"]).stdout)["tag"]
    first = json.loads(ok(["review", v1, "--json"]).stdout)  # nothing to compare with yet
    assert first["baseline"] is None and first["changes"] is None and first["regressed"] == []
    assert first["contract"]["passed"] and first["readiness"]["missing"] == ["rule approvals: 0 of 1 valid approvals"]

    edit_toml(Path("notebooks/ticket_triage.py"), "Triage one customer-support ticket",
              "Triage one customer-support request")
    text = tiny_project.read_text()
    tiny = text.index("[models.tiny]")
    tiny_project.write_text(text[:tiny] + text[tiny:].replace("max_tokens = 96", "max_tokens = 3", 1))
    failed = runner.invoke(app, ["check", "ticket-triage"])
    assert failed.exit_code == 1, failed.output
    refused = runner.invoke(app, ["build", "ticket-triage"])
    assert refused.exit_code == 1 and "--override" in refused.output
    not_admin = runner.invoke(app, ["build", "ticket-triage", "--override", "hotfix"])
    assert not_admin.exit_code == 1 and "rule role: alice lacks the role 'override'" in not_admin.output
    built = json.loads(ok(["build", "ticket-triage", "--override", "hotfix <b>now</b>", "--key", str(keys["root"]),
                           "--json"]).stdout)
    assert built["labels"]["slipway.override"] == "hotfix <b>now</b>"
    v2 = built["tag"]

    data = json.loads(ok(["review", v2, "--json"]).stdout)
    assert data["baseline"]["tag"] == v1 and data["baseline_reason"] == "previous build"
    instructions = next(iter(data["changes"]["program"].values()))["instructions"]
    assert ["+", "Triage one customer-support request for a B2B project-management SaaS."] in instructions
    assert {"key": "max_tokens", "old": 96, "new": 3} in data["changes"]["model"]
    assert data["changes"]["eval_set"] == {"added": [], "removed": [], "changed": []}
    assert data["comparison"]["shared"] == 12
    assert data["regressed"], "answers cut at 3 tokens must lose metrics that scored before"
    # the same paired comparison per tag of the 12 eval rows (tags stored with each result)
    sliced = {row["slice"]: row for row in data["slices"]}
    assert sliced["non_english"]["n"] == 3 and sliced["untagged"]["n"] == 2 and sliced["ambiguous"]["n"] == 3
    assert {d["metric"] for d in sliced["non_english"]["metrics"]} == {d["metric"] for d in data["metrics"]}
    assert not data["summary"]["contract_passed"]
    assert data["overrides"][0]["reason"] == "hotfix <b>now</b>"
    error_rate = next(c for c in data["contract"]["clauses"] if c["name"] == "error_rate_max")
    assert not error_rate["passed"]

    terminal = ok(["review", v2]).output
    assert "OVERRIDE" in terminal and f"against {v1}" in terminal and "Regressed examples" in terminal

    with sync_api.sync_playwright() as playwright:
        browser = _browser(playwright)
        page = browser.new_page()
        requests, errors = [], []
        page.on("request", lambda request: requests.append(request.url))
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(Path(data["report_html"]).as_uri())

        assert v2 in page.locator("h1").inner_text() and "FAIL" in page.locator("h1 .badge").inner_text()
        assert page.locator("#contract tr").count() == 1 + len(data["contract"]["clauses"])
        assert page.locator("#contract tr", has_text="error_rate_max").locator("td.fail").inner_text() == "FAIL"
        assert page.locator("#changes .diff ins").first.inner_text() == "request"
        assert page.locator("#changes .diff del").first.inner_text() == "ticket"
        assert page.locator("#changes-model tr", has_text="max_tokens").count() == 1
        assert page.locator("#regressed tr").count() == 1 + len(data["regressed"])
        first = data["regressed"][0]
        assert page.locator("#regressed tr", has_text=first["example_id"]).locator("td.drop").inner_text() == \
            ", ".join(first["dropped"])
        override = page.locator(".override")
        assert override.is_visible() and "hotfix <b>now</b>" in override.inner_text()
        assert override.evaluate("e => getComputedStyle(e).borderColor") == "rgb(207, 34, 46)"
        assert page.locator("#deltas tr").count() == 1 + len(data["metrics"])
        assert page.locator("#slice-deltas tr").count() == 1 + len(data["slices"])
        assert not errors
        assert all(url.startswith("file://") for url in requests), requests
        browser.close()
