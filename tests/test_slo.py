"""The live contract (framework/slo.py) on synthetic traces: figures against numpy, windows, channels,
burn rates. Served traffic through the real path is tests/e2e/test_traces_served.py."""

from __future__ import annotations

import shutil
import uuid
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from framework.slo import slo
from framework.spec import load_project
from framework.traces import SegmentWriter, iso, utc_now


def synthetic(started_at, duration_ms: float, status: int, *, channel: str = "prod", version: str = "v1",
              tokens: tuple[int, int, int] = (30, 600, 10), cost: float = 1e-6) -> dict:
    """A trace line as the service writes it (only the fields the SLO reads, plus ids)."""
    return {"trace_id": uuid.uuid4().hex, "request_id": uuid.uuid4().hex, "started_at": iso(started_at),
            "duration_ms": duration_ms, "status": status, "channel": channel, "version": version,
            "bento": f"ticket-triage:{version}", "tokens_in_new": tokens[0], "tokens_in_cached": tokens[1],
            "tokens_out": tokens[2], "cost": cost}


@pytest.fixture
def project(project_root):
    return load_project(str(project_root / "projects" / "ticket-triage"))


def write(project, rows) -> None:
    writer = SegmentWriter(project.trace_dir, "traces", fsync="never")
    for row in rows:
        writer.append(row)
    writer.close()


rows_strategy = st.lists(st.tuples(st.floats(0.5, 60000, allow_nan=False), st.sampled_from([200, 200, 200, 503, 413]),
                                   st.integers(0, 500), st.integers(0, 100), st.floats(0, 1e-3)),
                         min_size=1, max_size=60)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=rows_strategy)
def test_figures_match_numpy_on_any_traffic(project, rows):
    shutil.rmtree(project.state_dir, ignore_errors=True)
    now = utc_now()
    write(project, [synthetic(now - timedelta(minutes=1), d, s, tokens=(a, 0, b), cost=c) for d, s, a, b, c in rows])
    report = slo(project, timedelta(hours=1), now=now)
    counted = [r for r in rows if r[1] != 413]
    assert report.n == len(counted)
    if not counted:
        assert report.clauses == [] and report.passed
        return
    clauses = {c.clause.name: c.clause for c in report.clauses}
    answered = [r for r in counted if r[1] == 200]
    assert clauses["error_rate_max"].measured == pytest.approx(sum(r[1] == 503 for r in counted) / len(counted))
    if answered:
        durations = [r[0] for r in answered]
        for q, name in ((50, "latency_p50_ms"), (95, "latency_p95_ms"), (99, "latency_p99_ms")):
            assert clauses[name].measured == pytest.approx(np.percentile(durations, q))
            assert clauses[name].passed == (np.percentile(durations, q) <= getattr(project.spec.contract, name))
        assert clauses["tokens_per_request_max"].measured == pytest.approx(np.mean([r[2] + r[3] for r in answered]))
    assert clauses["cost_per_request_max"].measured == pytest.approx(np.mean([r[4] for r in counted]))
    assert report.passed == all(c.passed for c in clauses.values())


def test_only_the_window_channel_and_version_asked_for_count(project):
    now = utc_now()
    write(project, [synthetic(now - timedelta(minutes=5), 100, 200),
                    synthetic(now - timedelta(hours=3), 90000, 503),                 # outside 1h
                    synthetic(now - timedelta(minutes=5), 90000, 503, channel="staging"),
                    synthetic(now - timedelta(minutes=5), 300, 200, version="v2")])
    assert slo(project, timedelta(hours=1), now=now).n == 3
    prod = slo(project, timedelta(hours=1), channel="prod", now=now)
    assert prod.n == 2 and prod.passed
    only_v2 = slo(project, timedelta(hours=1), version="v2", now=now)
    assert only_v2.n == 1 and only_v2.figures["p50"] == 300
    assert not slo(project, timedelta(hours=4), now=now).passed


def test_burn_rates(project):
    """error_rate_max 1% with 2 errors in 100 requests burns 2x; 10% over the p95 target burns 2x."""
    now = utc_now()
    limit = project.spec.contract.latency_p95_ms
    rows = [synthetic(now - timedelta(minutes=1), 100, 200) for _ in range(88)]
    rows += [synthetic(now - timedelta(minutes=1), limit + 1, 200) for _ in range(10)]
    rows += [synthetic(now - timedelta(minutes=1), 100, 503) for _ in range(2)]
    write(project, rows)
    report = slo(project, timedelta(hours=1), now=now)
    burns = {c.clause.name: c.burn_rate for c in report.clauses}
    assert burns["error_rate_max"] == pytest.approx(2.0)
    assert burns["latency_p95_ms"] == pytest.approx((10 / 98) / 0.05)
    assert "error_rate_max" in report.breached


def test_monthly_budget_is_judged_on_the_windows_actual_spend(project):
    """$0.01 spent in one hour is $7.20 over 30 days: over the demo's $5 budget."""
    now = utc_now()
    write(project, [synthetic(now - timedelta(minutes=1), 100, 200, cost=0.001) for _ in range(10)])
    report = slo(project, timedelta(hours=1), now=now)
    budget = next(c for c in report.clauses if c.clause.name == "monthly_budget")
    assert budget.clause.measured == pytest.approx(0.01 * 720)
    assert not budget.clause.passed and budget.burn_rate == pytest.approx(7.2 / 5.0)


def test_no_traffic_is_not_a_breach(project):
    report = slo(project, timedelta(hours=1))
    assert report.n == 0 and report.passed and report.clauses == []
    assert set(report.offline_only) == set(project.spec.contract.eval)


def test_json_has_no_nan_even_when_nothing_was_answered(project):
    """Only 5xx in the window: latency is not measured; --json must stay valid JSON (null, not NaN)."""
    import json

    now = utc_now()
    write(project, [synthetic(now - timedelta(minutes=1), 100, 503) for _ in range(3)])
    data = slo(project, timedelta(hours=1), now=now).to_dict()
    text = json.dumps(data, allow_nan=False)
    assert json.loads(text)["clauses"][0]["measured"] is None
