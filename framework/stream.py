"""Server-sent events for one answer: values as the model completes them, then the whole answer.

The request runs on its own thread through exactly the stages `POST /<endpoint>` runs (the service's
`_answer`); this module only carries what that thread reports to the client as SSE. Until the first value
arrives nothing is sent, so a request refused before the model runs (bad key, guardrail, budget, overload)
still gets its ordinary status and JSON body; once values flow, the status is 200 and the last event says how
it ended:

    event: field    data: {"name": "category", "value": "billing", "provisional": true}
    event: answer   data: {<the response body: outputs, guardrails, served, request_id, version>}
    event: error    data: {"status": 503, "error": ..., "request_id": ..., "version": ...}

Only closed-set values (an enum, a boolean, a number) are streamed early: they cannot carry text from the
ticket, so nothing reaches the client before the output guardrails that they could have stopped. They are
*provisional*: business rules and the program's own code may still change them; the `answer` event is the
answer. Free-text values arrive in the `answer` event.
"""

from __future__ import annotations

import contextvars
import json
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any


class Reply:
    """Status and headers of a streamed request, kept apart from the HTTP response until it is known whether
    the answer streams (status 200) or is refused with its own status."""

    def __init__(self) -> None:
        self.status_code = 200
        self.headers: dict[str, str] = {}


def event(kind: str, data: dict[str, Any]) -> str:
    """One SSE event. JSON never holds a raw newline, so a value cannot end the event or forge another."""
    return f"event: {kind}\ndata: {json.dumps(data, default=str, ensure_ascii=False)}\n\n"


def start(answer: Callable[[Reply, Callable[[str, Any], None]], dict], response, fields: frozenset[str]):
    """Run `answer(reply, emit)` on a thread; return the plain body (refused before any value) or a streaming
    response of its events. `response` is the framework's response, given the status and headers."""
    from starlette.responses import StreamingResponse

    events: queue.Queue = queue.Queue()
    reply = Reply()

    def emit(name: str, value: Any) -> None:
        if name in fields:
            events.put(("field", {"name": name, "value": value, "provisional": True}))

    def run() -> None:
        try:
            body = answer(reply, emit)
        except BaseException as exc:  # noqa: BLE001 - the client must get an end event, never a hung stream
            reply.status_code = 500
            body = {"error": f"internal error: {type(exc).__name__}", "request_id": reply.headers.get("X-Request-ID")}
        events.put(("done", body))

    # the request's context (BentoML's request variables, OpenTelemetry's span) goes with it to the thread
    threading.Thread(target=contextvars.copy_context().run, args=(run,), name="slipway-stream", daemon=True).start()
    first = events.get()
    if first[0] == "done" and reply.status_code != 200:
        response.status_code = reply.status_code
        response.headers.update(reply.headers)
        return first[1]
    headers = {**reply.headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(_events(first, events, reply), media_type="text/event-stream", headers=headers)


async def _events(first, events: queue.Queue, reply: Reply) -> AsyncIterator[str]:
    import anyio

    item = first
    while True:
        kind, data = item
        if kind == "field":
            yield event("field", data)
        else:
            ok = reply.status_code == 200
            yield event("answer" if ok else "error", data if ok else {"status": reply.status_code, **data})
            return
        item = await anyio.to_thread.run_sync(events.get)
