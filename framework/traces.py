"""Served requests → trace records → segment files → the store.

Each served worker appends one JSON line per answered request to its own segment file
(`<project>/.slipway/traces/traces/<host>-<pid>-<start>-<rand>.jsonl`), written before the response
leaves, so an answered request always has its trace. DuckDB allows one writer per file and a worker
must never wait on `slipway approve`, so workers do not touch the store: `ingest()` copies new
complete lines into it later (every `slipway traces`, `slo`, `harvest`, `drift`, `dashboard` starts
with it). Ingestion is idempotent (traces are keyed by `trace_id`, and a segment's ingested byte offset
is stored in the same transaction as its rows), so a second ingest, or one killed half-way, adds nothing
twice. A line cut short by a killed worker is detected (no newline, or not JSON) and skipped with a
warning naming the file; it is never ingested as garbage.

fsync policy (`[tracing] fsync`): every line is one `os.write` on an O_APPEND file, so once a response is
sent its trace is in the kernel and survives the worker being killed; "interval" (default) also has a
background thread fsync the file about once a second after a write, bounding what a power cut loses to
about a second, without the request waiting for the disk; "always" fsyncs every line before answering.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson  # ~10x faster than json.dumps: the trace is written on the request path (BENCHMARKS.md)

# Keys every trace line carries; a line without them is not ingested (docs/traces.md has the rest).
REQUIRED = ("trace_id", "request_id", "started_at", "duration_ms", "status")
TRACE_COLUMNS = {
    "trace_id": "VARCHAR", "request_id": "VARCHAR", "started_at": "TIMESTAMP", "duration_ms": "DOUBLE",
    "project": "VARCHAR", "channel": "VARCHAR", "bento": "VARCHAR", "version": "VARCHAR",
    "model_sha256": "VARCHAR", "program_hash": "VARCHAR", "caller": "VARCHAR", "tenant": "VARCHAR",
    "status": "INTEGER", "error_code": "VARCHAR", "error": "VARCHAR",
    "tokens_in_new": "INTEGER", "tokens_in_cached": "INTEGER", "tokens_out": "INTEGER", "cost": "DOUBLE",
    "inputs": "JSON", "outputs": "JSON", "calls": "JSON", "stages": "JSON", "decisions": "JSON",
    "redactions": "JSON", "worker": "VARCHAR", "flags": "JSON", "served": "JSON",
}
FEEDBACK_COLUMNS = {
    "feedback_id": "VARCHAR", "request_id": "VARCHAR", "trace_id": "VARCHAR", "bento": "VARCHAR",
    "version": "VARCHAR", "score": "DOUBLE", "negative": "BOOLEAN", "comment": "VARCHAR",
    "correct_labels": "JSON", "received_at": "TIMESTAMP",
}
FEEDBACK_REQUIRED = ("feedback_id", "request_id", "score", "received_at")
# Requests handed to a person by `[fallback] action = "human"` (framework/handoff.py): table human_queue.
HANDOFF_COLUMNS = {
    "handoff_id": "VARCHAR", "request_id": "VARCHAR", "created_at": "TIMESTAMP", "project": "VARCHAR",
    "channel": "VARCHAR", "bento": "VARCHAR", "version": "VARCHAR", "program_hash": "VARCHAR", "caller": "VARCHAR",
    "tenant": "VARCHAR", "flags": "JSON", "failure": "VARCHAR", "error_code": "VARCHAR", "error": "VARCHAR",
    "inputs": "JSON", "answer": "JSON", "redactions": "JSON", "worker": "VARCHAR",
}
HANDOFF_REQUIRED = ("handoff_id", "request_id", "created_at", "error_code")
KINDS = {"traces": (TRACE_COLUMNS, REQUIRED), "feedback": (FEEDBACK_COLUMNS, FEEDBACK_REQUIRED),
         "handoff": (HANDOFF_COLUMNS, HANDOFF_REQUIRED)}
TABLES = {"traces": "traces", "feedback": "feedback", "handoff": "human_queue"}   # kind → store table
# A segment whose writer is gone (dead pid on this host, or silent this long) has its cut-off last line skipped.
ABANDONED_AFTER_S = 300


def utc_now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds")


class SegmentWriter:
    """One worker's append-only segment of one kind (traces or feedback). Thread-safe.

    The file is created on the first line, so a worker that answers nothing leaves nothing behind.
    A worker starts a new file each UTC day (so retention can delete old days while it runs, and no
    file grows without bound), and at once if its file was deleted under it. A file is never reopened
    once left (a restarted worker gets a new name), so a line cut short by a kill stays the last line
    of a file nobody writes again."""

    def __init__(self, directory: Path, kind: str, *, fsync: str = "interval"):
        self.directory, self.kind, self.fsync = Path(directory), kind, fsync
        self.path: Path | None = None
        self._fd: int | None = None
        self._day: str | None = None
        self._lock = threading.Lock()
        self._dirty = threading.Event()
        self._flusher: threading.Thread | None = None

    def _rotate(self) -> None:
        """Open today's file (named here, in the process that writes it: a forked worker has its own pid)."""
        if self._fd is not None:
            os.close(self._fd)
        now = utc_now()
        self._day = f"{now:%Y%m%d}"
        self.path = (self.directory / self.kind /
                     f"{socket.gethostname()}-{os.getpid()}-{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}.jsonl")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        if self.fsync == "interval" and self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_every_second, name=f"slipway-{self.kind}-fsync",
                                             daemon=True)
            self._flusher.start()

    def append(self, record: dict[str, Any]) -> None:
        try:
            line = orjson.dumps(record, default=str, option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS)
        except TypeError:   # what orjson cannot write (an int over 64 bits): the slower, total encoder
            line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode()
        with self._lock:
            if self._fd is None or self._day != f"{utc_now():%Y%m%d}" or os.fstat(self._fd).st_nlink == 0:
                self._rotate()
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view):]
            if self.fsync == "always":
                os.fsync(self._fd)
            else:
                self._dirty.set()

    def _flush_every_second(self) -> None:
        """fsync off the request path: a request pays for one write(), the disk flush happens here, on a
        duplicate of the file descriptor and outside the lock, so an append never waits for the disk. It
        polls (rather than being woken by each append) so no request hands the GIL to this thread."""
        while True:
            time.sleep(1.0)
            if not self._dirty.is_set():
                continue
            with self._lock:
                self._dirty.clear()
                fd = os.dup(self._fd) if self._fd is not None else None
            if fd is not None:
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None


