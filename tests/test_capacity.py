"""The capacity model (framework/capacity.py), checked against arithmetic written out by hand here.

Every expected replica count below is computed in the test from its stated inputs (requests/day, the peak
factor, the utilization, a replica's requests/s), not by calling the module's own helpers.
"""

from __future__ import annotations

import importlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from framework.spec import load_project
from framework.store import Store
from tests.conftest import REPO, edit_toml

# the module (`framework.capacity` is the function, re-exported by the package)
cap = importlib.import_module("framework.capacity")
QWEN15 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
TINY = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def _engine_json(folder: Path, *, sha: str = QWEN15, sequential: float = 0.25, batched: float = 0.5,
                 load: float = 0.0) -> Path:
    """A bench result file shaped like bench/engine.py writes it, with round figures."""
    folder.mkdir(parents=True, exist_ok=True)
    section = lambda rate: {"concurrent": {"clients": 4, "requests": 40, "requests_per_s": rate},  # noqa: E731
                            "machine_load": {"other_cpu_cores_mean": load}}
    (folder / "engine.json").write_text(json.dumps({
        "machine": {"date": "2026-11-26T23:46:04+00:00", "nproc": 2, "cpu": "test CPU"},
        "model_file": {"name": "Qwen2.5-Coder-1.5B-Instruct Q4_K_M", "sha256": sha, "threads": 2},
        "served": {"bentos": {"sequential": {"parallel": 1}, "batched": {"parallel": 4}},
                   "bento_sequential": section(sequential), "bento_batched": section(batched)},
        "startup": {"in_process": {"batched_saved_prefix": {"prefix_bytes": 2_000_000, "prefix_tokens": 500}}},
    }))
    return folder


def _project(toml_path: Path, *, per_day: int = 200_000, parallel: int = 1, model: str = "qwen15"):
    edit_toml(toml_path, "expected_requests_per_day = 5000", f"expected_requests_per_day = {per_day}")
    edit_toml(toml_path, "parallel = 1\n", f"parallel = {parallel}\n")
    edit_toml(toml_path, 'model = "qwen15"', f'model = "{model}"')
    return load_project(str(toml_path))


def test_replicas_from_the_declared_volume_and_the_bench_figure(toml_path, tmp_path):
    results = _engine_json(tmp_path / "results")
    plan = cap.capacity(_project(toml_path), results=results, ingest=False, now=NOW)
    # 200,000 requests/day over 86,400 s = 2.3148/s; peak x3 = 6.9444/s.
    # Sequential replica (parallel = 1): 0.25/s, planned at 80% = 0.2/s; 6.9444 / 0.2 = 34.72 -> 35 replicas.
    assert plan["demand"]["peak_per_s"] == pytest.approx(200_000 / 86_400 * 3)
    assert plan["source"] == "bench" and plan["replicas"] == 35
    [row] = plan["rows"]
    assert row["requests_per_s"] == 0.25 and row["field"] == "served.bento_sequential.concurrent.requests_per_s"
    assert row["file"] == str(results / "engine.json") and row["cores"] == 2
    # weights: the pinned size_bytes; KV: 4,096 tokens x (2,000,000 B / 500 tokens = 4,000 B) = 16,384,000 B
    memory = plan["memory"]
    assert memory["weights_bytes"] == 1_117_320_768 and memory["kv_bytes"] == 16_384_000
    assert memory["estimate_bytes"] == 1_117_320_768 + 16_384_000


def test_batching_uses_the_figure_measured_at_no_more_parallel_than_declared(toml_path, tmp_path):
    results = _engine_json(tmp_path / "results")
    batched = cap.capacity(_project(toml_path, parallel=4), results=results, ingest=False, now=NOW)
    # 0.5/s at 80% = 0.4/s; 6.9444 / 0.4 = 17.36 -> 18. KV: 4,096 x 4 + 256 = 16,640 tokens x 4,000 B.
    assert batched["replicas"] == 18 and batched["rows"][0]["parallel"] == 4
    assert batched["memory"]["kv_tokens"] == 16_640 and batched["memory"]["kv_bytes"] == 66_560_000


