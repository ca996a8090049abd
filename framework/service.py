"""The one BentoML service every Slipway bento runs (generic, not written per project).

At import it reads the bento's `slipway/` folder (written by build.py): the
project spec, the notebook, the saved DSPy program and the version labels.
Request and response schemas are pydantic models derived from the program's
DSPy signature. Each worker loads the GGUF once from the BentoML model store
and answers in process; llama.cpp calls are serialised by the engine's lock.
Every response says which versions produced it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import bentoml
from pydantic import BaseModel, Field, create_model, field_validator

from framework import alerts
from framework import fallback as fallbacks
from framework.admission import Admission, Shed, parse_step
from framework.apikeys import KEYS_FILE, KeyFiles, KeyRefusal, bearer, verify_key
from framework.budgets import Budgets, Reservation, budgets_path
from framework.errors import NotebookError, SlipwayError
from framework.flags import FLAGS_FILE, SUBJECT_HEADER, FlagFiles, assign, load_flags
from framework.handoff import HandoffWriter
from framework.lm import load_engine
from framework.metrics import request_cost
from framework.spec import RoutingSpec, parse_spec
from framework.traces import RequestIndex, Tracer, feedback_id, is_negative, iso, trace_dir_for_bento, utc_now


def _bento_dir() -> Path:
    """Where the bento's `slipway/` folder is: env (build time), beside this package, or the cwd."""
    candidates = [os.environ.get("SLIPWAY_BENTO_DIR"), Path(__file__).resolve().parent.parent / "slipway",
                  Path.cwd() / "slipway"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "bento.json").exists():
            return Path(candidate)
    raise RuntimeError("framework.service runs inside a bento built by `slipway build`; no slipway/bento.json found")


def _absolute_bentoml_home() -> None:
    """Make a relative BENTOML_HOME absolute, or fail at once saying how to fix it.

    `BENTOML_HOME=bentos bentoml serve <tag>` resolves `bentos` from the repository root in the
    server process but from the bento's own folder in each worker (BentoML starts them there), where
    the model lookup misses and the worker crash-loops on `bentos/.yatai.yaml`. A bento served from a
    store lives at `<home>/bentos/<name>/<version>/src/framework/service.py`, so the home it was found
    in is known here; it is used when it ends with the relative path given."""
    home = os.environ.get("BENTOML_HOME")
    if not home or os.path.isabs(home):
        return
    here = Path(__file__).resolve()
    found = here.parents[5] if len(here.parents) > 5 and (here.parents[2] / "bento.yaml").exists() else None
    relative = Path(os.path.normpath(home))
    if found is None or found.parts[-len(relative.parts):] != relative.parts:
        raise RuntimeError(f"BENTOML_HOME={home} is a relative path, which BentoML's worker processes resolve "
                           f"from another directory ({Path.cwd()}); set it to an absolute path, e.g. "
                           f"BENTOML_HOME=$PWD/{home}")
    os.environ["BENTOML_HOME"] = str(found)
    from framework.bentos import _repoint_imported_bentoml

    _repoint_imported_bentoml(found)


def _verify_files(bento_dir: Path) -> None:
    """Refuse to start when any file of the bento differs from the manifest signed at build time
    (framework/bentos.py), naming the file. While `slipway build` imports this module to build the
    bento there is no bento yet (no bento.yaml), so there is nothing to verify."""
    from framework import bentos

    root = bento_dir.parent.parent
    if (root / "bento.yaml").exists():
        bentos.verify(root)


_absolute_bentoml_home()
BENTO_DIR = _bento_dir()
_verify_files(BENTO_DIR)
CONFIG: dict[str, Any] = json.loads((BENTO_DIR / "bento.json").read_text())
SPEC = parse_spec((BENTO_DIR / "project.toml").read_text(), str(BENTO_DIR / "project.toml"))
MODEL = SPEC.models[CONFIG["model_key"]]
LABELS = CONFIG["labels"]
# How many requests this worker takes on; past the bound, 429 at once (framework/admission.py).
# [routing]: when a cheaper tier's answer is kept (framework/routing.py); used when the bento packs tiers.
ROUTING = SPEC.routing or RoutingSpec()
ADMISSION = Admission(capacity=MODEL.parallel, max_queue=SPEC.serve.max_queue, degrade_at=SPEC.serve.degrade_at,
                      steps=tuple(parse_step(step) for step in SPEC.serve.degrade))


def _program(name: str | None = None, file: str = "program.json"):
    """The pipeline (or, with `name` and `file`, a flag variant's program) as this bento packs it."""
    from framework.notebook import import_notebook

    program = getattr(import_notebook(BENTO_DIR / "notebook.py"), name or CONFIG["program"])()
    program.load(str(BENTO_DIR / file))
    return program


def _variants() -> dict[tuple[str, str], tuple[Any, str]]:
    """(flag, variant) → (program, program_hash) for every variant the build packed (each with a passing signed
    check, framework/build.py); a variant whose loaded program does not hash as built is refused like the
    pipeline would be."""
    from framework.notebook import program_hash

    found = {}
    for entry in CONFIG.get("variants", []):
        program = _program(entry["program"], entry["file"])
        actual = program_hash(program)
        if actual != entry["program_hash"]:
            raise NotebookError(f"flag variant {entry['flag']}={entry['variant']} loads as {actual[:12]}…, but was "
                                f"checked as {entry['program_hash'][:12]}…", path=str(BENTO_DIR / entry["file"]),
                                hint="rebuild from the checked project (`slipway build`)")
        found[(entry["flag"], entry["variant"])] = (program, actual)
    return found


def verified_program_hash(program, labels: dict[str, str], bento_dir: Path) -> str:
    """The hash of the program as loaded here, or `NotebookError` when it is not the one the gate passed.

    `slipway build` labels the bento with the program hash its passing check covered; a changed
    `program.json` (or notebook) in the bento after the build would otherwise serve unchecked prompts
    under a checked label. `_verify_files` catches such an edit first, by the signed manifest; this
    recomputation is what the response's `program_hash` reports."""
    from framework.notebook import program_hash

    actual = program_hash(program)
    expected = labels.get("slipway.program_hash", "")
    if actual != expected:
        raise NotebookError(
            f"the program loaded from this bento hashes to {actual[:12]}…, but the bento was built and checked "
            f"with {expected[:12] or '(no label)'}…: {bento_dir / 'program.json'} (or notebook.py beside it) "
            "changed after `slipway build`; refusing to serve it",
            path=str(bento_dir / "program.json"), field="labels.slipway.program_hash",
            hint="rebuild from the checked project (`slipway build`) instead of editing a built bento")
    return actual


