"""The warehouse export (framework/warehouse.py): every table of two projects' stores, spread over two UTC
days, read back by DuckDB from the Hive-partitioned Parquet equals the store row for row; re-exports add
nothing; rows pruned from the store stay exported; `since` bounds the days written; the audit rows still
verify from the files alone."""

from __future__ import annotations

import json
import re
import tempfile
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from framework import audit, signing
from framework.errors import SpecError, StoreError
from framework.evaluate import store_path
from framework.spec import load_project
from framework.store import Store
from framework.traces import SegmentWriter, iso, utc_now
from framework.warehouse import TABLES, export, export_store, partition_dir

DAY1, DAY2 = date(2026, 3, 1), date(2026, 3, 2)
LATE = datetime(2026, 3, 1, 23, 30)          # day 1, half an hour before midnight UTC
EARLY = datetime(2026, 3, 2, 0, 15)          # day 2
NOON = datetime(2026, 3, 2, 12, 0)           # day 2
TRICKY = 'é ü 中文 🚀 "quoted" \'single\' back\\slash\nnew line\ttab'
_SIGNED: dict = {}


def _trace(trace_id: str, at: datetime, project: str = "p", **extra) -> dict:
    return {"trace_id": trace_id, "request_id": f"req-{trace_id}", "started_at": iso(at), "duration_ms": 12.5,
            "status": 200, "project": project, "channel": "prod", "bento": f"{project}:v1", "version": "v1",
            "inputs": {"ticket": TRICKY}, "outputs": {"category": "billing"}, "stages": [{"name": "model"}],
            "tokens_in_new": 3, "tokens_out": 2, "cost": 1e-6, **extra}


def _signed(project: str, i: int, at: datetime, key: Path) -> signing.Signed:
    cache_key = (project, i, at, str(key))
    if cache_key not in _SIGNED:   # ssh-keygen per signature: sign each statement once per session
        _SIGNED[cache_key] = signing.sign(audit.statement(project, "check", project, {"i": i, "note": TRICKY}, at=at),
                                          key)
    return _SIGNED[cache_key]


def fill(path: Path, project: str, key: Path) -> None:
    """Rows in every exported table of one project's store, some on each side of midnight UTC."""
    result = {"position": 0, "inputs": {"ticket": TRICKY}, "expected": {"category": "bug"}, "output": None,
              "scores": {"category_accuracy": 0.0}, "latency_ms": 5.0, "tokens_in": 7, "tokens_out": 3, "cost": 0.0,
              "error": "model-error: 'quote' \"double\"", "tags": ["billing", "é"]}
    with Store(path) as store:
        for run_id, at in ((f"{project}-r1", LATE), (f"{project}-r2", NOON)):
            store.start_run({"run_id": run_id, "project": project, "split": "eval", "n_examples": 2})
            store.add_result(run_id, {**result, "example_id": "e1"})
            store.add_result(run_id, {**result, "example_id": "e2", "position": 1, "output": {"category": "bug"}})
            store.finish_run(run_id, "complete", {"category_accuracy": 0.5})
            store.con.execute("UPDATE runs SET started_at = ? WHERE run_id = ?", [at, run_id])
        # run 1's results were scored after midnight: they still belong to the run's day
        store.con.execute("UPDATE results SET created_at = ?", [EARLY])
        store.add_check({"check_id": f"{project}-c1", "run_id": f"{project}-r1", "project": project, "passed": True,
                         "verdict": {"passed": True}, "statement": {"action": "check"}, "signature": "sig"})
        store.add_approval({"approval_id": f"{project}-a1", "project": project, "version": "v1",
                            "content_hash": "h", "approver": "bob", "statement": {"action": "approve"}})
        store.add_deployment({"deploy_id": f"{project}-d1", "project": project, "channel": "prod", "version": "v1",
                              "action": "deploy", "actor": "carol"})
        store.add_rollout_event({"event_id": f"{project}-ev0", "rollout_id": "ro1", "seq": 0, "project": project,
                                 "channel": "prod", "action": "canary-start", "version": "v2",
                                 "stable_version": "v1", "step": 0, "weight": 10, "actor": "carol",
                                 "details": {"steps": [10, 50]}})
        for table, at in (("checks", LATE), ("approvals", EARLY), ("deployments", NOON), ("rollout_events", LATE)):
            store.con.execute(f"UPDATE {table} SET created_at = ?", [at])
        for i, at in enumerate((LATE, LATE, EARLY)):
            audit.append(store, _signed(project, i, at, key), "alice")
        store.add_segment_rows("traces", "traces/a.jsonl",
                               [_trace(f"{project}-t1", LATE, project), _trace(f"{project}-t2", EARLY, project,
                                                                               error=TRICKY),
                                _trace(f"{project}-t3", NOON, project)], start=0, end=1, skipped=0)
        store.add_segment_rows("feedback", "feedback/a.jsonl",
                               [{"feedback_id": f"{project}-f1", "request_id": f"req-{project}-t2", "score": -1,
                                 "negative": True, "comment": TRICKY, "correct_labels": {"category": "bug"},
                                 "received_at": iso(NOON)}], start=0, end=1, skipped=0)
        store.add_segment_rows("handoff", "handoff/a.jsonl",
                               [{"handoff_id": f"{project}-h1", "request_id": "req-h", "created_at": iso(LATE),
                                 "project": project, "error_code": "model-timeout", "failure": "timeout",
                                 "inputs": {"ticket": TRICKY}}], start=0, end=1, skipped=0)


