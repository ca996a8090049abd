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
from tests.test_release import project  # noqa: F401 - the fixture the canary controller tests build on


class FakeUpstream:
    """A keep-alive HTTP/1.1 server answering its own name; `/slow` holds the answer for 1 s; `failing`
    answers every POST with a 503 (a canary that breaks)."""

    def __init__(self, name: str, *, failing: bool = False) -> None:
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
                self.send_response(503 if failing else 201)
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


# -- canary routing (framework/rollout.py decides the weight; the proxy applies it per request) -------------


def _canary(blue_green, weight: int, *, sticky: str = "none") -> Upstreams:
    upstreams = Upstreams()
    upstreams.live, upstreams.canary = blue_green[0].port, blue_green[1].port
    upstreams.weight, upstreams.sticky, upstreams.salt = weight, sticky, "rollout-test"
    return upstreams


def test_the_canary_gets_its_declared_share_within_a_binomial_interval(blue_green):
    """600 requests at 20%: the canary's count must fall in the central 99.9% of Binomial(600, 0.2), i.e.
    [94, 148]; a proxy that routed per connection (this client keeps one) would send all or none."""
    from scipy.stats import binom

    upstreams = _canary(blue_green, 20)
    with running_proxy(upstreams) as (base, _, _), httpx.Client(base_url=base, timeout=10) as client:
        names = [client.get("/").text for _ in range(600)]
    low, high = binom.interval(0.999, 600, 0.20)
    assert low <= names.count("green") <= high, names.count("green")
    assert names.count("blue") + names.count("green") == 600
    assert upstreams.sent == {"canary": names.count("green"), "stable": names.count("blue")}


def test_weight_zero_or_no_canary_sends_everything_to_stable(blue_green):
    upstreams = _canary(blue_green, 0)
    with running_proxy(upstreams) as (base, _, _), httpx.Client(base_url=base, timeout=10) as client:
        names = [client.get("/").text for _ in range(50)]
        upstreams.weight, upstreams.canary = 100, None
        names += [client.get("/").text for _ in range(50)]
    assert set(names) == {"blue"}


def test_a_sticky_caller_sees_one_version_and_stays_on_the_canary_as_it_widens(blue_green):
    upstreams = _canary(blue_green, 30, sticky="caller")
    callers = [f"Bearer sk-slipway-caller-{i}" for i in range(60)]
    with running_proxy(upstreams) as (base, _, _), httpx.Client(base_url=base, timeout=10) as client:
        def seen() -> dict[str, set[str]]:
            return {c: {client.get("/", headers={"Authorization": c}).text for _ in range(4)} for c in callers}

        at_30 = seen()
        upstreams.weight = 60
        at_60 = seen()
    assert all(len(v) == 1 for v in (*at_30.values(), *at_60.values()))   # one caller, one version
    on_canary_30 = {c for c, v in at_30.items() if v == {"green"}}
    on_canary_60 = {c for c, v in at_60.items() if v == {"green"}}
    assert on_canary_30 <= on_canary_60 and 0 < len(on_canary_30) < len(on_canary_60) < 60


def test_a_sticky_header_keys_the_draw_and_requests_without_it_are_drawn_alone(blue_green):
    upstreams = _canary(blue_green, 50, sticky="header:X-User")
    with running_proxy(upstreams) as (base, _, _), httpx.Client(base_url=base, timeout=10) as client:
        users = {u: {client.get("/", headers={"X-User": u}).text for _ in range(5)} for u in "abcdefghij"}
        anonymous = {client.get("/").text for _ in range(40)}
    assert all(len(v) == 1 for v in users.values())
    assert anonymous == {"blue", "green"}   # P(all 40 one way at 50%) = 2 * 0.5**40


def test_a_failed_canary_answer_is_retried_on_stable_so_the_caller_never_sees_it():
    blue, broken = FakeUpstream("blue"), FakeUpstream("green", failing=True)
    try:
        upstreams = _canary((blue, broken), 100)
        with running_proxy(upstreams) as (base, _, _), httpx.Client(base_url=base, timeout=10) as client:
            retried = client.post("/triage", content=b"x")
            upstreams.retry_on_stable = False
            bare = client.post("/triage", content=b"x")
    finally:
        blue.close()
        broken.close()
    assert retried.status_code == 201 and retried.text == "blue:x" and retried.headers["x-slipway-retried"] == "canary"
    assert bare.status_code == 503 and bare.text == "green:x"
    assert upstreams.sent == {"canary": 2, "retried": 1}


def test_a_canary_that_does_not_answer_at_all_is_retried_on_stable(blue_green):
    upstreams = _canary(blue_green, 100)
    with socket.socket() as sock:      # a port nobody listens on: the canary's server died
        sock.bind(("127.0.0.1", 0))
        upstreams.canary = sock.getsockname()[1]
    with running_proxy(upstreams) as (base, _, _), httpx.Client(base_url=base, timeout=10) as client:
        answer = client.post("/triage", content=b"y")
    assert answer.status_code == 201 and answer.text == "blue:y"


# -- the front's canary controller (CanaryFront) on the real store, signatures and analysis --------------------
# Fake here: the versions' servers (FakeProcess on a made-up port) and the bentos (tests/test_release.py's
# FakeBento). tests/e2e/test_canary_served.py runs the same on real bentos of the tiny model.


class FakeProcess:
    """Stands in for a version's `bentoml serve` process."""

    def __init__(self) -> None:
        self.returncode = None

    def poll(self):
        return self.returncode

    def terminate(self) -> None:
        self.returncode = 0

    def wait(self, timeout=None) -> int:
        return 0

    def kill(self) -> None:
        self.returncode = -9


