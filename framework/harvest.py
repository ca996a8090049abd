"""Served requests that went wrong → reviewed, signed rows of the eval set.

`harvest()` ingests traces and feedback, then turns every request whose latest feedback is negative or
corrects the labels into a *candidate* in `projects/<name>/harvest/candidates.jsonl`, a file a person
edits by hand: one JSON object a line, the served (redacted) inputs, the model's output, every piece of
feedback, provenance, `expected` labels (the correction when given, else the model's own answer with
`needs_labels: true`), and `accept: false`. Re-running harvest merges by id: a candidate already in the
file keeps what the reviewer edited (accept, inputs, expected, needs_labels, tags); only its feedback
and provenance are refreshed.

`accept()` moves the candidates a reviewer marked (or named) into the eval split as ordinary rows plus a
`provenance` object. The eval set is what every contract check measures, so changing it is a gated,
signed action like an approval: the signer's key must be listed in signers.toml with the `curate` role,
the statement (action `harvest-accept`) names the rows' ids and sha256 and the new file's sha256, and
its audit row is appended in the same transaction that replaces the file. A candidate is refused (and
stays in the review file, with the reason reported) when its labels are incomplete or invalid for the
program's output types, or its text is already in train, dev or eval: the splits stay apart.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from framework.dataset import jsonl_models
from framework.errors import DatasetError, ReleaseRefused, SpecError
from framework.spec import Project

REVIEW_FILE = Path("harvest") / "candidates.jsonl"
ID_PREFIX = "served-"
ROLE = "curate"
ACTION = "harvest-accept"
TAG = "served"
REDACTION_NOTE = ("inputs are the served request after redaction: [EMAIL], [PHONE], [CARD], [IBAN], [NATIONAL_ID] "
                  "and the project's [tracing] patterns stand for text that was removed before the trace was written")


class Candidate(BaseModel):
    """One line of the review file. Unknown keys are refused, so a misspelt `acept` is an error, not a no-op."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    accept: bool = Field(False, strict=True)
    inputs: dict[str, Any] = Field(min_length=1)
    expected: dict[str, Any] = Field(default_factory=dict)
    needs_labels: bool = Field(False, strict=True)
    tags: list[str] = Field(default_factory=lambda: [TAG])
    output: dict[str, Any] | None = None
    feedback: list[dict[str, Any]] = Field(default_factory=list)
    provenance: dict[str, Any] = Field(default_factory=dict)
    note: str | None = None

    def line(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_none=True), ensure_ascii=False)


def review_path(project: Project) -> Path:
    return project.dir / REVIEW_FILE


def read_candidates(path: Path) -> list[Candidate]:
    """The review file's candidates (none when it does not exist); every bad line is reported as file:line."""
    if not path.exists():
        return []
    problems: list[str] = []
    out = [c for _, c in jsonl_models(path.read_text(encoding="utf-8"), str(path), Candidate, problems)]
    if problems:
        raise DatasetError(f"{len(problems)} bad line(s) in the review file:\n  " + "\n  ".join(problems[:20]),
                           path=str(path), hint="fix those lines by hand (one JSON object a line), or delete the "
                                            "file and run harvest again (reviewer edits in it are then lost)")
    return out


