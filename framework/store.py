"""The DuckDB store: the only module that speaks SQL.

One file per project (`projects/<name>/.slipway/store.duckdb`), plain tables
anyone can query (`duckdb projects/ticket-triage/.slipway/store.duckdb`).
Results are written one example at a time, so a killed run keeps every row it
finished; its run row stays `running` (or `interrupted`) and is never reused.
Commands open the file briefly (a check opens it per example), because DuckDB lets one process
write at a time and a long check must not lock out `approve`, `deploy` or `rollback`. A signed
record and the audit row that logs it are written in one transaction (`Store.transaction`).
The schema is documented in docs/store.md; SCHEMA_VERSION guards upgrades.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from framework.errors import StoreError

SCHEMA_VERSION = 10

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY,
    project VARCHAR NOT NULL,
    split VARCHAR NOT NULL,
    model_key VARCHAR,
    model_name VARCHAR,
    model_sha256 VARCHAR,
    content_hash VARCHAR,
    program_hash VARCHAR,
    notebook_hash VARCHAR,
    dataset_hash VARCHAR,
    settings_hash VARCHAR,
    git_commit VARCHAR,
    started_at TIMESTAMP,
    finished_at TIMESTAMP,
    status VARCHAR,              -- running | complete | interrupted | failed
    n_examples INTEGER,          -- examples the run set out to score
    measurements JSON            -- metrics.Measurements once complete
);
CREATE TABLE IF NOT EXISTS results (
    run_id VARCHAR NOT NULL,
    example_id VARCHAR NOT NULL,
    position INTEGER,
    inputs JSON,
    expected JSON,
    output JSON,                 -- null when the example errored
    scores JSON,                 -- metric name -> score in [0, 1]
    latency_ms DOUBLE,
    tokens_in INTEGER,           -- prompt tokens, cached included
    tokens_out INTEGER,          -- generated tokens (a forced JSON skeleton counts as prompt)
    cost DOUBLE,                 -- in the currency of the price_per_1k_* settings
    error VARCHAR,
    created_at TIMESTAMP,
    tokens_cached INTEGER,       -- of tokens_in, reused from llama.cpp's KV cache (not evaluated again)
    guardrails JSON,             -- every guardrail decision on the example: [{check, stage, action, ms, detail}]
    blocked VARCHAR,             -- the check that blocked it (no answer); null when answered
    tags JSON,                   -- the example's tags in its split file: the slices it is measured in
    routing JSON,                -- a tiered pipeline: the tier that answered, each escalation and attempt
    PRIMARY KEY (run_id, example_id)
);
CREATE TABLE IF NOT EXISTS checks (
    check_id VARCHAR PRIMARY KEY,
    run_id VARCHAR NOT NULL,
    project VARCHAR NOT NULL,
    content_hash VARCHAR,
    contract_hash VARCHAR,
    passed BOOLEAN,
    failed_clauses JSON,
    verdict JSON,
    report_json VARCHAR,
    report_html VARCHAR,
    created_at TIMESTAMP,
    report_sha256 VARCHAR,       -- sha256 of report_json's bytes, bound into the signed statement
    statement JSON,              -- what the checker signed (framework/signing.py)
    signer_key VARCHAR,
    signature VARCHAR
);
CREATE TABLE IF NOT EXISTS approvals (
    approval_id VARCHAR PRIMARY KEY,
    project VARCHAR NOT NULL,
    version VARCHAR NOT NULL,    -- bento version
    content_hash VARCHAR NOT NULL,  -- the slipway.content_hash label of that bento
    approver VARCHAR NOT NULL,   -- the signer's name in signers.toml when it was recorded (display only)
    note VARCHAR,
    created_at TIMESTAMP,
    statement JSON,              -- what the approver signed: project, version, content and manifest hashes
    signer_key VARCHAR,
    signature VARCHAR
);
CREATE TABLE IF NOT EXISTS deployments (
    deploy_id VARCHAR PRIMARY KEY,
    project VARCHAR NOT NULL,
    channel VARCHAR NOT NULL,    -- staging | prod
    version VARCHAR NOT NULL,
    previous_version VARCHAR,    -- what the channel pointed to before; rollback returns there
    action VARCHAR NOT NULL,     -- deploy | rollback
    actor VARCHAR NOT NULL,
    override_reason VARCHAR,     -- set when an admin deployed past the gate
    created_at TIMESTAMP,
    statement JSON,              -- what the deployer signed; `serve --channel` follows only verified rows
    signer_key VARCHAR,
    signature VARCHAR
);
CREATE TABLE IF NOT EXISTS audit (
    seq BIGINT PRIMARY KEY,      -- 1, 2, 3 … never reused, even after pruning
    logged_at TIMESTAMP NOT NULL,
    actor VARCHAR NOT NULL,
    action VARCHAR NOT NULL,     -- check | build | approve | deploy | rollback | override
    target VARCHAR,
    details JSON,
    prev_hash VARCHAR NOT NULL,
    hash VARCHAR NOT NULL,       -- sha256(prev_hash + canonical row), see framework/audit.py
    statement JSON,              -- the signed statement the row records (action, target, details, time)
    signer_key VARCHAR,
    signature VARCHAR
);
CREATE TABLE IF NOT EXISTS traces (
    trace_id VARCHAR PRIMARY KEY, -- one per answered request (framework/traces.py); the OTLP trace id
    request_id VARCHAR NOT NULL,  -- X-Request-ID as sent, or generated
    started_at TIMESTAMP NOT NULL, -- UTC
    duration_ms DOUBLE,
    project VARCHAR,
    channel VARCHAR,              -- the channel `slipway serve --channel` served it on; null otherwise
    bento VARCHAR,                -- project:version
    version VARCHAR,
    model_sha256 VARCHAR,
    program_hash VARCHAR,
    caller VARCHAR,
    tenant VARCHAR,
    status INTEGER,               -- HTTP status answered
    error_code VARCHAR,           -- input-too-large | model-timeout | model-error | … (docs/traces.md)
    error VARCHAR,
    tokens_in_new INTEGER,
    tokens_in_cached INTEGER,
    tokens_out INTEGER,
    cost DOUBLE,
    inputs JSON,                  -- redacted; null when [tracing] keep_text = false
    outputs JSON,
    calls JSON,                   -- per model call: prompt messages, raw output, tokens, timings
    stages JSON,                  -- [{name, start_ms, duration_ms}]
    decisions JSON,
    redactions JSON,              -- rule -> how many replacements
    worker VARCHAR,
    flags JSON,                   -- {flag: variant} when a feature flag chose the program (docs/flags.md)
    served JSON,                  -- how it was answered besides the model: cache, degraded, fallback (docs/serve.md)
    segment VARCHAR,              -- the segment file it was ingested from
    ingested_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS feedback (
    feedback_id VARCHAR PRIMARY KEY, -- sha256 of request_id + the body: a repeated POST adds nothing
    request_id VARCHAR NOT NULL,
    trace_id VARCHAR,
    bento VARCHAR,                -- the version that answered (from its trace)
    version VARCHAR,
    score DOUBLE,                 -- as sent: -1 / +1, or 0..1
    negative BOOLEAN,
    comment VARCHAR,
    correct_labels JSON,
    received_at TIMESTAMP,
    segment VARCHAR,
    ingested_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS segments (
    segment VARCHAR PRIMARY KEY,  -- traces/<file> or feedback/<file> under <project>/.slipway/traces
    bytes_ingested BIGINT NOT NULL, -- written with the rows in one transaction: ingest is idempotent
    lines_skipped BIGINT NOT NULL,
    updated_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS human_queue (
    handoff_id VARCHAR PRIMARY KEY, -- one per request a served worker handed to a person (framework/handoff.py)
    request_id VARCHAR NOT NULL,  -- X-Request-ID as sent, or generated
    created_at TIMESTAMP NOT NULL, -- UTC, when the worker handed it over
    project VARCHAR,
    channel VARCHAR,
    bento VARCHAR,                -- project:version that failed to answer
    version VARCHAR,
    program_hash VARCHAR,
    caller VARCHAR,
    tenant VARCHAR,
    flags JSON,                   -- {flag: variant} when a feature flag chose the program that failed
    failure VARCHAR,              -- model-error | timeout | exhausted
    error_code VARCHAR,           -- the service's code: model-timeout | model-error | …
    error VARCHAR,                -- redacted
    inputs JSON,                  -- redacted as traces are; null when [tracing] keep_text = false
    answer JSON,                  -- the fallback answer the caller got meanwhile
    redactions JSON,
    worker VARCHAR,
    segment VARCHAR,
    ingested_at TIMESTAMP,
    resolved_at TIMESTAMP,        -- null while open
    resolved_by VARCHAR,          -- the signer's name in signers.toml (display only)
    labels JSON,                  -- the person's answer: output field -> value
    note VARCHAR,
    statement JSON,               -- what the resolver signed (action queue-resolve)
    signer_key VARCHAR,
    signature VARCHAR
);
CREATE TABLE IF NOT EXISTS rollout_events (
    event_id VARCHAR PRIMARY KEY,
    rollout_id VARCHAR NOT NULL,  -- one canary rollout (framework/rollout.py): its start and every decision
    seq INTEGER NOT NULL,         -- 0 (the start), 1, 2 … within the rollout
    project VARCHAR NOT NULL,
    channel VARCHAR NOT NULL,
    action VARCHAR NOT NULL,      -- canary-start | canary-step | canary-rollback | canary-complete
    version VARCHAR NOT NULL,     -- the canary
    stable_version VARCHAR NOT NULL,
    step INTEGER,                 -- index into the rollout's steps after this event
    weight INTEGER,               -- percent of requests the canary gets after this event
    actor VARCHAR NOT NULL,
    created_at TIMESTAMP,
    details JSON,                 -- the step's figures, findings and timings (all inside the signed statement)
    statement JSON,
    signer_key VARCHAR,
    signature VARCHAR
);
CREATE TABLE IF NOT EXISTS audit_checkpoint (
    seq BIGINT PRIMARY KEY,      -- last pruned row
    hash VARCHAR NOT NULL,       -- its hash: the next kept row's prev_hash
    pruned_at TIMESTAMP
);
"""


