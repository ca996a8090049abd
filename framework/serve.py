"""`slipway serve`: pick the bento to serve, run `bentoml serve` on it, and trust it only once it is ready.

Serving is BentoML's own server, started as `bentoml serve <tag>` against the repository's store, so
what runs here is exactly what `bentoml serve` or a container built from the same bento would run. A
version is live only after its /readyz says yes, which the service says only after a successful
warm-up answer; one that fails its warm-up, exits, or passes `[serve] startup_timeout_s` is stopped.
With `--channel`, an HTTP reverse proxy (uvicorn + httpx) holds the public port and sends each request
to the version that is live when the request arrives (docs/serve.md says why this and not nginx or a
TCP relay).
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from framework.bentos import use_bentoml_home
from framework.errors import NotReady, ReleaseRefused, SpecError
from framework.flags import bucket
from framework.spec import Project, load_project

# Hop-by-hop headers (RFC 9110 7.6.1) belong to one connection and are not forwarded by a proxy.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
                        b"upgrade", b"host", b"content-length"})
MAX_BODY_BYTES = 1 << 20  # requests carry one ticket (contract.max_input_chars); anything larger is refused


def resolve_tag(target: str) -> tuple[str, str]:
    """(project name, bento tag) for `project` (newest build) or `project:version`."""
    from framework import bentos

    name, _, version = target.partition(":")
    project = load_project(name)
    return project.name, str(bentos.get(project, version or None).tag)


def pick_tag(target: str, echo: Callable[[str], None] = print) -> tuple[Project, str]:
    """The bento plain `slipway serve` runs, honouring the release gate.

    When the project requires approvals (`[contract] approvals_required >= 1`), `<project>` alone
    serves what the prod channel points to, never the newest (possibly unapproved) build, and is
    refused when nothing is deployed; an explicit `<project>:<version>` is served with a warning
    when that version is neither deployed nor approved. Without approvals the newest build is served.
    """
    from framework import release
    from framework.evaluate import store_path
    from framework.store import Store

    name, _, version = target.partition(":")
    project = load_project(name)
    if project.spec.contract.approvals_required < 1:
        return project, resolve_tag(target)[1]
    deployed = {channel: row["version"] for channel, row in release.status(project).items()
                if row and row["verified"]}
    if not version:
        if "prod" not in deployed:
            raise ReleaseRefused(f"{project.name} requires {project.spec.contract.approvals_required} approval(s) "
                                 "and has nothing deployed to prod; refusing to serve its newest build, which may "
                                 "not be approved", path=str(project.toml_path), field="contract.approvals_required",
                                 hint=f"serve an explicit version: `slipway serve {project.name}:<version>`, or "
                                      f"deploy one: `slipway deploy {project.name}:<version> --channel prod`")
        tag = resolve_tag(f"{project.name}:{release.channel_version(project, 'prod')}")[1]  # re-verifies the gate
        echo(f"serving {tag}: what the prod channel points to ({project.name} requires approvals; pass "
             f"{project.name}:<version> to serve another build)")
        return project, tag
    tag = resolve_tag(target)[1]
    where = [channel for channel, v in deployed.items() if v == version]
    if store_path(project).exists():
        with Store(store_path(project), read_only=True) as store:
            missing = release.readiness(project, store, version).missing
    else:
        missing = ["no store: nothing checked or approved here"]
    if not where and missing:
        echo(f"warning: {tag} is not deployed to any channel and is not approved ({'; '.join(missing)})")
    elif not where:
        echo(f"warning: {tag} is approved but not deployed to any channel")
    return project, tag


def serve_command(tag: str, *, host: str, port: int) -> list[str]:
    return [str(Path(sys.executable).parent / "bentoml"), "serve", tag, "--host", host, "--port", str(port)]


def serve_env(project: Project, workers: int | None, channel: str | None = None) -> dict[str, str]:
    """The environment `bentoml serve` runs in: workers trace into the project's folder
    (framework/traces.py) and know which channel they serve, for their traces."""
    # Bytecode goes to a private folder: a .pyc planted beside the bento's verified sources is never read.
    prefix = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slipway" / "pycache"
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "PYTHONPYCACHEPREFIX": str(prefix),
           "SLIPWAY_TRACE_DIR": str(project.trace_dir.resolve()),
           # API keys (read live, so a revocation holds at once) and tenants' budgets across workers
           "SLIPWAY_STATE_DIR": str(project.state_dir.resolve())}
    env.pop("SLIPWAY_CHANNEL", None)
    if channel:
        env["SLIPWAY_CHANNEL"] = channel
    service_name = project.name.replace("-", "_")
    if workers:
        env["BENTOML_CONFIG_OPTIONS"] = f"services.{service_name}.workers={workers}"
    # llama.cpp's CPU backend waits for its threads with OpenMP, spinning by default. When the workers'
    # threads outnumber the cores, a spinning thread holds the core another worker needs, and decode
    # steps slowed 10-100x on 2 cores (bench/engine.py's notes). Passive waits then, unless set already.
    model = project.model(project.spec.pipeline.model)
    threads = model.threads or os.cpu_count() or 1
    # Following a channel, a deploy or rollback starts the next version beside the live one: for that
    # overlap the two versions' threads share the cores (a rollback test saw a 45 s request there).
    overlap = 2 if channel else 1
    if overlap * (workers or project.spec.serve.workers) * threads > (os.cpu_count() or 1):
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def serve(target: str, *, host: str, port: int, workers: int | None,
          echo: Callable[[str], None] = print) -> int:
    """Run `bentoml serve` on the picked bento until it exits; raise `NotReady` when it does not become
    ready within `[serve] startup_timeout_s` (it is stopped first). SIGTERM/SIGINT are passed on to
    BentoML, which drains in-flight requests and stops its workers; the exit status is BentoML's."""
    import signal
    import subprocess

    from framework import bentos

    project, tag = pick_tag(target, echo)
    use_bentoml_home(project)
    # Refuse before starting a bento with an edited file. Who built it is the deploy gate's question: an
    # explicit version by an unlisted key is served with pick_tag's warning, a channel only through the gate.
    bentos.verify(Path(bentos.get(project, tag.partition(":")[2]).path), tag)
    spec = project.spec.serve
    echo(f"serving {tag} on http://{host}:{port} (BENTOML_HOME={os.environ['BENTOML_HOME']})")
    process = subprocess.Popen(serve_command(tag, host=host, port=port),
                               env=serve_env(project, workers), start_new_session=True)
    stopping: list[int] = []

    def forward(signum, _frame) -> None:
        stopping.append(signum)
        process.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        probe_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        deadline = time.monotonic() + spec.startup_timeout_s
        while not stopping:
            state = _probe(process, probe_host, port)
            if state == "ready":
                echo(f"{tag} is ready")
                break
            if state != "starting" or time.monotonic() > deadline:
                reason = state if state != "starting" else f"not ready after {spec.startup_timeout_s} s"
                _terminate(process, 10)
                raise NotReady(f"{tag} did not become ready: {reason}; stopped it", path=str(project.toml_path),
                               field="serve.startup_timeout_s" if state == "starting" else None,
                               hint="see the server log above; a failed warm-up names the error")
            time.sleep(0.5)
        return process.wait()
    finally:
        if process.poll() is None:
            _terminate(process, spec.timeout_s + 30)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def serve_channel(project_name: str, channel: str, *, host: str, port: int, workers: int | None,
                  poll_s: float = 2.0, key: Path | None = None, echo: Callable[[str], None] = print) -> int:
    """Serve what `channel` points to, and follow it without downtime (blue/green).

    The public port is an HTTP reverse proxy in this process; behind it runs `bentoml serve` of the
    channel's version on a private port. When a deploy or rollback moves the channel, the new version
    starts on another private port while the old one keeps answering; once its /readyz says yes (after
    its warm-up answer), each request that arrives from then on, on a new or a kept-alive connection,
    goes to it; the old server gets SIGTERM once the requests it was given are answered. A version
    that fails its warm-up, exits or passes `[serve] startup_timeout_s` is stopped, logged and skipped;
    the old one keeps serving. The proxy closes idle connections after `[serve] idle_timeout_s` and
    answers 503 past `[serve] max_connections`.

    A canary (`slipway deploy --canary`, framework/rollout.py) on top of the live version is started beside
    it and given its step's share of requests; each step is judged on live traffic (framework/canary.py)
    and promoted, completed (a signed deploy) or rolled back, signed with `key`, which needs the
    `deploy:<channel>` and `rollback:<channel>` roles (without them the canary gets no traffic).
    """
    import asyncio

    return asyncio.run(_follow(project_name, channel, host=host, port=port, workers=workers, poll_s=poll_s,
                               key=key, echo=echo))


