"""Trace records → OpenTelemetry spans: a file for any OTLP tool, or live to a collector.

A served request's trace (framework/traces.py) becomes one span tree built by the OpenTelemetry SDK:
a SERVER root span for the request, a child per stage (validation, program, model_call_N, parse) and,
under each model_call_N stage, a `chat <model>` span carrying the GenAI semantic conventions (tokens,
finish reasons, prompt and output messages as recorded, i.e. already redacted). The OTLP trace id *is*
the trace's `trace_id` and span ids are derived from it, so a trace exported twice, or sent live and
exported later, is the same trace in Jaeger, Phoenix or Langfuse, and `slipway trace <id>` finds
what a trace viewer shows.

`export_otlp` writes the OTLP/JSON file format the OpenTelemetry Collector's file exporter writes: one
`ExportTraceServiceRequest` per line, ids in hex, enums as integers. `LiveExporter` is the `[tracing]
otlp_endpoint` sink: spans go to a `BatchSpanProcessor` that posts http/protobuf from its own thread, so
a slow or absent collector never delays or fails a request (the SDK drops spans when its queue is full
and logs export errors).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import hashlib
import json
import logging
import random
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from opentelemetry import trace as trace_api
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai
from opentelemetry.semconv.attributes import error_attributes, http_attributes, service_attributes
from opentelemetry.trace import SpanKind, Status, StatusCode

logger = logging.getLogger("slipway.otlp")

# The GenAI conventions have no enumerated value for llama.cpp; provider names are open-ended.
PROVIDER = "llama.cpp"
SCOPE = "slipway"
ROOT_SPAN = "slipway.request"
TRACES_PER_LINE = 100        # traces per ExportTraceServiceRequest line of an OTLP/JSON file
_HEX_IDS = ("traceId", "spanId", "parentSpanId")
_TRACE_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_EPOCH = datetime(1970, 1, 1)


def otlp_trace_id(trace_id: str) -> int:
    """The 128-bit OTLP trace id of a Slipway trace: its `trace_id` read as hex (uuid4().hex, as the
    tracer writes it); anything else (not 32 hex digits, or all zeros) is hashed to 128 bits."""
    text = str(trace_id).lower()
    if _TRACE_ID_RE.match(text) and int(text, 16):
        return int(text, 16)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:16], "big") or 1


class TraceIds(IdGenerator):
    """Ids for the trace being built on this thread: its own trace id, and span ids hashed from it and
    the span's position (root, then stages, then model calls), so the same trace always gets the same
    ids. Outside `building()` (no trace set) it hands out random ids, as the SDK's default does."""

    def __init__(self) -> None:
        self._local = threading.local()

    @contextlib.contextmanager
    def building(self, trace_id: str) -> Iterator[None]:
        self._local.trace = (otlp_trace_id(trace_id), str(trace_id))
        self._local.spans = 0
        try:
            yield
        finally:
            self._local.trace = None

    def generate_trace_id(self) -> int:
        current = getattr(self._local, "trace", None)
        return current[0] if current else random.getrandbits(128)

    def generate_span_id(self) -> int:
        current = getattr(self._local, "trace", None)
        if not current:
            return random.getrandbits(64) or 1
        self._local.spans += 1
        digest = hashlib.sha256(f"{current[1]}/{self._local.spans}".encode()).digest()
        return int.from_bytes(digest[:8], "big") or 1


class _Collected(SpanExporter):
    """Keeps finished spans until `take()`: export_otlp writes them out a line at a time."""

    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS

    def take(self) -> list[ReadableSpan]:
        spans, self.spans = self.spans, []
        return spans


def _resource(trace: Mapping[str, Any]) -> Resource:
    """What is constant for one worker of one served version: the service is the project, its version
    the bento's, the instance the worker (host-pid; else the SDK would make up a random one per export)."""
    attributes = {service_attributes.SERVICE_NAME: trace.get("project") or "slipway",
                  service_attributes.SERVICE_VERSION: trace.get("version") or "unknown",
                  "service.namespace": "slipway", "service.instance.id": trace.get("worker") or "unknown",
                  "slipway.bento": trace.get("bento"),
                  "slipway.model_sha256": trace.get("model_sha256"),
                  "slipway.program_hash": trace.get("program_hash")}
    return Resource.create({k: v for k, v in attributes.items() if v is not None})