def _plain(value):
    return value.astimezone(UTC).replace(tzinfo=None) if isinstance(value, datetime) and value.tzinfo else value


def _rows(con, sql: str, params=()) -> list[dict]:
    cursor = con.execute(sql, list(params))
    names = [d[0] for d in cursor.description]
    return [{k: _plain(v) for k, v in zip(names, row, strict=True)} for row in cursor.fetchall()]


def _key(table: str):
    return lambda row: tuple(str(row[k]) for k in TABLES[table].key)


def stored(path: Path, table: str) -> list[dict]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return sorted(_rows(con, f"SELECT * FROM {table}"), key=_key(table))
    finally:
        con.close()


def exported(out: Path, table: str, project: str | None = None) -> list[dict]:
    """The table as a warehouse reader sees it: every file under <out>/<table>, partition columns from the path."""
    con = duckdb.connect()
    rows = _rows(con, f"SELECT * FROM read_parquet('{out}/{table}/**/*.parquet', hive_partitioning = true, "
                      "hive_types = {'project': VARCHAR, 'day': DATE})")
    return sorted((r for r in rows if project is None or r["project"] == project), key=_key(table))


def partitions(out: Path, table: str) -> set[tuple[str, str]]:
    return {(p.parent.parent.name, p.parent.name) for p in (out / table).glob("*/*/*.parquet")}


@pytest.fixture
def stores(tmp_path, keys) -> dict[str, Path]:
    out = {}
    for project in ("alpha", "2026"):      # "2026": a project name that looks like a number stays a string
        out[project] = tmp_path / project / "store.duckdb"
        fill(out[project], project, keys["alice"])
    return out


def export_all(stores: dict[str, Path], out: Path, **kwargs) -> dict[str, dict[str, int]]:
    counts = {}
    for project, path in stores.items():
        with Store(path, read_only=True) as store:
            counts[project] = export_store(store, project, out, **kwargs)
    return counts


