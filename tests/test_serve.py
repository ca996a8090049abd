"""The `serve --channel` proxy on its own: fake upstreams (plain HTTP servers on 127.0.0.1), the real
uvicorn + httpx proxy. The real path (bentos, a rollback) is in tests/e2e/test_release_flow.py."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from framework.serve import Upstreams, proxy_app, proxy_server


class FakeUpstream:
    """A keep-alive HTTP/1.1 server answering its own name; `/slow` holds the answer for 1 s."""

    def __init__(self, name: str) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path == "/slow":
                    time.sleep(1)
                body = name.encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802
                data = self.rfile.read(int(self.headers["content-length"]))
                body = name.encode() + b":" + data
                self.send_response(201)
                self.send_header("content-length", str(len(body)))
                self.send_header("x-request-id", self.headers.get("x-request-id", ""))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def running_proxy(upstreams: Upstreams, *, idle_timeout_s: float = 5, max_connections: int = 16):
    """The proxy on a free port in a background event loop; yields (base URL, uvicorn server, loop)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = proxy_app(upstreams, timeout_s=10, read_timeout_s=idle_timeout_s)
    server = proxy_server(app, host="127.0.0.1", port=port, idle_timeout_s=idle_timeout_s,
                          max_connections=max_connections, graceful_s=5)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(),), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "proxy did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", server, loop
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def blue_green():
    blue, green = FakeUpstream("blue"), FakeUpstream("green")
    yield blue, green
    blue.close()
    green.close()


def test_no_live_version_is_a_clean_503():
    with running_proxy(Upstreams()) as (base, _, _):
        answer = httpx.get(f"{base}/readyz", timeout=5)
    assert answer.status_code == 503 and "no version" in answer.json()["error"]


def test_requests_headers_and_bodies_pass_through(blue_green):
    upstreams = Upstreams()
    upstreams.live = blue_green[0].port
    with running_proxy(upstreams) as (base, _, _):
        answer = httpx.post(f"{base}/triage?x=1", content=b'{"ticket": "hi"}', headers={"X-Request-ID": "r-1"},
                            timeout=5)
    assert answer.status_code == 201 and answer.content == b'blue:{"ticket": "hi"}'
    assert answer.headers["x-request-id"] == "r-1"


def test_keep_alive_client_follows_a_switch_without_a_failed_request(blue_green):
    """One connection, kept alive across the switch: each request goes to the version live when it
    arrives; the request in flight on the old server is answered, and the drain waits for it."""
    blue, green = blue_green
    upstreams = Upstreams()
    upstreams.live = blue.port
    with running_proxy(upstreams) as (base, server, loop), httpx.Client(base_url=base, timeout=10) as client:
        before = [client.get("/").text for _ in range(3)]
        with httpx.Client(base_url=base, timeout=10) as other:
            slow = threading.Thread(target=lambda: seen.append(other.get("/slow")))
            seen: list[httpx.Response] = []
            slow.start()
            time.sleep(0.3)  # the slow request is in flight on blue
            upstreams.live = green.port
            drained = asyncio.run_coroutine_threadsafe(upstreams.drained(blue.port, 5), loop)
            after = [client.get("/").text for _ in range(3)]
            assert drained.result(timeout=5) is True
            slow.join()
        deadline = time.monotonic() + 5
        while len(server.server_state.connections) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)  # the other client's connection is gone once the proxy sees it closed
        assert len(server.server_state.connections) == 1  # the keep-alive client's one connection
    assert before == ["blue"] * 3 and after == ["green"] * 3
    assert seen[0].status_code == 200 and seen[0].text == "blue"


def test_a_connection_over_the_cap_is_refused_cleanly(blue_green):
    upstreams = Upstreams()
    upstreams.live = blue_green[0].port
    with running_proxy(upstreams, max_connections=2) as (base, _, _):
        first, second, third = (httpx.Client(base_url=base, timeout=5) for _ in range(3))
        assert first.get("/").status_code == 200 and second.get("/").status_code == 200  # both kept alive
        refused = third.get("/")
        assert refused.status_code == 503 and refused.headers.get("connection") == "close"
        first.close()
        time.sleep(0.2)
        assert third.get("/").status_code == 200  # room again once a connection closed
        second.close()
        third.close()


def test_idle_connections_are_closed_after_the_idle_timeout(blue_green):
    upstreams = Upstreams()
    upstreams.live = blue_green[0].port
    with running_proxy(upstreams, idle_timeout_s=1) as (base, _, _):
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as kept_alive, \
                socket.create_connection(("127.0.0.1", port), timeout=5) as silent, \
                socket.create_connection(("127.0.0.1", port), timeout=5) as half:
            kept_alive.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(b"blue"):  # the whole answer (head and body may come apart)
                chunk = kept_alive.recv(4096)
                assert chunk, answer
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200")
            half.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n")  # a request head that never ends
            start = time.monotonic()
            for sock in (kept_alive, silent, half):
                assert sock.recv(4096) == b""  # closed by the proxy
            assert time.monotonic() - start < 4