class SpanBuilder:
    """Turns trace dicts into SDK spans handed to `processor`; one TracerProvider per served version and
    worker (the resource), all sharing the processor and the deterministic ids."""

    def __init__(self, processor: SpanProcessor):
        self.processor = processor
        self.ids = TraceIds()
        self._tracers: dict[tuple, trace_api.Tracer] = {}
        self._lock = threading.Lock()

    def _tracer(self, trace: Mapping[str, Any]) -> trace_api.Tracer:
        key = tuple(trace.get(k) for k in ("project", "version", "bento", "model_sha256", "program_hash", "worker"))
        with self._lock:
            if key not in self._tracers:
                # Sampling is Slipway's decision (every answered request is traced), not OTEL_TRACES_SAMPLER's.
                provider = TracerProvider(resource=_resource(trace), id_generator=self.ids, sampler=ALWAYS_ON,
                                          shutdown_on_exit=False)
                provider.add_span_processor(self.processor)
                self._tracers[key] = provider.get_tracer(SCOPE)
            return self._tracers[key]

    def add(self, trace: Mapping[str, Any], model_name: str | None = None) -> int:
        """Emit the spans of one trace; returns how many."""
        tracer = self._tracer(trace)
        base = _start_ns(trace["started_at"])
        at = lambda ms: base + round(float(ms or 0) * 1_000_000)  # noqa: E731 - offsets from started_at
        status = int(trace.get("status") or 0)
        model = model_name or trace.get("model") or f"gguf-{str(trace.get('model_sha256') or '')[:12]}"
        with self.ids.building(trace["trace_id"]):
            root = tracer.start_span(ROOT_SPAN, kind=SpanKind.SERVER, start_time=base,
                                     attributes=_root_attributes(trace))
            if status >= 500:
                root.set_status(Status(StatusCode.ERROR, trace.get("error") or trace.get("error_code") or None))
            root_context = trace_api.set_span_in_context(root)
            count = 1
            stage_contexts = {}
            for stage in trace.get("stages") or []:
                span = tracer.start_span(stage["name"], context=root_context, kind=SpanKind.INTERNAL,
                                         start_time=at(stage.get("start_ms")),
                                         attributes=_clean({"slipway.stage": stage["name"],
                                                            "slipway.waited_ms": stage.get("waited_ms")}))
                span.end(end_time=at(float(stage.get("start_ms") or 0) + float(stage.get("duration_ms") or 0)))
                stage_contexts[stage["name"]] = trace_api.set_span_in_context(span)
                count += 1
            for call in trace.get("calls") or []:
                index = call.get("index", 0)
                begin = float(call.get("start_ms") or 0) + float(call.get("waited_ms") or 0)
                span = tracer.start_span(f"chat {model}", kind=SpanKind.INTERNAL, start_time=at(begin),
                                         context=stage_contexts.get(f"model_call_{index}", root_context),
                                         attributes=_call_attributes(call, model))
                if call.get("format_problems"):
                    span.set_status(Status(StatusCode.ERROR, "; ".join(map(str, call["format_problems"]))[:500]))
                span.end(end_time=at(begin + float(call.get("latency_ms") or 0)))
                count += 1
            root.end(end_time=at(trace.get("duration_ms")))
        return count


def _start_ns(started_at: str | datetime) -> int:
    """Nanoseconds since the epoch of a trace's `started_at` (ISO text, naive UTC; or the store's datetime)."""
    moment = datetime.fromisoformat(started_at) if isinstance(started_at, str) else started_at
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return (moment - _EPOCH) // timedelta(microseconds=1) * 1000


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """OTLP attributes are str/bool/int/float (or lists of them): drop empties, JSON-encode the rest."""
    out = {}
    for key, value in attributes.items():
        if value is None or value == "" or value == [] or value == {}:
            continue
        if isinstance(value, (str, bool, int, float)):
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            out[key] = list(value)
        else:
            out[key] = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    return out