class Upstreams:
    """Where new requests go: the stable server (`live`, None before the first version is ready) and, during
    a canary (framework/rollout.py), the canary server and the share of requests it gets (`weight`, percent).
    `in_flight` counts each port's open requests, so a replaced server is stopped only once they are answered."""

    def __init__(self) -> None:
        self.live: int | None = None
        self.in_flight: Counter[int] = Counter()
        self.canary: int | None = None
        self.weight = 0
        self.sticky = "none"          # [release] sticky
        self.salt = ""                # the rollout id: a new rollout draws its callers afresh
        self.retry_on_stable = True
        self.sent: Counter[str] = Counter()  # requests sent per route ("stable", "canary", "retried")

    def pick(self, headers: list[tuple[bytes, bytes]]) -> tuple[int | None, bool]:
        """(port, is_canary) for one request: drawn by weight, or by the sticky subject's bucket (the same
        caller stays on the canary as the weight grows: its bucket stays under it)."""
        if self.canary is None or self.weight <= 0 or self.live is None:
            return self.live, False
        subject = _sticky_subject(self.sticky, headers)
        draw = bucket(self.salt, subject) if subject is not None else random.randrange(100)
        return (self.canary, True) if draw < self.weight else (self.live, False)

    async def drained(self, port: int, timeout_s: float) -> bool:
        import asyncio

        deadline = time.monotonic() + timeout_s
        while self.in_flight[port] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self.in_flight[port]