def test_every_table_round_trips_by_project_and_day(stores, tmp_path):
    out = tmp_path / "warehouse"
    counts = export_all(stores, out)
    expected_days = {"runs": {DAY1, DAY2}, "results": {DAY1, DAY2}, "checks": {DAY1}, "approvals": {DAY2},
                     "deployments": {DAY2}, "audit": {DAY1, DAY2}, "traces": {DAY1, DAY2}, "feedback": {DAY2},
                     "rollout_events": {DAY1}, "human_queue": {DAY1}}
    assert set(expected_days) == set(TABLES)
    for project, path in stores.items():
        for table in TABLES:
            want = stored(path, table)
            got = exported(out, table, project)
            assert counts[project][table] == len(want) == len(got) > 0, table
            for before, after in zip(want, got, strict=True):
                assert after.pop("project") == project
                day = after.pop("day")
                assert before.pop("project", project) == project   # a store holds one project: the partition
                assert after == before, table
                assert day in expected_days[table]
    for table, days in expected_days.items():
        assert partitions(out, table) == {(f"project={p}", f"day={d}") for p in stores for d in days}
    # results go with their run: scored after midnight, filed under the day the run started
    results = exported(out, "results", "alpha")
    assert {r["run_id"]: r["day"] for r in results} == {"alpha-r1": DAY1, "alpha-r2": DAY2}
    assert json.loads(next(r for r in results if r["example_id"] == "e1")["inputs"]) == {"ticket": TRICKY}
    assert not list(out.glob(".staging-*"))


