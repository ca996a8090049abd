"""Requests the service handed to a person → the human queue → a person's signed answer.

With `[fallback] action = "human"` (framework/fallback.py), a served request whose model call fails is
answered with the declared safe answer and handed to a person: the worker appends one line (`entry()`)
to its own append-only segment `<trace dir>/handoff/<host>-<pid>-<start>-<rand>.jsonl` before the response
leaves (`HandoffWriter`, a `traces.SegmentWriter`: one `write` per line, flushed as `[tracing] fsync`
says), so a worker killed after answering has lost no handed-over request. The inputs are redacted by the
worker's trace redactor, as its trace is. `queue()` ingests new lines into the store's `human_queue`
table exactly as traces are ingested (idempotent by `handoff_id`; a line cut short by a killed worker is
skipped and reported once its writer is gone) and lists the entries. `resolve()` records a person's
answer: labels that fit the program's output fields, in a statement signed with their SSH key, which
signers.toml must grant the `queue` role, written with its audit row (`queue-resolve`) in one
transaction. An entry is resolved once; a resolution whose row no longer says what was signed is shown
as not verified.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from framework.errors import HandoffError, ReleaseRefused
from framework.fallback import Fallback, coerce_labels, output_fields
from framework.spec import Project
from framework.traces import SegmentWriter, iso, utc_now

KIND = "handoff"            # the segment folder under the trace directory (traces.KINDS)
ROLE = "queue"              # the signers.toml role that may resolve entries
ACTION = "queue-resolve"    # the audit action of a resolution
# What a resolution's signature covers of the entry it answers (with the labels and note it gives).
ENTRY_KEYS = ("handoff_id", "request_id", "bento", "tenant", "error_code", "inputs", "answer")


# -- the served side: one line per handed-over request ---------------------------------------------------------
def entry(*, request_id: str, fallback: Fallback, error: str | None, inputs: dict[str, Any] | None,
          identity: Mapping[str, Any], redactor, keep_text: bool = True, caller: str | None = None,
          tenant: str | None = None, flags: dict[str, str] | None = None, program_hash: str | None = None,
          worker: str | None = None, at: datetime | None = None) -> dict[str, Any]:
    """The queue line of one request handed to a person. `inputs` (as the model saw them) and `error` are
    redacted by `redactor` (the worker's `Tracer.redactor`); without `keep_text` the inputs are not kept,
    as a trace would not keep them. `identity` is the Tracer's: project, channel, bento, version, program_hash."""
    counts: dict[str, int] = {}
    return {
        "handoff_id": uuid.uuid4().hex, "request_id": request_id, "created_at": iso(at or utc_now()),
        "project": identity.get("project"), "channel": identity.get("channel"), "bento": identity.get("bento"),
        "version": identity.get("version"), "program_hash": program_hash or identity.get("program_hash"),
        "caller": caller, "tenant": tenant, "flags": flags or {}, "failure": fallback.failure,
        "error_code": fallback.code, "error": redactor.text(error, counts) if error else None,
        "inputs": redactor.value(inputs, counts) if keep_text and inputs is not None else None,
        "answer": fallback.answer, "redactions": counts, "worker": worker,
    }


class HandoffWriter:
    """One per served worker, beside its `Tracer`: appends the queue line of each request handed to a
    person to the worker's handoff segment (thread-safe). Written whether or not `[tracing] enabled`: the
    queue is how a person learns of the request, not telemetry."""

    def __init__(self, tracer):
        self.tracer = tracer
        self.writer = SegmentWriter(tracer.directory, KIND, fsync=tracer.spec.fsync)

    def write(self, request_id: str, fallback: Fallback, *, error: str | None, inputs: dict[str, Any] | None,
              caller: str | None = None, tenant: str | None = None, flags: dict[str, str] | None = None,
              program_hash: str | None = None) -> dict[str, Any]:
        """Append the line and return it; raises what the disk raised (OSError): then no person will see the
        request, and the caller must be answered the error, not the promise of one."""
        line = entry(request_id=request_id, fallback=fallback, error=error, inputs=inputs,
                     identity=self.tracer.identity, redactor=self.tracer.redactor,
                     keep_text=self.tracer.spec.keep_text, caller=caller, tenant=tenant, flags=flags,
                     program_hash=program_hash, worker=self.tracer._worker())
        self.writer.append(line)
        return line


# -- the person's side: list and resolve -----------------------------------------------------------------------
def entry_hash(row: Mapping[str, Any]) -> str:
    """sha256 of what the service wrote about the request (ENTRY_KEYS), as the resolver signs it."""
    from framework.content import json_hash

    return json_hash({key: row.get(key) for key in ENTRY_KEYS})


def verified(row: Mapping[str, Any], project_name: str) -> bool:
    """Does a resolved row carry a signature that holds over a queue-resolve statement saying exactly what the
    row says (the entry, labels and note)? An edited row, or one typed in, is False. (Who signed, and whether
    they had the role, is the audit log's check: `slipway audit verify`.)"""
    from framework import audit, signing

    if not row.get("signature"):
        return False
    signed = audit.signed_of(row)
    details = signed.statement.get("details") or {}
    return signing.signature_holds(signed) and (
        signed.statement.get("action"), signed.statement.get("project"), details.get("handoff_id"),
        details.get("labels"), details.get("note"), details.get("entry_sha256")) == (
        ACTION, project_name, row["handoff_id"], row.get("labels"), row.get("note"), entry_hash(row))


@dataclass
class Listing:
    """What `slipway queue list` prints: the entries (oldest first) and the lines ingestion skipped."""

    entries: list[dict[str, Any]]
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"entries": [{k: v for k, v in row.items() if k not in ("statement", "signature")}
                            for row in self.entries], "skipped": self.skipped}


