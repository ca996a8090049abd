"""The audit log: a hash-chained, append-only record of every signed check, build, approval, deploy,
rollback, override, prune, addition of served requests to the eval set (harvest-accept) and answer a
person gave to a request the service handed over (queue-resolve).

Each row records one signed statement (framework/signing.py: who, by key, did which action to which
target, with which details, when) and carries sha256(previous row's hash + its own canonical content,
signature included), so an edit changes that row's hash, a deletion breaks the next row's link, and a
forged row lacks a valid signature. Re-hashing the whole chain inside the DuckDB file is caught by the
*anchor*: `slipway audit anchor` writes the signed head (seq and hash) to `audit-anchor.json` beside
project.toml, kept in git, and every export carries a signed head as its last line. Pruning is its own
signed, chained row (`slipway audit prune`); `audit verify` only reads. Hashing and verification are
pure functions over plain rows (and can run on an exported file without the store); the rest is store calls.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from framework import signing
from framework.errors import SpecError
from framework.store import Store, now

GENESIS = "0" * 64
ANCHOR_FILE = "audit-anchor.json"


def statement(project: str, action: str, target: str | None, details: dict | None = None,
              at: datetime | None = None) -> dict[str, Any]:
    """What a person signs for one action; the same dict is the audit row's content."""
    return {"v": 1, "project": project, "action": action, "target": target,
            "details": json.loads(json.dumps(details or {}, sort_keys=True, default=str)),
            "at": (at or now()).isoformat(timespec="microseconds")}


def canonical(row: dict[str, Any]) -> str:
    """The hashed content of a row: seq, the signed statement, the key, the signature and the display name."""
    st = row["statement"]
    body = {"seq": int(row["seq"]), "statement": json.loads(st) if isinstance(st, str) else st,
            "key": row["signer_key"], "signature": row["signature"], "actor": row["actor"]}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)


def row_hash(prev_hash: str, row: dict[str, Any]) -> str:
    return hashlib.sha256((prev_hash + canonical(row)).encode()).hexdigest()


def make_row(seq: int, prev_hash: str, signed: signing.Signed, actor: str) -> dict[str, Any]:
    st = signed.statement
    row = {"seq": seq, "logged_at": datetime.fromisoformat(st["at"]), "actor": actor, "action": st["action"],
           "target": st["target"], "details": json.dumps(st["details"], sort_keys=True),
           "statement": json.dumps(st, sort_keys=True), "signer_key": signed.key, "signature": signed.signature,
           "prev_hash": prev_hash}
    row["hash"] = row_hash(prev_hash, row)
    return row


def signed_of(row: dict[str, Any]) -> signing.Signed:
    """The signed statement a row records. A malformed one (not JSON, not an object) comes back empty,
    so its signature fails like any other forgery instead of crashing the reader."""
    st = row.get("statement")
    try:
        statement = json.loads(st) if isinstance(st, str) else st
    except ValueError:
        statement = None
    return signing.Signed(statement=statement if isinstance(statement, dict) else {},
                          key=row.get("signer_key") or "", signature=row.get("signature") or "")


@dataclass
class Problem:
    """Where the log breaks: the row's seq and what is wrong with it."""

    seq: int
    message: str


def _columns_match(row: dict[str, Any]) -> bool:
    """The queryable columns must say what the signed statement says."""
    st = signed_of(row).statement
    details = json.loads(row["details"]) if isinstance(row["details"], str) else row["details"]
    at = row["logged_at"]
    at = at.isoformat(timespec="microseconds") if isinstance(at, datetime) else str(at)
    return (st.get("action"), st.get("target"), st.get("details"), st.get("at")) == (
        row["action"], row["target"], details, at)


