"""framework/report.py: terminal renderings print user text as written; HTML pages escape it.

Fakes stand in for runs and reviews (plain dicts and dataclasses shaped like the real ones);
tests/e2e/test_report_in_browser.py and test_review_page.py open the real pages in Chromium.
"""

from __future__ import annotations

import io
import json
from html.parser import HTMLParser
from types import SimpleNamespace

from rich.console import Console

from framework import report
from framework.contract import Clause, Verdict

MARKUP = "[bold]loud[/] [optimize] [/]"
PAYLOAD = '<img src=x onerror="alert(1)"><script>alert(2)</script> [bold]refund[/] & "me"'


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=200, highlight=False, color_system=None), out


def fake_review() -> dict:
    """A review shaped like framework.review.review's, with user text in every free-text field."""
    clause = {"name": "acc" + MARKUP, "target": ">= 0.5", "measured": 0.4, "passed": False, "unit": "",
              "interval": [0.3, 0.5], "note": PAYLOAD}
    ops = [(" ", "l1"), (" ", "l2"), (" ", "l3"), (" ", "l4"), (" ", "l5"), ("-", "Triage one ticket " + MARKUP),
           ("+", "Triage one request " + MARKUP), (" ", "l6"), ("+", "added " + PAYLOAD)]
    return {
        "target": {"tag": "p:v2", "version": "v2", "created": "2026-11-26T10:00:00", "author": "al[/]ice",
                   "check_id": "chk", "model": "tiny", "model_sha256": "0" * 64, "content_hash": "1" * 64},
        "baseline": {"tag": "p:v1", "version": "v1", "created": "2026-11-25T10:00:00", "author": "bob"},
        "baseline_reason": "previous build",
        "contract": {"passed": False, "failed": [clause["name"]], "clauses": [clause]},
        "changes": {"program": {"triage": {"only_in": None, "instructions": ops, "fields": [],
                                           "demos": {"added": [{"ticket": PAYLOAD}], "removed": []}}},
                    "notebook": ops, "model": [{"key": "max_tokens", "old": 96, "new": 3}],
                    "contract": [], "eval_set": {"added": ["x" + MARKUP], "removed": [], "changed": []}},
        "comparison": {"shared": 3, "samples": 100, "note": "", "old_n": 3, "new_n": 3},
        "metrics": [{"metric": "category_accuracy", "old": 0.9, "new": 0.5, "delta": -0.4, "interval": [-0.6, -0.2],
                     "p_value": 0.01, "significant": True}],
        "slo": [{"name": "latency_p95_ms", "unit": "ms", "old": 1000.0, "new": 1500.0, "delta": 500.0, "pct": 50.0}],
        "regressed": [{"example_id": "ex" + MARKUP, "inputs": {"ticket": PAYLOAD}, "expected": {"category": "billing"},
                       "old_output": {"category": "billing"}, "new_output": {"category": "[red]bug[/]"},
                       "old_error": None, "new_error": None, "dropped": ["category_accuracy"]}],
        "improved": 0,
        "approvals": [{"approver": "carol[/]", "note": PAYLOAD, "at": "2026-11-26 10:05:00"}],
        "readiness": {"required": 2, "counted": ["carol[/]"], "missing": ["1 of 2 approvals " + MARKUP]},
        "overrides": [{"where": "build", "actor": "dave", "reason": "hotfix " + MARKUP, "at": "2026-11-26"}],
    }


def test_review_printout_prints_user_text_literally():
    console, out = _console()
    report.print_review(console, fake_review())
    text = out.getvalue()
    for literal in ("built 2026-11-26T10:00:00 by al[/]ice", " OVERRIDE  build by dave: hotfix " + MARKUP,
                    "acc" + MARKUP, "- Triage one ticket " + MARKUP, "+ Triage one request " + MARKUP,
                    "ex" + MARKUP + ": category billing → [red]bug[/] (expected billing)",
                    "approved by carol[/]", "not deployable yet: 1 of 2 approvals " + MARKUP):
        assert literal in text, literal