VERSION = {"bento": f"{CONFIG['project']}:{CONFIG['bento_version']}", "model_sha256": MODEL.identity,
           "program_hash": verified_program_hash(_program(), LABELS, BENTO_DIR), "flags": {}}
# Why this worker is not ready (a failed warm-up), for /readyz and the API to say; None while starting or ready.
NOT_READY: dict[str, str | None] = {"reason": None}


def _schemas():
    """Request/response pydantic models from the program's DSPy signature."""
    from framework.notebook import input_fields

    program = _program()
    signature = program.predictors()[-1].signature
    limit = SPEC.contract.max_input_chars
    inputs = {name: (signature.input_fields[name].annotation, Field(description=_desc(signature.input_fields[name])))
              for name in input_fields(program)}
    outputs = {name: (field.annotation, ...) for name, field in signature.output_fields.items()}
    request = create_model("Request", __base__=bentoml.IODescriptor, __config__=None, **inputs)
    request.model_config["extra"] = "forbid"  # a misspelt field is an error, not silently ignored
    request.model_rebuild(force=True)
    version = create_model("Version", bento=(str, ...), model_sha256=(str, ...), program_hash=(str, ...),
                           flags=(dict[str, str], Field(default_factory=dict, description=(
                               "feature flags that chose this answer's program variant (docs/flags.md)"))))
    response = create_model("Response", **outputs, guardrails=(dict[str, str], Field(
        default_factory=dict, description="each guardrail that fired and its action; empty when none did")),
        served=(dict[str, Any], Field(default_factory=dict, description=(
            "how the answer was served when not by the model alone: `cache` (exact/semantic), `degraded` (steps "
            "applied under load), `fallback` (the declared fallback answered); empty otherwise"))),
        request_id=(str, ...), version=(version, ...))
    return request, response, limit


def _desc(field) -> str:
    return (field.json_schema_extra or {}).get("desc", "") if hasattr(field, "json_schema_extra") else ""


Request, Response, MAX_INPUT_CHARS = _schemas()
ENDPOINT = "/" + SPEC.serve.endpoint.strip("/")
STREAM = ENDPOINT + "/stream"   # the same answer as server-sent events (framework/stream.py)
OUTPUT_TYPES = {name: field.annotation for name, field in Response.model_fields.items()
                if name not in ("request_id", "version", "guardrails", "served")}


def _closed(annotation) -> bool:
    """A value from a fixed set (a Literal, an Enum, a bool or a number): it cannot carry text from the ticket,
    so it may be streamed before the output guardrails judge the whole answer."""
    import enum
    import typing

    if typing.get_origin(annotation) is typing.Literal or annotation in (bool, int, float):
        return True
    return isinstance(annotation, type) and issubclass(annotation, enum.Enum)


CLOSED_FIELDS = frozenset(name for name, annotation in OUTPUT_TYPES.items() if _closed(annotation))


class FeedbackBody(bentoml.IODescriptor):
    """POST /feedback: a thumbs up/down (+1 / -1) or a 0..1 score on one answered request."""

    model_config = {"extra": "forbid"}
    request_id: str = Field(min_length=1, max_length=200)
    score: float = Field(ge=-1, le=1, description="+1 / -1, or 0..1 (below 0.5 counts as negative)")
    comment: str | None = Field(None, max_length=2000)
    correct_labels: dict[str, Any] | None = Field(None, description="what the answer should have been")

    @field_validator("score")
    @classmethod
    def _thumbs_or_unit(cls, value: float) -> float:
        if value < 0 and value != -1:
            raise ValueError("score is -1 / +1, or between 0 and 1")
        return value


TRACE_IDENTITY = {"project": CONFIG["project"], "channel": os.environ.get("SLIPWAY_CHANNEL") or None,
                  "bento": VERSION["bento"], "version": CONFIG["bento_version"],
                  "model_sha256": VERSION["model_sha256"], "program_hash": VERSION["program_hash"]}
TRACE_DIR = trace_dir_for_bento(CONFIG["project"])
TRACER = Tracer(SPEC.tracing, TRACE_DIR, TRACE_IDENTITY, MODEL)
REQUESTS = RequestIndex(TRACE_DIR)
HANDOFFS = HandoffWriter(TRACER)   # the human queue: one line per request handed to a person (framework/handoff.py)
# Callers: the project's live keys file (a revocation holds on the next request), checked against the
# signers.toml and project.toml this version was built with; budgets shared by every worker.
STATE_DIR = Path(os.environ.get("SLIPWAY_STATE_DIR") or TRACE_DIR.parent)
KEY_FILES = KeyFiles(STATE_DIR / KEYS_FILE, BENTO_DIR / "signers.toml", BENTO_DIR / "project.toml")
# Feature flags: the project's live flags file, judged by this version's signers.toml and project.toml; only
# variants this bento packs with the approved content can be chosen (framework/flags.py).
FLAG_FILES = FlagFiles(STATE_DIR / FLAGS_FILE, BENTO_DIR / "signers.toml", BENTO_DIR / "project.toml")
PACKED_VARIANTS = {(v["flag"], v["variant"]): v["content_hash"] for v in CONFIG.get("variants", [])}
CHANNEL = os.environ.get("SLIPWAY_CHANNEL") or None
_BUDGETS: list[Budgets] = []
_BUDGETS_LOCK = threading.Lock()


def budgets() -> Budgets:
    """The tenants' budgets file, opened on first use (never at import: `slipway build` imports this)."""
    with _BUDGETS_LOCK:
        if not _BUDGETS:
            _BUDGETS.append(Budgets(budgets_path(STATE_DIR), SPEC.tenants))
        return _BUDGETS[0]
logger = logging.getLogger("slipway.service")