def queue(project: Project, *, everything: bool = False) -> Listing:
    """Ingest new trace, feedback and handoff lines into the store, then list the open entries (with
    `everything`, the resolved ones too, each marked `verified`)."""
    from framework.evaluate import store_path
    from framework.store import Store
    from framework.traces import ingest

    with Store(store_path(project)) as store:
        ingested = ingest(project, store=store)
        rows = store.handoffs(open_only=not everything)
    for row in rows:
        if row.get("resolved_at") is not None:
            row["verified"] = verified(row, project.name)
    return Listing(entries=rows, skipped=ingested.skipped)


def parse_labels(pairs: list[str]) -> dict[str, str]:
    """`["category=billing", "needs_human=true"]` → {"category": "billing", "needs_human": "true"}."""
    labels: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise HandoffError(f"{pair!r} is not a label: write <output field>=<value>, e.g. category=billing",
                               field="--labels")
        if name.strip() in labels:
            raise HandoffError(f"label {name.strip()!r} is given twice", field="--labels")
        labels[name.strip()] = value
    return labels


@dataclass
class Resolution:
    """What `slipway queue resolve` prints: the entry, the answer recorded and who signed it."""

    handoff_id: str
    request_id: str
    labels: dict[str, Any]
    note: str | None
    resolved_by: str
    resolved_at: str
    audit_seq: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        labels = ", ".join(f"{k}={v!r}" for k, v in self.labels.items())
        return [f"resolved {self.request_id} ({self.handoff_id}) as {labels}, signed by {self.resolved_by} "
                f"(audit row {self.audit_seq})" + (f"; note: {self.note}" if self.note else "")]


def _one(rows: list[dict[str, Any]], ident: str, project: Project) -> dict[str, Any]:
    if not rows:
        raise HandoffError(f"no entry {ident!r} in the human queue of {project.name}",
                           hint=f"`slipway queue list {project.name}` lists the open ones (by request id and "
                                "handoff id)")
    if len(rows) > 1:
        raise HandoffError(f"request id {ident!r} names {len(rows)} entries: "
                           f"{', '.join(r['handoff_id'] for r in rows)}",
                           hint="pass the handoff id of the one you mean (`slipway queue list --all`)")
    return rows[0]