MIGRATIONS = [f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column}"
              for table, columns in {"results": ("tokens_cached INTEGER", "guardrails JSON", "blocked VARCHAR",
                                                 "tags JSON", "routing JSON"),
                                     "traces": ("flags JSON", "served JSON"),
                                     "checks": ("report_sha256 VARCHAR", "statement JSON", "signer_key VARCHAR",
                                                "signature VARCHAR"),
                                     "approvals": ("statement JSON", "signer_key VARCHAR", "signature VARCHAR"),
                                     "deployments": ("statement JSON", "signer_key VARCHAR", "signature VARCHAR"),
                                     "audit": ("statement JSON", "signer_key VARCHAR", "signature VARCHAR")}.items()
              for column in columns]

LOCK_WAIT_S = 30.0


def _connect(path: Path, read_only: bool, sandbox: bool = False):
    """DuckDB lets one process write a file, or several read it. Slipway's commands hold the file for
    milliseconds (a check opens it once per example), so wait a while for a short holder to let go."""
    import time

    import duckdb

    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            # sandbox: no file but the store, no setting changed later (for SQL a user typed, e.g. --where)
            config = {"enable_external_access": False, "lock_configuration": True} if sandbox else {}
            return duckdb.connect(str(path), read_only=read_only, config=config)
        except duckdb.Error as exc:
            if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                raise StoreError(f"cannot open the store: {exc}", path=str(path),
                                 hint="is another slipway process (a running check?) using it? wait for it "
                                      "or stop it") from None
            time.sleep(0.05)


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def new_id(prefix: str) -> str:
    return f"{prefix}-{now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