def test_column_types_are_what_every_reader_takes(stores, tmp_path):
    out = tmp_path / "warehouse"
    export_all(stores, out)
    con = duckdb.connect()
    types = dict(con.execute(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM read_parquet("
                             f"'{out}/traces/**/*.parquet', hive_partitioning = true))").fetchall())
    assert types["started_at"] == types["ingested_at"] == "TIMESTAMP WITH TIME ZONE"
    assert types["inputs"] == types["calls"] == "VARCHAR"       # JSON text, not DuckDB's JSON extension type
    assert (types["status"], types["duration_ms"], types["day"]) == ("INTEGER", "DOUBLE", "DATE")
    assert list(types)[-2:] == ["day", "project"] or list(types)[-2:] == ["project", "day"]
    traces_file, runs_file = (next((out / table).rglob("*.parquet")) for table in ("traces", "runs"))
    schema = con.execute("SELECT logical_type FROM parquet_schema(?) WHERE name = 'started_at'",
                         [str(traces_file)]).fetchone()
    assert "isAdjustedToUTC=1" in schema[0]           # an instant in UTC (BigQuery TIMESTAMP, not DATETIME)
    names = {row[0] for row in con.execute("SELECT name FROM parquet_schema(?)", [str(runs_file)]).fetchall()}
    assert "project" not in names and "day" not in names   # partition columns live in the folder names only


def test_a_reexport_adds_nothing_and_replaces_updated_rows(stores, tmp_path):
    out = tmp_path / "warehouse"
    export_all(stores, out)
    first = {table: exported(out, table) for table in TABLES}
    files = sorted(p.relative_to(out) for p in out.rglob("*.parquet"))
    export_all(stores, out)
    assert {table: exported(out, table) for table in TABLES} == first
    assert sorted(p.relative_to(out) for p in out.rglob("*.parquet")) == files
    with Store(stores["alpha"]) as store:   # a run's row changes after its export: the new version replaces it
        store.con.execute("UPDATE runs SET status = 'failed' WHERE run_id = 'alpha-r1'")
    export_all(stores, out)
    runs = exported(out, "runs", "alpha")
    assert [(r["run_id"], r["status"]) for r in runs] == [("alpha-r1", "failed"), ("alpha-r2", "complete")]


def test_rows_pruned_from_the_store_stay_in_the_warehouse(stores, tmp_path):
    out = tmp_path / "warehouse"
    export_all(stores, out)
    with Store(stores["alpha"]) as store:   # retention cuts through day 2: t1 (day 1) and t2 (day 2) go
        assert store.delete_traces_before(EARLY + timedelta(hours=1)) == 2
    assert export_all({"alpha": stores["alpha"]}, out, tables=["traces"])["alpha"] == {"traces": 1}
    assert [r["trace_id"] for r in exported(out, "traces", "alpha")] == ["alpha-t1", "alpha-t2", "alpha-t3"]
    assert len(exported(out, "traces")) == 6     # the other project's partitions are untouched


def test_since_writes_whole_days_from_its_utc_day(stores, tmp_path):
    out = tmp_path / "warehouse"
    counts = export_all({"alpha": stores["alpha"]}, out, since=NOON + timedelta(hours=5))  # day 2, after every row
    assert counts["alpha"]["traces"] == 2 and counts["alpha"]["checks"] == 0    # all of day 2, none of day 1
    assert partitions(out, "traces") == {("project=alpha", f"day={DAY2}")}
    assert not (out / "checks").exists()
    # an aware time is taken in UTC: 01:00 at +02:00 on day 2 is 23:00 UTC on day 1
    aware = datetime(2026, 3, 2, 1, 0, tzinfo=timezone(timedelta(hours=2)))
    assert export_all({"alpha": stores["alpha"]}, out, since=aware)["alpha"]["traces"] == 3
    assert partitions(out, "traces") == {("project=alpha", f"day={DAY1}"), ("project=alpha", f"day={DAY2}")}


def test_days_and_times_do_not_depend_on_the_session_time_zone(stores, tmp_path):
    with Store(stores["alpha"], read_only=True) as store:
        store.con.execute("SET TimeZone = 'Pacific/Auckland'")   # +13:00 in March: LATE is already day 2 there
        export_store(store, "alpha", tmp_path / "w", tables=["traces"])
    export_all({"alpha": stores["alpha"]}, tmp_path / "utc", tables=["traces"])
    assert exported(tmp_path / "w", "traces") == exported(tmp_path / "utc", "traces")
    assert [(r["trace_id"], r["started_at"], r["day"]) for r in exported(tmp_path / "w", "traces")][0] == (
        "alpha-t1", LATE, DAY1)


def test_an_empty_store_writes_nothing(tmp_path):
    path = tmp_path / "store.duckdb"
    Store(path).close()
    out = tmp_path / "warehouse"
    with Store(path, read_only=True) as store:
        assert export_store(store, "alpha", out) == dict.fromkeys(TABLES, 0)
    assert not out.exists()


def test_unknown_tables_and_unwritable_folders_are_refused(stores, tmp_path):
    with Store(stores["alpha"], read_only=True) as store:
        with pytest.raises(SpecError, match="'segments', 'meta'") as caught:
            export_store(store, "alpha", tmp_path / "w", tables=["runs", "segments", "meta"])
        assert "choose among runs, results" in caught.value.hint
        with pytest.raises(SpecError, match="one folder name"):
            export_store(store, "../elsewhere", tmp_path / "w")
        (tmp_path / "file").write_text("not a folder")
        with pytest.raises(StoreError, match="cannot write the export"):
            export_store(store, "alpha", tmp_path / "file", tables=["runs"])


def test_the_exported_audit_log_verifies_and_shows_an_edit_made_after_export(stores, tmp_path):
    out = tmp_path / "warehouse"
    export_all(stores, out, tables=["audit"])

    def rows(project: str) -> list[dict]:
        return sorted(exported(out, "audit", project), key=lambda r: (r["seq"], r["hash"]))

    for project in stores:
        assert [r["seq"] for r in rows(project)] == [1, 2, 3]
        assert audit.verify_rows(rows(project), None, (3, rows(project)[-1]["hash"])) is None
    with Store(stores["alpha"]) as store:     # someone rewrites a logged row in the store
        store.con.execute("UPDATE audit SET target = 'beta' WHERE seq = 2")
    export_all({"alpha": stores["alpha"]}, out, tables=["audit"])
    assert [r["seq"] for r in rows("alpha")] == [1, 2, 2, 3]      # the original is kept beside it
    problem = audit.verify_rows(rows("alpha"), None, None)
    assert problem is not None and problem.seq in (2, 3)


def test_export_ingests_new_trace_segments_first(project_root, tmp_path):
    project = load_project(str(project_root / "projects" / "ticket-triage"))
    writer = SegmentWriter(project.trace_dir, "traces", fsync="never")
    at = utc_now() - timedelta(minutes=5)      # recent: ingest applies the project's trace retention
    writer.append(_trace("seg-1", at, "ticket-triage"))
    writer.close()
    out = tmp_path / "warehouse"
    counts = export(project, out, tables=("traces", "runs"))
    assert counts == {"traces": 1, "runs": 0}
    assert [(r["trace_id"], r["project"], r["day"]) for r in exported(out, "traces")] == [
        ("seg-1", "ticket-triage", at.date())]
    assert partition_dir(out, "traces", "ticket-triage", at.date()).is_dir()
    assert store_path(project).exists()


def test_the_documented_schema_is_the_stores(tmp_path):
    """docs/warehouse.md names, per table, its day column, merge key and every column that is not STRING."""
    kinds = {"TIMESTAMP": "timestamp", "JSON": "json", "INTEGER": "INT32", "BIGINT": "INT64", "DOUBLE": "DOUBLE",
             "BOOLEAN": "BOOLEAN"}
    documented = {}
    for line in (Path(__file__).parents[1] / "docs" / "warehouse.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0].strip("`") in TABLES:
            name = cells[0].strip("`")
            columns = {c: "timestamp" for c in re.findall(r"`(\w+)`", cells[3])}
            columns |= {c: "json" for c in re.findall(r"`(\w+)`", cells[4])}
            columns |= dict(re.findall(r"`(\w+)` (\w+)", cells[5]))
            documented[name] = (re.findall(r"`(\w+)`", cells[2]), columns)
    assert set(documented) == set(TABLES)
    path = tmp_path / "store.duckdb"
    Store(path).close()
    con = duckdb.connect(str(path), read_only=True)
    for name, (key, columns) in documented.items():
        assert tuple(key) == TABLES[name].key
        actual = {c: kinds[t] for c, t in con.execute("SELECT column_name, data_type FROM information_schema.columns "
                                                     "WHERE table_name = ?", [name]).fetchall() if t in kinds}
        assert columns == actual, name
    con.close()


text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)   # no lone surrogates: not UTF-8
json_value = st.one_of(text, st.lists(text, max_size=3), st.integers(-2**63, 2**63 - 1), st.none())


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(inputs=st.dictionaries(text, json_value, max_size=4),
       error=st.one_of(st.none(), text), comment=text)
def test_any_text_round_trips_in_json_and_string_columns(inputs, error, comment):
    with tempfile.TemporaryDirectory() as folder:
        path, out = Path(folder) / "store.duckdb", Path(folder) / "w"
        with Store(path) as store:
            store.add_segment_rows("traces", "traces/x.jsonl", [_trace("t", NOON, inputs=inputs, error=error)],
                                   start=0, end=1, skipped=0)
            store.add_segment_rows("feedback", "feedback/x.jsonl",
                                   [{"feedback_id": "f", "request_id": "req-t", "score": 1, "comment": comment,
                                     "correct_labels": inputs, "received_at": iso(NOON)}], start=0, end=1, skipped=0)
        with Store(path, read_only=True) as store:
            assert export_store(store, "p", out, tables=["traces", "feedback"]) == {"traces": 1, "feedback": 1}
        (trace,), (feedback,) = exported(out, "traces"), exported(out, "feedback")
        assert json.loads(trace["inputs"]) == inputs and trace["error"] == error
        assert feedback["comment"] == comment and json.loads(feedback["correct_labels"]) == inputs
        assert trace["inputs"] == stored(path, "traces")[0]["inputs"]        # the store's JSON text, byte for byte
