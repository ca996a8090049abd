"""Server-sent events of one answer (framework/stream.py), driven by a named fake answer function: no model,
no server. tests/e2e/test_controls_served.py streams from a real served bento."""

from __future__ import annotations

import asyncio
import json
import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from framework.stream import Reply, event, start


class FakeResponse:
    def __init__(self) -> None:
        self.status_code = 200
        self.headers: dict[str, str] = {}


def events_of(streaming) -> list[tuple[str, dict]]:
    async def collect():
        return "".join([chunk async for chunk in streaming.body_iterator])

    body = asyncio.run(collect())
    found = []
    for block in body.strip().split("\n\n"):
        lines = block.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        found.append((lines[0][7:], json.loads(lines[1][6:])))
    return found


def fake_answer(values: list[tuple[str, object]], body: dict, status: int = 200, gate: threading.Event | None = None):
    """FakeAnswer: tells `values` one by one (waiting on `gate` after the first, so the stream starts before the
    answer exists), then returns `body` with `status`."""
    def answer(reply: Reply, emit):
        reply.headers["X-Request-ID"] = "r-1"
        for i, (name, value) in enumerate(values):
            emit(name, value)
            if i == 0 and gate is not None:
                gate.wait(5)
        reply.status_code = status
        return body
    return answer


def test_values_stream_before_the_answer_and_only_closed_set_fields():
    gate = threading.Event()
    response = FakeResponse()
    streaming = start(fake_answer([("category", "billing"), ("reason", "free text"), ("priority", "high")],
                                  {"category": "billing", "reason": "free text", "request_id": "r-1"}, gate=gate),
                      response, frozenset({"category", "priority", "needs_human"}))
    assert streaming.media_type == "text/event-stream" and streaming.headers["x-request-id"] == "r-1"
    gate.set()
    got = events_of(streaming)
    assert [kind for kind, _ in got] == ["field", "field", "answer"]
    assert got[0][1] == {"name": "category", "value": "billing", "provisional": True}
    assert got[1][1]["name"] == "priority" and got[-1][1]["reason"] == "free text"


def test_a_request_refused_before_any_value_gets_its_status_and_json_body():
    response = FakeResponse()
    body = start(fake_answer([], {"error": "The ticket is empty"}, status=400), response, frozenset({"category"}))
    assert body == {"error": "The ticket is empty"} and response.status_code == 400
    assert response.headers["X-Request-ID"] == "r-1"


def test_a_failure_after_values_were_sent_ends_with_an_error_event_carrying_the_status():
    streaming = start(fake_answer([("category", "bug")], {"error": "model error", "request_id": "r-1"}, status=503),
                      FakeResponse(), frozenset({"category"}))
    got = events_of(streaming)
    assert got[-1] == ("error", {"status": 503, "error": "model error", "request_id": "r-1"})


def test_an_exception_in_the_answer_still_ends_the_stream():
    def broken(reply, emit):
        emit("category", "bug")
        raise RuntimeError("boom")

    got = events_of(start(broken, FakeResponse(), frozenset({"category"})))
    assert got[-1][0] == "error" and got[-1][1]["status"] == 500 and "boom" not in json.dumps(got)


@settings(max_examples=200)
@given(st.text())
def test_a_value_can_never_end_its_event_or_forge_another(text):
    rendered = event("field", {"name": "category", "value": text})
    assert rendered.count("\n\n") == 1 and rendered.endswith("\n\n")
    head, data = rendered[:-2].split("\n")
    assert head == "event: field" and json.loads(data.removeprefix("data: "))["value"] == text
