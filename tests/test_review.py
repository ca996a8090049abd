"""Review arithmetic on plain records: which examples regressed, which metric deltas are real."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from framework.report import render_review_html
from framework.review import metric_deltas, regressions, slice_deltas

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


@settings(max_examples=30, deadline=None)
@given(outcomes, st.lists(st.sampled_from(["non_english", "short", None]), min_size=30, max_size=30))
def test_slice_deltas_over_a_partition_weight_back_to_the_overall_delta(rows, tag_pool):
    """One tag or none per example: the slices' paired accuracy deltas, weighted by n, are the overall one."""
    old = {str(i): record(str(i), t, a) for i, (t, a, _) in enumerate(rows)}
    new = {str(i): record(str(i), t, b) for i, (t, _, b) in enumerate(rows)}
    tags = {str(i): [tag_pool[i]] if tag_pool[i] else [] for i in range(len(rows))}
    shared, deltas = metric_deltas(old, new, METRICS, samples=20)
    sliced = slice_deltas(old, new, shared, METRICS, tags, samples=20)
    if not any(tags.values()):
        assert sliced == []  # nothing tagged: no slice table
        return
    overall = next(d for d in deltas if d["metric"] == "category_accuracy")["delta"]
    weighted = sum(row["n"] * next(d for d in row["metrics"] if d["metric"] == "category_accuracy")["delta"]
                   for row in sliced) / len(rows)
    assert abs(weighted - overall) < 1e-9
    assert sum(row["n"] for row in sliced) == len(rows)


def test_a_slice_that_got_worse_shows_under_a_flat_overall_figure():
    """English tickets fixed, non-English ones broken: overall Δ 0, the slices say what happened."""
    old = {f"e{i}": record(f"e{i}", "bug", "billing") for i in range(20)}
    old.update({f"n{i}": record(f"n{i}", "bug", "bug") for i in range(20)})
    new = {f"e{i}": record(f"e{i}", "bug", "bug") for i in range(20)}
    new.update({f"n{i}": record(f"n{i}", "bug", "billing") for i in range(20)})
    tags = {k: ["non_english"] if k.startswith("n") else [] for k in old}
    shared, deltas = metric_deltas(old, new, METRICS, samples=200)
    assert next(d for d in deltas if d["metric"] == "category_accuracy")["delta"] == 0
    sliced = {row["slice"]: {d["metric"]: d for d in row["metrics"]}
              for row in slice_deltas(old, new, shared, METRICS, tags, samples=200)}
    assert sliced["non_english"]["category_accuracy"]["delta"] == -1.0
    assert sliced["non_english"]["category_accuracy"]["significant"]
    assert sliced["untagged"]["category_accuracy"]["delta"] == 1.0


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
    assert "id=optimized" not in page   # a program not made by `slipway optimize` claims nothing
    json.dumps(regressed)  # the --json output must serialise


def test_a_forced_optimised_program_is_marked_on_the_review_page():
    made = {"optimizer": "BootstrapFewShot<b>", "demos": 8, "objective": "notebook:triage_match", "before": 0.7,
            "after": 0.72, "delta": 0.02, "interval": [-0.01, 0.05], "p_value": 0.2, "forced": True, "why": "x",
            "at": "t", "calls": 40, "dev_n": 110}
    side = {"tag": "p:v", "version": "v", "created": "now", "author": "alice", "check_id": "c", "run_id": "r",
            "content_hash": "h", "model": "m", "model_sha256": "s", "git_commit": "none", "optimized": made}
    page = render_review_html({
        "project": "p", "target": side, "baseline": None, "baseline_reason": "first build", "contract": None,
        "changes": None, "metrics": [], "slo": [], "regressed": [], "improved": 0, "approvals": [],
        "readiness": None, "comparison": {"shared": 0, "samples": 20, "note": ""}, "overrides": []})
    assert "id=optimized" in page and "BootstrapFewShot&lt;b&gt;, 8 demos" in page
    assert "FORCED: saved without a significant gain" in page and "p 0.200" in page


def test_a_metric_the_baseline_never_scored_is_not_compared_as_zero():
    old = {"a": record("a", "bug", "bug")}
    new = {"a": record("a", "bug", "bug")}
    new["a"]["scores"]["reason_complete"] = 1.0   # declared after the baseline's check ran
    _, deltas = metric_deltas(old, new, [*METRICS, "notebook:reason_complete"], samples=20)
    assert "reason_complete" not in {d["metric"] for d in deltas}
    assert {d["metric"] for d in deltas} == {"category_accuracy", "category_macro_f1", "priority_accuracy"}
