"""The DuckDB store: plain tables, incremental writes, schema guard."""

from __future__ import annotations

import duckdb
import pytest

from framework import StoreError
from framework.store import SCHEMA_VERSION, Store, now


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


def _trace_row(i: int, version: str) -> dict:
    return {"trace_id": f"{i:032x}", "request_id": f"req-{i}", "started_at": f"2026-11-2{i}T10:00:00.000001",
            "duration_ms": 10.5 * i, "project": "p", "bento": f"p:{version}", "version": version,
            "status": 503 if i == 3 else 200, "error_code": "model-timeout" if i == 3 else None,
            "tokens_in_new": i, "tokens_out": 2, "cost": 0.001 * i, "inputs": {"ticket": f"t{i} ü"},
            "outputs": {"category": "bug"}, "calls": [{"index": 0, "messages": [{"role": "user", "content": "x"}]}],
            "stages": [{"name": "validation", "start_ms": 0.0, "duration_ms": 0.1}], "decisions": [],
            "redactions": {"email": 1}}


def test_traces_export_to_parquet_with_the_same_rows(tmp_path):
    from datetime import datetime

    path = tmp_path / "store.duckdb"
    with Store(path) as store:
        store.add_segment_rows("traces", "traces/w.jsonl", [_trace_row(i, "v1" if i < 4 else "v2")
                                                            for i in range(1, 6)], start=0, end=100, skipped=0)
        every = store.export_traces_parquet(tmp_path / "out" / "all.parquet")
        recent = store.export_traces_parquet(tmp_path / "recent.parquet", since=datetime(2026, 11, 23))
        v2 = store.export_traces_parquet(tmp_path / "v2.parquet", version="p:v2")
        assert (every, recent, v2) == (5, 3, 2)
        stored = store.con.execute("SELECT * FROM traces ORDER BY started_at").fetchall()
        columns = [d[0] for d in store.con.description]
    con = duckdb.connect()
    cursor = con.execute("SELECT * FROM read_parquet(?) ORDER BY started_at", [str(tmp_path / "out" / "all.parquet")])
    assert [d[0] for d in cursor.description] == columns
    assert cursor.fetchall() == stored
    assert con.execute("SELECT list(request_id ORDER BY started_at) FROM read_parquet(?)",
                       [str(tmp_path / "recent.parquet")]).fetchone()[0] == ["req-3", "req-4", "req-5"]
    assert con.execute("SELECT inputs->>'ticket' FROM read_parquet(?) WHERE request_id = 'req-5'",
                       [str(tmp_path / "v2.parquet")]).fetchone()[0] == "t5 ü"


def test_a_parquet_export_to_an_unwritable_place_names_the_file(tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    with Store(tmp_path / "store.duckdb") as store, pytest.raises(StoreError, match="cannot write the Parquet"):
        store.export_traces_parquet(tmp_path / "taken" / "x.parquet")


@pytest.mark.parametrize("old", ["6", "7", "8"])
def test_an_older_store_upgrades_in_place_with_the_human_queue(tmp_path, old):
    path = tmp_path / "store.duckdb"
    Store(path).close()
    con = duckdb.connect(str(path))
    con.execute("DROP TABLE human_queue")
    con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [old])
    con.close()
    with pytest.raises(StoreError, match=f"schema version {old}"):   # a reader does not upgrade
        Store(path, read_only=True)
    with Store(path) as store:
        assert store.handoffs() == []
    con = duckdb.connect(str(path), read_only=True)
    assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)
    assert SCHEMA_VERSION == 10
    con.close()


def test_a_resolution_is_recorded_once(tmp_path):
    with Store(tmp_path / "store.duckdb") as store:
        store.add_segment_rows("handoff", "handoff/w.jsonl", [
            {"handoff_id": "h1", "request_id": "r1", "created_at": "2026-11-26T10:00:00", "error_code": "model-timeout",
             "inputs": {"ticket": "t"}, "answer": {"category": "billing"}}], start=0, end=10, skipped=0)
        assert store.add_segment_rows("handoff", "handoff/w.jsonl", [
            {"handoff_id": "h1", "request_id": "r1", "created_at": "2026-11-26T10:00:00",
             "error_code": "model-timeout"}], start=0, end=10, skipped=0) == 0   # same handoff_id: ignored
        [row] = store.handoffs(open_only=True)
        assert row["inputs"] == {"ticket": "t"} and row["answer"] == {"category": "billing"}
        assert store.resolve_handoff("h1", {"resolved_at": now(), "resolved_by": "carol",
                                            "labels": {"category": "bug"}, "note": None}) == 1
        assert store.resolve_handoff("h1", {"resolved_at": now(), "resolved_by": "mallory",
                                            "labels": {"category": "abuse"}, "note": None}) == 0
        assert store.handoffs(open_only=True) == []
        [row] = store.handoffs(ident="r1")
        assert (row["resolved_by"], row["labels"]) == ("carol", {"category": "bug"})


def test_a_version_8_store_gains_results_routing(tmp_path):
    """Schema 9 adds results.routing (a tiered pipeline's tier and escalations): an older file upgrades in place,
    and a routed result round-trips."""
    path = tmp_path / "store.duckdb"
    Store(path).close()
    con = duckdb.connect(str(path))
    con.execute("ALTER TABLE results DROP COLUMN routing")
    con.execute("UPDATE meta SET value = '8' WHERE key = 'schema_version'")
    con.close()
    routing = {"outcome": "answered", "tier": "qwen15", "tier_index": 1,
               "escalations": [{"tier": "qwen05", "reason": "confidence", "detail": "0.41 < 0.6"}], "attempts": []}
    record = {"example_id": "e1", "position": 0, "inputs": {"ticket": "t"}, "expected": {}, "output": None,
              "scores": {}, "latency_ms": 1.0, "tokens_in": 3, "tokens_out": 1, "cost": 0.0, "error": None,
              "routing": routing}
    with Store(path) as store:
        store.add_result("run-1", record)
        store.add_result("run-1", {**record, "example_id": "e2", "routing": None})
        rows = store.results("run-1")
    assert [r["routing"] for r in rows] == [routing, None]