def verify_rows(rows: list[dict[str, Any]], checkpoint: tuple[int, str] | None,
                head: tuple[int, str] | None, *, check_signatures: bool = True) -> Problem | None:
    """The first break in `rows` (ordered by seq), or None when the chain is whole and every row's
    signature holds over its statement.

    `checkpoint` is (seq, hash) of the last pruned row; `head` is the (seq, hash) recorded on the last
    append (by the store, an anchor or an export), which catches deletion of the newest rows.
    """
    seq, prev = checkpoint if checkpoint else (0, GENESIS)
    for row in rows:
        if int(row["seq"]) != seq + 1:
            return Problem(seq + 1, f"row {seq + 1} is missing (next row is {row['seq']}): deleted")
        if row["prev_hash"] != prev:
            return Problem(int(row["seq"]), f"row {row['seq']} does not chain to row {seq}: "
                                            "the previous row was edited or deleted")
        if not row.get("statement") or not row.get("signature"):
            return Problem(int(row["seq"]), f"row {row['seq']} ({row['action']}) carries no signature")
        if row_hash(prev, row) != row["hash"] or not _columns_match(row):
            return Problem(int(row["seq"]), f"row {row['seq']} ({row['action']}) was edited: its content no "
                                            "longer matches its hash")
        if check_signatures and not signing.signature_holds(signed_of(row)):
            return Problem(int(row["seq"]), f"row {row['seq']} ({row['action']}): its signature does not verify "
                                            "(forged or edited)")
        seq, prev = int(row["seq"]), row["hash"]
    if head is not None and (seq, prev) != tuple(head):
        if seq < head[0]:
            return Problem(seq + 1, f"rows {seq + 1}..{head[0]} are missing: deleted")
        return Problem(seq, f"row {seq} does not match the recorded head of the log: edited or re-chained")
    return None


def check_anchor(rows: list[dict[str, Any]], anchor: signing.Signed, signers: signing.SignersSpec,
                 checkpoint: tuple[int, str] | None) -> Problem | None:
    """Does the chain still hold the row the signed anchor names? A chain rewritten inside the store
    (every hash recomputed) fails here, because the anchor lives outside it, in git."""
    why = signing.refusal(signing.verify(anchor, signers), "audit")
    if why:
        return Problem(0, f"the audit anchor does not verify: {why}")
    seq, digest = int(anchor.statement["details"]["seq"]), anchor.statement["details"]["hash"]
    if checkpoint and seq <= checkpoint[0]:
        return None  # pruned since; the signed prune row in the chain vouches for the cut
    row = next((r for r in rows if int(r["seq"]) == seq), None)
    if row is None:
        return Problem(seq, f"row {seq}, anchored in {ANCHOR_FILE}, is missing: deleted")
    if row["hash"] != digest:
        return Problem(seq, f"row {seq} differs from the anchored hash in {ANCHOR_FILE}: the chain was rewritten")
    return None


def prune_upto(rows: list[dict[str, Any]], before: datetime) -> dict[str, Any] | None:
    """The last row of the oldest prefix dated before `before` (the new checkpoint), or None."""
    last = None
    for row in rows:
        if row["logged_at"] >= before:
            break
        last = row
    return last


def names(rows: list[dict[str, Any]], signers: signing.SignersSpec) -> dict[int, str]:
    """Who signed each row according to the signers file now (rows keep the name recorded then)."""
    out = {}
    for row in rows:
        signer = signers.by_key(row["signer_key"]) if row.get("signer_key") else None
        out[int(row["seq"])] = signer.name if signer else (
            f"unlisted key {signing.fingerprint(row['signer_key'])}" if row.get("signer_key") else "unsigned")
    return out


# -- store edges ---------------------------------------------------------------
def append(store: Store, signed: signing.Signed, actor: str) -> dict:
    """Append one signed statement, chained to the current head (or the checkpoint after pruning).
    Call inside `store.transaction()` together with the state change it records."""
    head = store.audit_head() or store.audit_checkpoint() or (0, GENESIS)
    row = make_row(head[0] + 1, head[1], signed, actor)
    store.audit_append(row)
    return row


# Rows that only count when a key listed in signers.toml (and not revoked) signed them. Checks and builds
# may be signed by anyone (their author is named); the deploy gate decides whether it trusts those.
LISTED_ONLY = {"approve": "approve", "deploy": None, "rollback": None, "prune": "audit",
               "harvest-accept": "curate", "flag-approve": "approve", "flag-on": "flags", "flag-off": "flags",
               "queue-resolve": "queue",
               # a canary (framework/rollout.py): starting and promoting it is deploying, stopping it rolling back
               "canary-start": "deploy:", "canary-step": "deploy:", "canary-complete": "deploy:",
               "canary-rollback": "rollback:"}


