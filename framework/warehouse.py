"""The store → partitioned Parquet, for a warehouse (docs/warehouse.md).

A project's store is one DuckDB file on one machine; a team that runs several projects, or keeps
history longer than `[tracing] retention_days`, reads them from a warehouse instead. `export` writes
each table to `<out>/<table>/project=<name>/day=<YYYY-MM-DD>/data_0.parquet` (Hive-style partition
folders that DuckDB, ClickHouse, BigQuery and Spark read as they are). DuckDB writes the files itself
(`COPY … TO … (PARTITION_BY …)`), so no row passes through Python.

An export writes whole UTC days, and a day written again is merged, not appended: its new file holds
the store's rows of that day plus the rows an earlier export wrote that the store no longer holds
(traces past retention, a pruned audit log), keyed by each table's primary key. So exporting the
same day twice adds nothing, and pruning the store never prunes the warehouse. Audit rows are never
replaced: one edited in the store after its export appears beside the exported one (same `seq`),
where `audit.verify_rows` on the warehouse copy names it.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from framework.errors import SpecError, StoreError

if TYPE_CHECKING:
    from framework.spec import Project
    from framework.store import Store

PARTITION_TYPES = "{'project': VARCHAR, 'day': DATE}"   # a project named "2026" must stay a string


@dataclass(frozen=True)
class Table:
    """How one store table is exported: the key a re-export merges on, and the timestamp its `day` comes from."""

    key: tuple[str, ...]
    day_from: str = "t.created_at"                  # SQL over `source`; its UTC date is the partition
    source: str = ""                                # FROM clause; the table itself (as `t`) when empty
    append_only: bool = False                       # merge on the whole row: an exported row is never replaced


TABLES: dict[str, Table] = {
    "runs": Table(("run_id",), "t.started_at"),
    # a result goes with its run (the day the run started), so a run that crosses midnight stays whole
    "results": Table(("run_id", "example_id"), "coalesce(r.started_at, t.created_at)",
                     "results t LEFT JOIN runs r ON r.run_id = t.run_id"),
    "checks": Table(("check_id",)),
    "approvals": Table(("approval_id",)),
    "deployments": Table(("deploy_id",)),
    # an audit row is never replaced: one edited in the store after its export is kept beside the original
    "audit": Table(("seq", "hash"), "t.logged_at", append_only=True),
    "traces": Table(("trace_id",), "t.started_at"),
    "feedback": Table(("feedback_id",), "coalesce(t.received_at, t.ingested_at)"),
    "rollout_events": Table(("event_id",)),
    "human_queue": Table(("handoff_id",)),
}


def export(project: Project, out_dir: Path, *, tables: Sequence[str] | None = None,
           since: datetime | None = None) -> dict[str, int]:
    """Ingest the project's new trace segments, then export its store to `out_dir`; see `export_store`."""
    from framework import traces
    from framework.evaluate import store_path
    from framework.store import Store

    traces.ingest(project)
    with Store(store_path(project), read_only=True) as store:
        return export_store(store, project.name, out_dir, tables=tables, since=since)


def export_store(store: Store, project: str, out_dir: Path, *, tables: Sequence[str] | None = None,
                 since: datetime | None = None) -> dict[str, int]:
    """Write `tables` (default: all of TABLES) of `store` under `out_dir` as Parquet partitioned by
    project and UTC day; returns the store rows written per table, in the order asked (0: nothing
    written for it, and no folder made).

    `since` (naive UTC, or aware) is rounded down to the start of its UTC day: every day from then on
    that the store holds rows for is written whole, and earlier days are left as they are. A day's
    partition is rewritten with the store's rows and the rows of the previous file whose key the store
    no longer holds (audit: every previous row that differs from all of the store's). Raises SpecError
    for an unknown table or a project name that is not one folder name, StoreError when `out_dir`
    cannot be written. Not safe to run twice at once on the same `out_dir`.
    """
    import duckdb

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", project):   # it names a folder: no `/`, no `..`
        raise SpecError(f"cannot export under the project name {project!r}: it must be one folder name",
                        hint="pass the project's name from project.toml")
    names = list(tables) if tables is not None else list(TABLES)
    unknown = [name for name in names if name not in TABLES]
    if unknown:
        raise SpecError(f"cannot export {', '.join(map(repr, unknown))}: not a store table that exports",
                        hint=f"choose among {', '.join(TABLES)}")
    first_day = _utc_day(since) if since is not None else None
    out_dir = Path(out_dir)
    staging = out_dir / f".staging-{uuid.uuid4().hex}"   # outside every <out>/<table>, hidden (Spark skips it)
    counts: dict[str, int] = {}
    try:
        for name in names:
            counts[name] = _export_table(store, project, name, out_dir, staging / name, first_day)
    except (OSError, duckdb.IOException) as exc:
        raise StoreError(f"cannot write the export: {str(exc).splitlines()[0]}", path=str(out_dir),
                         hint="choose a folder you can write to, with room for the files") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return counts