def _sticky_subject(sticky: str, headers: list[tuple[bytes, bytes]]) -> str | None:
    """What keeps one user on one version: the caller's API key, or a declared header's value."""
    if sticky == "none":
        return None
    wanted = b"authorization" if sticky == "caller" else sticky.partition(":")[2].lower().encode()
    return next((v.decode("latin-1") for k, v in headers if k.lower() == wanted and v), None)


def proxy_app(upstreams: Upstreams, *, timeout_s: float, read_timeout_s: float):
    """ASGI app forwarding each HTTP request to `upstreams.live` at the moment it arrives.

    `timeout_s` bounds the wait for the upstream's answer (its own deadline fires first), `read_timeout_s`
    each read of the client's request body. Errors are JSON bodies with an `error`, like the service's."""
    import asyncio
    import json

    import httpx

    client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=5.0), follow_redirects=False,
                               limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    async def answer(send, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await client.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        port, to_canary = upstreams.pick(scope["headers"])
        if port is None:
            return await answer(send, 503, "not ready: no version of this channel is live yet")
        upstreams.in_flight[port] += 1  # before any await: the switch waits for this request
        try:
            body = bytearray()
            more = True
            while more:
                try:
                    message = await asyncio.wait_for(receive(), read_timeout_s)
                except TimeoutError:
                    return await answer(send, 408, f"request body not received within {read_timeout_s} s")
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > MAX_BODY_BYTES:
                    return await answer(send, 413, f"request body over {MAX_BODY_BYTES} bytes")
            path = scope.get("raw_path", scope["path"].encode()).decode("latin-1")
            if scope.get("query_string"):
                path += "?" + scope["query_string"].decode("latin-1")
            headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP]
            upstreams.sent["canary" if to_canary else "stable"] += 1
            response = await _send(client, scope["method"], port, path, headers, body)
            if to_canary and upstreams.retry_on_stable and upstreams.live is not None and (
                    isinstance(response, str) or response.status_code >= 500):
                # The canary failed this request (its trace counts it against the canary): the caller gets
                # the stable version's answer instead of the failure.
                if not isinstance(response, str):
                    await response.aclose()
                upstreams.sent["retried"] += 1
                port2 = upstreams.live
                upstreams.in_flight[port2] += 1
                try:
                    retried = await _send(client, scope["method"], port2, path, headers, body)
                    return await _relay(send, answer, retried, extra=[(b"x-slipway-retried", b"canary")])
                finally:
                    upstreams.in_flight[port2] -= 1
            return await _relay(send, answer, response)
        finally:
            upstreams.in_flight[port] -= 1

    return app