def policy_problem(rows: list[dict[str, Any]], signers: signing.SignersSpec) -> Problem | None:
    """The first gated row (approve, deploy, rollback, prune, harvest-accept) whose key is not listed, is
    revoked, or lacks the role: a row signed with a throw-away key verifies as a signature but proves nothing."""
    for row in rows:
        if row["action"] in LISTED_ONLY:
            role = LISTED_ONLY[row["action"]]
            channel = (signed_of(row).statement.get("details") or {}).get("channel")
            if role is None:
                role = f"{row['action']}:{channel}"
            elif role.endswith(":"):
                role += str(channel)
            if why := signing.refusal(signing.verify(signed_of(row), signers), role):
                return Problem(int(row["seq"]), f"row {row['seq']} ({row['action']}): {why}")
    return None


def verify(store: Store, *, anchor: signing.Signed | None = None,
           signers: signing.SignersSpec | None = None) -> Problem | None:
    """Chain, signatures, checkpoint and (with `signers`) who signed each gated row, then the anchor."""
    rows = store.audit_rows()
    checkpoint = _signed_checkpoint(rows, store.audit_checkpoint(), signers)
    if isinstance(checkpoint, Problem):
        return checkpoint
    problem = verify_rows(rows, checkpoint, store.audit_head())
    if problem is None and signers is not None:
        problem = policy_problem(rows, signers)
    if problem is None and anchor is not None:
        problem = check_anchor(rows, anchor, signers or signing.SignersSpec(), checkpoint)
    return problem


def _signed_checkpoint(rows: list[dict[str, Any]], stored: tuple[int, str] | None,
                       signers: signing.SignersSpec | None):
    """The checkpoint table is a plain row; trust it only as far as the newest signed prune row vouches
    (signed by an `audit` key when the signers are known)."""
    if stored is None:
        return None
    prunes = [r for r in rows if r["action"] == "prune"]
    if not prunes:
        return Problem(stored[0], "the log starts after a checkpoint that no signed prune row records")
    if signers is not None and (why := signing.refusal(signing.verify(signed_of(prunes[-1]), signers), "audit")):
        return Problem(int(prunes[-1]["seq"]), f"the prune row that sets the checkpoint does not count: {why}")
    details = signed_of(prunes[-1]).statement.get("details") or {}
    if (details.get("through_seq"), details.get("through_hash")) != (int(stored[0]), stored[1]):
        return Problem(stored[0], "the checkpoint differs from what the newest signed prune row records")
    return stored


def prune(store: Store, project: str, retention_days: int | None, *, key: Path | None = None,
          signers: signing.SignersSpec, at: datetime | None = None) -> int:
    """Delete rows older than `retention_days` behind a signed, chained prune row; returns how many."""
    if not retention_days:
        return 0
    rows = store.audit_rows()
    last = prune_upto(rows, (at or now()) - timedelta(days=retention_days))
    if last is None:
        return 0
    signed = signing.sign(statement(project, "prune", project, {"through_seq": int(last["seq"]),
                                                                "through_hash": last["hash"],
                                                                "retention_days": retention_days}), key)
    who = _actor(signed, signers, "audit")
    with store.transaction():
        append(store, signed, who)
        store.audit_prune(int(last["seq"]), last["hash"])
    return sum(1 for r in rows if r["seq"] <= last["seq"])


def _actor(signed: signing.Signed, signers: signing.SignersSpec, role: str | None) -> str:
    from framework.errors import ReleaseRefused

    verified = signing.verify(signed, signers)
    why = signing.refusal(verified, role)
    if why:
        raise ReleaseRefused(f"refusing to {signed.statement['action']}: {why}", hint="see docs/trust.md")
    assert verified is not None
    return verified.name


def anchor(store: Store, project_dir: Path, project: str, *, key: Path | None = None,
           signers: signing.SignersSpec) -> signing.Signed:
    """Sign the current head and write it to `audit-anchor.json` beside project.toml (commit that file)."""
    head = store.audit_head()
    if head is None:
        raise SpecError("the audit log is empty: nothing to anchor", path=str(store.path))
    signed = signing.sign(statement(project, "audit-anchor", project, {"seq": head[0], "hash": head[1]}), key)
    _actor(signed, signers, "audit")
    (project_dir / ANCHOR_FILE).write_text(json.dumps(signed.to_dict(), indent=1, sort_keys=True) + "\n")
    return signed