@dataclass
class Chunk:
    """The complete, valid lines of one segment from a byte offset on."""

    segment: str
    start: int
    end: int                          # byte offset after the last line consumed (valid, skipped or cut off)
    rows: list[dict[str, Any]] = field(default_factory=list)
    lines: list[bytes] = field(default_factory=list)   # the same rows as the segment holds them
    skipped: list[str] = field(default_factory=list)   # "file:byte: why", for each line not ingested


def segments(trace_dir: Path, kind: str) -> list[Path]:
    folder = Path(trace_dir) / kind
    return sorted(folder.glob("*.jsonl")) if folder.is_dir() else []


def _writer_gone(path: Path) -> bool:
    parts = path.stem.split("-")
    try:
        pid = int(parts[-3])
    except (IndexError, ValueError):
        return True
    hostname = "-".join(parts[:-3])
    if time.time() - path.stat().st_mtime > ABANDONED_AFTER_S:
        return True
    if hostname != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


_PY_TYPES = {"VARCHAR": (str,), "INTEGER": (int,), "DOUBLE": (int, float), "BOOLEAN": (bool,),
             "TIMESTAMP": (str,), "JSON": (object,)}


def _problem(row: Any, kind: str) -> str | None:
    """Why a parsed line is not a record (None when it is one). Every column is type-checked, so one bad
    value is one skipped line, never a failed batch that would stop every later ingest."""
    columns, required = KINDS[kind]
    if not isinstance(row, dict):
        return "not a JSON object"
    missing = [key for key in required if row.get(key) is None]
    if missing:
        return f"missing {', '.join(missing)}"
    for key, sql_type in columns.items():
        value = row.get(key)
        if value is None:
            continue
        if not isinstance(value, _PY_TYPES[sql_type]) or (isinstance(value, bool) and sql_type != "BOOLEAN"):
            return f"wrong type for {key} ({type(value).__name__}, expected {sql_type})"
        if sql_type == "INTEGER" and not -(2**31) <= value < 2**31:
            return f"{key} out of range"
        if sql_type == "TIMESTAMP":
            try:
                moment = datetime.fromisoformat(value)
            except ValueError:
                return f"{key} is not an ISO time"
            if moment.tzinfo is not None:
                return f"{key} has a time zone; traces are written in UTC without one"
    return None


MAX_CHUNK_BYTES = 64 << 20   # ingest reads a segment in blocks of at most this, each committed with its offset