@pytest.fixture
def canary_setup(project, keys):  # noqa: F811 - the fixture imported from tests/test_release.py
    from framework import release
    from framework.spec import ReleaseSpec
    from tests.test_release import build

    for version, content in (("v1", "c1"), ("v2", "c2")):
        build(project, keys, version, content)
        release.approve(project, version, key=keys["bob"])
    release.deploy(project, "v1", "prod", key=keys["carol"])
    quick = project.spec.model_copy(update={"release": ReleaseSpec(steps=[10, 50, 100], min_requests=5,
                                                                   min_seconds=0)})
    return project.model_copy(update={"spec": quick})


def _front(proj, key, log):
    from framework.serve import CanaryFront

    upstreams = Upstreams()
    upstreams.live = 1111
    started: list[str] = []

    async def start(version):
        started.append(version)
        return FakeProcess(), 2222

    return CanaryFront(proj, "prod", upstreams, start=start, key=key, echo=log.append), upstreams, started


def _served(proj, version: str, latencies: list[float]) -> None:
    import uuid

    from framework.traces import SegmentWriter, iso, utc_now

    writer = SegmentWriter(proj.trace_dir, "traces", fsync="never")
    for ms in latencies:
        writer.append({"trace_id": uuid.uuid4().hex, "request_id": uuid.uuid4().hex, "started_at": iso(utc_now()),
                       "duration_ms": ms, "status": 200, "channel": "prod", "version": version,
                       "bento": f"ticket-triage:{version}", "tokens_in_new": 50, "tokens_out": 20, "cost": 0.0})
    writer.close()


def test_the_front_promotes_a_healthy_canary_step_by_step_and_completes_with_a_signed_deploy(canary_setup, keys):
    from framework import release, rollout

    proj = canary_setup
    rollout.start(proj, "v2", "prod", key=keys["carol"])
    log: list[str] = []
    front, upstreams, started = _front(proj, keys["carol"], log)
    asyncio.run(front.follow("v1"))
    assert started == ["v2"] and (upstreams.canary, upstreams.weight) == (2222, 10)
    asyncio.run(front.judge())
    assert upstreams.weight == 10, log             # no canary traffic yet: it waits
    for weight in (50, 100):
        _served(proj, "v1", [900 + i for i in range(30)])
        _served(proj, "v2", [905 + i for i in range(8)])
        time.sleep(0.01)
        asyncio.run(front.judge())
        if weight < 100:
            assert upstreams.weight == weight, log
    assert release.channel_version(proj, "prod") == "v2"
    assert front.promoted and rollout.latest(proj, "prod").state == rollout.COMPLETED
    version, process, port = front.take()
    assert (version, port) == ("v2", 2222) and process.poll() is None   # its warm server becomes the live one
    assert upstreams.canary is None and upstreams.weight == 0


def test_the_front_rolls_a_slow_canary_back_and_records_the_evidence_and_timings(canary_setup, keys):
    from framework import release, rollout

    proj = canary_setup
    rollout.start(proj, "v2", "prod", key=keys["carol"])
    log: list[str] = []
    front, upstreams, _ = _front(proj, keys["carol"], log)
    asyncio.run(front.follow("v1"))
    process = front.process
    _served(proj, "v1", [900 + i for i in range(30)])
    _served(proj, "v2", [3900 + i for i in range(8)])
    time.sleep(0.01)
    asyncio.run(front.judge())
    assert upstreams.weight == 0 and upstreams.canary is None and process.poll() == 0, log
    assert release.channel_version(proj, "prod") == "v1"
    incident = rollout.incidents(proj, "prod")[-1]
    assert incident["by"] == "carol" and "regression latency" in incident["reason"] and incident["weight"] == 10
    assert incident["detect_s"] >= 0 and incident["recover_s"] >= 0 and incident["breach_to_recovered_s"] >= \
        incident["detect_s"]
    details = rollout.latest(proj, "prod").events[-1]["details"]
    assert details["analysis"]["canary"]["latency_p50_ms"] > 3000 and details["analysis"]["stable"]["requests"] == 30


def test_a_front_whose_key_cannot_sign_gives_the_canary_nothing(canary_setup, keys):
    from framework import rollout

    rollout.start(canary_setup, "v2", "prod", key=keys["carol"])
    log: list[str] = []
    front, upstreams, started = _front(canary_setup, keys["dave"], log)   # rollback:prod only
    asyncio.run(front.follow("v1"))
    assert started == [] and upstreams.weight == 0 and upstreams.canary is None
    assert any("cannot sign its decisions" in line and "deploy:prod" in line for line in log), log


def test_a_person_stopping_the_canary_takes_its_traffic_away_at_the_next_poll(canary_setup, keys):
    from framework import rollout

    rollout.start(canary_setup, "v2", "prod", key=keys["carol"])
    front, upstreams, _ = _front(canary_setup, keys["carol"], [])
    asyncio.run(front.follow("v1"))
    process = front.process
    assert upstreams.weight == 10
    rollout.stop(canary_setup, "prod", key=keys["dave"], reason="customer complaints")
    asyncio.run(front.follow("v1"))
    assert upstreams.weight == 0 and upstreams.canary is None and process.poll() == 0
    assert "customer complaints" in rollout.incidents(canary_setup, "prod")[-1]["reason"]


def test_a_canary_that_never_becomes_ready_is_rolled_back_having_served_nothing(canary_setup, keys):
    from framework import rollout

    rollout.start(canary_setup, "v2", "prod", key=keys["carol"])
    front, upstreams, _ = _front(canary_setup, keys["carol"], [])

    async def broken(version):
        return "the server exited with 1"

    front.start = broken
    asyncio.run(front.follow("v1"))
    assert upstreams.weight == 0 and upstreams.canary is None
    assert "never became ready" in rollout.incidents(canary_setup, "prod")[-1]["reason"]
