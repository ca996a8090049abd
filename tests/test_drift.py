"""Served traffic against the eval set (framework/drift.py): synthetic traffic written by `Tracer`, as the
service writes it, then `drift()` over a window; the pure `compare()` under arbitrary text."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from framework.dataset import load_examples
from framework.drift import compare, drift, merge_rare
from framework.spec import TracingSpec, load_project
from framework.traces import Tracer, utc_now

IDENTITY = {"project": "ticket-triage", "channel": "prod", "bento": "ticket-triage:v1", "version": "v1",
            "model_sha256": "ab" * 32, "program_hash": "cd" * 32}

GERMAN = [
    "Seit heute Morgen können sich mehrere Kolleginnen und Kollegen aus unserem Team nicht mehr anmelden, obwohl "
    "die Passwörter stimmen und wir nichts an der Konfiguration geändert haben. ",
    "Die Rechnung für den letzten Monat ist deutlich höher als erwartet, und wir verstehen nicht, warum zusätzliche "
    "Lizenzen berechnet wurden, die wir nie bestellt haben. ",
    "Beim Export der Projektberichte erscheint jedes Mal eine Fehlermeldung, und die Datei bleibt leer; das "
    "passiert sowohl im Browser als auch in der Desktop-Anwendung. ",
    "Wir würden uns sehr wünschen, dass man Aufgaben mehreren Personen gleichzeitig zuweisen kann, weil das in "
    "unserem Arbeitsalltag ständig vorkommt und viel Zeit kostet. ",
]


@pytest.fixture
def project(project_root):
    return load_project(str(project_root / "projects" / "ticket-triage"))


def serve(tracer: Tracer, request_id: str, ticket: str, category: str, status: int = 200) -> None:
    t0 = time.perf_counter()
    tracer.record(request_id=request_id, started_at=utc_now(), t0=t0, t_valid=t0 + 0.0005, t_end=t0 + 0.05,
                  status=status, inputs={"ticket": ticket},
                  outputs={"category": category, "priority": "low", "needs_human": False, "reason": "x"}
                  if status < 400 else None)


def test_traffic_drawn_from_the_eval_set_does_not_drift(project):
    tracer = Tracer(TracingSpec(), project.trace_dir, IDENTITY, project.model())
    examples = load_examples(project.split_path("eval"))
    for i, example in enumerate(random.Random(7).sample(examples, 80)):
        serve(tracer, f"r{i}", example.inputs["ticket"], example.expected["category"])
    report = drift(project, timedelta(hours=24))
    assert report.verdict == "stable" and not report.drifted, report.lines()
    assert report.summary == "the eval set still represents traffic"
    assert (report.n_served, report.n_eval) == (80, 200)
    assert [t.name for t in report.tests] == ["input_length", "language", "predicted_label"]
    assert all(t.p_value is not None and t.p_value >= 0.01 and t.drifted is False for t in report.tests)
    assert "as long as eval's" in report.tests[0].explanation


def test_long_german_tickets_drift_on_every_test(project):
    tracer = Tracer(TracingSpec(), project.trace_dir, IDENTITY, project.model())
    rng = random.Random(3)
    for i in range(60):
        ticket = "".join(rng.sample(GERMAN, 4)) + f"Kundennummer {1000 + i}. Vielen Dank!"
        serve(tracer, f"de{i}", ticket, "outage")
    serve(tracer, "failed", "x" * 50, "outage", status=500)   # errors are not traffic the eval set must cover
    report = drift(project, timedelta(hours=1))
    assert report.verdict == "drifted" and report.drifted and report.n_served == 60
    assert report.summary.startswith("the eval set no longer represents traffic")
    length, language, label = report.tests
    assert all(t.drifted and t.p_value < 0.01 for t in report.tests), report.lines()
    assert length.explanation.startswith("served tickets are longer: median ")
    assert length.detail["median_served"] > length.detail["median_eval"]
    assert "100% 'de'" in language.explanation and "in the eval set" in language.explanation
    assert "'outage'" in label.explanation and "category" in label.explanation
    data = json.loads(json.dumps(report.to_dict()))   # --json
    assert data["drifted"] is True and data["tests"][1]["name"] == "language" and data["window_s"] == 3600
    assert any("DRIFTED" in line for line in report.lines())


def test_too_little_traffic_says_so_instead_of_a_p_value(project):
    tracer = Tracer(TracingSpec(), project.trace_dir, IDENTITY, project.model())
    for i in range(5):
        serve(tracer, f"r{i}", "Wo ist meine Rechnung?", "billing")
    report = drift(project, timedelta(hours=24))
    assert report.verdict == "not-enough-traffic" and "5 served requests" in report.summary
    assert all(t.p_value is None and t.drifted is None and "not enough traffic" in t.explanation
               for t in report.tests)


def test_only_requests_inside_the_window_count(project):
    tracer = Tracer(TracingSpec(), project.trace_dir, IDENTITY, project.model())
    for i in range(40):
        serve(tracer, f"r{i}", "Das Dashboard lädt nicht. " * 20, "outage")
    later = drift(project, timedelta(minutes=5), until=utc_now() + timedelta(hours=2))
    assert later.n_served == 0 and later.verdict == "not-enough-traffic"


def test_rare_categories_are_pooled_until_expected_counts_reach_five():
    served = Counter({"en": 60, "de": 20, "fr": 2})
    reference = Counter({"en": 150, "es": 60, "it": 2, "nl": 1})
    table = merge_rare(served, reference)
    # nl, fr, it pooled first; "other" (5) is still too small, so the next smallest, de, joins it
    assert table == {"en": [60, 150], "es": [0, 60], "other": [22, 3]}
    n_served, n = sum(served.values()), sum(served.values()) + sum(reference.values())
    assert all(sum(v) * min(n_served, n - n_served) / n >= 5 for v in table.values())


def test_one_language_everywhere_is_not_drift():
    texts = ["The invoice for March is wrong, please check it again."] * 40
    report = compare(texts, ["billing"] * 40, texts, ["billing"] * 40)
    assert report.verdict == "stable"
    assert report.tests[1].p_value == 1.0 and report.tests[2].drifted is False


TEXT = st.text(st.characters(codec="utf-8"), max_size=120)


@given(served=st.lists(TEXT, max_size=70), reference=st.lists(TEXT, min_size=1, max_size=40),
       labels=st.lists(st.sampled_from(["billing", "bug", "outage", "other", ""]), max_size=70),
       threshold=st.floats(min_value=1e-6, max_value=0.5))
@settings(max_examples=60, deadline=None)
def test_the_report_never_crashes_on_arbitrary_text(served, reference, labels, threshold):
    report = compare(served, labels, reference, [r[:3] for r in reference], threshold=threshold,
                           min_served=10)
    assert report.verdict in ("drifted", "stable", "not-enough-traffic")
    for test in report.tests:
        assert (test.p_value is None) == (test.drifted is None)
        assert test.p_value is None or 0.0 <= test.p_value <= 1.0
        assert test.explanation
    json.dumps(report.to_dict(), allow_nan=False)
    assert report.lines()