def _root_attributes(trace: Mapping[str, Any]) -> dict[str, Any]:
    status = int(trace.get("status") or 0)
    return _clean({
        http_attributes.HTTP_REQUEST_METHOD: "POST",
        http_attributes.HTTP_RESPONSE_STATUS_CODE: status,
        # server spans set error.type for 5xx only: a 4xx is the caller's mistake, not the service's failure
        error_attributes.ERROR_TYPE: (trace.get("error_code") or str(status)) if status >= 500 else None,
        "slipway.trace_id": trace.get("trace_id"), "slipway.request_id": trace.get("request_id"),
        "slipway.project": trace.get("project"), "slipway.channel": trace.get("channel"),
        "slipway.bento": trace.get("bento"), "slipway.version": trace.get("version"),
        "slipway.model_sha256": trace.get("model_sha256"), "slipway.program_hash": trace.get("program_hash"),
        "slipway.caller": trace.get("caller"), "slipway.tenant": trace.get("tenant"),
        "slipway.error_code": trace.get("error_code"), "slipway.error": trace.get("error"),
        "slipway.tokens_in_new": trace.get("tokens_in_new"), "slipway.tokens_in_cached": trace.get("tokens_in_cached"),
        "slipway.tokens_out": trace.get("tokens_out"), "slipway.cost": trace.get("cost"),
        "slipway.model_calls": len(trace.get("calls") or []),
        "slipway.inputs": trace.get("inputs"), "slipway.outputs": trace.get("outputs"),
        "slipway.decisions": trace.get("decisions"), "slipway.redactions": trace.get("redactions"),
        "slipway.worker": trace.get("worker"), "slipway.flags": trace.get("flags") or None,
    })


def _parts(content: Any) -> list[dict[str, Any]]:
    """A chat message's content as GenAI `parts` (text parts; anything else as its JSON text)."""
    if isinstance(content, str):
        return [{"type": "text", "content": content}]
    if isinstance(content, list):
        return [{"type": "text", "content": item["text"]} if isinstance(item, dict) and "text" in item
                else {"type": "text", "content": json.dumps(item, default=str)} for item in content]
    return [{"type": "text", "content": json.dumps(content, default=str)}]


def _call_attributes(call: Mapping[str, Any], model: str) -> dict[str, Any]:
    """One model call under the GenAI semantic conventions (chat operation; an INTERNAL span, as they say
    for a model running in the same process)."""
    new, cached = int(call.get("tokens_in_new") or 0), int(call.get("tokens_in_cached") or 0)
    finish = call.get("finish_reason")
    inputs = ([{"role": m.get("role", "user"), "parts": _parts(m.get("content"))} for m in call["messages"]]
              if call.get("messages") else None)
    outputs = ([{"role": "assistant", "parts": _parts(call["output"]), "finish_reason": finish or "stop"}]
               if call.get("output") is not None else None)
    return _clean({
        gen_ai.GEN_AI_OPERATION_NAME: gen_ai.GenAiOperationNameValues.CHAT.value,
        gen_ai.GEN_AI_PROVIDER_NAME: PROVIDER,
        gen_ai.GEN_AI_SYSTEM: PROVIDER,     # the name before gen_ai.provider.name; older backends read it
        gen_ai.GEN_AI_REQUEST_MODEL: model,
        gen_ai.GEN_AI_RESPONSE_MODEL: model,
        # input_tokens includes the prompt prefix llama.cpp reused from its KV cache, reported apart
        gen_ai.GEN_AI_USAGE_INPUT_TOKENS: new + cached,
        gen_ai.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: cached,
        gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS: int(call.get("tokens_out") or 0),
        gen_ai.GEN_AI_RESPONSE_FINISH_REASONS: [finish] if finish else None,
        gen_ai.GEN_AI_INPUT_MESSAGES: inputs,
        gen_ai.GEN_AI_OUTPUT_MESSAGES: outputs,
        "slipway.call_index": call.get("index"), "slipway.waited_ms": call.get("waited_ms"),
        "slipway.latency_ms": call.get("latency_ms"), "slipway.format_problems": call.get("format_problems"),
    })