def test_parallel_between_measured_points_takes_the_lower_one(toml_path, tmp_path):
    results = _engine_json(tmp_path / "results")
    plan = cap.capacity(_project(toml_path, parallel=2), results=results, ingest=False, now=NOW)
    assert plan["rows"][0]["parallel"] == 1 and plan["replicas"] == 35   # the sequential figure, as above


def test_a_given_peak_factor_and_utilization_replace_the_defaults(toml_path, tmp_path):
    results = _engine_json(tmp_path / "results")
    plan = cap.capacity(_project(toml_path), results=results, ingest=False, now=NOW, peak_factor=1.5,
                        utilization=0.5)
    # 200,000 / 86,400 x 1.5 = 3.4722/s; 0.25 x 0.5 = 0.125/s per replica; 3.4722 / 0.125 = 27.78 -> 28
    assert plan["replicas"] == 28 and plan["demand"]["peak_factor_source"] == "given"


def test_a_peak_factor_below_one_or_a_utilization_outside_0_1_is_refused(toml_path, tmp_path):
    from framework.errors import SpecError

    project = _project(toml_path)
    with pytest.raises(SpecError, match="peak factor"):
        cap.capacity(project, results=tmp_path, ingest=False, peak_factor=0.5)
    with pytest.raises(SpecError, match="utilization"):
        cap.capacity(project, results=tmp_path, ingest=False, utilization=1.2)


def test_the_repositorys_measured_figures_for_the_demo(toml_path):
    """The committed bench/results/engine.json: the demo bento (qwen15, parallel = 1) served 0.2743 requests/s
    with 4 clients on 2 cores; the demo declares 5,000 requests/day."""
    project = load_project(str(toml_path))
    plan = cap.capacity(project, results=REPO / "bench" / "results", ingest=False, now=NOW)
    measured = json.loads((REPO / "bench/results/engine.json").read_text())
    rate = measured["served"]["bento_sequential"]["concurrent"]["requests_per_s"]
    assert 0.27 < rate < 0.28
    # 5,000 x 3 / 86,400 = 0.1736/s against 0.2743 x 0.8 = 0.2194/s: one replica (79% of its planned share)
    assert plan["source"] == "bench" and plan["rows"][0]["requests_per_s"] == rate and plan["replicas"] == 1
    # 50,000/day: 1.736/s / 0.2194 = 7.91 -> 8 replicas
    edit_toml(toml_path, "expected_requests_per_day = 5000", "expected_requests_per_day = 50000")
    assert cap.capacity(load_project(str(toml_path)), results=REPO / "bench" / "results", ingest=False,
                        now=NOW)["replicas"] == 8
    # KV per token from the saved prefix: 19,565,916 B over 682 tokens
    prefix = measured["startup"]["in_process"]["batched_saved_prefix"]
    assert plan["memory"]["kv_bytes_per_token"] == prefix["prefix_bytes"] / prefix["prefix_tokens"]
    text = "\n".join(cap.describe(plan))
    assert "used: bench -> 1 replica(s)" in text and "bench/results/engine.json" in text
    assert "gpu: not measured" in text and "not counted" in text


def test_the_gpu_row_only_for_a_model_measured_on_a_gpu(toml_path, tmp_path):
    results = _engine_json(tmp_path / "results")
    plan = cap.capacity(_project(toml_path, model="tiny"), results=results, ingest=False, now=NOW)
    # the bench file measured qwen15, not tiny: no CPU figure, so no replica count from a CPU source
    assert plan["source"] is None and plan["replicas"] is None
    assert "not this model file" in plan["tried"][1]["why"]
    [gpu] = plan["rows"]
    # BENCHMARKS.md "GPU": the tiny model's demo call, p50 285 ms on one H200 -> 1 / 0.285 s = 3.509/s;
    # 6.9444 / (3.509 x 0.8 = 2.807) = 2.47 -> 3 replicas
    assert gpu["device"] == "gpu" and gpu["requests_per_s"] == pytest.approx(1 / 0.285) and gpu["replicas"] == 3
    assert plan["memory"]["kv_bytes"] is None   # KV per token was measured for qwen15 only
    assert "used: no measured throughput" in "\n".join(cap.describe(plan))


