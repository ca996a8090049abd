"""Review arithmetic on plain records: which examples regressed, which metric deltas are real."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from framework.report import render_review_html
from framework.review import metric_deltas, regressions

METRICS = ["exact_match:category", "macro_f1:category", "exact_match:priority"]


def record(example_id, category, predicted, priority="low", predicted_priority="low", error=None, text="t"):
    output = None if error else {"category": predicted, "priority": predicted_priority}
    scores = {"category_accuracy": float(not error and category == predicted),
              "priority_accuracy": float(not error and priority == predicted_priority)}
    return {"example_id": example_id, "inputs": {"ticket": text}, "expected": {"category": category,
            "priority": priority}, "output": output, "scores": scores, "error": error}


def test_a_lost_field_and_a_new_error_are_regressions_and_a_fix_is_not():
    old = {"a": record("a", "bug", "bug"), "b": record("b", "bug", "billing"), "c": record("c", "bug", "bug"),
           "d": record("d", "bug", "bug", "high", "high")}
    new = {"a": record("a", "bug", "billing"), "b": record("b", "bug", "bug"),
           "c": record("c", "bug", None, error="ModelTimeout: took 60 s"),
           "d": record("d", "bug", "bug", "high", "low")}
    shared, _ = metric_deltas(old, new, METRICS, samples=50)
    regressed, improved = regressions(old, new, shared)
    by_id = {r["example_id"]: r for r in regressed}
    assert set(by_id) == {"a", "c", "d"} and improved == 1
    assert by_id["a"]["dropped"] == ["category_accuracy"]
    assert by_id["c"]["dropped"] == ["category_accuracy", "priority_accuracy"]
    assert by_id["c"]["new_error"].startswith("ModelTimeout")
    assert by_id["d"]["old_output"]["priority"] == "high" and by_id["d"]["new_output"]["priority"] == "low"
    assert regressed[0]["example_id"] == "c"  # most metrics lost first


def test_examples_whose_input_or_label_changed_are_not_compared():
    old = {"a": record("a", "bug", "bug"), "b": record("b", "bug", "bug")}
    new = {"a": record("a", "bug", "billing", text="edited ticket"), "b": record("b", "bug", "bug"),
           "z": record("z", "bug", "billing")}
    shared, deltas = metric_deltas(old, new, METRICS, samples=50)
    assert shared == ["b"]
    assert regressions(old, new, shared) == ([], 0)
    assert all(d["n"] == 1 and d["delta"] == 0 for d in deltas)


outcomes = st.lists(st.tuples(st.sampled_from(["bug", "billing", "account"]), st.sampled_from(["bug", "billing"]),
                              st.sampled_from(["bug", "billing"])), min_size=1, max_size=30)


@settings(max_examples=40, deadline=None)
@given(outcomes)
def test_regressed_and_improved_counts_match_the_accuracy_delta(rows):
    old = {str(i): record(str(i), t, a) for i, (t, a, _) in enumerate(rows)}
    new = {str(i): record(str(i), t, b) for i, (t, _, b) in enumerate(rows)}
    shared, deltas = metric_deltas(old, new, METRICS, samples=20)
    regressed, improved = regressions(old, new, shared)
    accuracy = next(d for d in deltas if d["metric"] == "category_accuracy")
    assert abs(accuracy["delta"] * len(rows) - (improved - len(regressed))) < 1e-9
    assert regressions(old, old, shared) == ([], 0)


def test_review_page_escapes_ticket_text_and_marks_overrides():
    payload = "<script>alert(1)</script>"
    old = {"a": record("a", "bug", "bug", text=payload)}
    new = {"a": record("a", "bug", "billing", text=payload)}
    shared, deltas = metric_deltas(old, new, METRICS, samples=20)
    regressed, improved = regressions(old, new, shared)
    side = {"tag": "p:v", "version": "v", "created": "now", "author": "alice", "check_id": "c", "run_id": "r",
            "content_hash": "h", "model": "m", "model_sha256": "s", "git_commit": "none"}
    page = render_review_html({
        "project": "p", "target": side, "baseline": {**side, "tag": "p:u", "version": "u"}, "baseline_reason": "x",
        "contract": None, "changes": None, "metrics": deltas, "slo": [], "regressed": regressed,
        "improved": improved, "approvals": [], "readiness": None, "comparison": {"shared": 1, "samples": 20,
                                                                              "note": ""},
        "overrides": [{"where": "build", "actor": "root", "reason": "hotfix <b>now</b>", "at": "t"}]})
    assert payload not in page and "&lt;script&gt;" in page
    assert "class=override" in page and "hotfix &lt;b&gt;now&lt;/b&gt;" in page
    json.dumps(regressed)  # the --json output must serialise