def read_chunk(path: Path, kind: str, start: int, *, name: str | None = None,
               max_bytes: int = MAX_CHUNK_BYTES) -> Chunk:
    """New complete lines of `path` from byte `start`, at most about `max_bytes` of them (call again
    from `chunk.end` for more). A last line without its newline is left for later while its writer
    lives, and skipped (reported) once the writer is gone."""
    label = name or str(path)
    with open(path, "rb") as fh:
        fh.seek(start)
        data = fh.read(max_bytes)
        more = bool(fh.read(1))
    cut = data.rfind(b"\n") + 1
    if more and cut == 0:   # one line longer than a block: read on to its end
        with open(path, "rb") as fh:
            fh.seek(start)
            data = fh.read()
        more, cut = False, data.rfind(b"\n") + 1
    chunk = Chunk(segment=label, start=start, end=start + cut)
    position = start
    for raw in data[:cut].splitlines(keepends=True):
        text = raw.strip()
        where = f"{label}:byte {position}"
        position += len(raw)
        if not text:
            continue
        try:
            row = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            chunk.skipped.append(f"{where}: not JSON ({exc}); a write cut short?")
            continue
        problem = _problem(row, kind)
        if problem:
            chunk.skipped.append(f"{where}: {problem}")
            continue
        chunk.rows.append(row)
        chunk.lines.append(text)
    if not more and cut < len(data) and _writer_gone(path):
        chunk.skipped.append(f"{label}:byte {start + cut}: last line cut short ({len(data) - cut} bytes, "
                             "no newline) and its writer is gone")
        chunk.end = start + len(data)
    return chunk


@dataclass
class Ingested:
    traces: int = 0
    feedback: int = 0
    handoff: int = 0
    skipped: list[str] = field(default_factory=list)
    deleted: int = 0


def ingest(project, *, store=None) -> Ingested:
    """Copy new segment lines of `project` into its store (idempotent), then apply retention."""
    from framework.evaluate import store_path
    from framework.store import Store

    if store is None:
        with Store(store_path(project)) as opened:
            return ingest(project, store=opened)
    result = Ingested()
    root = project.trace_dir
    for kind in KINDS:
        for path in segments(root, kind):
            name = f"{kind}/{path.name}"
            start = store.segment_offset(name)
            while path.exists() and path.stat().st_size > start:
                chunk = read_chunk(path, kind, start, name=name, max_bytes=MAX_CHUNK_BYTES)
                if chunk.end == start:
                    break
                added = store.add_segment_rows(kind, chunk.segment, chunk.lines, start=chunk.start, end=chunk.end,
                                               skipped=len(chunk.skipped))
                setattr(result, kind, getattr(result, kind) + added)
                result.skipped += chunk.skipped
                start = chunk.end
    days = project.spec.tracing.retention_days
    if days is not None:
        result.deleted = retain(project, store, utc_now() - timedelta(days=days))
    return result


def retain(project, store, cutoff: datetime) -> int:
    """Delete traces and feedback older than `cutoff` from the store, and segment files wholly ingested
    whose last write is older than it. A writer moves to a new file every day and whenever its file is
    gone, so deleting an old day's file never loses a later line. Human-queue entries stay in the store
    (a person has yet to answer them, or did and signed it); only their ingested segment files go."""
    deleted = store.delete_traces_before(cutoff)
    for kind in KINDS:
        for path in segments(project.trace_dir, kind):
            name = f"{kind}/{path.name}"
            if (datetime.fromtimestamp(path.stat().st_mtime, UTC).replace(tzinfo=None) < cutoff
                    and store.segment_offset(name) >= path.stat().st_size):
                path.unlink()
                store.forget_segment(name)
    return deleted


def parse_since(text: str) -> timedelta:
    """`90s`, `15m`, `1h`, `7d`, `2w` → a timedelta (for --since and --window)."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text or "")
    if not match:
        raise ValueError(f"{text!r} is not a duration: write a number and a unit, e.g. 30m, 1h, 7d")
    value, unit = float(match.group(1)), match.group(2)
    return timedelta(seconds=value * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit])


def trace_dir_for_bento(project_name: str) -> Path:
    """Where a served bento writes: `SLIPWAY_TRACE_DIR` (set by `slipway serve`), else the project's
    trace folder when the bento store is a repository's `bentos/`, else `./slipway-traces/<project>`."""
    explicit = os.environ.get("SLIPWAY_TRACE_DIR")
    if explicit:
        return Path(explicit)
    home = os.environ.get("BENTOML_HOME")
    if home:
        candidate = Path(home).resolve().parent / "projects" / project_name
        if (candidate / "project.toml").exists():
            return candidate / ".slipway" / "traces"
    return Path.cwd() / "slipway-traces" / project_name


