"""The DuckDB store: plain tables, incremental writes, schema guard."""

from __future__ import annotations

import duckdb
import pytest

from framework import StoreError
from framework.store import SCHEMA_VERSION, Store


def _record(i):
    return {"example_id": f"e{i}", "position": i, "inputs": {"ticket": "t"}, "expected": {"category": "bug"},
            "output": {"category": "bug"}, "scores": {"category_accuracy": 1.0}, "latency_ms": 10.0,
            "tokens_in": 5, "tokens_out": 2, "cost": 0.0, "error": None}


def test_rows_written_before_a_crash_survive(tmp_path):
    path = tmp_path / "store.duckdb"
    with Store(path) as store:
        store.start_run({"run_id": "r1", "project": "p", "split": "eval", "n_examples": 3})
        store.add_result("r1", _record(0))
        store.add_result("r1", _record(1))
        # no finish_run: the process "died" here
    con = duckdb.connect(str(path), read_only=True)
    assert con.execute("SELECT count(*) FROM results WHERE run_id = 'r1'").fetchone() == (2,)
    assert con.execute("SELECT status FROM runs").fetchone() == ("running",)
    con.close()
    with Store(path) as store:
        assert store.find_complete_run("anything") is None


def test_unknown_schema_version_is_refused(tmp_path):
    path = tmp_path / "store.duckdb"
    Store(path).close()
    con = duckdb.connect(str(path))
    con.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(StoreError, match=f"schema version 999, this slipway knows {SCHEMA_VERSION}"):
        Store(path)


def test_read_only_without_a_store_says_what_to_run(tmp_path):
    with pytest.raises(StoreError, match="slipway eval"):
        Store(tmp_path / "none.duckdb", read_only=True)
