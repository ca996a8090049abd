"""The audit log: a hash-chained, append-only record of every check, build, approval, deploy, rollback and override.

Each row carries sha256(previous row's hash + its own canonical content), so an
edit changes that row's hash and a deletion breaks the next row's link; the
store also keeps the head (last seq and hash) so deleting the newest row shows.
Pruning (`[audit] retention_days`) deletes a prefix of the chain and writes a
checkpoint with the hash of the last pruned row, from which verification starts.
Hashing and verification are pure functions over plain rows; the rest is store calls.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import subprocess
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from framework.errors import SpecError
from framework.store import Store, now

GENESIS = "0" * 64


def who(explicit: str | None = None) -> str:
    """The acting person: `--as`, else SLIPWAY_USER, else git config user.name, else the OS user."""
    if explicit:
        return explicit
    if os.environ.get("SLIPWAY_USER"):
        return os.environ["SLIPWAY_USER"]
    try:
        name = subprocess.run(["git", "config", "user.name"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        name = ""
    return name.strip() or getpass.getuser()


def canonical(row: dict[str, Any]) -> str:
    """The hashed content of a row: everything but its own hash, as sorted compact JSON."""
    at = row["logged_at"]
    body = {"seq": int(row["seq"]), "at": at.isoformat() if isinstance(at, datetime) else str(at),
            "actor": row["actor"], "action": row["action"], "target": row["target"],
            "details": json.loads(row["details"]) if isinstance(row["details"], str) else row["details"]}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)


def row_hash(prev_hash: str, row: dict[str, Any]) -> str:
    return hashlib.sha256((prev_hash + canonical(row)).encode()).hexdigest()


def make_row(seq: int, prev_hash: str, *, actor: str, action: str, target: str | None,
             details: dict | None = None, at: datetime | None = None) -> dict[str, Any]:
    row = {"seq": seq, "logged_at": at or now(), "actor": actor, "action": action, "target": target,
           "details": json.dumps(details or {}, sort_keys=True, default=str), "prev_hash": prev_hash}
    row["hash"] = row_hash(prev_hash, row)
    return row


@dataclass
class Problem:
    """Where the chain breaks: the row's seq and what is wrong with it."""

    seq: int
    message: str


def verify_rows(rows: list[dict[str, Any]], checkpoint: tuple[int, str] | None,
                head: tuple[int, str] | None) -> Problem | None:
    """The first break in `rows` (ordered by seq), or None when the chain is whole.

    `checkpoint` is (seq, hash) of the last pruned row; `head` is the (seq, hash) the store recorded on the
    last append, which catches deletion of the newest rows.
    """
    seq, prev = checkpoint if checkpoint else (0, GENESIS)
    for row in rows:
        if int(row["seq"]) != seq + 1:
            return Problem(seq + 1, f"row {seq + 1} is missing (next row is {row['seq']}): deleted")
        if row["prev_hash"] != prev:
            return Problem(int(row["seq"]), f"row {row['seq']} does not chain to row {seq}: "
                                            "the previous row was edited or deleted")
        if row_hash(prev, row) != row["hash"]:
            return Problem(int(row["seq"]), f"row {row['seq']} ({row['action']}) was edited: its content no "
                                            "longer matches its hash")
        seq, prev = int(row["seq"]), row["hash"]
    if head is not None and (seq, prev) != head:
        if seq < head[0]:
            return Problem(seq + 1, f"rows {seq + 1}..{head[0]} are missing: deleted")
        return Problem(seq, f"row {seq} does not match the recorded head of the log: edited")
    return None


def prune_upto(rows: list[dict[str, Any]], before: datetime) -> dict[str, Any] | None:
    """The last row of the oldest prefix dated before `before` (the new checkpoint), or None."""
    last = None
    for row in rows:
        if row["logged_at"] >= before:
            break
        last = row
    return last


# -- store edges ---------------------------------------------------------------
def append(store: Store, *, actor: str, action: str, target: str | None, details: dict | None = None) -> dict:
    """Append one row chained to the current head (or the checkpoint when every row was pruned)."""
    head = store.audit_head() or store.audit_checkpoint() or (0, GENESIS)
    row = make_row(head[0] + 1, head[1], actor=actor, action=action, target=target, details=details)
    store.audit_append(row)
    return row


def record(path: Path, **kwargs) -> dict:
    """`append` on the store file at `path`, for callers that do not hold a connection."""
    with Store(path) as store:
        return append(store, **kwargs)


def verify(store: Store) -> Problem | None:
    return verify_rows(store.audit_rows(), store.audit_checkpoint(), store.audit_head())


def prune(store: Store, retention_days: int | None, *, at: datetime | None = None) -> int:
    """Delete rows older than `retention_days` (none when None); returns how many were pruned."""
    if not retention_days:
        return 0
    rows = store.audit_rows()
    last = prune_upto(rows, (at or now()) - timedelta(days=retention_days))
    if last is None:
        return 0
    store.audit_prune(int(last["seq"]), last["hash"])
    return sum(1 for r in rows if r["seq"] <= last["seq"])


def export(rows: list[dict[str, Any]], out: Path, fmt: str) -> int:
    """Write rows as JSON lines or Parquet; returns the row count."""
    if fmt == "jsonl":
        with out.open("w") as fh:
            for row in rows:
                fh.write(json.dumps({**row, "details": json.loads(row["details"] or "{}")}, default=str) + "\n")
    elif fmt == "parquet":
        import duckdb

        con = duckdb.connect()
        con.execute("CREATE TABLE audit (seq BIGINT, logged_at TIMESTAMP, actor VARCHAR, action VARCHAR, "
                    "target VARCHAR, details JSON, prev_hash VARCHAR, hash VARCHAR)")
        con.executemany("INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        [[r["seq"], r["logged_at"], r["actor"], r["action"], r["target"], r["details"],
                          r["prev_hash"], r["hash"]] for r in rows])
        con.execute(f"COPY audit TO '{str(out).replace(chr(39), chr(39) * 2)}' (FORMAT parquet)")
        con.close()
    else:
        raise SpecError(f"unknown export format {fmt!r}", hint="use --format jsonl or --format parquet")
    return len(rows)