def partition_dir(out_dir: Path, table: str, project: str, day: date) -> Path:
    return Path(out_dir) / table / f"project={project}" / f"day={day.isoformat()}"


def _utc_day(moment: datetime) -> date:
    return (moment.astimezone(UTC) if moment.tzinfo else moment).date()


def _select(store: Store, project: str, name: str) -> tuple[str, list]:
    """The table's rows as exported: JSON columns as their JSON text, timestamps as UTC instants,
    `project` and `day` (the partition columns) last. Columns come from the store, so a column a later
    schema adds is exported without a change here."""
    table = TABLES[name]
    columns = store.con.execute("SELECT column_name, data_type FROM information_schema.columns "
                                "WHERE table_name = ? ORDER BY ordinal_position", [name]).fetchall()
    select = []
    for column, kind in columns:
        if column == "project":   # the partition column: the store's project (a store holds one project)
            continue
        ref = f't."{column}"'
        if kind == "JSON":
            ref = f"CAST({ref} AS VARCHAR)"      # the JSON text as a plain string, which every reader takes
        elif kind == "TIMESTAMP":
            ref = f"timezone('UTC', {ref})"     # the store's naive UTC → Parquet isAdjustedToUTC=true
        select.append(f'{ref} AS "{column}"')
    sql = (f"SELECT {', '.join(select)}, ?::VARCHAR AS project, CAST({table.day_from} AS DATE) AS day "
           f"FROM {table.source or name + ' t'} WHERE {table.day_from} IS NOT NULL")
    return sql, [project]


def _export_table(store: Store, project: str, name: str, out_dir: Path, staging: Path,
                  first_day: date | None) -> int:
    rows_sql, params = _select(store, project, name)
    if first_day is not None:
        rows_sql, params = f"SELECT * FROM ({rows_sql}) WHERE day >= ?", [*params, first_day]
    days = dict(store.con.execute(f"SELECT day, count(*) FROM ({rows_sql}) GROUP BY day", params).fetchall())
    if not days:
        return 0
    key = ", ".join(f'"{column}"' for column in TABLES[name].key)
    earlier = [str(path) for day in sorted(days) for path in
               sorted(partition_dir(out_dir, name, project, day).glob("*.parquet"))]
    sql, sql_params = rows_sql, params
    if earlier:
        kept = (f"SELECT * FROM read_parquet(?, hive_partitioning = true, hive_types = {PARTITION_TYPES}, "
                "union_by_name = true)")
        if TABLES[name].append_only:   # UNION without ALL: identical rows once, any difference kept twice
            sql, sql_params = f"({rows_sql}) UNION BY NAME ({kept})", [*params, earlier]
        else:                          # the store's row wins; rows the store no longer holds stay
            sql = f"({rows_sql}) UNION ALL BY NAME ({kept} ANTI JOIN ({rows_sql}) USING ({key}))"
            sql_params = [*params, earlier, *params]
    staging.mkdir(parents=True, exist_ok=True)
    store.con.execute(f"COPY (SELECT * FROM ({sql}) ORDER BY day, {key}) TO ? "
                      "(FORMAT parquet, PARTITION_BY (project, day), FILENAME_PATTERN 'data_{i}', "
                      "COMPRESSION snappy)", [*sql_params, str(staging)])
    for day in days:
        _replace(staging / f"project={project}" / f"day={day.isoformat()}", partition_dir(out_dir, name, project, day))
    return sum(days.values())


def _replace(new: Path, target: Path) -> None:
    """Move a day's new files over the old ones (each `os.replace` is atomic: a reader sees the old
    file or the new one), then drop old files the new write did not produce."""
    target.mkdir(parents=True, exist_ok=True)
    written = set()
    for path in sorted(new.glob("*.parquet")):
        os.replace(path, target / path.name)
        written.add(path.name)
    for path in target.glob("*.parquet"):
        if path.name not in written:
            path.unlink()