def test_verdict_table_and_run_rows_print_user_text_literally():
    verdict = Verdict(clauses=(Clause(name="c[bold]", target="[x]", measured=0.1, passed=False, note=MARKUP),), n=1)
    console, out = _console()
    console.print(report.verdict_table(verdict, "title [bold]t[/]"))
    assert all(s in out.getvalue() for s in ("title [bold]t[/]", "c[bold]", "[x]", MARKUP))

    measurements = SimpleNamespace(metrics={"acc": 0.5}, intervals={"acc": (0.4, 0.6)}, latency_p50_ms=1.0,
                                   latency_p95_ms=2.0, latency_p99_ms=3.0, error_rate=0.0, tokens_per_request=10.0,
                                   cost_per_request=0.0,
                                   slices={"tag[bold]": {"n": 1, "metrics": {"acc": 0.5},
                                                         "intervals": {"acc": (0.4, 0.6)}}})
    records = [{"example_id": "e[/]1", "expected": {"category": "[optimize]"}, "output": {"category": MARKUP},
                "error": None, "scores": {"acc": 0.0}},
               {"example_id": "e2", "expected": {}, "output": None, "error": "bad [bold]json[/]", "scores": {}}]
    run = SimpleNamespace(run_id="run-1", split="eval", model_key="m[/]", n=2, records=records,
                          measurements=measurements)  # a FakeRun: what report reads of an EvalRun
    console, out = _console()
    report.print_run(console, run)
    text = out.getvalue()
    assert "e[/]1 expected {'category': '[optimize]'} got {'category': '" + MARKUP + "'}" in text
    assert "e2 expected {} got bad [bold]json[/]" in text and "model m[/]" in text
    assert "tag[bold]" in text  # a slice's tag is user text too