# What /metrics carries: what the bento's slipway/alerts.yml queries (names and buckets: framework/alerts.py).
# Every series is labelled by version and tenant ("" when the request named none).
_latency = alerts.collector(
    "Histogram", name=alerts.REQUEST_SECONDS,
    documentation="End-to-end request latency (outcome: ok, error = 5xx, rejected = 4xx)",
    labelnames=["bento_version", "outcome", "tenant"], buckets=alerts.latency_buckets(SPEC.contract))
_request_tokens = alerts.collector(
    "Histogram", name=alerts.REQUEST_TOKENS, documentation="New prompt + generated tokens per answered request",
    labelnames=["bento_version", "tenant"], buckets=alerts.token_buckets(SPEC.contract))
_request_cost = alerts.collector(
    "Histogram", name=alerts.REQUEST_COST, documentation="Cost per answered or failed (5xx) request, from token prices",
    labelnames=["bento_version", "tenant"], buckets=alerts.cost_buckets(SPEC.contract))
_tokens = alerts.collector("Counter", name=alerts.TOKENS, documentation="Tokens processed",
                           labelnames=["bento_version", "direction", "tenant"])
_cost = alerts.collector("Counter", name=alerts.COST, documentation="Cost from token prices",
                         labelnames=["bento_version", "tenant"])
_errors = alerts.collector("Counter", name=alerts.ERRORS, documentation="Requests answered with an error",
                           labelnames=["bento_version", "status", "tenant"])


_shed = alerts.collector("Counter", name="slipway_requests_shed", documentation="Requests refused with 429 because "
                         "the worker's queue was full (serve.max_queue)", labelnames=["bento_version"])
_degraded = alerts.collector("Counter", name="slipway_requests_degraded", documentation="Requests answered with a "
                             "degradation step (serve.degrade)", labelnames=["bento_version", "step"])
_cache_lookups = alerts.collector("Counter", name="slipway_cache_lookups", documentation="Answer-cache lookups by "
                                  "result (exact, semantic, miss)", labelnames=["bento_version", "result"])
_fallbacks = alerts.collector("Counter", name="slipway_fallbacks", documentation="Failed model calls answered by the "
                              "declared [fallback]", labelnames=["bento_version", "action", "reason"])
_trace_errors = alerts.collector("Counter", name="slipway_trace_errors",
                                 documentation="Traces that could not be written", labelnames=["bento_version"])


def _trace(**fields: Any) -> dict | None:
    """Write the request's trace; a trace that cannot be written is logged and counted
    (`slipway_trace_errors_total`), and the caller still gets the answer. The trace folder is checked
    writable before the worker reports ready, so this is for the disk filling up, not a bad setting."""
    try:
        trace = TRACER.record(**fields)
    except Exception as exc:  # noqa: BLE001 - the answer must not be lost to its trace
        _trace_errors.labels(VERSION["bento"]).inc()
        logger.error("could not write the trace of request %s to %s: %s: %s", fields.get("request_id"),
                     TRACE_DIR, type(exc).__name__, exc)
        return None
    REQUESTS.add(trace)
    return trace


def _observe(status: int, t0: float, trace: dict | None, calls) -> None:
    """One answered request into the metrics, priced as `slipway check` prices it."""
    version, tenant = VERSION["bento"], (trace or {}).get("tenant") or ""
    new = sum(c.tokens_in_new for c in calls)
    cached = sum(c.tokens_in_cached for c in calls)
    generated = sum(c.tokens_out for c in calls)
    cost = trace["cost"] if trace else request_cost(MODEL, new, cached, generated) if calls else 0.0
    outcome = "ok" if status < 400 else "rejected" if status < 500 else "error"
    _tokens.labels(version, "input", tenant).inc(new)
    _tokens.labels(version, "input_cached", tenant).inc(cached)
    _tokens.labels(version, "output", tenant).inc(generated)
    _cost.labels(version, tenant).inc(cost)
    if outcome != "rejected":
        _request_cost.labels(version, tenant).observe(cost)
    if outcome == "ok":
        _request_tokens.labels(version, tenant).observe(new + generated)
    else:
        _errors.labels(version, str(status), tenant).inc()
    _latency.labels(version, outcome, tenant).observe(time.perf_counter() - t0)


class ErrorBody(BaseModel):
    error: str
    request_id: str
    version: dict[str, Any]
    guardrails: dict[str, str] | None = None


class NotReadyAnswers:
    """After a failed warm-up the worker stays up but not ready: /readyz and the API answer 503 saying why
    (BentoML's own /readyz only says that `__is_ready__` returned False), so `slipway serve` can give up on
    the version at once instead of waiting for `serve.startup_timeout_s`."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        reason = NOT_READY["reason"]
        if reason is None or scope["type"] != "http" or scope.get("path") not in ("/readyz", ENDPOINT, STREAM):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1") or uuid.uuid4().hex
        body = {"error": f"not ready: {reason}", "request_id": request_id, "version": VERSION, "ready": False}
        if scope.get("path") in (ENDPOINT, STREAM):   # a request refused by a version that cannot answer is an error
            t0 = time.perf_counter()
            trace = _trace(request_id=request_id, started_at=utc_now(), t0=t0, t_valid=None, t_end=t0, status=503,
                           error_code="not-ready", error=body["error"])
            _observe(503, t0, trace, ())
        payload = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"x-request-id", request_id.encode("latin-1"))]})
        await send({"type": "http.response.body", "body": payload})


class Shedding:
    """Bounded admission to the endpoint: past `serve.max_queue` requests waiting for the model, a newcomer is
    answered 429 with a Retry-After at once (traced, counted), before its body is read, instead of waiting
    until its deadline and failing with a 5xx. Runs inside the key check, so only callers with a valid key
    count. The admitted request's depth travels in its ASGI scope to `predict` (degradation steps)."""

    PATHS = (ENDPOINT, STREAM)

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") not in self.PATHS or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        admitted = ADMISSION.enter()
        if isinstance(admitted, Shed):
            t0, started_at = time.perf_counter(), utc_now()
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
            request_id = headers.get("x-request-id") or uuid.uuid4().hex
            caller = caller_of(headers, ENDPOINT)
            who = ({"caller": caller.key_id, "tenant": caller.tenant}
                   if caller is not None and not isinstance(caller, KeyRefusal) else {})
            trace = _trace(request_id=request_id, started_at=started_at, t0=t0, t_valid=None,
                           t_end=time.perf_counter(), status=429, error_code="overloaded", error=admitted.message,
                           served={"shed": {"depth": admitted.depth, "limit": admitted.limit}}, **who)
            _observe(429, t0, trace, ())
            _shed.labels(VERSION["bento"]).inc()
            return await _send_json(send, 429, {"error": admitted.message, "request_id": request_id,
                                                "version": VERSION, "retry_after": admitted.retry_after},
                                    [(b"retry-after", str(admitted.retry_after).encode()),
                                     (b"x-request-id", request_id.encode("latin-1"))])
        scope["slipway.admitted"] = admitted
        try:
            await self.app(scope, receive, send)
        finally:
            ADMISSION.leave()