def test_a_bench_section_run_beside_other_load_is_not_a_figure(toml_path, tmp_path):
    results = _engine_json(tmp_path / "results", load=0.5)
    plan = cap.capacity(_project(toml_path), results=results, ingest=False, now=NOW)
    assert plan["source"] is None and "other busy cores" in plan["tried"][1]["why"]


def _traces(store_path: Path, rows: list[dict]) -> None:
    with Store(store_path) as store:
        store.add_segment_rows("traces", "traces/w.jsonl", rows, start=0, end=1, skipped=0)


def _row(i: int, start: datetime, ms: float, *, worker: str = "w1", served: dict | None = None,
         status: int = 200, sha: str = QWEN15) -> dict:
    return {"trace_id": f"t{i}", "request_id": f"r{i}", "started_at": start.replace(tzinfo=None).isoformat(),
            "duration_ms": ms, "status": status, "model_sha256": sha, "version": "v1", "bento": "ticket-triage:v1",
            "worker": worker, "served": served or {}}


def test_served_traffic_comes_first_when_it_was_under_load(toml_path, tmp_path):
    project = _project(toml_path)
    results = _engine_json(tmp_path / "results")
    start = NOW - timedelta(hours=2)
    # 30 requests, one every 10 s, each taking 3 s on the sequential engine: it was busy 30 x 3 = 90 s and
    # answered 30 in that time, 1/3 request/s (the arrivals were 0.1/s). Cache hits in between use no model.
    rows = [_row(i, start + timedelta(seconds=10 * i), 3000) for i in range(30)]
    rows += [_row(100 + i, start + timedelta(seconds=10 * i + 1), 30, served={"cache": {"kind": "exact"}})
             for i in range(30)]
    _traces(project.state_dir / "store.duckdb", rows)
    plan = cap.capacity(project, results=results, ingest=False, now=NOW)
    served = plan["rows"][0]
    assert plan["source"] == "served" and served["answers"] == 30 and served["saturated_s"] == 90.0
    assert served["requests_per_s"] == pytest.approx(1 / 3)
    # 6.9444/s / (1/3 x 0.8 = 0.2667) = 26.04 -> 27 replicas; the bench row is still shown beside it
    assert plan["replicas"] == 27 and [r["source"] for r in plan["rows"]] == ["served", "bench"]
    assert "used: served -> 27 replica(s)" in "\n".join(cap.describe(plan))


def test_served_traffic_too_light_to_show_capacity_falls_back_to_the_bench(toml_path, tmp_path):
    project = _project(toml_path)
    start = NOW - timedelta(hours=1)
    _traces(project.state_dir / "store.duckdb", [_row(i, start + timedelta(seconds=10 * i), 3000) for i in range(10)])
    plan = cap.capacity(project, results=_engine_json(tmp_path / "results"), ingest=False, now=NOW)
    assert plan["source"] == "bench" and plan["replicas"] == 35
    assert "not been served under load" in plan["tried"][0]["why"] and "30 s saturated" in plan["tried"][0]["why"]