def read_anchor(project_dir: Path) -> signing.Signed | None:
    path = project_dir / ANCHOR_FILE
    if not path.exists():
        return None
    try:
        return signing.Signed.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError):
        raise SpecError("not the signed head `slipway audit anchor` writes", path=str(path),
                        hint="restore it from git history, or write a new one with `slipway audit anchor`") from None


def export(rows: list[dict[str, Any]], out: Path, fmt: str, *, head: signing.Signed | None = None) -> int:
    """Write rows as JSON lines (the last line a signed head, when given) or Parquet (the head beside
    it in `<out>.head.json`); returns the row count."""
    if fmt == "jsonl":
        with out.open("w") as fh:
            for row in rows:
                fh.write(json.dumps({**row, "details": json.loads(row["details"] or "{}"),
                                     "statement": json.loads(row["statement"]) if row.get("statement") else None},
                                    default=str) + "\n")
            if head is not None:
                fh.write(json.dumps({"head": head.to_dict()}) + "\n")
    elif fmt == "parquet":
        import duckdb

        con = duckdb.connect()
        con.execute("CREATE TABLE audit (seq BIGINT, logged_at TIMESTAMP, actor VARCHAR, action VARCHAR, "
                    "target VARCHAR, details JSON, prev_hash VARCHAR, hash VARCHAR, statement JSON, "
                    "signer_key VARCHAR, signature VARCHAR)")
        con.executemany("INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [[r["seq"], r["logged_at"], r["actor"], r["action"], r["target"], r["details"],
                          r["prev_hash"], r["hash"], r.get("statement"), r.get("signer_key"), r.get("signature")]
                         for r in rows])
        con.execute(f"COPY audit TO '{str(out).replace(chr(39), chr(39) * 2)}' (FORMAT parquet)")
        con.close()
        if head is not None:
            Path(f"{out}.head.json").write_text(json.dumps(head.to_dict(), indent=1))
    else:
        raise SpecError(f"unknown export format {fmt!r}", hint="use --format jsonl or --format parquet")
    return len(rows)


def export_head(rows: list[dict[str, Any]], project: str, key: Path | None = None) -> signing.Signed | None:
    """A signed statement of the exported range's last row, so the file verifies on its own."""
    if not rows:
        return None
    return signing.sign(statement(project, "audit-export", project,
                                  {"seq": int(rows[-1]["seq"]), "hash": rows[-1]["hash"],
                                   "first_seq": int(rows[0]["seq"])}), key)


def verify_file(path: Path, signers: signing.SignersSpec) -> tuple[int, Problem | None]:
    """Verify an exported JSONL file without the store: chain from its first row, every signature,
    and the signed head on its last line (whose key must be listed in signers.toml)."""
    rows, head = [], None
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            if "head" in data:
                head = signing.Signed.from_dict(data["head"])
                continue
            data["details"] = json.dumps(data["details"], sort_keys=True)
            data["statement"] = json.dumps(data["statement"], sort_keys=True) if data.get("statement") else None
            data["logged_at"] = datetime.fromisoformat(str(data["logged_at"]))
        except (ValueError, KeyError, TypeError) as exc:
            return len(rows), Problem(0, f"{path}:{number}: not an exported audit row ({type(exc).__name__}: {exc})")
        data["_line"] = number
        rows.append(data)
    if head is None:
        return len(rows), Problem(0, f"{path} has no signed head line: export it with `slipway audit export`")
    why = signing.refusal(signing.verify(head, signers), None)
    if why:
        return len(rows), Problem(0, f"the export's head does not verify: {why}")
    details = head.statement["details"]
    if not rows or int(rows[0]["seq"]) != int(details.get("first_seq", 1)):
        return len(rows), Problem(int(details.get("first_seq", 1)), f"the export's first row is not row "
                                                                    f"{details.get('first_seq', 1)}: rows were removed")
    start = (int(rows[0]["seq"]) - 1, rows[0]["prev_hash"])
    problem = verify_rows(rows, start, (int(details["seq"]), details["hash"]))
    return len(rows), problem or policy_problem(rows, signers)