async def _send(client, method: str, port: int, path: str, headers, body: bytes):
    """The upstream's streamed response, or why it did not answer."""
    import httpx

    request = client.build_request(method, f"http://127.0.0.1:{port}{path}", headers=headers, content=bytes(body))
    try:
        return await client.send(request, stream=True)
    except httpx.TransportError as exc:
        return f"{type(exc).__name__}: {exc}"


async def _relay(send, answer, response, extra: list[tuple[bytes, bytes]] = ()) -> None:
    """Stream the upstream's answer back as it comes (hop-by-hop headers dropped), or a 502."""
    if isinstance(response, str):
        return await answer(send, 502, f"the live server did not answer: {response}")
    try:
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP
                                or k.lower() == b"content-length"] + list(extra)})
        async for chunk in response.aiter_raw():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        await response.aclose()


def proxy_server(app, *, host: str, port: int, idle_timeout_s: float, max_connections: int,
                 graceful_s: float):
    """A uvicorn server for the proxy that leaves SIGTERM/SIGINT to its caller, closes a connection
    with no request in `idle_timeout_s` (new, or kept alive after an answer, or with headers still
    incomplete) and answers 503 (then closes) a request on a connection past `max_connections`."""
    import contextlib

    import h11
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def connection_made(self, transport) -> None:  # uvicorn only times out connections after an answer
            super().connection_made(transport)
            self._arm_idle_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state == h11.IDLE:  # still waiting for a whole request head
                self._arm_idle_timer()

        def _arm_idle_timer(self) -> None:
            if self.timeout_keep_alive_task is None and not self.transport.is_closing():
                self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                    self.timeout_keep_alive_handler)

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            yield

    # uvicorn counts the connection asking as one of `limit_concurrency`: +1 admits max_connections at once
    config = uvicorn.Config(app, host=host, port=port, http=Protocol, lifespan="on", log_level="warning",
                            access_log=False, server_header=False, date_header=False,
                            timeout_keep_alive=idle_timeout_s, limit_concurrency=max_connections + 1,
                            timeout_graceful_shutdown=graceful_s)
    return Server(config)