class _Elements(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def _parse(page: str) -> _Elements:
    parser = _Elements()
    parser.feed(page)
    return parser


def test_check_report_escapes_every_run_value():
    data = {"verdict": {"passed": False, "failed": ["acc"], "n": 1, "meta": {"model_name": PAYLOAD},
                        "clauses": [{"name": "acc", "target": ">= 0.5", "measured": 0.1, "passed": False, "unit": "",
                                     "interval": None, "note": PAYLOAD}]},
            "run": {"run_id": "run-1", "split": "eval", "model": "m", "n": 2, "reused": False,
                    "hashes": {"content_hash": "abc"}},
            "measurements": {"metrics": {"acc": 0.5}, "intervals": {},
                             "slices": {"tag" + PAYLOAD: {"n": 1, "metrics": {"acc": 0.0},
                                                          "intervals": {"acc": [0, 0]}}},
                             "confusion": {"category": {PAYLOAD: {"x": 1}}}},
            "errors": [{"example_id": "err" + PAYLOAD, "error": PAYLOAD}],
            "misses": [{"example_id": "miss-1", "inputs": {"ticket": PAYLOAD}, "expected": {"category": PAYLOAD},
                        "output": {"category": "x"}, "scores": {"acc": 0.0}}]}
    page = report.render_html("proj<b>", "chk-1", data)
    parsed = _parse(page)
    assert "script" not in parsed.tags and "img" not in parsed.tags and "b" not in parsed.tags
    text = "".join(parsed.text)
    assert PAYLOAD in text and "err" + PAYLOAD in text and "proj<b>" in text
    assert json.dumps({"category": PAYLOAD}) in text
    assert "tag" + PAYLOAD in text  # slice names and confusion labels are labellers' text: escaped too


def test_check_report_shows_slices_and_a_confusion_matrix_with_recall():
    from framework.metrics import measure

    records = [{"example_id": f"e{i}", "inputs": {"ticket": "t"}, "expected": {"category": c},
                "output": {"category": p}, "scores": {"category_accuracy": float(c == p)}, "latency_ms": 1.0,
                "tokens_in": 1, "tokens_out": 1,
                "cost": 0.0, "error": None, "tags": tags}
               for i, (c, p, tags) in enumerate([("bug", "bug", []), ("bug", "billing", ["non_english"]),
                                                 ("billing", "billing", ["non_english"]), ("billing", "billing", [])])]
    measurements = measure(records, ["exact_match:category"], bootstrap_samples=20).to_dict()
    data = {"verdict": {"passed": True, "failed": [], "n": 4, "meta": {}, "clauses": []},
            "run": {"run_id": "run-1", "split": "eval", "model": "m", "n": 4, "reused": False, "hashes": {}},
            "measurements": measurements, "errors": [], "misses": []}
    page = report.render_html("proj", "chk-1", data)
    assert 'id=slices' in page and "non_english" in page and "untagged" in page
    matrix = page[page.index('id="confusion-category"'):]
    matrix = matrix[:matrix.index("</table>")]
    # rows billing (2 of 2 right) and bug (1 of 2 right, 1 answered billing), with recall
    assert "<th>billing</th><td class=\"num hit\">2</td><td class=\"num\"></td><td class=num>1.00</td>" in matrix
    assert "<th>bug</th><td class=\"num miss\">1</td><td class=\"num hit\">1</td><td class=num>0.50</td>" in matrix


def test_review_page_escapes_every_value_and_marks_changed_words():
    page = report.render_review_html(fake_review())
    parsed = _parse(page)
    assert "script" not in parsed.tags and "img" not in parsed.tags
    text = "".join(parsed.text)
    for literal in (PAYLOAD, "hotfix " + MARKUP, "ex" + MARKUP, "carol[/]", "al[/]ice"):
        assert literal in text, literal
    assert "<del>ticket</del>" in page and "<ins>request</ins>" in page
    assert "… 3 unchanged lines" in text  # five unchanged lines before the change: two kept as context


def test_pages_come_from_autoescaping_templates():
    from importlib.resources import files

    templates = {p.name for p in files("framework").joinpath("templates").iterdir()}
    assert {"check_report.html.j2", "review.html.j2"} <= templates
    assert report._template("review.html.j2").environment.autoescape is True


CACHE = {"path": "data/cache/paraphrases.jsonl", "sha256": "0" * 64, "model": "Qwen" + PAYLOAD, "threshold": 0.97,
         "exact": True, "semantic": True, "n_same": 50, "hits": 7, "n_different": 51, "wrong_hits": 0,
         "by_kind": {"exact": 1, "semantic": 6},
         "cache_hit_rate": {"value": 0.14, "interval": [0.069, 0.262]},
         "cache_wrong_hit_rate": {"value": 0.0, "interval": [0.0, 0.070]}}


def test_check_report_shows_the_answer_cache_figures_with_counts():
    data = {"verdict": {"passed": True, "failed": [], "n": 1, "meta": {"cache": CACHE}, "clauses": []},
            "run": {"run_id": "run-1", "split": "eval", "model": "m", "n": 1, "reused": False, "hashes": {}},
            "measurements": {"metrics": {}, "intervals": {}}, "errors": [], "misses": [], "cache": CACHE}
    page = report.render_html("proj", "chk-1", data)
    table = page[page.index("id=cache"):]
    table = table[:table.index("</table>")]
    assert "7 of 50" in table and "0 of 51" in table and "[0.069, 0.262]" in table and "[0.000, 0.070]" in table
    assert "script" not in _parse(page).tags and "Qwen" + PAYLOAD in "".join(_parse(page).text)
    console, out = _console()
    console.print(report.cache_line(CACHE))
    printed = " ".join(out.getvalue().split())   # wrapped at the console width
    assert "hits 0.140 [0.069, 0.262] (7 of 50 same-meaning pairs)" in printed
    assert "wrong hits 0.000 [0.000, 0.070] (0 of 51 different-meaning pairs)" in printed
    assert PAYLOAD in printed   # the model's name is printed as written, never read as markup


def test_check_report_without_a_cache_has_no_cache_section():
    data = {"verdict": {"passed": True, "failed": [], "n": 1, "meta": {}, "clauses": []},
            "run": {"run_id": "run-1", "split": "eval", "model": "m", "n": 1, "reused": False, "hashes": {}},
            "measurements": {"metrics": {}, "intervals": {}}, "errors": [], "misses": []}
    assert "id=cache" not in report.render_html("proj", "chk-1", data)