def write_lines(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically: a reader sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        # mkstemp makes the file 0600; the replacement keeps the old file's mode (an eval file others read)
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_candidates(path: Path, candidates: list[Candidate]) -> None:
    write_lines(path, "".join(c.line() + "\n" for c in candidates).encode())


# -- harvest: feedback + traces → candidates (pure) ---------------------------------------------------
def expected_keys(examples) -> tuple[str, ...]:
    """The label names of the eval set, in the order its rows write them."""
    keys: dict[str, None] = {}
    for example in examples:
        keys.update(dict.fromkeys(example.expected))
    return tuple(keys)


def _iso(value: Any) -> Any:
    return value.isoformat(timespec="microseconds") if isinstance(value, datetime) else value


def candidate_for(request_id: str, feedback: list[dict[str, Any]], trace: dict[str, Any],
                  keys: tuple[str, ...]) -> Candidate | None:
    """The candidate one request's feedback (oldest first) makes, or None when its latest feedback is neither
    negative nor a correction. The latest feedback decides; the labels are the newest correction given
    (a later thumbs-down without labels does not erase it); every comment is kept."""
    latest = feedback[-1]
    if not latest.get("negative") and not latest.get("correct_labels"):
        return None
    labels = next((f["correct_labels"] for f in reversed(feedback) if f.get("correct_labels")), None) or {}
    output = trace.get("outputs")
    base = {k: output[k] for k in keys if isinstance(output, dict) and k in output}
    expected = {**base, **labels}
    complete = bool(keys) and all(k in labels for k in keys)
    return Candidate(
        id=f"{ID_PREFIX}{request_id}", inputs=trace["inputs"], expected=expected, needs_labels=not complete,
        output=output,
        feedback=[{"feedback_id": f["feedback_id"], "score": f.get("score"), "negative": f.get("negative"),
                   "comment": f.get("comment"), "correct_labels": f.get("correct_labels"),
                   "received_at": _iso(f.get("received_at"))} for f in feedback],
        provenance={"request_id": request_id, "trace_id": trace.get("trace_id"), "bento": trace.get("bento"),
                    "version": trace.get("version"), "feedback_ids": [f["feedback_id"] for f in feedback]},
        note=REDACTION_NOTE)


def merge(existing: list[Candidate], fresh: list[Candidate], drop: set[str]) -> tuple[list[Candidate], list[str],
                                                                                      list[str]]:
    """The review file after a harvest: existing candidates in their order (those in `drop`, already in the
    eval set, removed), each keeping its reviewer-editable fields with feedback and provenance refreshed,
    then new ones. Returns (candidates, added ids, ids with new feedback)."""
    by_id = {c.id: c for c in fresh}
    out, updated = [], []
    for old in existing:
        if old.id in drop:
            continue
        new = by_id.pop(old.id, None)
        if new is not None and new.provenance.get("feedback_ids") != old.provenance.get("feedback_ids"):
            old = old.model_copy(update={"feedback": new.feedback, "provenance": new.provenance})
            updated.append(old.id)
        out.append(old)
    added = [c for c in fresh if c.id in by_id]
    return out + added, [c.id for c in added], updated


@dataclass
class Harvest:
    """What `slipway harvest` prints: where the review file is and what changed in it."""

    path: Path
    candidates: int                                   # in the review file now
    added: list[str] = field(default_factory=list)    # new candidate ids
    updated: list[str] = field(default_factory=list)  # candidates that received new feedback
    needs_labels: int = 0                             # candidates whose labels a reviewer must still fill in
    to_accept: int = 0                                # candidates marked accept: true
    skipped: list[str] = field(default_factory=list)  # "request <id>: why" for feedback that made no candidate
    ingested: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}

    def lines(self) -> list[str]:
        out = [f"{self.path}: {self.candidates} candidate(s); {len(self.added)} new, {len(self.updated)} with new "
               f"feedback; {self.needs_labels} need labels, {self.to_accept} marked accept"]
        out += [f"  skipped {why}" for why in self.skipped]
        if self.candidates:
            out.append("  next: edit `expected`, set `needs_labels` to false and `accept` to true, then run "
                       "`slipway harvest accept`")
        return out


def harvest(project: Project) -> Harvest:
    """Ingest, then write or update the review file with one candidate per request whose latest feedback
    is negative or corrects the labels. Requests already in the eval set are skipped."""
    from framework.dataset import load_examples
    from framework.evaluate import store_path
    from framework.store import Store
    from framework.traces import ingest

    path = review_path(project)
    existing = read_candidates(path)          # a corrupt review file stops here, before anything changes
    examples = load_examples(project.split_path("eval"))
    keys = expected_keys(examples)
    eval_ids, eval_requests = in_eval(examples)
    fresh, skipped = [], []
    with Store(store_path(project)) as store:
        ingested = ingest(project, store=store)
        by_request: dict[str, list[dict[str, Any]]] = {}
        for row in store.feedback_rows():
            by_request.setdefault(row["request_id"], []).append(row)
        for request_id, rows in by_request.items():
            if f"{ID_PREFIX}{request_id}" in eval_ids or request_id in eval_requests:
                continue
            traces = store.trace(request_id)
            trace = next((t for t in traces if t["trace_id"] == rows[-1].get("trace_id")), traces[0] if traces
                         else None)
            if trace is None:
                if rows[-1].get("negative") or rows[-1].get("correct_labels"):
                    skipped.append(f"request {request_id}: no trace in the store (deleted by retention?)")
                continue
            if not trace.get("inputs"):
                skipped.append(f"request {request_id}: its trace kept no inputs ([tracing] keep_text = false)")
                continue
            candidate = candidate_for(request_id, rows, trace, keys)
            if candidate is not None:
                fresh.append(candidate)
    drop = {c.id for c in existing if _already(c, eval_ids, eval_requests)}
    merged, added, updated = merge(existing, fresh, drop)
    if merged or path.exists():
        write_candidates(path, merged)
    return Harvest(path=path, candidates=len(merged), added=added, updated=updated,
                   needs_labels=sum(c.needs_labels for c in merged), to_accept=sum(c.accept for c in merged),
                   skipped=skipped, ingested=asdict(ingested))