def test_served_throughput_counts_only_saturated_time():
    start = datetime(2026, 11, 27, 10, 0)
    # parallel 2: pairs of requests at once, each 4 s, a pair every 10 s, 15 pairs: saturated 15 x 4 = 60 s with
    # 30 answers -> 0.5/s. The same traffic judged for parallel 4 never saturates: no figure.
    rows = [_row(2 * i + k, start + timedelta(seconds=10 * i), 4000, worker="w") for i in range(15) for k in (0, 1)]
    figure = cap.served_throughput(rows, 2)
    assert figure["saturated_s"] == 60.0 and figure["answers"] == 30 and figure["requests_per_s"] == 0.5
    assert cap.served_throughput(rows, 4)["requests_per_s"] is None
    # a second worker's traffic is its own: two workers each saturated 60 s with 30 answers -> still 0.5/s each
    other = [{**r, "trace_id": "x" + r["trace_id"], "worker": "v"} for r in rows]
    assert cap.served_throughput(rows + other, 2)["requests_per_s"] == 0.5
    # the share of each request's own time spent saturated is what counts: with parallel 2, A runs alone from
    # 0 s to 10 s, B from 9.9 s to 19.9 s; 0.1 s saturated, in which each did 0.1 s / 10 s of its work: 0.02 answers
    ramp = [_row(1, start, 10_000, worker="w"), _row(2, start + timedelta(seconds=9.9), 10_000, worker="w")]
    figure = cap.served_throughput(ramp, 2)
    assert figure["saturated_s"] == pytest.approx(0.1) and figure["answers"] == pytest.approx(0.02, abs=1e-3)
    # failures and fallback answers are not model answers
    failed = [_row(900 + i, start + timedelta(seconds=10 * i), 4000, status=503) for i in range(15)]
    fallback = [_row(950 + i, start + timedelta(seconds=10 * i), 4000, served={"fallback": {"action": "static"}})
                for i in range(15)]
    assert cap.served_throughput(failed + fallback, 1)["answers"] == 0


def test_no_declared_volume_gives_figures_but_no_replica_count(toml_path, tmp_path):
    text = toml_path.read_text()
    toml_path.write_text(text.replace("monthly_budget = 5.0", "").replace("expected_requests_per_day = 5000", ""))
    plan = cap.capacity(load_project(str(toml_path)), results=_engine_json(tmp_path / "r"), ingest=False, now=NOW)
    assert plan["demand"] is None and plan["replicas"] is None and plan["rows"][0]["requests_per_s"] == 0.25
    assert "expected_requests_per_day" in "\n".join(cap.describe(plan))


def test_the_replica_arithmetic_by_hand():
    # 86,400 requests/day = 1/s mean, x3 = 3/s; a replica at 1.5/s planned at 80% = 1.2/s; 3 / 1.2 = 2.5 -> 3
    assert cap.replicas_needed(86_400, 1.5) == 3
    # exactly at a boundary: 3/s against 1.5/s at 100% is 2 replicas, not 3
    assert cap.replicas_needed(86_400, 1.5, utilization=1.0) == 2
    assert cap.replicas_needed(0, 1.0) == 1   # a declared service keeps one replica
    with pytest.raises(ValueError):
        cap.replicas_needed(100, 0.0)


rates = st.floats(min_value=1e-4, max_value=1e4, allow_nan=False)
volumes = st.floats(min_value=0, max_value=1e9, allow_nan=False)
factors = st.floats(min_value=1, max_value=20, allow_nan=False)
utilizations = st.floats(min_value=0.05, max_value=1, allow_nan=False)


@given(volumes, volumes, rates, factors, utilizations)
def test_more_requests_never_need_fewer_replicas(a, b, rate, factor, utilization):
    low, high = sorted((a, b))
    assert (cap.replicas_needed(low, rate, peak_factor=factor, utilization=utilization)
            <= cap.replicas_needed(high, rate, peak_factor=factor, utilization=utilization))


@given(volumes, rates, rates, factors, utilizations)
def test_a_faster_replica_never_needs_more_replicas(volume, a, b, factor, utilization):
    slow, fast = sorted((a, b))
    assert (cap.replicas_needed(volume, fast, peak_factor=factor, utilization=utilization)
            <= cap.replicas_needed(volume, slow, peak_factor=factor, utilization=utilization))


@given(volumes, rates, factors, utilizations)
def test_the_replicas_carry_the_peak(volume, rate, factor, utilization):
    n = cap.replicas_needed(volume, rate, peak_factor=factor, utilization=utilization)
    peak = volume / 86_400 * factor
    assert n >= 1 and n * rate * utilization >= peak * (1 - 1e-9)
    assert n == 1 or (n - 1) * rate * utilization < peak * (1 + 1e-9)
