"""The audit log: who checked, built, approved, deployed or rolled back what, and when.

Rows live in the project's DuckDB store (`audit` table) and are hash-chained: each row's
`hash` is sha256 over the previous row's hash and the row's own canonical content. Editing
a row breaks its hash; deleting one breaks the next row's link; deleting the newest rows is
caught by the head (last seq and hash) kept in `meta`. Retention prunes old rows after
writing a checkpoint (the last pruned seq and hash), so what remains still verifies.

This catches hand edits and accidental damage, not a determined attacker who rewrites the
whole file: for that, export the log regularly (`slipway audit export`) to somewhere else.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
ACTIONS = ("check", "build", "build-refused", "approve", "deploy", "rollback", "override", "prune")
_HASHED = ("seq", "recorded_at", "actor", "action", "subject", "details")


def who(explicit: str | None = None, *, cwd: Path | None = None) -> str:
    """The person acting: `--as`, else SLIPWAY_USER, else git's user.name, else the OS login."""
    if explicit:
        return explicit
    if os.environ.get("SLIPWAY_USER"):
        return os.environ["SLIPWAY_USER"]
    try:
        name = subprocess.run(["git", "config", "user.name"], capture_output=True, text=True, cwd=cwd,
                              timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        name = ""
    return name or getpass.getuser()


def row_hash(prev_hash: str, row: dict[str, Any]) -> str:
    """sha256 over the previous hash and this row's canonical JSON (keys sorted, no whitespace)."""
    body = json.dumps({key: row[key] for key in _HASHED}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(f"{prev_hash}\n{body}".encode()).hexdigest()


def new_row(prev: tuple[int, str], actor: str, action: str, subject: str, details: dict[str, Any],
            at: datetime | None = None) -> dict[str, Any]:
    """The next row after `prev` = (seq, hash), with its hash filled in."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}; expected one of {', '.join(ACTIONS)}")
    seq, prev_hash = prev
    row = {"seq": seq + 1, "recorded_at": (at or datetime.now(UTC)).isoformat(timespec="microseconds"),
           "actor": actor, "action": action, "subject": subject,
           "details": json.dumps(details, sort_keys=True, separators=(",", ":"), default=str),
           "prev_hash": prev_hash}
    row["hash"] = row_hash(prev_hash, row)
    return row


@dataclass(frozen=True)
class Problem:
    """The first place the chain does not hold: the row to look at and what is wrong with it."""

    seq: int
    reason: str

    def __str__(self) -> str:
        return f"audit row seq={self.seq}: {self.reason}"


def verify_chain(rows: Iterable[dict[str, Any]], *, start: tuple[int, str] = (0, GENESIS),
                 head: tuple[int, str] | None = None) -> Problem | None:
    """None when the rows (ordered by seq) continue the chain from `start` and end at `head`."""
    seq, prev_hash = start
    for row in rows:
        if row["seq"] != seq + 1:
            return Problem(seq + 1, f"missing (deleted); the next row present is seq={row['seq']}")
        if row["prev_hash"] != prev_hash:
            return Problem(row["seq"], "does not link to the row before it (that row was edited or replaced)")
        if row_hash(prev_hash, row) != row["hash"]:
            return Problem(row["seq"], "content does not match its hash (edited by hand)")
        seq, prev_hash = row["seq"], row["hash"]
    if head is not None and head != (seq, prev_hash):
        if head[0] > seq:
            return Problem(seq + 1, f"missing (deleted): the log's head says it ends at seq={head[0]}")
        return Problem(seq, f"the log's head records seq={head[0]} with another hash (the newest row was changed)")
    return None


def retention_cutoff(days: int, now: datetime | None = None) -> str:
    """Rows older than this ISO timestamp may be pruned."""
    return ((now or datetime.now(UTC)) - timedelta(days=days)).isoformat(timespec="microseconds")


# -- recording, through the project's store ------------------------------------------------------
def record(project, action: str, subject: str, details: dict[str, Any], *, actor: str | None = None) -> dict:
    """Append one row to the project's audit log and return it."""
    from framework.evaluate import store_path
    from framework.store import Store

    with Store(store_path(project)) as store:
        return store.append_audit(who(actor, cwd=project.root), action, subject, details)


def verify(project) -> tuple[int, Problem | None]:
    """(rows checked, first problem or None) for the project's audit log."""
    from framework.evaluate import store_path
    from framework.store import Store

    with Store(store_path(project), read_only=True) as store:
        rows = store.audit_rows()
        return len(rows), verify_chain(rows, start=store.audit_checkpoint(), head=store.audit_head())