def in_eval(examples) -> tuple[set[str], set[str]]:
    """(row ids, served request ids) of the eval set (harvested rows carry provenance.request_id)."""
    ids = {e.id for e in examples}
    requests = {str(e.provenance["request_id"]) for e in examples if (e.provenance or {}).get("request_id")}
    return ids, requests


def _already(candidate: Candidate, ids: set[str], requests: set[str]) -> bool:
    return candidate.id in ids or candidate.provenance.get("request_id") in requests


# -- accept: candidates → eval rows (signed) ------------------------------------------------------------
def label_problems(expected: dict[str, Any], keys: tuple[str, ...], types: dict[str, Any]) -> list[str]:
    """What is wrong with a candidate's labels: a missing or extra key (against the eval set's label names),
    or a value its output type refuses (strictly: "true" is not a bool)."""
    from pydantic import TypeAdapter

    problems = [f"expected lacks {k!r}" for k in keys if k not in expected]
    problems += [f"expected.{k} is not a label of the eval set (labels: {', '.join(keys)})"
                 for k in expected if k not in keys]
    for k in keys:
        if k in expected and k in types:
            try:
                TypeAdapter(types[k]).validate_python(expected[k], strict=True)
            except ValidationError as exc:
                problems.append(f"expected.{k}: {exc.errors()[0]['msg']}, got {expected[k]!r}")
    return problems


def output_types(project: Project) -> dict[str, Any]:
    """The program's output fields and their declared types, from the notebook's signature."""
    from framework.notebook import load_program

    program = load_program(project, saved=False)
    predictors = program.predictors()
    if not predictors:
        return {}
    return {name: info.annotation for name, info in predictors[-1].signature.output_fields.items()}


def text_key(inputs: dict[str, Any]) -> str:
    """Inputs compared as a person would: case and runs of whitespace do not make a ticket new."""
    return json.dumps({k: " ".join(v.casefold().split()) if isinstance(v, str) else v for k, v in inputs.items()},
                      sort_keys=True, ensure_ascii=False, default=str)


def _split_texts(project: Project) -> dict[str, str]:
    """text_key → "<split> row <id>" over every declared split that exists, for each row's text as written
    and as a trace would have redacted it (a served copy of a dev ticket with an email reads `[EMAIL]`)."""
    from framework.dataset import load_examples
    from framework.redact import Redactor

    redactor = Redactor(project.spec.tracing)
    out: dict[str, str] = {}
    for split in ("train", "dev", "eval"):
        try:
            path = project.split_path(split)
        except SpecError:   # an undeclared split holds no text
            continue
        if path.exists():
            for example in load_examples(path):
                for inputs in (example.inputs, redactor.value(example.inputs, {})):
                    out.setdefault(text_key(inputs), f"{split} row {example.id}")
    return out


@dataclass
class Refused:
    id: str
    reason: str


@dataclass
class Acceptance:
    """What `slipway harvest accept` prints: rows added to the eval split, candidates refused and why."""

    dataset: Path
    added: list[dict[str, Any]] = field(default_factory=list)    # the eval rows written, provenance included
    refused: list[Refused] = field(default_factory=list)          # stay in the review file
    already: list[str] = field(default_factory=list)              # in the eval set before; dropped from review
    accepted_by: str | None = None
    acceptance_id: str | None = None
    dataset_sha256: str | None = None                             # the eval file's sha256 after (its dataset_hash)

    @property
    def ok(self) -> bool:
        """False when a chosen candidate was refused (the CLI exits 1 then)."""
        return not self.refused

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "dataset": str(self.dataset), "ok": self.ok}

    def lines(self) -> list[str]:
        out = []
        if self.added:
            out.append(f"added {len(self.added)} row(s) to {self.dataset}, signed by {self.accepted_by} "
                       f"({self.acceptance_id}); the next `slipway check` measures the new eval set "
                       f"(sha256 {self.dataset_sha256})")
        else:
            out.append(f"nothing added to {self.dataset}")
        out += [f"  {row['id']}: {json.dumps(row['expected'], ensure_ascii=False)}" for row in self.added]
        out += [f"  already in the eval set: {i}" for i in self.already]
        out += [f"  refused {r.id}: {r.reason}" for r in self.refused]
        return out


def _identity(project: Project, key: Path | str | None) -> tuple[Path, str, str]:
    """(key path, public key, signer name) of a key allowed to curate; refuses before anything is signed."""
    from framework import signing

    path = signing.find_key(key)
    public = signing.public_key(path)
    signers = signing.load_signers(project.dir)
    signer = signers.by_key(public)
    if why := signing.key_refusal(public, ROLE, signer, signers.revocation(public)):
        raise ReleaseRefused(f"refusing to add served rows to the eval set of {project.name}: {why}",
                             path=str(signing.signers_path(project.dir)),
                             hint=f"a person whose key has the {ROLE!r} role runs it; `slipway signers show` prints "
                                  "your key, `slipway signers add` proposes the entry (a reviewed change)")
    assert signer is not None
    return path, public, signer.name