class Tracer:
    """One per served worker: turns a finished request into a redacted trace line in its segment.

    `identity` is what every trace of this worker shares: project, channel, bento, version,
    model_sha256, program_hash. Live OTLP export (`[tracing] otlp_endpoint`) is one more sink."""

    def __init__(self, spec, directory: Path, identity: dict[str, Any], model=None):
        from framework.redact import Redactor

        self.spec = spec
        self.directory = Path(directory)
        self.identity = identity
        self.model = model
        self.redactor = Redactor(spec)
        self.writer = SegmentWriter(self.directory, "traces", fsync=spec.fsync)
        self.feedback_writer = SegmentWriter(self.directory, "feedback", fsync=spec.fsync)
        self.sinks: list[Any] = []
        if spec.otlp_endpoint:
            from framework.otlp import LiveExporter

            self.sinks.append(LiveExporter(spec.otlp_endpoint, identity, model_name=getattr(model, "name", None)))

    def _worker(self) -> str:
        if getattr(self, "_worker_pid", None) != os.getpid():
            self._worker_pid, self._worker_name = os.getpid(), f"{socket.gethostname()}-{os.getpid()}"
        return self._worker_name

    def record(self, *, request_id: str, started_at: datetime, t0: float, t_valid: float | None, t_end: float,
               status: int, inputs: dict | None = None, outputs: dict | None = None, calls=(),
               error_code: str | None = None, error: str | None = None, caller: str | None = None,
               tenant: str | None = None, decisions: list[dict] | None = None, flags: dict[str, str] | None = None,
               program_hash: str | None = None, served: dict[str, Any] | None = None,
               cost: float | None = None) -> dict[str, Any] | None:
        """Build, redact and append the trace of one request; returns it (None when tracing is off).
        Times are `time.perf_counter()` readings: t0 at arrival, t_valid after validation, t_end at answer.
        `cost`: what the calls cost when they ran on several models (tiers); else priced at this model's prices."""
        if not self.spec.enabled:
            return None
        from framework.metrics import request_cost

        counts: dict[str, int] = {}
        keep = self.spec.keep_text
        ms = lambda t: round((t - t0) * 1000, 3)  # noqa: E731 - offsets from arrival
        stages = []
        if t_valid is not None:
            stages.append({"name": "validation", "start_ms": 0.0, "duration_ms": ms(t_valid)})
        call_rows, cursor = [], t_valid
        for i, call in enumerate(calls):
            begin = call.started if call.started is not None else cursor or t0
            if cursor is not None and begin - cursor > 0.0005:
                stages.append({"name": "program", "start_ms": ms(cursor), "duration_ms": ms(begin) - ms(cursor)})
            end = begin + (call.waited_ms + call.latency_ms) / 1000
            stages.append({"name": f"model_call_{i}", "start_ms": ms(begin), "duration_ms": ms(end) - ms(begin),
                           "waited_ms": round(call.waited_ms, 3)})
            cursor = end
            call_rows.append({
                "index": i, "start_ms": ms(begin), "latency_ms": round(call.latency_ms, 3),
                "waited_ms": round(call.waited_ms, 3), "tokens_in_new": call.tokens_in_new,
                "tokens_in_cached": call.tokens_in_cached, "tokens_out": call.tokens_out,
                "finish_reason": call.finish_reason, "format_valid": call.raw_valid,
                # Schema problems quote the model's own values: redacted like any text, and not kept
                # without keep_text.
                "format_problems": self.redactor.value(call.format_problems, counts)
                if keep and call.format_problems else None,
                "messages": self.redactor.value(call.messages, counts) if keep and call.messages else None,
                "output": self.redactor.text(call.raw_text, counts) if keep and call.raw_text else None})
        if cursor is not None and t_end - cursor > 0.0005 and status < 400:
            stages.append({"name": "parse", "start_ms": ms(cursor), "duration_ms": ms(t_end) - ms(cursor)})
        new = sum(c.tokens_in_new for c in calls)
        cached = sum(c.tokens_in_cached for c in calls)
        generated = sum(c.tokens_out for c in calls)
        trace = {
            "trace_id": uuid.uuid4().hex, "request_id": request_id, "started_at": iso(started_at),
            "duration_ms": ms(t_end), **self.identity, "caller": caller, "tenant": tenant, "status": status,
            "error_code": error_code, "error": self.redactor.text(error, counts) if error else None,
            "tokens_in_new": new, "tokens_in_cached": cached, "tokens_out": generated,
            "cost": cost if cost is not None else request_cost(self.model, new, cached, generated)
            if self.model is not None and calls else 0.0,
            "inputs": self.redactor.value(inputs, counts) if keep and inputs is not None else None,
            "outputs": self.redactor.value(outputs, counts) if keep and outputs is not None else None,
            "calls": call_rows, "stages": stages, "decisions": decisions or [], "redactions": counts,
            "worker": self._worker(), "flags": flags or {}, "served": served or {},
        }
        if program_hash is not None:   # a flag variant answered: its program, not the pipeline's
            trace["program_hash"] = program_hash
        self.writer.append(trace)
        for sink in self.sinks:
            sink.send(trace)
        return trace


