"""Real path: notebook program → DSPy → llama.cpp (tiny GGUF) → DuckDB → verdict → reports."""

from __future__ import annotations

import duckdb
import pytest

from framework import load_project
from framework.check import check


@pytest.mark.model
def test_check_on_a_slice_records_everything(toml_path, tiny_model_present):
    project = load_project(str(toml_path))
    result = check(project, model_key="tiny", limit=8)
    run = result.run
    assert run.n == 8 and not run.reused
    m = run.measurements
    assert 0 < m.latency_p50_ms <= m.latency_p95_ms <= m.latency_p99_ms
    assert all(r["tokens_in"] > 100 for r in run.records)  # the prompt alone is hundreds of tokens
    assert sum(r["tokens_cached"] for r in run.records) > 0  # the shared instruction prefix is reused
    assert m.tokens_per_request == pytest.approx(  # what the model evaluated anew and generated
        sum(r["tokens_in"] - r["tokens_cached"] + r["tokens_out"] for r in run.records) / run.n)
    assert m.metrics["format_validity"] == 1.0  # the grammar guarantees parseable output
    assert {c.name for c in result.verdict.clauses} >= {"latency_p95_ms", "category_macro_f1", "monthly_budget"}

    con = duckdb.connect(str(project.state_dir / "store.duckdb"), read_only=True)
    rows = con.execute("SELECT example_id, output, latency_ms, tokens_in, tokens_out, cost, error "
                       "FROM results WHERE run_id = ? ORDER BY position", [run.run_id]).fetchall()
    status = con.execute("SELECT status FROM runs WHERE run_id = ?", [run.run_id]).fetchone()
    checks = con.execute("SELECT passed, run_id FROM checks").fetchall()
    con.close()
    assert len(rows) == 8 and status == ("complete",)
    assert all(r[1] is not None and r[2] > 0 and r[3] > 0 and r[4] > 0 and r[6] is None for r in rows)
    assert checks == [(result.passed, run.run_id)]

    html = open(result.report_html).read()
    assert "<table id=contract>" in html and "category_macro_f1" in html

    again = check(project, model_key="tiny", limit=8)
    assert again.run.reused and again.run.run_id == run.run_id
