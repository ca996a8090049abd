"""Traces as OpenTelemetry spans (framework/otlp.py): the OTLP/JSON file, read back with the OTLP protobuf
classes, and live export to a collector: a small HTTP server on 127.0.0.1 that parses what it is posted."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from framework.evaluate import store_path
from framework.otlp import LiveExporter, export_otlp, otlp_trace_id, read_otlp
from framework.spec import TracingSpec, load_project
from framework.store import Store
from framework.traces import Tracer, ingest, utc_now
from tests.test_traces import IDENTITY, FakeCall, answer


@pytest.fixture
def project(project_root):
    return load_project(str(project_root / "projects" / "ticket-triage"))


def two_calls(tracer: Tracer, request_id: str, status: int = 200):
    """A request whose program called the model twice (a retry after a format problem, say)."""
    t0 = time.perf_counter()
    calls = [FakeCall(messages=[{"role": "system", "content": "Triage."}, {"role": "user", "content": "hi"}],
                      started=t0 + 0.001, format_problems=["missing field priority"], finish_reason="length"),
             FakeCall(messages=[{"role": "user", "content": "again"}], started=t0 + 0.05, tokens_in_cached=0)]
    return tracer.record(request_id=request_id, started_at=utc_now(), t0=t0, t_valid=t0 + 0.0005, t_end=t0 + 0.2,
                         status=status, inputs={"ticket": "hi"}, outputs={"category": "billing"}, calls=calls,
                         tenant="acme", caller="ci", error_code="model-timeout" if status >= 500 else None,
                         error="the model ran past serve.timeout_s" if status >= 500 else None)


def spans_of(requests: list[ExportTraceServiceRequest]) -> list[tuple[dict, Span]]:
    """(resource attributes, span) for every span of every request."""
    out = []
    for request in requests:
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                out += [(resource, span) for span in scope_spans.spans]
    return out


def attributes(span: Span) -> dict:
    values = {}
    for item in span.attributes:
        kind = item.value.WhichOneof("value")
        value = getattr(item.value, kind)
        values[item.key] = list(v.string_value for v in value.values) if kind == "array_value" else value
    return values


@pytest.fixture
def stored(project):
    """Five traces in the store: answered ones, a 503 after two model calls, a 413 that never reached the model."""
    tracer = Tracer(TracingSpec(), project.trace_dir, IDENTITY, project.model())
    answer(tracer, "ok-1")
    answer(tracer, "ok-2")
    two_calls(tracer, "retried")
    two_calls(tracer, "failed", status=503)
    answer(tracer, "too-big", status=413)
    ingest(project)
    with Store(store_path(project), read_only=True) as store:
        return store.traces(limit=None)


def test_the_otlp_file_round_trips_with_one_span_tree_per_trace(project, stored, tmp_path):
    path = tmp_path / "traces.otlp.jsonl"
    written = export_otlp(stored, path, model_names={IDENTITY["model_sha256"]: project.model().name})
    expected = sum(1 + len(t["stages"]) + len(t["calls"]) for t in stored)
    assert written == expected

    requests = read_otlp(path)
    spans = spans_of(requests)
    assert len(spans) == expected
    by_trace: dict[str, list[Span]] = {}
    for resource, span in spans:
        assert resource["service.name"] == "ticket-triage" and resource["service.version"] == "v1"
        by_trace.setdefault(span.trace_id.hex(), []).append(span)
    assert set(by_trace) == {t["trace_id"] for t in stored}   # the OTLP trace id is the trace's own

    for trace in stored:
        tree = by_trace[trace["trace_id"]]
        roots = [s for s in tree if not s.parent_span_id]
        assert len(roots) == 1
        root = roots[0]
        assert root.kind == Span.SPAN_KIND_SERVER and root.name == "slipway.request"
        info = attributes(root)
        assert info["http.response.status_code"] == trace["status"]
        assert info["slipway.request_id"] == trace["request_id"] and info["slipway.bento"] == "ticket-triage:v1"
        duration_ns = root.end_time_unix_nano - root.start_time_unix_nano
        assert abs(duration_ns - trace["duration_ms"] * 1e6) < 1000
        stages = {s.name: s for s in tree if s.parent_span_id == root.span_id}
        assert set(stages) == {stage["name"] for stage in trace["stages"]}
        chats = [s for s in tree if s.name.startswith("chat ")]
        assert len(chats) == len(trace["calls"])
        for i, chat in enumerate(sorted(chats, key=lambda s: s.start_time_unix_nano)):
            assert chat.parent_span_id == stages[f"model_call_{i}"].span_id   # the call sits in its stage
            assert chat.start_time_unix_nano >= stages[f"model_call_{i}"].start_time_unix_nano
        if trace["status"] >= 500:
            assert root.status.code == Status.STATUS_CODE_ERROR and info["error.type"] == trace["error_code"]
        else:
            assert root.status.code == Status.STATUS_CODE_UNSET and "error.type" not in info
    too_big = next(t for t in stored if t["request_id"] == "too-big")
    assert len(by_trace[too_big["trace_id"]]) == 1 + len(too_big["stages"]) and not too_big["calls"]


def test_model_calls_carry_the_genai_attributes(project, stored, tmp_path):
    path = tmp_path / "traces.otlp.jsonl"
    export_otlp(stored, path, model_names={IDENTITY["model_sha256"]: project.model().name})
    retried = next(t for t in stored if t["request_id"] == "retried")
    chats = sorted((s for _, s in spans_of(read_otlp(path))
                    if s.trace_id.hex() == retried["trace_id"] and s.name.startswith("chat ")),
                   key=lambda s: s.start_time_unix_nano)
    first, second = (attributes(s) for s in chats)
    assert chats[0].name == f"chat {project.model().name}"
    assert first["gen_ai.operation.name"] == "chat" and first["gen_ai.provider.name"] == "llama.cpp"
    assert first["gen_ai.system"] == "llama.cpp" and first["gen_ai.request.model"] == project.model().name
    assert (first["gen_ai.usage.input_tokens"], first["gen_ai.usage.cache_read.input_tokens"],
            first["gen_ai.usage.output_tokens"]) == (630, 600, 12)
    assert second["gen_ai.usage.input_tokens"] == 30 and second["gen_ai.usage.cache_read.input_tokens"] == 0
    assert first["gen_ai.response.finish_reasons"] == ["length"]
    assert json.loads(first["gen_ai.input.messages"]) == [
        {"role": "system", "parts": [{"type": "text", "content": "Triage."}]},
        {"role": "user", "parts": [{"type": "text", "content": "hi"}]}]
    assert json.loads(first["gen_ai.output.messages"]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": '{"category": "billing"}'}],
         "finish_reason": "length"}]
    assert chats[0].status.code == Status.STATUS_CODE_ERROR   # the format problem is on the call
    assert chats[1].status.code == Status.STATUS_CODE_UNSET


def test_the_file_is_otlp_json_with_hex_ids_and_the_same_on_every_export(stored, tmp_path):
    """The Collector's file format: a JSON object per line, ids in hex (not protobuf's base64), enums as
    numbers; exporting the same traces twice writes the same spans (deterministic span ids)."""
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    export_otlp(stored, one)
    export_otlp(list(reversed(stored)), two)
    line = json.loads(one.read_text().splitlines()[0])
    span = line["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert span["traceId"] in {t["trace_id"] for t in stored} and len(span["spanId"]) == 16
    assert isinstance(span["kind"], int)

    def ids(path):
        return sorted((s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name)
                      for _, s in spans_of(read_otlp(path)))

    assert ids(one) == ids(two)
    unnamed = next(s for _, s in spans_of(read_otlp(one)) if s.name.startswith("chat "))
    assert unnamed.name == f"chat gguf-{IDENTITY['model_sha256'][:12]}"   # no model name given


def test_traces_straight_from_the_tracer_export_too(project, tmp_path):
    """Trace dicts as the tracer returns them (started_at as ISO text), no store involved."""
    tracer = Tracer(TracingSpec(), project.trace_dir, IDENTITY, project.model())
    traces = [answer(tracer, f"req-{i}") for i in range(3)]
    assert export_otlp(traces, tmp_path / "t.jsonl") == sum(1 + len(t["stages"]) + len(t["calls"]) for t in traces)
    assert export_otlp([], tmp_path / "none.jsonl") == 0 and read_otlp(tmp_path / "none.jsonl") == []


def test_a_trace_id_that_is_not_hex_still_gets_a_stable_otlp_id():
    assert otlp_trace_id("0123456789abcdef0123456789ABCDEF") == 0x0123456789abcdef0123456789abcdef
    assert otlp_trace_id("cut") == otlp_trace_id("cut") != otlp_trace_id("cut2")
    assert otlp_trace_id("0" * 32) != 0


stage_names = st.sampled_from(["validation", "program", "parse"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(calls=st.integers(min_value=0, max_value=4), extra=st.lists(stage_names, max_size=3),
       status=st.sampled_from([200, 413, 422, 500, 503]),
       started=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2200, 1, 1)),
       duration=st.floats(min_value=0, max_value=1e6, allow_nan=False),
       text=st.text(max_size=30), tenant=st.one_of(st.none(), st.text(max_size=10)))
def test_any_trace_shape_gives_one_root_and_a_child_per_stage_and_call(tmp_path, calls, extra, status, started,
                                                                        duration, text, tenant):
    trace = {"trace_id": "ab" * 16, "request_id": text or "r", "started_at": started.isoformat(),
             "duration_ms": duration, "status": status, "tenant": tenant, "inputs": {"ticket": text},
             "stages": [{"name": n, "start_ms": 1.0, "duration_ms": 2.0} for n in extra]
             + [{"name": f"model_call_{i}", "start_ms": 3.0 + i, "duration_ms": 1.0, "waited_ms": 0.1}
                for i in range(calls)],
             "calls": [{"index": i, "start_ms": 3.0 + i, "latency_ms": 0.5, "waited_ms": 0.1, "tokens_in_new": 1,
                        "tokens_in_cached": 0, "tokens_out": 1, "finish_reason": None,
                        "messages": [{"role": "user", "content": text}], "output": text} for i in range(calls)]}
    path = tmp_path / "p.jsonl"
    assert export_otlp([trace], path) == 1 + len(extra) + 2 * calls
    spans = [s for _, s in spans_of(read_otlp(path))]
    root = next(s for s in spans if not s.parent_span_id)
    assert sum(1 for s in spans if s.parent_span_id == root.span_id) == len(extra) + calls
    assert root.end_time_unix_nano >= root.start_time_unix_nano
    assert (root.status.code == Status.STATUS_CODE_ERROR) == (status >= 500)


class Collector:
    """An OTLP/HTTP receiver on 127.0.0.1: keeps every ExportTraceServiceRequest posted to /v1/traces."""

    def __init__(self):
        self.requests: list[ExportTraceServiceRequest] = []
        self.content_types: list[str] = []
        received = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.content_types.append(self.headers["Content-Type"])
                received.requests.append(ExportTraceServiceRequest.FromString(body))
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_live_export_posts_protobuf_spans_to_the_collector(project):
    with Collector() as collector:
        tracer = Tracer(TracingSpec(otlp_endpoint=collector.url), project.trace_dir, IDENTITY, project.model())
        first = answer(tracer, "live-1")
        second = two_calls(tracer, "live-2", status=503)
        exporter = tracer.sinks[0]
        assert isinstance(exporter, LiveExporter)
        assert exporter.force_flush(10000)
        exporter.shutdown()
    assert collector.content_types and set(collector.content_types) == {"application/x-protobuf"}
    spans = spans_of(collector.requests)
    assert {s.trace_id.hex() for _, s in spans} == {first["trace_id"], second["trace_id"]}
    assert len(spans) == sum(1 + len(t["stages"]) + len(t["calls"]) for t in (first, second))
    chat = next(s for _, s in spans if s.name.startswith("chat "))
    assert chat.name == f"chat {project.model().name}"   # the tracer names the model it serves
    root = next(s for _, s in spans if not s.parent_span_id and s.trace_id.hex() == second["trace_id"])
    assert root.status.code == Status.STATUS_CODE_ERROR and attributes(root)["slipway.tenant"] == "acme"


def test_live_export_never_fails_or_holds_up_a_request(project, caplog):
    """No collector listening, and a trace the exporter cannot read: send() returns at once, raises nothing."""
    exporter = LiveExporter("http://127.0.0.1:9/v1/traces", IDENTITY, timeout_s=0.5)
    tracer = Tracer(TracingSpec(), project.trace_dir, IDENTITY, project.model())
    began = time.perf_counter()
    exporter.send(answer(tracer, "nobody-listens"))
    exporter.send({"trace_id": "x", "request_id": "broken"})   # no started_at
    assert time.perf_counter() - began < 0.5
    assert "could not export trace x" in caplog.text
    exporter.force_flush(3000)   # the failed post is logged by the SDK, not raised
    exporter.shutdown()