def choose(candidates: list[Candidate], ids: list[str] | None) -> tuple[list[Candidate], list[Refused]]:
    """The candidates to accept: those named in `ids`, else those marked `accept: true`."""
    if ids is None:
        return [c for c in candidates if c.accept], []
    by_id = {c.id: c for c in candidates}
    unknown = [Refused(i, "no such candidate in the review file") for i in ids if i not in by_id]
    return [by_id[i] for i in dict.fromkeys(ids) if i in by_id], unknown


def accept(project: Project, *, ids: list[str] | None = None, key: Path | str | None = None) -> Acceptance:
    """Add the chosen candidates whose labels are complete and valid, and whose text is in no split yet,
    to the eval split; signed (`curate` role) and logged in the audit chain with the file's replacement."""
    from framework import audit, signing
    from framework.content import sha256
    from framework.dataset import load_examples, parse_rows
    from framework.evaluate import store_path
    from framework.store import Store, new_id, now

    path = review_path(project)
    if not path.exists():
        raise DatasetError("no review file", path=str(path), hint=f"run `slipway harvest {project.name}` first")
    candidates = read_candidates(path)
    chosen, refused = choose(candidates, ids)
    dataset = project.split_path("eval")
    result = Acceptance(dataset=dataset, refused=refused)
    examples = load_examples(dataset)
    eval_ids, eval_requests = in_eval(examples)
    keys = expected_keys(examples)
    types = output_types(project) if chosen else {}
    taken = _split_texts(project)
    ready: list[Candidate] = []
    for candidate in chosen:
        if _already(candidate, eval_ids, eval_requests):
            result.already.append(candidate.id)
            continue
        problems = label_problems(candidate.expected, keys, types)
        if candidate.needs_labels:
            problems.insert(0, "needs_labels is true: check `expected`, then set needs_labels to false")
        where = taken.get(text_key(candidate.inputs))
        if where:
            problems.append(f"its text is already in {where}: the train, dev and eval splits must stay apart")
        if problems:
            result.refused.append(Refused(candidate.id, "; ".join(problems)))
            continue
        taken[text_key(candidate.inputs)] = f"this batch ({candidate.id})"
        ready.append(candidate)
    if ready:
        key_path, public, name = _identity(project, key)
        at = now()
        acceptance_id = new_id("harvest")
        rows = [{"id": c.id, "inputs": c.inputs, "expected": {k: c.expected[k] for k in keys}, "tags": c.tags,
                 "provenance": {**{k: c.provenance.get(k) for k in ("request_id", "trace_id", "bento", "version",
                                                                      "feedback_ids")},
                                "accepted_by": name, "key_fingerprint": signing.fingerprint(public),
                                "accepted_at": at.isoformat(timespec="microseconds"),
                                "acceptance_id": acceptance_id}}
                for c in ready]
        added = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
        before = dataset.read_bytes()
        after = before + (b"\n" if before and not before.endswith(b"\n") else b"") + added
        parse_rows(after.decode("utf-8"), str(dataset))   # the new file must still be a valid split
        target = f"{project.name}:{dataset.relative_to(project.dir).as_posix()}"
        statement = audit.statement(project.name, ACTION, target, {
            "ids": [row["id"] for row in rows], "rows_sha256": sha256(added), "dataset_sha256": sha256(after),
            "dataset_sha256_before": sha256(before), "acceptance_id": acceptance_id}, at=at)
        signed = signing.sign(statement, key_path)
        if why := signing.refusal(signing.verify(signed, signing.load_signers(project.dir)), ROLE):
            raise ReleaseRefused(f"refusing to add served rows to the eval set of {project.name}: {why}",
                                 path=str(signing.signers_path(project.dir)))
        replaced = False
        try:
            with Store(store_path(project)) as store, store.transaction():
                # The store's lock serialises two curators; the file must still be the one signed over,
                # or the other's rows would be overwritten and this statement's "before" would be false.
                if dataset.read_bytes() != before:
                    raise ReleaseRefused(f"{dataset} changed while these rows were being signed (another "
                                         "`slipway harvest accept`, or an edit); nothing was added",
                                         path=str(dataset), hint="run `slipway harvest accept` again")
                audit.append(store, signed, name)
                write_lines(dataset, after)
                replaced = True
        except BaseException:
            if replaced:   # the audit row did not commit: the file must not say otherwise
                write_lines(dataset, before)
            raise
        result.added, result.accepted_by, result.acceptance_id = rows, name, acceptance_id
        result.dataset_sha256 = sha256(after)
    gone = {row["id"] for row in result.added} | set(result.already)
    if gone:
        write_candidates(path, [c for c in candidates if c.id not in gone])
    return result