class CanaryFront:
    """The serving front's side of a canary (framework/rollout.py): start the canary's server beside the
    stable one, give it its step's share of requests, judge each step on live traffic, and record the
    decision signed with the front's key. Any doubt ends in the safe state: the canary gets no traffic."""

    def __init__(self, project: Project, channel: str, upstreams: Upstreams, *, start, key: Path | None,
                 echo: Callable[[str], None]):
        self.project, self.channel, self.upstreams = project, channel, upstreams
        self.start, self.key, self.echo = start, key, echo
        self.rollout = None
        self.process = None
        self.port: int | None = None
        self.since = None           # when the current step began taking traffic
        self.refused: set[str] = set()
        self.said_at = 0.0
        self.promoted = False

    @property
    def version(self) -> str | None:
        return self.rollout.version if self.rollout is not None else None

    async def follow(self, stable: str) -> None:
        """Start, keep or drop the canary that the store says runs on top of `stable`."""
        import asyncio

        from framework import rollout
        from framework.traces import utc_now

        try:
            found = await asyncio.to_thread(rollout.active, self.project, self.channel, stable)
        except Exception as exc:  # noqa: BLE001 - unverifiable records: send the canary nothing
            self.echo(f"not following canaries on {self.channel}: {_reason(exc)}")
            await self.stop("its records do not verify")
            return
        if self.rollout is not None and (found is None or found.rollout_id != self.rollout.rollout_id):
            await self.stop(f"canary {self.rollout.rollout_id} of {self.rollout.version} is over")
        if found is None:
            return
        if self.rollout is not None:
            self.rollout = found
            return
        if found.rollout_id in self.refused:
            return
        why = await asyncio.to_thread(rollout.signer_refusal, self.project, self.key, self.channel)
        if why:
            self.refused.add(found.rollout_id)
            self.echo(f"not starting canary {found.rollout_id} of {found.version}: this front cannot sign its "
                      f"decisions ({why}); it gets no traffic. Restart `slipway serve --channel {self.channel}` "
                      f"with --key of a signer holding deploy:{self.channel} and rollback:{self.channel}")
            return
        self.echo(f"canary {found.rollout_id}: starting {self.project.name}:{found.version} beside {stable} "
                  f"(steps {found.steps})")
        started = await self.start(found.version)
        self.rollout = found
        if isinstance(started, str):
            await self._rollback(f"the canary never became ready: {started}", None, detected=utc_now())
            return
        self.process, self.port = started
        self.since = max(utc_now(), found.changed_at)
        up = self.upstreams
        up.sent.clear()
        up.canary, up.salt, up.sticky = self.port, found.rollout_id, found.sticky
        up.retry_on_stable = self.project.spec.release.retry_on_stable
        up.weight = found.weight
        self.echo(f"canary {found.rollout_id}: {found.weight}% of requests to {found.version}")

    async def judge(self) -> None:
        """Judge the current step on the traffic since it began; act on promote or rollback."""
        import asyncio

        from framework import canary, rollout
        from framework.traces import utc_now

        if self.rollout is None or self.port is None or self.promoted:
            return   # nothing running, or promoted: the loop hands its server over at its next look at the store
        now = utc_now()
        if self.process.poll() is not None:
            await self._rollback(f"the canary's server exited with {self.process.returncode}", None, detected=now)
            return
        try:
            found = await asyncio.to_thread(rollout.judge, self.project, self.rollout, since=self.since, now=now)
        except Exception as exc:  # noqa: BLE001 - a busy store: judge at the next poll
            self.echo(f"canary {self.rollout.rollout_id}: cannot judge the step yet ({_reason(exc)})")
            return
        if found.decision == canary.WAIT:
            if time.monotonic() - self.said_at > 30:
                self.said_at = time.monotonic()
                self.echo(f"canary {self.rollout.rollout_id} at {self.rollout.weight}%: {found.reason}")
            return
        if found.decision == canary.ROLLBACK:
            await self._rollback(found.reason, found, detected=now)
        elif self.rollout.last_judged:
            await self._complete(found)
        else:
            await self._step(found)

    async def _step(self, found) -> None:
        import asyncio

        from framework import rollout
        from framework.traces import utc_now

        r = self.rollout
        details = {"reason": found.reason, "analysis": found.to_dict(), "step_since": self.since.isoformat(),
                   "sent": dict(self.upstreams.sent)}
        try:
            await asyncio.to_thread(rollout.record, self.project, r, rollout.STEP, details=details, key=self.key)
        except Exception as exc:  # noqa: BLE001
            await self._rollback(f"could not record the promotion: {_reason(exc)}", found, detected=utc_now())
            return
        weight = r.steps[r.step + 1]
        self.rollout = await asyncio.to_thread(rollout.active, self.project, self.channel, r.stable)
        if self.rollout is None:   # stopped by a person between the decision and now
            await self.stop(f"canary {r.rollout_id} is over")
            return
        self.since = utc_now()
        self.upstreams.weight = weight
        self.echo(f"canary {r.rollout_id}: step passed ({found.reason}); {weight}% of requests to {r.version}")

    async def _complete(self, found) -> None:
        import asyncio

        from framework import release, rollout
        from framework.traces import utc_now

        r = self.rollout
        try:
            await asyncio.to_thread(release.deploy, self.project, r.version, self.channel, key=self.key,
                                    rollout_id=r.rollout_id)
        except Exception as exc:  # noqa: BLE001 - e.g. an approval revoked meanwhile: the gate is closed now
            await self._rollback(f"promotion refused: {_reason(exc)}", found, detected=utc_now())
            return
        details = {"reason": found.reason, "analysis": found.to_dict(), "step_since": self.since.isoformat(),
                   "sent": dict(self.upstreams.sent)}
        try:
            await asyncio.to_thread(rollout.record, self.project, r, rollout.COMPLETE, details=details, key=self.key)
        except Exception as exc:  # noqa: BLE001 - the deploy is what moves the channel; this only closes the record
            self.echo(f"canary {r.rollout_id}: promoted, but its completion was not recorded ({_reason(exc)})")
        self.promoted = True
        self.echo(f"canary {r.rollout_id}: all steps passed; {self.channel} now points to {r.version}")

    async def _rollback(self, reason: str, found, *, detected) -> None:
        """Weight to zero at once, drain the canary, stop it, then record why and how long it took."""
        import asyncio

        from framework import rollout
        from framework.traces import utc_now

        r, since = self.rollout, self.since or detected
        self.upstreams.weight = 0
        if self.port is not None:
            await self.upstreams.drained(self.port, self.project.spec.serve.timeout_s + 30)
        recovered = utc_now()
        sent = dict(self.upstreams.sent)
        await self.stop("rolled back")
        details = {"reason": reason, "analysis": found.to_dict() if found is not None else None,
                   "step_since": since.isoformat(), "detected_at": detected.isoformat(),
                   "recovered_at": recovered.isoformat(), "detect_s": (detected - since).total_seconds(),
                   "recover_s": (recovered - detected).total_seconds(),
                   "breach_to_recovered_s": (recovered - since).total_seconds(), "sent": sent}
        try:
            await asyncio.to_thread(rollout.record, self.project, r, rollout.ROLLBACK, details=details, key=self.key)
        except Exception as exc:  # noqa: BLE001 - the canary gets no traffic whatever happens to the record
            self.echo(f"canary {r.rollout_id}: rolled back but not recorded ({_reason(exc)})")
        self.echo(f"canary {r.rollout_id}: rolled back {r.version} ({reason}); detected after "
                  f"{details['detect_s']:.1f} s, recovered {details['recover_s']:.1f} s later")

    def take(self) -> tuple[str, object, int]:
        """Hand the (completed) canary's server over as the live one."""
        taken = (self.rollout.version, self.process, self.port)
        self.upstreams.canary, self.upstreams.weight = None, 0
        self.rollout, self.process, self.port, self.since, self.promoted = None, None, None, None, False
        return taken

    async def stop(self, why: str) -> None:
        """No more traffic to the canary; drain and stop its server (the record is not touched)."""
        import asyncio

        up = self.upstreams
        up.weight = 0
        if self.port is not None:
            self.echo(f"stopping the canary server of {self.version}: {why}")
            await up.drained(self.port, self.project.spec.serve.timeout_s + 30)
            up.canary = None
        if self.process is not None:
            await asyncio.to_thread(_terminate, self.process, self.project.spec.serve.timeout_s + 30)
        self.rollout, self.process, self.port, self.since, self.promoted = None, None, None, None, False