class Store:
    """A connection to one project's store file; use as a context manager."""

    def __init__(self, path: Path, *, read_only: bool = False, sandbox: bool = False):
        self.path = path
        if not read_only:
            path.parent.mkdir(parents=True, exist_ok=True)
        elif not path.exists():
            raise StoreError("no store yet", path=str(path), hint="run `slipway eval` or `slipway check` first")
        self.con = _connect(path, read_only, sandbox)
        if not read_only:
            self.con.execute(SCHEMA)
            self.con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
            # 1 -> 2 added tables (SCHEMA creates them); 2 -> 3 added signature columns and results.tokens_cached;
            # 3 -> 4 added traces, feedback and segments (SCHEMA creates them); 4 -> 5 results.guardrails, .blocked;
            # 5 -> 6 traces.flags; 6 -> 7 results.tags; 7 -> 8 traces.served and human_queue (SCHEMA creates it);
            # 8 -> 9 results.routing; 9 -> 10 rollout_events (SCHEMA creates it).
            # Rows from before signing stay readable but carry no signature, so no gate counts them.
            for sql in MIGRATIONS:
                self.con.execute(sql)
            self.con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version' AND CAST(value AS INTEGER) < ?",
                             [str(SCHEMA_VERSION), SCHEMA_VERSION])
        version = self.con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if version and int(version[0]) != SCHEMA_VERSION:
            older = int(version[0]) < SCHEMA_VERSION   # a reader never upgrades: the next writing command does
            raise StoreError(f"schema version {version[0]}, this slipway knows {SCHEMA_VERSION}", path=str(path),
                             hint="run a command that writes the store first (e.g. `slipway slo <project>`, "
                                  "which ingests traces), which upgrades it in place" if older else
                                  "upgrade slipway, or move the file aside to start a new store")

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Store]:
        """All writes inside happen together or not at all (a record and its audit row)."""
        self.con.execute("BEGIN TRANSACTION")
        try:
            yield self
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        self.con.execute("COMMIT")

    def close(self) -> None:
        self.con.close()

    # -- runs -----------------------------------------------------------------
    def start_run(self, run: dict[str, Any]) -> None:
        columns = ", ".join(run)
        marks = ", ".join("?" for _ in run)
        self.con.execute(f"INSERT INTO runs ({columns}, started_at, status) VALUES ({marks}, ?, 'running')",
                         [*run.values(), now()])

    def add_result(self, run_id: str, record: dict[str, Any]) -> None:
        self.con.execute(
            "INSERT INTO results (run_id, example_id, position, inputs, expected, output, scores, latency_ms, "
            "tokens_in, tokens_out, cost, error, created_at, tokens_cached, guardrails, blocked, tags, routing) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [run_id, record["example_id"], record["position"], json.dumps(record["inputs"]),
             json.dumps(record["expected"]), json.dumps(record["output"]) if record["output"] is not None else None,
             json.dumps(record["scores"]), record["latency_ms"], record["tokens_in"], record["tokens_out"],
             record["cost"], record["error"], now(), record.get("tokens_cached"),
             json.dumps(record.get("guardrails") or []), record.get("blocked"), json.dumps(record.get("tags") or []),
             json.dumps(record["routing"]) if record.get("routing") else None])

    def finish_run(self, run_id: str, status: str, measurements: dict | None) -> None:
        self.con.execute("UPDATE runs SET status = ?, finished_at = ?, measurements = ? WHERE run_id = ?",
                         [status, now(), json.dumps(measurements) if measurements else None, run_id])

    def find_complete_run(self, content_hash: str) -> str | None:
        row = self.con.execute(
            "SELECT run_id FROM runs WHERE content_hash = ? AND status = 'complete' "
            "ORDER BY finished_at DESC LIMIT 1", [content_hash]).fetchone()
        return row[0] if row else None

    def run(self, run_id: str) -> dict[str, Any]:
        cursor = self.con.execute("SELECT * FROM runs WHERE run_id = ?", [run_id])
        row = cursor.fetchone()
        if row is None:
            raise StoreError(f"no run {run_id!r}", path=str(self.path), hint="list runs with `slipway runs list`")
        data = dict(zip([d[0] for d in cursor.description], row, strict=True))
        data["measurements"] = json.loads(data["measurements"]) if data["measurements"] else None
        return data

    def results(self, run_id: str) -> list[dict[str, Any]]:
        cursor = self.con.execute("SELECT * FROM results WHERE run_id = ? ORDER BY position", [run_id])
        names = [d[0] for d in cursor.description]
        out = []
        for row in cursor.fetchall():
            data = dict(zip(names, row, strict=True))
            for key in ("inputs", "expected", "output", "scores", "guardrails", "tags", "routing"):
                data[key] = json.loads(data[key]) if data[key] is not None else None
            out.append(data)
        return out

    def list_runs(self, limit: int = 20) -> list[dict[str, Any]]:
        cursor = self.con.execute(
            "SELECT r.run_id, r.split, r.model_key, r.status, r.n_examples, count(x.example_id) AS done, "
            "r.started_at, r.content_hash FROM runs r LEFT JOIN results x USING (run_id) "
            "GROUP BY ALL ORDER BY r.started_at DESC LIMIT ?", [limit])
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    # -- checks ---------------------------------------------------------------
    def add_check(self, check: dict[str, Any]) -> None:
        self._insert("checks", {**check, "created_at": now()})

    def checks_for(self, content_hash: str, contract_hash: str) -> list[dict[str, Any]]:
        """Checks recorded for this content and contract, newest first (the caller verifies signatures)."""
        return self._rows("SELECT * FROM checks WHERE content_hash = ? AND contract_hash = ? "
                          "ORDER BY created_at DESC", [content_hash, contract_hash])

    def recent_checks(self, project: str, limit: int) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM checks WHERE project = ? ORDER BY created_at DESC LIMIT ?", [project, limit])

    # -- approvals and channels -----------------------------------------------
    def _rows(self, sql: str, params: list) -> list[dict[str, Any]]:
        cursor = self.con.execute(sql, params)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def _insert(self, table: str, row: dict[str, Any]) -> None:
        row = {k: json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else v for k, v in row.items()}
        self.con.execute(f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})",
                         list(row.values()))

    def add_approval(self, approval: dict[str, Any]) -> None:
        self._insert("approvals", {**approval, "created_at": now()})

    def approvals(self, project: str, version: str) -> list[dict[str, Any]]:
        """Every approval row recorded for the version (the gate verifies each signature itself)."""
        return self._rows("SELECT * FROM approvals WHERE project = ? AND version = ? ORDER BY created_at",
                          [project, version])

    def add_deployment(self, row: dict[str, Any]) -> None:
        self._insert("deployments", {**row, "created_at": now()})

    def deployments(self, project: str, channel: str | None = None) -> list[dict[str, Any]]:
        """Newest first."""
        if channel is None:
            return self._rows("SELECT * FROM deployments WHERE project = ? ORDER BY rowid DESC",
                              [project])
        return self._rows("SELECT * FROM deployments WHERE project = ? AND channel = ? "
                          "ORDER BY rowid DESC", [project, channel])

    # -- canary rollouts (framework/rollout.py) ---------------------------------
    def add_rollout_event(self, row: dict[str, Any]) -> None:
        self._insert("rollout_events", {**row, "created_at": now()})

    def rollout_events(self, project: str, channel: str | None = None) -> list[dict[str, Any]]:
        """Oldest first."""
        where, params = "project = ?", [project]
        if channel is not None:
            where, params = where + " AND channel = ?", [project, channel]
        rows = self._rows(f"SELECT * FROM rollout_events WHERE {where} ORDER BY rowid", params)
        for row in rows:
            for key in ("details", "statement"):
                if isinstance(row.get(key), str):
                    row[key] = json.loads(row[key])
        return rows

    def served_requests(self, *, since: datetime, until: datetime, channel: str, version: str
                        ) -> list[dict[str, Any]]:
        """One version's requests on a channel in [since, until): what a canary step is judged on
        (framework/canary.py), with each request's feedback when it has some."""
        return self._rows(
            "SELECT t.duration_ms, t.status, t.error_code, t.cost, "
            "coalesce(t.tokens_in_new, 0) + coalesce(t.tokens_out, 0) AS tokens, "
            "json_extract_string(t.served, '$.fallback') AS fallback, "
            "json_extract_string(t.served, '$.cache.kind') AS cache_hit, t.outputs, "
            "f.negative, f.correct_labels FROM traces t "
            "LEFT JOIN (SELECT request_id, bool_or(negative) AS negative, last(correct_labels) AS correct_labels "
            "           FROM feedback GROUP BY request_id) f ON f.request_id = t.request_id "
            "WHERE t.started_at >= ? AND t.started_at < ? AND t.channel = ? AND (t.version = ? OR t.bento = ?)",
            [since, until, channel, version, version])

    # -- audit ----------------------------------------------------------------
    def audit_rows(self, since: datetime | None = None) -> list[dict[str, Any]]:
        if since is None:
            return self._rows("SELECT * FROM audit ORDER BY seq", [])
        return self._rows("SELECT * FROM audit WHERE logged_at >= ? ORDER BY seq", [since])

    def audit_append(self, row: dict[str, Any]) -> None:
        self._insert("audit", row)
        self.con.execute("INSERT OR REPLACE INTO meta VALUES ('audit_head', ?)", [f"{row['seq']}:{row['hash']}"])

    def audit_head(self) -> tuple[int, str] | None:
        row = self.con.execute("SELECT value FROM meta WHERE key = 'audit_head'").fetchone()
        if not row:
            return None
        seq, _, digest = row[0].partition(":")
        return int(seq), digest

    def audit_checkpoint(self) -> tuple[int, str] | None:
        row = self.con.execute("SELECT seq, hash FROM audit_checkpoint ORDER BY seq DESC LIMIT 1").fetchone()
        return (int(row[0]), row[1]) if row else None

    def audit_prune(self, last_seq: int, last_hash: str) -> None:
        """Delete rows up to `last_seq` and record the checkpoint the next row chains from (call it inside
        the transaction that appends the signed prune row)."""
        self.con.execute("INSERT INTO audit_checkpoint VALUES (?, ?, ?)", [last_seq, last_hash, now()])
        self.con.execute("DELETE FROM audit WHERE seq <= ?", [last_seq])

    # -- traces and feedback (framework/traces.py) ------------------------------
    def segment_offset(self, segment: str) -> int:
        row = self.con.execute("SELECT bytes_ingested FROM segments WHERE segment = ?", [segment]).fetchone()
        return int(row[0]) if row else 0

    def add_segment_rows(self, kind: str, segment: str, rows: list[dict[str, Any] | bytes], *, start: int,
                         end: int, skipped: int) -> int:
        """Insert a segment's new rows and move its offset in one transaction; returns rows added.
        Rows already present (same trace_id / feedback_id / handoff_id) are ignored, so this is idempotent. A row may be
        the segment's own JSON line (bytes, already validated by traces.read_chunk): it is copied as is,
        and DuckDB reads only the table's columns from it."""
        import os
        import tempfile

        import orjson

        from framework.traces import KINDS, TABLES

        columns = KINDS[kind][0]
        table = TABLES[kind]
        added = 0
        with tempfile.NamedTemporaryFile("wb", suffix=".jsonl", delete=False) as tmp:
            for row in rows:
                tmp.write(row.rstrip(b"\n") + b"\n" if isinstance(row, bytes) else
                          orjson.dumps({k: row.get(k) for k in columns}, default=str) + b"\n")
        try:
            spec = "{" + ", ".join(f"'{name}': '{kind_}'" for name, kind_ in columns.items()) + "}"
            with self.transaction():
                if rows:
                    added = self.con.execute(
                        f"INSERT OR IGNORE INTO {table} BY NAME SELECT *, ? AS segment, ? AS ingested_at "
                        f"FROM read_json(?, format='newline_delimited', columns={spec})",
                        [segment, now(), tmp.name]).fetchone()[0]
                self.con.execute(
                    "INSERT INTO segments VALUES (?, ?, ?, ?) ON CONFLICT (segment) DO UPDATE SET "
                    "bytes_ingested = excluded.bytes_ingested, "
                    "lines_skipped = segments.lines_skipped + excluded.lines_skipped, updated_at = excluded.updated_at",
                    [segment, end, skipped, now()])
        finally:
            os.unlink(tmp.name)
        return int(added)

    def forget_segment(self, segment: str) -> None:
        self.con.execute("DELETE FROM segments WHERE segment = ?", [segment])

    def delete_traces_before(self, cutoff: datetime) -> int:
        traces = self.con.execute("DELETE FROM traces WHERE started_at < ?", [cutoff]).fetchone()[0]
        feedback = self.con.execute("DELETE FROM feedback WHERE received_at < ?", [cutoff]).fetchone()[0]
        return int(traces) + int(feedback)

    def traces(self, *, since: datetime | None = None, version: str | None = None, channel: str | None = None,
               where: str | None = None, limit: int | None = 100) -> list[dict[str, Any]]:
        """Traces newest first. `where` is SQL over the traces table's columns, as `slipway traces --where`
        takes it: run it on `Store(path, read_only=True, sandbox=True)`, which can read the store and
        nothing else (no file access, no settings); a second statement smuggled in is refused here."""
        clauses, params = _trace_filter(since=since, version=version, channel=channel)
        if where:
            clauses.append(f"({where})")
        sql = f"SELECT * FROM traces WHERE {' AND '.join(clauses)} ORDER BY started_at DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        try:
            if where and len(duckdb_statements(sql)) != 1:
                raise ValueError("it holds more than one SQL statement")
            rows = self._rows(sql, params)
        except Exception as exc:  # noqa: BLE001 - duckdb raises many kinds; say which clause failed
            if not where:
                raise
            raise StoreError(f"--where {where!r} failed: {str(exc).splitlines()[0]}", path=str(self.path),
                             hint="write SQL over the traces columns (docs/traces.md), e.g. "
                                  "\"status >= 500\" or \"duration_ms > 2000\"") from None
        return [_decode_trace(row) for row in rows]

    def export_traces_parquet(self, path: Path, *, since: datetime | None = None,
                              version: str | None = None) -> int:
        """Write the traces table (every column, JSON columns as JSON text) to a Parquet file at `path`,
        oldest first; returns the rows written. `since` and `version` filter as `traces()` does. DuckDB
        writes the file itself (COPY … TO), so an export never holds the rows in Python."""
        clauses, params = _trace_filter(since=since, version=version)
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            row = self.con.execute(f"COPY (SELECT * FROM traces WHERE {' AND '.join(clauses)} "
                                   "ORDER BY started_at, trace_id) TO ? (FORMAT parquet)",
                                   [*params, str(path)]).fetchone()
        except Exception as exc:  # noqa: BLE001 - duckdb raises IOException and others: say which file
            raise StoreError(f"cannot write the Parquet export: {str(exc).splitlines()[0]}", path=str(path),
                             hint="choose a writable path for the output file") from None
        return int(row[0]) if row else 0

    def trace(self, request_id: str) -> list[dict[str, Any]]:
        """Every trace of a request id (normally one; a client may reuse an id), newest first."""
        return [_decode_trace(row) for row in
                self._rows("SELECT * FROM traces WHERE request_id = ? OR trace_id = ? ORDER BY started_at DESC",
                           [request_id, request_id])]

    def feedback_rows(self, *, since: datetime | None = None) -> list[dict[str, Any]]:
        rows = self._rows("SELECT * FROM feedback WHERE received_at >= ? ORDER BY received_at",
                          [since or datetime(1970, 1, 1)])
        for row in rows:
            row["correct_labels"] = json.loads(row["correct_labels"]) if row["correct_labels"] else None
        return rows

    def slo_figures(self, *, since: datetime, channel: str | None = None, version: str | None = None,
                    latency_targets: dict[str, float] | None = None) -> dict[str, Any]:
        """The contract's SLO and cost figures over served traffic since `since` (framework/slo.py).

        Client errors (4xx: a bad or oversized request) are the caller's, not the service's: they are
        left out of every figure. Latency percentiles are over answered requests (2xx); the error rate
        is 5xx over all the rest; `slow.<clause>` counts answered requests slower than each target."""
        clauses, params = _trace_filter(since=since, version=version, channel=channel, served=True)
        slow = "".join(f", count(*) FILTER (WHERE status < 400 AND duration_ms > {float(limit)!r}) "
                       f"AS \"slow.{name}\"" for name, limit in (latency_targets or {}).items())
        sql = ("SELECT count(*) AS n, count(*) FILTER (WHERE status >= 500) AS errors, "
               "count(*) FILTER (WHERE status < 400) AS answered, "
               "quantile_cont(duration_ms, 0.5) FILTER (WHERE status < 400) AS p50, "
               "quantile_cont(duration_ms, 0.95) FILTER (WHERE status < 400) AS p95, "
               "quantile_cont(duration_ms, 0.99) FILTER (WHERE status < 400) AS p99, "
               "avg(coalesce(tokens_in_new, 0) + coalesce(tokens_out, 0)) FILTER (WHERE status < 400) AS tokens, "
               "quantile_cont(coalesce(tokens_in_new, 0) + coalesce(tokens_out, 0), 0.95) "
               "FILTER (WHERE status < 400) AS tokens_p95, "
               "avg(coalesce(tokens_in_cached, 0)) FILTER (WHERE status < 400) AS tokens_cached, "
               "avg(coalesce(cost, 0)) AS cost, sum(coalesce(cost, 0)) AS spent, "
               # all guardrail checks of one request: the sum of its decisions' ms (framework/guardrails.py)
               "quantile_cont(list_sum(CAST(json_extract(decisions, '$[*].ms') AS DOUBLE[])), 0.99) "
               "FILTER (WHERE json_array_length(decisions) > 0) AS guardrail_p99, "
               f"min(started_at) AS first, max(started_at) AS last{slow} "
               f"FROM traces WHERE {' AND '.join(clauses)}")
        return self._rows(sql, params)[0]

    # -- the human queue (framework/handoff.py) ---------------------------------
    def handoffs(self, *, ident: str | None = None, open_only: bool = False) -> list[dict[str, Any]]:
        """Human-queue entries, oldest first: all, the open ones (`open_only`), or those whose handoff_id or
        request_id is `ident` (a client may reuse a request id: several can match)."""
        clauses, params = ["TRUE"], []
        if ident is not None:
            clauses.append("(handoff_id = ? OR request_id = ?)")
            params += [ident, ident]
        if open_only:
            clauses.append("resolved_at IS NULL")
        rows = self._rows(f"SELECT * FROM human_queue WHERE {' AND '.join(clauses)} ORDER BY created_at, handoff_id",
                          params)
        for row in rows:
            for key in ("inputs", "answer", "labels", "redactions", "flags"):
                if row.get(key) is not None:
                    row[key] = json.loads(row[key])
        return rows

    def resolve_handoff(self, handoff_id: str, resolution: dict[str, Any]) -> int:
        """Record who resolved an open entry with what (`resolved_at`, `resolved_by`, `labels`, `note`, and the
        signed `statement`, `signer_key`, `signature`); returns the rows changed: 0 when it is resolved already.
        Call inside `transaction()` with the audit row that logs it."""
        row = {k: json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else v for k, v in resolution.items()}
        sets = ", ".join(f"{name} = ?" for name in row)
        return int(self.con.execute(f"UPDATE human_queue SET {sets} WHERE handoff_id = ? AND resolved_at IS NULL",
                                    [*row.values(), handoff_id]).fetchone()[0])

    # -- dashboard (framework/dashboard.py) -------------------------------------
    def served_over_time(self, *, since: datetime, bucket: timedelta, channel: str | None = None
                         ) -> list[dict[str, Any]]:
        """Served traffic per time bucket and version since `since`, oldest first: the dashboard's charts.

        The rules are `slo_figures`' (4xx left out; latency percentiles over answered requests; error rate
        is 5xx over the rest), so a chart and the contract table agree. `bucket` is the bucket width;
        its start (`bucket`, UTC) is aligned to multiples of the width. A trace without a version counts
        under its bento, else under "unknown"."""
        clauses, params = _trace_filter(since=since, channel=channel, served=True)
        params = [bucket, *params]   # time_bucket(?) comes first in the SELECT
        sql = ("SELECT time_bucket(?, started_at) AS bucket, coalesce(version, bento, 'unknown') AS version, "
               "count(*) AS n, count(*) FILTER (WHERE status >= 500) AS errors, "
               "count(*) FILTER (WHERE status >= 500) / count(*) AS error_rate, "
               "quantile_cont(duration_ms, 0.5) FILTER (WHERE status < 400) AS p50, "
               "quantile_cont(duration_ms, 0.95) FILTER (WHERE status < 400) AS p95, "
               "quantile_cont(duration_ms, 0.99) FILTER (WHERE status < 400) AS p99, "
               "avg(coalesce(cost, 0)) AS cost, "
               "avg(coalesce(tokens_in_new, 0) + coalesce(tokens_out, 0)) FILTER (WHERE status < 400) AS tokens "
               f"FROM traces WHERE {' AND '.join(clauses)} GROUP BY ALL ORDER BY bucket, version")
        return self._rows(sql, params)

    def feedback_by_version(self, *, since: datetime) -> list[dict[str, Any]]:
        """Positive and negative feedback received since `since`, per version that answered (ordered by version).
        A row whose `negative` flag is missing is judged by its score (below 0.5 is negative, as
        traces.is_negative)."""
        return self._rows(
            "SELECT coalesce(version, bento, 'unknown') AS version, count(*) AS n, "
            "count(*) FILTER (WHERE NOT coalesce(negative, score < 0.5)) AS positive, "
            "count(*) FILTER (WHERE coalesce(negative, score < 0.5)) AS negative, avg(score) AS mean_score "
            "FROM feedback WHERE received_at >= ? GROUP BY ALL ORDER BY version", [since])


def _trace_filter(*, since: datetime | None = None, version: str | None = None, channel: str | None = None,
                  served: bool = False) -> tuple[list[str], list[Any]]:
    """WHERE clauses and parameters every trace query shares. `served`: leave client errors (4xx) out,
    as every SLO figure does (docs/traces.md)."""
    clauses: list[str] = ["TRUE"]
    params: list[Any] = []
    if since is not None:
        clauses.append("started_at >= ?")
        params.append(since)
    if served:
        clauses.append("NOT (status >= 400 AND status < 500)")
    if version:
        clauses.append("(version = ? OR bento = ?)")
        params += [version, version]
    if channel:
        clauses.append("channel = ?")
        params.append(channel)
    return clauses, params


def duckdb_statements(sql: str) -> list:
    import duckdb

    return duckdb.extract_statements(sql)


def _decode_trace(row: dict[str, Any]) -> dict[str, Any]:
    for key in ("inputs", "outputs", "calls", "stages", "decisions", "redactions", "flags", "served"):
        if row.get(key) is not None:
            row[key] = json.loads(row[key])
    return row