def caller_of(headers, path: str):
    """The verified caller of `path` (`apikeys.Caller`), a `KeyRefusal`, or None when keys are off."""
    if SPEC.serve.auth != "api_key":
        return None
    return verify_key(KEY_FILES, bearer(headers.get("authorization")), path, CHANNEL)


class ApiKeys:
    """Every call to the endpoint and /feedback presents a tenant's API key (`Authorization: Bearer …`),
    checked before the body is read: no key or a bad one is 401, a key outside its scope 403, and
    nothing about the request is processed. /readyz, /livez and /metrics stay open (for probes)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or (path not in (ENDPOINT, STREAM, "/feedback") and not path.startswith("/traces/")):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        # streaming is the endpoint answered another way: the same key scope
        found = caller_of(headers, "traces" if path.startswith("/traces/") else ENDPOINT if path == STREAM else path)
        if not isinstance(found, KeyRefusal):
            return await self.app(scope, receive, send)
        t0, started_at = time.perf_counter(), utc_now()
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        if scope["path"] in (ENDPOINT, STREAM):
            trace = _trace(request_id=request_id, started_at=started_at, t0=t0, t_valid=None,
                           t_end=time.perf_counter(), status=found.status, error_code=found.code,
                           error=found.message, caller=found.key_id)
            _observe(found.status, t0, trace, ())
        payload = json.dumps({"error": found.message, "request_id": request_id, "version": VERSION}).encode()
        extra = [(b"www-authenticate", b'Bearer realm="slipway"')] if found.status == 401 else []
        await send({"type": "http.response.start", "status": found.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"x-request-id", request_id.encode("latin-1")), *extra]})
        await send({"type": "http.response.body", "body": payload})


class TraceReads:
    """GET /traces/<request_id>: the caller's own request, summarised from its trace: status, versions and flags,
    tokens, cost. Prompts, texts and guardrail decisions stay on the host (`slipway trace`). A request of
    another tenant answers 404, as an unknown one does, so its existence is not disclosed. Needs an API key
    allowed the route `traces` (a tenant's or key's `endpoints`; all routes when those are absent)."""

    PREFIX = "/traces/"

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope.get("path", "").startswith(self.PREFIX):
            return await self.app(scope, receive, send)
        if scope.get("method") != "GET":
            return await _send_json(send, 405, {"error": "GET /traces/<request_id>"}, [(b"allow", b"GET")])
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        caller = caller_of(headers, "traces")   # checked here too: middleware order is BentoML's to choose
        if isinstance(caller, KeyRefusal):
            extra = [(b"www-authenticate", b'Bearer realm="slipway"')] if caller.status == 401 else []
            return await _send_json(send, caller.status, caller.to_dict(), extra)
        request_id = scope["path"][len(self.PREFIX):]
        found = REQUESTS.lookup(request_id, caller.tenant if caller else None) if request_id else None
        if found is not None and caller is not None and found.get("tenant") != caller.tenant:
            found = None
        if found is None:
            return await _send_json(send, 404, {"error": f"no trace of request {request_id!r} for this caller",
                                                "request_id": request_id})
        await _send_json(send, 200, {"request_id": request_id, **found})


async def _send_json(send, status: int, body: dict, extra: list | None = None) -> None:
    payload = json.dumps(body, default=str).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *(extra or [])]})
    await send({"type": "http.response.body", "body": payload})


class ValidationErrorsAs422:
    """BentoML answers schema errors with 400; HTTP APIs (and FastAPI users) expect 422. Body unchanged.
    A refused request to the endpoint is traced too (error_code invalid-request, no inputs kept)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") not in (ENDPOINT, STREAM, "/feedback"):
            return await self.app(scope, receive, send)
        t0, started_at = time.perf_counter(), utc_now()
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1") or uuid.uuid4().hex

        async def send_422(message):
            if message["type"] == "http.response.start" and message["status"] == 400 and not any(
                    name.lower() == b"x-slipway-guardrail" for name, _ in message.get("headers", [])):
                message = {**message, "status": 422,
                           "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]}
                if scope.get("path") in (ENDPOINT, STREAM):
                    trace = _trace(request_id=request_id, started_at=started_at, t0=t0, t_valid=None,
                                   t_end=time.perf_counter(), status=422, error_code="invalid-request",
                                   error="the request does not match the endpoint's schema")
                    _observe(422, t0, trace, ())
            await send(message)

        await self.app(scope, receive, send_422)


# BentoML's own timeout is only a backstop; Slipway's deadline (serve.timeout_s, enforced in the engine
# at token boundaries; a prompt evaluation already under way finishes first, which on a loaded host can
# take seconds) fires first, so the caller gets a 503 naming the request, not a bare 504. BentoML
# runs a sync API on `threads` threads (default 1), so requests would queue inside BentoML where no
# deadline applies; one thread per admitted request makes them queue on the engine's lock instead.
# Slipway's own bound (`Shedding`, serve.max_queue) answers 429 with a Retry-After first; BentoML's max_concurrency
# (a bare 429) and its threads sit above it, with room for /feedback and /traces calls.
_THREADS = max(SPEC.serve.max_concurrency, ADMISSION.limit + 8)


@bentoml.service(name=CONFIG["service_name"], workers=SPEC.serve.workers, threads=_THREADS,
                 traffic={"timeout": SPEC.serve.timeout_s + 60, "max_concurrency": _THREADS * SPEC.serve.workers},
                 labels={k.replace("slipway.", "slipway-"): v for k, v in LABELS.items()})
class SlipwayService:
    if CONFIG["model_tag"] is not None:   # None: a remote model (framework/remote.py), nothing packed
        gguf = bentoml.models.BentoModel(CONFIG["model_tag"])

    def __init__(self) -> None:
        self.ready = False
        from framework import weights
        from framework.lm import json_adapter, make_lm

        if MODEL.remote is None:
            path = Path(self.gguf.path) / "model.gguf"
            weights.verify(MODEL, path, field=f"models.{CONFIG['model_key']}.sha256")
            self.lm = make_lm(MODEL, path)
            self.engine = load_engine(MODEL, path)
        else:   # the server must answer as the model the check measured: its fingerprint, probed now
            from framework.remote import make_remote_lm

            try:
                self.lm = make_remote_lm(MODEL, f"models.{CONFIG['model_key']}",
                                         toml=str(BENTO_DIR / "project.toml"))
            except SlipwayError as exc:   # stay up, unready, saying why (as a failed warm-up does)
                NOT_READY["reason"] = f"the remote model cannot be used ({exc.render()})"
                logger.error("%s is not ready: %s", VERSION["bento"], NOT_READY["reason"])
                return
            self.engine = self.lm.engine
        self.tiers = self._tiers() if CONFIG.get("tiers") else []
        self.cache = self._cache()
        self.program = _program()
        self.variants: dict = {}
        self.guards: dict = {}
        self.prompt_tokens: dict = {}
        self.adapter = json_adapter() if SPEC.pipeline.adapter == "json" else None
        import dspy

        from framework.guardrails import guard_for

        # the same checks, in the same order, as `slipway check` ran on the eval split
        self.guard = guard_for(SPEC.guardrails, self.program, engine=self.engine,
                               adapter=self.adapter or dspy.ChatAdapter(), model=MODEL)
        try:
            # flag variants: each with its own guard (its prompt's length sets its input-size limit, as in its
            # check) and its own worst case held against budgets
            self.variants = _variants()
            for key, (program, _) in self.variants.items():
                self.guards[key] = guard_for(SPEC.guardrails, program, engine=self.engine,
                                             adapter=self.adapter or dspy.ChatAdapter(), model=MODEL)
                self.prompt_tokens[key] = self.guards[key].prompt_tokens
            # the declared fallback answer must fit the program (and each variant) this bento serves
            for program in (self.program, *(p for p, _ in self.variants.values())):
                fallbacks.validate(SPEC.fallback, fallbacks.output_fields(program), path=BENTO_DIR / "project.toml",
                                   text=(BENTO_DIR / "project.toml").read_text())
            prefix = BENTO_DIR / "prefix.kv"
            if self.engine.batcher is not None and prefix.exists():
                # computed at build time on this exact model file (framework/build.py); refused otherwise.
                # The warm-up answer below then evaluates only its own few tokens, not the instructions.
                self.engine.load_prefix(prefix, MODEL.identity)
            self._warm_up()
            if SPEC.tracing.enabled or SPEC.fallback.action == "human":
                TRACE_DIR.mkdir(parents=True, exist_ok=True)
                if not os.access(TRACE_DIR, os.W_OK):
                    raise PermissionError(f"cannot write traces to {TRACE_DIR}: set SLIPWAY_TRACE_DIR to a "
                                          "writable folder (slipway serve sets it), or [tracing] enabled = false")
        except Exception as exc:  # noqa: BLE001 - stay up and say why: a crash-looping worker hides the reason
            from framework.lm import root_cause

            cause = root_cause(exc)
            detail = (cause.render() if isinstance(cause, SlipwayError)
                      else f"{type(cause).__name__}: {str(cause)[:300]}")
            NOT_READY["reason"] = f"the warm-up answer failed ({detail})"
            logger.error("%s is not ready: %s; /readyz and %s answer 503", VERSION["bento"], NOT_READY["reason"],
                         ENDPOINT)
            return
        self.ready = True

    def _cache(self):
        """`[cache]` (framework/cache.py): answers kept in this worker, per bento version, program and tenant;
        the semantic layer's embedding GGUF is packed by `slipway build` and verified here. None when off."""
        from framework.cache import AnswerCache, open_embedder

        spec = SPEC.cache
        if not (spec.exact or spec.semantic):
            return None
        embedder = None
        if spec.semantic:
            key = spec.embedding_model
            path = Path(bentoml.models.get(CONFIG["extra_models"][key]).path) / "model.gguf"
            embedder = open_embedder(spec, SPEC.models[key], path, field=f"models.{key}")
        return AnswerCache.from_spec(spec, embedder)

    def _tiers(self) -> list:
        """The bento's tiers, cheapest first (`[pipeline] tiers`): each GGUF packed as its own BentoML model by
        `slipway build`, verified against its pinned sha256 before it may answer; the last is the pipeline's."""
        from framework import weights
        from framework.lm import make_lm
        from framework.routing import Tier

        tiers = []
        for entry in CONFIG["tiers"]:
            spec = SPEC.models[entry["key"]]
            if entry["key"] == CONFIG["model_key"]:
                tiers.append(Tier(entry["key"], self.lm, spec))
                continue
            if spec.remote is not None:
                from framework.remote import make_remote_lm

                tiers.append(Tier(entry["key"], make_remote_lm(spec, f"models.{entry['key']}"), spec))
                continue
            path = Path(bentoml.models.get(entry["model_tag"]).path) / "model.gguf"
            weights.verify(spec, path, field=f"models.{entry['key']}.sha256")
            tiers.append(Tier(entry["key"], make_lm(spec, path), spec))
        return tiers

    def _warm_up(self) -> None:
        """One answer before /readyz says yes, which must succeed: it proves the model and program answer
        (a version that cannot answer must never take traffic), pages the weights in and fills llama.cpp's
        prompt cache with the instructions (measured: 3 s vs 0.6 s for the tiny model), so that cost does
        not land on the first real request after a start, a deploy or a rollback. With the bento's saved
        prefix state loaded first, the instructions are already there and this answer is short.
        Raises what the program raised."""
        import dspy

        from framework.lm import deadline
        from framework.notebook import warm_up_inputs

        inputs = warm_up_inputs(self.program)
        start = time.perf_counter()
        with deadline(SPEC.serve.startup_timeout_s), dspy.context(lm=self.lm, adapter=self.adapter):
            self.program(**inputs)
        ADMISSION.seconds_per_answer = time.perf_counter() - start   # Retry-After's first estimate
        if self.tiers:   # and routed: the cheap tier runs (it may escalate, as it will in traffic), the route answers
            from framework.routing import route

            with deadline(SPEC.serve.startup_timeout_s):
                route(self.program, inputs, self.tiers, ROUTING, guard=self.guard, outputs=tuple(OUTPUT_TYPES),
                      adapter=self.adapter).raise_if_exhausted()

    def __is_ready__(self) -> bool:
        return self.ready

    @bentoml.api(route=ENDPOINT, input_spec=Request)
    def predict(self, ctx: bentoml.Context, **inputs: Any) -> dict:
        return self._answer(ctx.request, ctx.response, inputs)

    @bentoml.api(route=STREAM, input_spec=Request)
    def stream(self, ctx: bentoml.Context, **inputs: Any):
        """The same answer as server-sent events: `field` events as closed-set values (categories, booleans,
        numbers) complete, then one `answer` event with the whole body (request id and versions included), or
        one `error` event. A request refused before the model runs gets its plain JSON error and status."""
        from framework.stream import start

        request = ctx.request
        return start(lambda reply, emit: self._answer(request, reply, inputs, emit=emit), ctx.response, CLOSED_FIELDS)

    def _answer(self, request, response, inputs: dict[str, Any], emit=None) -> dict:
        """One request through the stages, in order (docs/serve.md, "The request path"): caller and variant →
        size → input guardrails → budget → cache → model or tiers (degraded under load) → fallback on failure →
        output guardrails → cache put → trace. `response` takes the status and headers; `emit(name, value)`
        (streaming) is told closed-set values as the model completes them."""
        import dspy

        from framework.lm import deadline, metering, on_values, root_cause

        t0, started_at = time.perf_counter(), utc_now()
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        response.headers["X-Request-ID"] = request_id
        caller = caller_of(request.headers, ENDPOINT)   # the middleware refused bad keys; this names who
        if isinstance(caller, KeyRefusal):   # revoked between the middleware and here
            return self._error(response, caller.status, caller.code, request_id, caller.message, t0, started_at,
                               inputs=None, who={"caller": caller.key_id})
        who = {"caller": caller.key_id, "tenant": caller.tenant} if caller is not None else {}
        program, version, chosen, guard = self.program, VERSION, None, self.guard
        if PACKED_VARIANTS:
            assigned = self._assigned(caller, request.headers.get(SUBJECT_HEADER) or request_id)
            if assigned:
                chosen = next(iter(assigned.items()))
                program, variant_hash = self.variants[chosen]
                guard = self.guards[chosen]
                version = {**VERSION, "program_hash": variant_hash, "flags": assigned}
                who = {**who, "flags": assigned, "program_hash": variant_hash}
        size = sum(len(str(v)) for v in inputs.values())
        if size > MAX_INPUT_CHARS:
            return self._error(response, 413, "input-too-large", request_id, f"input is {size} characters; the "
                               f"contract allows {MAX_INPUT_CHARS} (contract.max_input_chars)", t0, started_at,
                               inputs=None, who=who, version=version)
        from framework.guardrails import decision_rows, fired

        checked = guard.check_input(inputs)
        decisions = list(checked.decisions)
        # what the model sees, and what the trace keeps: PII already redacted when a guardrail says so
        inputs = checked.values
        if checked.blocked is not None:
            blocked = checked.blocked
            response.headers["X-Slipway-Guardrail"] = blocked.check   # a declared refusal, not a bad body
            return self._error(response, blocked.status, blocked.code, request_id, blocked.message, t0, started_at,
                               inputs=inputs, decisions=decisions, who=who, version=version)
        held = None
        if caller is not None:
            held = budgets().reserve(caller.tenant, *self._worst_case(decisions, program, chosen))
            if not isinstance(held, Reservation):
                response.headers["Retry-After"] = str(held.retry_after)
                body = self._error(response, 429, held.to_dict()["error"], request_id, held.message, t0, started_at,
                                   inputs=inputs, decisions=decisions, who=who, version=version)
                return {**body, "limit": held.limit, "value": held.value, "used": held.used,
                        "retry_after": held.retry_after}
        t_valid = time.perf_counter()
        admitted = request.scope.get("slipway.admitted")   # its depth in the worker decides degradation
        steps = admitted.degraded if admitted is not None else ()
        served: dict[str, Any] = {"degraded": [str(step) for step in steps]} if steps else {}
        for step in steps:
            _degraded.labels(VERSION["bento"], str(step)).inc()
        scope = None
        if self.cache is not None:
            from framework.cache import Scope

            scope = Scope(version=CONFIG["bento_version"], program=version["program_hash"],
                          tenant=caller.tenant if caller is not None else "")
            hit = self.cache.get(scope, inputs, semantic=not any(
                step.kind == "skip" and step.value == "semantic_cache" for step in steps))
            _cache_lookups.labels(VERSION["bento"], hit.kind if hit else "miss").inc()
            if hit is not None:   # counted against the tenant's rate like any request, but no tokens
                self._settle(held, [], 0.0)
                served = {**served, "cache": {"kind": hit.kind, "similarity": round(hit.similarity, 4),
                                    "age_s": round(hit.age_s, 1), "request_id": hit.request_id}}
                outputs = hit.answer["outputs"]
                trace = _trace(request_id=request_id, started_at=started_at, t0=t0, t_valid=t_valid,
                               t_end=time.perf_counter(), status=200, inputs=inputs, outputs=outputs, calls=[],
                               decisions=decision_rows(decisions), served=served, cost=0.0, **who)
                _observe(200, t0, trace, [])
                return {**outputs, "guardrails": {**fired(decisions), **hit.answer["guardrails"]}, "served": served,
                        "request_id": request_id, "version": version}
        lm = self.lm
        for step in steps:
            if step.kind == "max_tokens":
                lm = lm.copy(max_tokens=min(int(step.value), MODEL.max_tokens))
        calls: list = []
        first: list[float] = []
        routed = None
        cost = None   # priced per tier when routed; else at the model's prices

        def told(name: str, text: str) -> None:
            if emit is not None and name in CLOSED_FIELDS:
                first.append(first[0] if first else time.perf_counter())
                emit(name, json.loads(text))

        try:
            if self.tiers:
                routed = self._route(program, inputs, guard, decisions, steps, told)
                calls, cost = routed.calls, routed.cost
                served["tier"] = routed.tier
                if routed.escalated:
                    served["escalations"] = [{"tier": e["tier"], "reason": e["reason"]}
                                             for e in routed.to_dict()["escalations"]]
                routed.raise_if_exhausted()
            else:
                with metering() as calls, deadline(SPEC.serve.timeout_s), \
                        dspy.context(lm=lm, adapter=self.adapter), on_values(told):
                    prediction = program(**inputs)
                outputs = {name: prediction.get(name) for name in OUTPUT_TYPES}
            ADMISSION.answered(sum(c.latency_ms for c in calls) / 1000)
        except Exception as exc:  # a request never kills the worker; the caller gets its id to report
            self._settle(held, calls, cost)
            cause = root_cause(exc)
            message = cause.render() if isinstance(cause, SlipwayError) else \
                f"model error: {type(exc).__name__}: {str(exc)[:1000]}"
            code = cause.code if isinstance(cause, SlipwayError) else "model-error"
            fallback = fallbacks.decide(SPEC.fallback, code)
            if fallback is not None and fallback.answers:
                return self._fallback(response, fallback, message, request_id, t0, started_at, inputs=inputs,
                                      t_valid=t_valid, calls=calls, decisions=decisions, who=who, version=version,
                                      served=served, cost=cost)
            body = self._error(response, 503, code, request_id, message, t0, started_at, inputs=inputs,
                               t_valid=t_valid, calls=calls, decisions=decisions, who=who, version=version,
                               cost=cost, served=served)
            return {**body, "served": {**served, "fallback": fallback.marker}} if fallback is not None else body
        self._settle(held, calls, cost)
        if routed is not None:   # the kept tier's answer went through the output guardrails inside `route`
            kept = routed.answer
            found, blocked, outputs = kept.decisions, kept.blocked, kept.output
        else:
            checked = guard.check_output(json.loads(json.dumps(outputs, default=str)), decisions)
            found, blocked, outputs = checked.decisions, checked.blocked, checked.values
        decisions += found
        if blocked is None and scope is not None and "degraded" not in served:   # a cut answer is not kept
            self.cache.put(scope, inputs, {"outputs": outputs, "guardrails": fired(found)}, request_id)
        if blocked is not None:
            response.headers["X-Slipway-Guardrail"] = blocked.check
            return self._error(response, blocked.status, blocked.code, request_id, blocked.message, t0, started_at,
                               inputs=inputs, t_valid=t_valid, calls=calls, decisions=decisions, who=who,
                               version=version, cost=cost, served=served)
        if first:
            served["first_field_ms"] = round((first[0] - t0) * 1000, 1)
        trace = _trace(request_id=request_id, started_at=started_at, t0=t0, t_valid=t_valid,
                       t_end=time.perf_counter(), status=200, inputs=inputs, outputs=outputs, calls=calls,
                       decisions=decision_rows(decisions), served=served, cost=cost, **who)
        _observe(200, t0, trace, calls)
        return {**outputs, "guardrails": fired(decisions), "served": served, "request_id": request_id,
                "version": version}

    def _route(self, program, inputs: dict, guard, decisions: list, steps, told):
        """The tiers, cheapest first (framework/routing.py): each tier's answer through the output guardrails,
        escalated when invalid, refused by a rule or below the confidence bar. Under load a `tier=<key>` step
        leaves that cheaper tier alone (no escalation: a failure goes to the fallback). A streamed request is
        told only the kept tier's values, after routing: an escalated tier's values were never the answer."""
        from framework.lm import deadline
        from framework.routing import Tier, route

        tiers = self.tiers
        for step in steps:
            if step.kind == "tier":
                tiers = [t for t in tiers if t.key == step.value][:1]
            if step.kind == "max_tokens":
                tiers = [Tier(t.key, t.lm.copy(max_tokens=min(int(step.value), t.model.max_tokens)), t.model)
                         for t in tiers]
        with deadline(SPEC.serve.timeout_s):
            routed = route(program, inputs, tiers, ROUTING, guard=guard, outputs=tuple(OUTPUT_TYPES),
                           adapter=self.adapter, earlier=decisions)
        if routed.outcome == "answered" and routed.answer.output is not None:
            for name in CLOSED_FIELDS & set(routed.answer.output):
                told(name, json.dumps(routed.answer.output[name]))
        return routed

    def _fallback(self, response, fallback, message: str, request_id: str, t0: float, started_at, *, inputs,
                  t_valid, calls, decisions, who, version, served, cost=None) -> dict:
        """Answer the declared fallback for a failed model call (framework/fallback.py). A person's queue entry is
        written before the answer leaves; when it cannot be written the caller gets the 503, never a promise of a
        person that nobody will keep. Traced with status 200 and the failure's error code."""
        from framework.guardrails import decision_rows, fired

        if fallback.handoff:
            try:
                HANDOFFS.write(request_id, fallback, error=message, inputs=inputs, **who)
            except Exception as exc:  # noqa: BLE001 - see the docstring
                logger.error("could not hand request %s to a person (%s: %s); answering 503", request_id,
                             type(exc).__name__, exc)
                return self._error(response, 503, fallback.code, request_id, message, t0, started_at, inputs=inputs,
                                   t_valid=t_valid, calls=calls, decisions=decisions, who=who, version=version,
                                   cost=cost, served=served)
        response.status_code = fallback.status
        response.headers[fallbacks.HEADER] = fallback.action
        served = {**served, "fallback": fallback.marker}
        trace = _trace(request_id=request_id, started_at=started_at, t0=t0, t_valid=t_valid, t_end=time.perf_counter(),
                       status=fallback.status, inputs=inputs, outputs=fallback.answer, calls=calls,
                       error_code=fallback.code, error=message, decisions=decision_rows(decisions), served=served,
                       cost=cost, **who)
        _observe(fallback.status, t0, trace, calls)
        _fallbacks.labels(VERSION["bento"], fallback.action, fallback.failure).inc()
        body = fallback.body(request_id=request_id, version=version, guardrails=fired(decisions))
        return {**body, "served": served}

    @staticmethod
    def _assigned(caller, subject: str) -> dict[str, str]:
        """The flag variant for this request, or {} (the pipeline). A flags file that cannot be read or judged
        (a hand-typed line of the wrong shape, a bad byte, a permission change) serves the pipeline, the
        version the build gate passed: failing closed, never a 500 for every tenant."""
        try:
            return assign(load_flags(FLAG_FILES), list(SPEC.flags), caller.tenant if caller else None, subject,
                          PACKED_VARIANTS)
        except Exception as exc:  # noqa: BLE001 - see the docstring
            logger.error("cannot judge the flags file %s (%s: %s); serving the pipeline", FLAG_FILES.flags,
                         type(exc).__name__, exc)
            return {}

    def _worst_case(self, decisions, program, chosen) -> tuple[int, float]:
        """What a request may spend at most, held against its tenant's budget before the model runs: every
        model call evaluating the whole prompt anew (no cache) and generating max_tokens."""
        size = next((d.detail.get("tokens", d.detail.get("at_most", 0)) for d in decisions
                     if d.check == "input_size"), 0)
        calls = max(1, len(program.predictors()))
        around = self.prompt_tokens[chosen] if chosen is not None else self.guard.prompt_tokens
        prompt = calls * (around + size)
        # routed: every tier may run (the prompt counted with the top tier's tokenizer, an estimate for the others)
        models = [tier.model for tier in self.tiers] or [MODEL]
        generated = [calls * model.max_tokens for model in models]
        return (len(models) * prompt + sum(generated),
                sum(request_cost(model, prompt, 0, out) for model, out in zip(models, generated, strict=True)))

    @staticmethod
    def _settle(held, calls, cost: float | None = None) -> None:
        """Charge what the request used (as tokens_per_request and cost count it) and free the rest."""
        if held is None:
            return
        new = sum(c.tokens_in_new for c in calls)
        cached = sum(c.tokens_in_cached for c in calls)
        generated = sum(c.tokens_out for c in calls)
        if cost is None:
            cost = request_cost(MODEL, new, cached, generated) if calls else 0.0
        budgets().settle(held, new + generated, cost)

    def _error(self, response, status: int, code: str, request_id: str, message: str, t0: float, started_at,
               *, inputs: dict | None, t_valid: float | None = None, calls=(), decisions=None, who=None,
               version: dict | None = None, cost: float | None = None, served: dict | None = None) -> dict:
        from framework.guardrails import decision_rows, fired

        response.status_code = status
        trace = _trace(request_id=request_id, started_at=started_at, t0=t0, t_valid=t_valid,
                       t_end=time.perf_counter(), status=status, inputs=inputs, calls=calls, error_code=code,
                       error=message, decisions=decision_rows(decisions or ()), cost=cost, served=served,
                       **(who or {}))
        _observe(status, t0, trace, calls)
        return ErrorBody(error=message, request_id=request_id, version=version or VERSION,
                         guardrails=fired(decisions or ()) if decisions is not None else None).model_dump()

    @bentoml.api(route="/feedback", input_spec=FeedbackBody)
    def feedback(self, ctx: bentoml.Context, **body: Any) -> dict:
        """Feedback on an answered request, attributed to the version that answered it (its trace).
        Unknown request_id: 404; the same body twice: recorded once; bad labels: 422."""
        request_id = body["request_id"]
        caller = caller_of(ctx.request.headers, "/feedback")
        if isinstance(caller, KeyRefusal):   # revoked between the middleware and here
            ctx.response.status_code = caller.status
            return {**caller.to_dict(), "request_id": request_id}
        problems = label_problems(body.get("correct_labels"))
        if problems:
            ctx.response.status_code = 422
            return {"error": "correct_labels: " + "; ".join(problems), "request_id": request_id}
        found = REQUESTS.lookup(request_id, caller.tenant if caller is not None else None)
        if found is not None and caller is not None and found.get("tenant") != caller.tenant:
            found = None   # another tenant's request: answered as unknown, so its existence is not disclosed
        if found is None:
            ctx.response.status_code = 404
            return {"error": f"no trace of request {request_id!r}: feedback must name the X-Request-ID (or "
                             "request_id) of a request this service answered", "request_id": request_id}
        fid = feedback_id(request_id, body["score"], body.get("comment"), body.get("correct_labels"))
        duplicate = REQUESTS.seen_feedback(fid)
        if not duplicate:
            redactions: dict[str, int] = {}
            TRACER.feedback_writer.append({
                "feedback_id": fid, "request_id": request_id, "trace_id": found["trace_id"],
                "bento": found["bento"], "version": found["version"], "score": body["score"],
                "negative": is_negative(body["score"]),
                "comment": TRACER.redactor.text(body["comment"], redactions) if body.get("comment") else None,
                "correct_labels": TRACER.redactor.value(body.get("correct_labels"), redactions),
                "received_at": iso(utc_now())})
            REQUESTS.feedback[fid] = None
        return {"feedback_id": fid, "request_id": request_id, "bento": found["bento"], "duplicate": duplicate}


def label_problems(labels: dict | None) -> list[str]:
    """Why `correct_labels` do not fit the program's output fields (empty when they do)."""
    from pydantic import TypeAdapter, ValidationError

    problems = []
    for name, value in (labels or {}).items():
        if name not in OUTPUT_TYPES:
            problems.append(f"{name!r} is not an output field ({', '.join(OUTPUT_TYPES)})")
            continue
        try:
            TypeAdapter(OUTPUT_TYPES[name]).validate_python(value)
        except ValidationError as exc:
            problems.append(f"{name}: {exc.errors()[0]['msg']}")
    return problems


SlipwayService.add_asgi_middleware(TraceReads)
SlipwayService.add_asgi_middleware(ValidationErrorsAs422)
SlipwayService.add_asgi_middleware(NotReadyAnswers)
SlipwayService.add_asgi_middleware(ApiKeys)
SlipwayService.add_asgi_middleware(Shedding)