def _hex_ids(value: Any, encode: bool) -> Any:
    """Protobuf's JSON mapping writes bytes as base64; OTLP/JSON writes trace and span ids as hex."""
    if isinstance(value, dict):
        return {k: ((base64.b64decode(v).hex() if encode else base64.b64encode(bytes.fromhex(v)).decode())
                    if k in _HEX_IDS and isinstance(v, str) else _hex_ids(v, encode)) for k, v in value.items()}
    if isinstance(value, list):
        return [_hex_ids(v, encode) for v in value]
    return value


def _line(spans: list[ReadableSpan]) -> str:
    from google.protobuf import json_format
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    body = json_format.MessageToDict(encode_spans(spans), use_integers_for_enums=True)
    return json.dumps(_hex_ids(body, encode=True), ensure_ascii=False, separators=(",", ":")) + "\n"


def export_otlp(traces: Iterable[Mapping[str, Any]], path: Path, *,
                model_names: Mapping[str, str] | None = None) -> int:
    """Write `traces` (trace dicts, as `Store.traces()` returns them) to `path` as OTLP/JSON lines; returns
    the number of spans written. `model_names` maps a model's sha256 to the name its `chat <model>` spans
    and `gen_ai.request.model` carry, e.g. `{m.sha256: m.name for m in project.spec.models.values()}`;
    a model not named is called `gguf-<sha256 prefix>`."""
    names = dict(model_names or {})
    collected = _Collected()
    processor = SimpleSpanProcessor(collected)
    builder = SpanBuilder(processor)
    written = 0
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        pending = 0
        for trace in traces:
            builder.add(trace, names.get(trace.get("model_sha256") or ""))
            pending += 1
            if pending == TRACES_PER_LINE:
                spans = collected.take()
                out.write(_line(spans))
                written, pending = written + len(spans), 0
        spans = collected.take()
        if spans:
            out.write(_line(spans))
            written += len(spans)
    processor.shutdown()
    return written


def read_otlp(path: Path) -> list[Any]:
    """The `ExportTraceServiceRequest`s of an OTLP/JSON file (one per line), as the Collector reads them."""
    from google.protobuf import json_format
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    requests = []
    # split on "\n" only: str.splitlines() would also cut at U+2028 and the like, which JSON text may hold raw
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            requests.append(json_format.ParseDict(_hex_ids(json.loads(line), encode=False),
                                                  ExportTraceServiceRequest()))
        except (ValueError, json_format.ParseError) as exc:
            raise ValueError(f"{path}:{number}: not an OTLP/JSON ExportTraceServiceRequest ({exc})") from None
    return requests


class LiveExporter:
    """The `[tracing] otlp_endpoint` sink: `send(trace)` queues the trace's spans for a background thread
    that posts them as http/protobuf to `endpoint` (e.g. http://127.0.0.1:4318/v1/traces). Headers (a
    Langfuse key, say) come from OTEL_EXPORTER_OTLP_TRACES_HEADERS / OTEL_EXPORTER_OTLP_HEADERS.

    `send` never raises and never waits on the network: a full queue drops spans, a failed post is
    logged by the SDK's exporter, and whatever else goes wrong is logged here. The request is answered
    and its trace is in its segment file either way; `slipway traces export` can send it again."""

    def __init__(self, endpoint: str, identity: Mapping[str, Any], *, model_name: str | None = None,
                 timeout_s: float = 5.0):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.endpoint = endpoint
        self.identity = dict(identity)
        self.model_name = model_name
        self.processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, timeout=timeout_s))
        self.builder = SpanBuilder(self.processor)
        atexit.register(self.shutdown)   # flush what is queued when the worker stops

    def send(self, trace: Mapping[str, Any]) -> None:
        try:
            self.builder.add(trace, self.model_name)
        except Exception:  # noqa: BLE001 - tracing must never fail the request it describes
            logger.warning("could not export trace %s to %s", trace.get("trace_id"), self.endpoint, exc_info=True)

    def force_flush(self, timeout_ms: int = 30000) -> bool:
        """Post everything queued now; True when it went out in time."""
        return self.processor.force_flush(timeout_ms)

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self.processor.shutdown()
