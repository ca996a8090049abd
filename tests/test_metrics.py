"""Metric arithmetic: percentiles, macro-F1, bootstrap intervals, aggregation."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from framework.metrics import (
    UNTAGGED,
    Measurements,
    bootstrap_interval,
    confusion,
    exact_match,
    macro_f1,
    measure,
    metric_name,
    paired_delta,
    percentile,
    slices,
)

finite = st.floats(min_value=0, max_value=1e5, allow_nan=False, allow_infinity=False)


@given(st.lists(finite, min_size=1, max_size=200), st.floats(min_value=0, max_value=100))
def test_percentile_matches_numpy(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-9, abs=1e-9)


@given(st.lists(finite, min_size=1, max_size=100))
def test_percentiles_are_ordered_and_bounded(values):
    p50, p95, p99 = (percentile(values, q) for q in (50, 95, 99))
    assert min(values) <= p50 <= p95 <= p99 <= max(values)


labels = st.sampled_from(["billing", "bug", "account", "outage"])


@given(st.lists(st.tuples(labels, labels), min_size=1, max_size=60))
def test_macro_f1_matches_definition(pairs):
    truth = [t for t, _ in pairs]
    pred = [p for _, p in pairs]
    expected = []
    for label in set(truth):
        tp = sum(t == p == label for t, p in pairs)
        fp = sum(p == label != t for t, p in pairs)
        fn = sum(t == label != p for t, p in pairs)
        expected.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    assert macro_f1(truth, pred) == pytest.approx(sum(expected) / len(expected))


@given(st.lists(labels, min_size=1, max_size=60))
def test_macro_f1_perfect_and_missing(truth):
    assert macro_f1(truth, truth) == 1.0
    assert macro_f1(truth, [None] * len(truth)) == 0.0


def test_exact_match_normalises_case_and_bool_strings():
    assert exact_match("Billing", " billing ") == 1.0
    assert exact_match(True, "true") == 1.0
    assert exact_match("bug", "outage") == 0.0


@settings(max_examples=30, deadline=None)
@given(st.floats(min_value=0.1, max_value=0.9), st.integers(0, 10_000))
def test_bootstrap_interval_brackets_the_estimate(p, seed):
    rng = random.Random(seed)
    rows = [float(rng.random() < p) for _ in range(200)]
    mean = sum(rows) / len(rows)
    lo, hi = bootstrap_interval(rows, lambda r: sum(r) / len(r), samples=300, seed=seed)
    assert lo <= mean <= hi
    assert hi - lo < 0.25


def test_bootstrap_interval_covers_true_mean_at_about_the_stated_rate():
    rng = random.Random(7)
    true_p, covered, trials = 0.8, 0, 120
    for trial in range(trials):
        rows = [float(rng.random() < true_p) for _ in range(150)]
        lo, hi = bootstrap_interval(rows, lambda r: sum(r) / len(r), samples=400, seed=trial)
        covered += lo <= true_p <= hi
    assert 0.88 <= covered / trials <= 0.99


def _record(category, predicted, latency, tokens_in=100, tokens_out=20, error=None):
    return {"expected": {"category": category}, "output": None if error else {"category": predicted},
            "scores": {"category_accuracy": float(category == predicted and not error)},
            "latency_ms": latency, "tokens_in": tokens_in, "tokens_out": tokens_out,
            "cost": 0.001, "error": error}


def test_measure_aggregates_quality_latency_errors_and_cost():
    records = [_record("bug", "bug", 100), _record("bug", "billing", 200), _record("billing", "billing", 300),
               _record("billing", None, 400, error="TimeoutError")]
    m = measure(records, ["exact_match:category", "macro_f1:category"], bootstrap_samples=200)
    assert m.metrics["category_accuracy"] == 0.5
    assert m.metrics["category_macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m.latency_p50_ms == 250
    assert m.error_rate == 0.25
    assert m.tokens_per_request == 120
    assert m.projected_monthly_cost(1000) == pytest.approx(30.0)
    assert not math.isnan(m.intervals["category_accuracy"][0])


def test_metric_names():
    assert metric_name("exact_match:category") == "category_accuracy"
    assert metric_name("macro_f1:category") == "category_macro_f1"
    assert metric_name("format_validity") == "format_validity"
    assert metric_name("notebook:priority_band_match") == "priority_band_match"


# -- paired comparison (the review's metric deltas) -------------------------------------------------------------

scores = st.lists(st.sampled_from([0.0, 1.0]), min_size=1, max_size=80)


@settings(max_examples=40, deadline=None)
@given(scores, st.integers(0, 1000))
def test_identical_runs_show_no_delta_and_no_significance(rows, seed):
    result = paired_delta(rows, list(rows), samples=200, seed=seed)
    assert result.delta == 0 and result.interval == (0.0, 0.0)
    assert result.p_value == 1.0 and not result.significant


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(labels, labels, labels), min_size=2, max_size=40), st.integers(0, 1000))
def test_paired_delta_of_macro_f1_is_antisymmetric_and_identical_runs_are_flat(rows, seed):
    def f1(pairs):
        return macro_f1([t for t, _ in pairs], [p for _, p in pairs])

    old = [(t, a) for t, a, _ in rows]
    new = [(t, b) for t, _, b in rows]
    forward = paired_delta(old, new, f1, samples=100, seed=seed)
    backward = paired_delta(new, old, f1, samples=100, seed=seed)
    assert forward.delta == pytest.approx(f1(new) - f1(old))
    assert backward.delta == pytest.approx(-forward.delta)
    assert forward.p_value == pytest.approx(backward.p_value)
    assert paired_delta(old, list(old), f1, samples=100, seed=seed).p_value == 1.0


def test_paired_interval_covers_the_true_delta_at_about_the_stated_rate():
    """Synthetic builds: each example is right with prob 0.70 before and 0.78 after, correlated the way two
    prompts on one model are (most answers do not move). The 95% interval should hold the true +0.08 in
    about 95% of repeated experiments."""
    rng = np.random.default_rng(11)
    true_delta, covered, trials = 0.08, 0, 200
    for trial in range(trials):
        u = rng.random(200)
        old = (u < 0.70).astype(float)
        new = (u < 0.78).astype(float)
        flip = rng.random(200) < 0.1  # some answers change independently
        new[flip] = (rng.random(int(flip.sum())) < 0.78).astype(float)
        result = paired_delta(old.tolist(), new.tolist(), samples=500, seed=trial)
        covered += result.interval[0] <= true_delta <= result.interval[1]
    assert 0.90 <= covered / trials <= 0.99


def test_paired_test_rejects_equal_builds_at_about_the_stated_rate():
    """No true difference (both builds right with prob 0.7, independently per example): p < 0.05 should
    happen in about 5% of experiments, not more."""
    rng = np.random.default_rng(5)
    trials = 200
    rejected = sum(paired_delta((rng.random(150) < 0.7).astype(float).tolist(),
                                (rng.random(150) < 0.7).astype(float).tolist(), samples=500, seed=t).significant
                   for t in range(trials))
    assert rejected / trials <= 0.09


def test_paired_test_finds_a_real_drop():
    rng = np.random.default_rng(3)
    old = (rng.random(200) < 0.8).astype(float)
    new = old.copy()
    new[rng.choice(np.flatnonzero(old), 30, replace=False)] = 0.0  # 30 right answers turn wrong
    result = paired_delta(old.tolist(), new.tolist())
    assert result.delta == pytest.approx(-30 / 200)
    assert result.significant and result.interval[1] < 0


CATEGORIES = ("billing", "bug", "abuse")
tagged_rows = st.lists(st.tuples(st.sampled_from(CATEGORIES), st.sampled_from(CATEGORIES),
                                 st.sampled_from(("non_english", "short", None))), min_size=1, max_size=60)


def _tagged(rows):
    return [{**_record(c, p, 100.0 + i), "tags": [tag] if tag else []} for i, (c, p, tag) in enumerate(rows)]


@settings(max_examples=60, deadline=None)
@given(tagged_rows)
def test_slice_means_over_a_partition_combine_to_the_overall_metric(rows):
    """With one tag or none per example the slices partition the run: their n-weighted means are the
    overall mean, so a slice table can never disagree with the headline figure."""
    records = _tagged(rows)
    m = measure(records, ["exact_match:category"], bootstrap_samples=20)
    found_slices = slices(records, ["exact_match:category"], bootstrap_samples=20)
    assert m.slices in ({}, found_slices)  # a run without any tag reports none
    assert sum(s["n"] for s in found_slices.values()) == len(records)
    combined = sum(s["n"] * s["metrics"]["category_accuracy"] for s in found_slices.values()) / len(records)
    assert combined == pytest.approx(m.metrics["category_accuracy"])
    for tag, found in found_slices.items():
        lo, hi = found["intervals"]["category_accuracy"]
        assert lo <= found["metrics"]["category_accuracy"] <= hi, tag


def test_an_example_with_two_tags_counts_in_both_slices_and_untagged_ones_in_their_own():
    records = [{**_record("bug", "bug", 1), "tags": ["short", "typos"]}, {**_record("bug", "billing", 2), "tags": []},
               {**_record("billing", "billing", 3), "tags": ["short"]}]
    m = measure(records, ["exact_match:category", "macro_f1:category"], bootstrap_samples=20)
    assert {t: s["n"] for t, s in m.slices.items()} == {"short": 2, "typos": 1, UNTAGGED: 1}
    assert m.slices["short"]["metrics"]["category_accuracy"] == 1.0
    assert m.slices[UNTAGGED]["metrics"]["category_accuracy"] == 0.0
    assert m.slice_metric("category_accuracy[short]") == (1.0, (1.0, 1.0), 2)
    assert math.isnan(m.slice_metric("category_accuracy[angry]")[0])
    # a run of untagged examples reports no slices (a table of one row, "untagged", says nothing)
    assert measure([_record("bug", "bug", 1)], ["exact_match:category"], bootstrap_samples=5).slices == {}


def test_slices_survive_the_round_trip_through_the_store_json():
    m = measure(_tagged([("bug", "bug", "short"), ("bug", "abuse", None)]), ["exact_match:category"],
                bootstrap_samples=20)
    again = Measurements.from_dict(json.loads(json.dumps(m.to_dict())))
    assert again.slices == m.slices and again.confusion == m.confusion


@settings(max_examples=60, deadline=None)
@given(tagged_rows)
def test_the_confusion_matrix_counts_every_example_once_and_its_diagonal_is_the_accuracy(rows):
    records = _tagged(rows)
    matrix = confusion(records, ["category"])["category"]
    assert sum(n for row in matrix.values() for n in row.values()) == len(records)
    hits = sum(row.get(label, 0) for label, row in matrix.items())
    assert hits / len(records) == pytest.approx(measure(records, ["exact_match:category"],
                                                        bootstrap_samples=5).metrics["category_accuracy"])


def test_a_missing_answer_is_its_own_column_and_free_text_fields_get_no_matrix():
    records = [_record("bug", None, 1, error="boom"), _record("bug", "bug", 2)]
    assert confusion(records, ["category"]) == {"category": {"bug": {"(no answer)": 1, "bug": 1}}}
    many = [{"expected": {"reason": f"r{i}"}, "output": {"reason": "x"}} for i in range(30)]
    assert confusion(many, ["reason"]) == {}