def _identity(project: Project, key: Path | str | None) -> tuple[Path, str]:
    """(key path, signer name) of a key allowed to resolve; refuses before anything is signed."""
    from framework import signing

    path = signing.find_key(key)
    public = signing.public_key(path)
    signers = signing.load_signers(project.dir)
    signer = signers.by_key(public)
    why = signing.key_refusal(public, ROLE, signer, signers.revocation(public))
    if why:
        raise ReleaseRefused(f"refusing to resolve a request handed to a person in {project.name}: {why}",
                             path=str(signing.signers_path(project.dir)),
                             hint=f"a person whose key has the {ROLE!r} role resolves it; `slipway signers show` "
                                  "prints your key, `slipway signers add` proposes the entry (a reviewed change)")
    assert signer is not None
    return path, signer.name


def resolve(project: Project, ident: str, labels: Mapping[str, Any], *, note: str | None = None,
            key: Path | str | None = None, output_types: Mapping[str, Any] | None = None) -> Resolution:
    """Record a person's answer to the entry `ident` (its handoff id, or its request id when that names one
    entry): `labels` (output field → value; strings are read as the field's type) must fit the program's
    output fields (`output_types`, default: the notebook's), signed with `key` (the `queue` role), logged in
    the audit chain in the same transaction. Raises `HandoffError` (unknown or ambiguous id, bad labels),
    `ReleaseRefused` (resolved already, a key not listed, revoked or without the role), `IdentityError`
    (no key). Nothing is written unless everything holds."""
    from framework import audit, signing
    from framework.evaluate import store_path
    from framework.store import Store, now
    from framework.traces import ingest

    if not labels:
        raise HandoffError("no labels: give the answer as --labels <output field>=<value> (repeatable)",
                           field="--labels")
    with Store(store_path(project)) as store:
        ingest(project, store=store)
        found = _one(store.handoffs(ident=ident), ident, project)
    if found.get("resolved_at") is not None:
        raise ReleaseRefused(f"refusing to resolve {found['request_id']} ({found['handoff_id']}): rule resolve-once: "
                             f"{found.get('resolved_by')} resolved it at {found['resolved_at']}",
                             hint="an answer given is kept as signed; `slipway queue list --all` shows it")
    if output_types is None:
        from framework.notebook import load_program

        output_types = output_fields(load_program(project, saved=False))
    values, problems = coerce_labels(labels, output_types)
    if problems:
        raise HandoffError("; ".join(problems), path=str(project.notebook_path),
                           hint="labels name output fields of the program's signature, with values of their types")
    key_path, name = _identity(project, key)
    at = now()
    statement = audit.statement(project.name, ACTION, f"{project.name}:{found['request_id']}", {
        "handoff_id": found["handoff_id"], "request_id": found["request_id"], "labels": values, "note": note,
        "entry_sha256": entry_hash(found)}, at=at)
    signed = signing.sign(statement, key_path)
    if why := signing.refusal(signing.verify(signed, signing.load_signers(project.dir)), ROLE):
        raise ReleaseRefused(f"refusing to resolve {found['request_id']}: {why}",
                             path=str(signing.signers_path(project.dir)))
    with Store(store_path(project)) as store, store.transaction():
        changed = store.resolve_handoff(found["handoff_id"], {
            "resolved_at": at, "resolved_by": name, "labels": signed.statement["details"]["labels"], "note": note,
            "statement": signed.statement, "signer_key": signed.key, "signature": signed.signature})
        if not changed:   # another person resolved it while this one was being signed
            raise ReleaseRefused(f"refusing to resolve {found['request_id']}: rule resolve-once: it was resolved "
                                 "meanwhile", hint="`slipway queue list --all` shows who answered it")
        row = audit.append(store, signed, name)
    return Resolution(handoff_id=found["handoff_id"], request_id=found["request_id"],
                      labels=signed.statement["details"]["labels"], note=note, resolved_by=name,
                      resolved_at=iso(at), audit_seq=int(row["seq"]))