def _reason(exc: BaseException) -> str:
    from framework.errors import SlipwayError

    return exc.args[0] if isinstance(exc, SlipwayError) and exc.args else f"{type(exc).__name__}: {exc}"


async def _follow(project_name: str, channel: str, *, host: str, port: int, workers: int | None, poll_s: float,
                  key: Path | None, echo: Callable[[str], None]) -> int:
    import asyncio
    import signal
    import subprocess

    from framework import release
    from framework.errors import SlipwayError, StoreError
    from framework.evaluate import store_path

    project = load_project(project_name)
    use_bentoml_home(project)
    spec = project.spec.serve
    env = serve_env(project, workers, channel)
    store = store_path(project)
    live: dict = {}  # version, port, process of the server that new requests go to
    upstreams = Upstreams()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    async def start(version: str) -> tuple[subprocess.Popen, int] | str:
        """The ready server of `version`, or why it is not (it is stopped then)."""
        _, tag = await asyncio.to_thread(resolve_tag, f"{project.name}:{version}")
        private = _free_port()
        process = subprocess.Popen(serve_command(tag, host="127.0.0.1", port=private), env=env)
        echo(f"starting {tag} ({channel} channel) on private port {private}")
        deadline = time.monotonic() + spec.startup_timeout_s
        while not stop.is_set():
            state = await asyncio.to_thread(_probe, process, "127.0.0.1", private)
            if state == "ready":
                return process, private
            if state != "starting" or time.monotonic() > deadline:
                reason = state if state != "starting" else \
                    f"not ready after {spec.startup_timeout_s} s (serve.startup_timeout_s)"
                echo(f"{tag} did not become ready: {reason}; stopping it")
                await asyncio.to_thread(_terminate, process, 10)
                return reason
            await asyncio.sleep(0.5)
        await asyncio.to_thread(_terminate, process, spec.timeout_s + 30)
        return "stopped while starting"

    async def switch(new: tuple[str, subprocess.Popen, int]) -> None:
        """Send new requests to `new` (version, process, port), then drain and stop the previous server."""
        old_process, old_port = live["process"], live["port"]
        live.update(version=new[0], process=new[1], port=new[2])
        upstreams.live = new[2]
        echo(f"{channel}: {project.name}:{new[0]} is live; draining the previous server")
        if not await upstreams.drained(old_port, spec.timeout_s + 30):
            echo(f"{upstreams.in_flight[old_port]} request(s) to the previous server still open; stopping it")
        await asyncio.to_thread(_terminate, old_process, spec.timeout_s + 30)

    canary = CanaryFront(project, channel, upstreams, start=start, key=key, echo=echo)

    version = release.channel_version(project, channel)  # nothing deployed: refuse before listening
    server = proxy_server(proxy_app(upstreams, timeout_s=spec.timeout_s + 60, read_timeout_s=spec.idle_timeout_s),
                          host=host, port=port, idle_timeout_s=spec.idle_timeout_s,
                          max_connections=spec.max_connections, graceful_s=spec.timeout_s + 30)
    proxy = asyncio.create_task(server.serve())
    while not server.started and not proxy.done():
        await asyncio.sleep(0.05)
    if proxy.done():
        raise SpecError(f"cannot listen on {host}:{port} (see the error above)", hint="pick another --port")
    echo(f"serving the {project.name} {channel} channel on http://{host}:{port}")
    failed: set[str] = set()
    stamp = None
    try:
        started = await start(version)
        if isinstance(started, str):
            if stop.is_set():
                return 0
            raise NotReady(f"{project.name}:{version} ({channel}) did not become ready: {started}",
                           path=str(project.toml_path), hint="see the server log above")
        live.update(version=version, process=started[0], port=started[1])
        upstreams.live = started[1]
        echo(f"{channel}: {project.name}:{version} is live")
        await canary.follow(version)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=poll_s)
                break
            except TimeoutError:
                pass
            if live["process"].poll() is not None:
                echo(f"the server of {live['version']} exited with {live['process'].returncode}")
                return live["process"].returncode or 1
            if _stamp(store) != stamp:  # only open the store (a file lock) when something wrote to it
                stamp = _stamp(store)
                try:
                    current = await asyncio.to_thread(release.channel_version, project, channel)
                except Exception as exc:  # noqa: BLE001 - a busy, emptied or tampered store never stops what is live
                    echo(f"keeping {live['version']}: cannot follow the {channel} channel "
                         f"({exc.args[0] if isinstance(exc, SlipwayError) else f'{type(exc).__name__}: {exc}'})")
                    if isinstance(exc, StoreError):
                        stamp = None  # a lock: try again at the next poll
                    continue
                if current != live["version"] and current not in failed:
                    if canary.version == current and canary.port is not None:
                        await switch(canary.take())   # a completed canary: its server is already warm
                    else:
                        await canary.stop(f"{channel} moved to {current}")
                        echo(f"{channel} moved from {live['version']} to {current}: starting it beside the live server")
                        started = await start(current)
                        if isinstance(started, str):
                            failed.add(current)
                            echo(f"still serving {live['version']}: {project.name}:{current} never became ready "
                                 f"({started})")
                            continue
                        await switch((current, *started))
                await canary.follow(live["version"])
            await canary.judge()
        return 0
    finally:
        await canary.stop("the front is stopping")
        server.should_exit = True
        await proxy
        if live.get("process") is not None:
            await asyncio.to_thread(_terminate, live["process"], spec.timeout_s + 30)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _probe(process, host: str, port: int) -> str:
    """`ready`, `starting`, or why the server will not become ready (it exited, or its warm-up failed)."""
    import json
    import urllib.error
    import urllib.request

    if process.poll() is not None:
        return f"the server exited with {process.returncode}"
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/readyz", timeout=2) as response:
            return "ready" if response.status == 200 else "starting"
    except urllib.error.HTTPError as exc:  # 503: starting, or not ready for good (the service says why)
        try:
            body = json.loads(exc.read() or b"{}")
        except ValueError:
            return "starting"
        if isinstance(body, dict) and body.get("ready") is False:
            return str(body.get("error", "not ready")).removeprefix("not ready: ")
        return "starting"
    except (urllib.error.URLError, OSError):
        return "starting"


def _terminate(process, timeout: float) -> None:
    """SIGTERM: BentoML stops accepting, finishes in-flight requests, stops its workers."""
    import subprocess

    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _stamp(path: Path) -> tuple:
    """Modification marks of the store and its write-ahead log."""
    marks = []
    for candidate in (path, path.with_name(path.name + ".wal")):
        try:
            info = candidate.stat()
            marks.append((info.st_mtime_ns, info.st_size))
        except FileNotFoundError:
            marks.append(None)
    return tuple(marks)