# What the index keeps per request: enough to attribute feedback, the tenant allowed to give it, and the summary
# a tenant may read back (GET /traces/<request_id>): never prompts, inputs or outputs (~300 bytes a request).
INDEXED = ("trace_id", "bento", "version", "status", "tenant", "started_at", "duration_ms", "error_code",
           "tokens_in_new", "tokens_in_cached", "tokens_out", "cost", "program_hash", "flags")


class RequestIndex:
    """request_id → its trace's (trace_id, bento, version, status), read incrementally from every
    worker's trace segments (the service answers POST /feedback with it: an id no worker traced is a
    404). Also the feedback ids already recorded, so a repeated POST is not written twice.

    Bounded: the newest `limit` requests are kept (feedback on older ones answers 404: say so in the
    client's docs), and a miss re-reads the segments at most once a second, so unknown ids cannot make
    a worker re-scan the disk on every request."""

    def __init__(self, directory: Path, *, limit: int = 200_000):
        from collections import OrderedDict

        self.directory = Path(directory)
        self.limit = limit
        self.offsets: dict[tuple[str, str], int] = {}
        self.requests: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        self.feedback: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._refreshed = 0.0

    def add(self, trace: dict[str, Any] | None) -> None:
        """A trace this worker just wrote: known at once, without reading it back."""
        if trace is not None:
            with self._lock:
                self.requests[_request_key(trace)] = {k: trace.get(k) for k in INDEXED}

    def refresh(self, *, at_most_every_s: float = 0.0) -> None:
        """Read what every segment gained; with `at_most_every_s`, first wait out that interval since the
        last read (a miss is answered late rather than by a scan per request)."""
        wait = at_most_every_s - (time.monotonic() - self._refreshed)
        if wait > 0:
            time.sleep(wait)
        with self._lock:
            self._refreshed = time.monotonic()
            for kind in ("traces", "feedback"):
                for path in segments(self.directory, kind):
                    key = (kind, path.name)
                    try:
                        size = path.stat().st_size
                    except FileNotFoundError:   # retention deleted it meanwhile
                        continue
                    while size > self.offsets.get(key, 0):
                        start = self.offsets.get(key, 0)
                        chunk = read_chunk(path, kind, start)
                        if chunk.end == start:
                            break
                        self.offsets[key] = chunk.end
                        for row in chunk.rows:
                            if kind == "traces":
                                self.requests[_request_key(row)] = {k: row.get(k) for k in INDEXED}
                                self.requests.move_to_end(_request_key(row))
                            else:
                                self.feedback[row["feedback_id"]] = None
            for table in (self.requests, self.feedback):
                while len(table) > self.limit:
                    table.popitem(last=False)

    def lookup(self, request_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        """The request `tenant` sent with this id (None: a caller without a tenant, keys off). Request ids are
        the callers' own X-Request-ID, so two tenants may send the same one: each sees only its own."""
        key = (tenant or "", request_id)
        if key not in self.requests:
            self.refresh(at_most_every_s=1.0)
        return self.requests.get(key)

    def seen_feedback(self, feedback_id: str) -> bool:
        if feedback_id not in self.feedback:
            self.refresh(at_most_every_s=1.0)
        return feedback_id in self.feedback


def _request_key(trace: dict[str, Any]) -> tuple[str, str]:
    return (trace.get("tenant") or "", trace["request_id"])


def feedback_id(request_id: str, score: float, comment: str | None, correct_labels: dict | None) -> str:
    import hashlib

    body = json.dumps({"request_id": request_id, "score": score, "comment": comment,
                       "correct_labels": correct_labels}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def is_negative(score: float) -> bool:
    """+1 / -1 thumbs, or a 0..1 rating: below 0.5 (and -1) is negative."""
    return score < 0.5
