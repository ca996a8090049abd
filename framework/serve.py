"""`slipway serve`: find the bento for a project (or a given version) and run `bentoml serve` on it.

Serving is BentoML's own server, started as `bentoml serve <tag>` against the
repository's store, so what runs here is exactly what `bentoml serve` or a
container built from the same bento would run.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from framework.build import use_bentoml_home
from framework.errors import SpecError
from framework.spec import load_project


def resolve_tag(target: str) -> tuple[str, str]:
    """(project name, bento tag) for `project` (newest build) or `project:version`."""
    name, _, version = target.partition(":")
    project = load_project(name)
    use_bentoml_home(project)
    import bentoml

    if version:
        try:
            return project.name, str(bentoml.get(f"{project.name}:{version}").tag)
        except bentoml.exceptions.NotFound:
            raise SpecError(f"no bento {project.name}:{version}", hint=f"list builds: BENTOML_HOME="
                            f"{os.environ['BENTOML_HOME']} bentoml list {project.name}") from None
    bentos = sorted(bentoml.list(project.name), key=lambda b: b.info.creation_time)
    if not bentos:
        raise SpecError(f"{project.name} has no build yet", path=str(project.toml_path),
                        hint=f"run `slipway build {project.name}`")
    return project.name, str(bentos[-1].tag)


def serve_command(tag: str, *, host: str, port: int) -> list[str]:
    return [str(Path(sys.executable).parent / "bentoml"), "serve", tag, "--host", host, "--port", str(port)]


def serve_env(service_name: str, workers: int | None) -> dict[str, str]:
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
    if workers:
        env["BENTOML_CONFIG_OPTIONS"] = f"services.{service_name}.workers={workers}"
    return env


def serve(target: str, *, host: str, port: int, workers: int | None,
          echo: Callable[[str], None] = print) -> int:
    """Replace this process with `bentoml serve`: signals (Ctrl-C, SIGTERM from a supervisor) then reach
    BentoML directly, which drains in-flight requests and stops its workers."""
    name, tag = resolve_tag(target)
    echo(f"serving {tag} on http://{host}:{port} (BENTOML_HOME={os.environ['BENTOML_HOME']})")
    command = serve_command(tag, host=host, port=port)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, serve_env(name.replace("-", "_"), workers))
    return 0  # not reached


def serve_channel(project_name: str, channel: str, *, host: str, port: int, workers: int | None,
                  poll_s: float = 2.0, echo: Callable[[str], None] = print) -> int:
    """Serve what `channel` points to, and follow it without downtime (blue/green).

    The public port is a small TCP relay in this process; behind it runs `bentoml serve` of the
    channel's version on a private port. When a deploy or rollback moves the channel, the new
    version starts on another private port while the old one keeps answering; once its /readyz
    says yes, new connections go to it and the old server gets SIGTERM, which lets BentoML finish
    the requests in flight. Nothing is refused or dropped during the switch; the time until the
    new version answers is its start-up (measured in BENCHMARKS.md). The two servers share the
    GGUF through the page cache when the model is the same. A version that fails to start is
    logged and skipped; the old one keeps serving.
    """
    import asyncio

    return asyncio.run(_follow(project_name, channel, host=host, port=port, workers=workers, poll_s=poll_s,
                               echo=echo))


async def _follow(project_name: str, channel: str, *, host: str, port: int, workers: int | None, poll_s: float,
                  echo: Callable[[str], None]) -> int:
    import asyncio
    import signal
    import subprocess

    from framework import release
    from framework.errors import SlipwayError
    from framework.evaluate import store_path

    project = load_project(project_name)
    use_bentoml_home(project)
    env = serve_env(project.name.replace("-", "_"), workers)
    store = store_path(project)
    live: dict = {}  # version, port, process of the server that new connections go to
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    async def start(version: str) -> tuple[subprocess.Popen, int] | None:
        _, tag = await asyncio.to_thread(resolve_tag, f"{project.name}:{version}")
        private = _free_port()
        process = subprocess.Popen(serve_command(tag, host="127.0.0.1", port=private), env=env)
        echo(f"starting {tag} ({channel} channel) on private port {private}")
        while not stop.is_set():
            if process.poll() is not None:
                echo(f"{tag} exited with {process.returncode} before it was ready")
                return None
            if await asyncio.to_thread(_ready, private):
                return process, private
            await asyncio.sleep(0.5)
        await asyncio.to_thread(_terminate, process, project.spec.serve.timeout_s + 30)
        return None

    async def relay(client_reader, client_writer) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", live["port"])
        except (OSError, KeyError):  # no server ready yet: refuse, as a starting server would
            client_writer.close()
            return
        await asyncio.gather(_pipe(client_reader, upstream_writer), _pipe(upstream_reader, client_writer))
        for writer in (client_writer, upstream_writer):
            writer.close()

    server = await asyncio.start_server(relay, host, port)
    echo(f"serving the {project.name} {channel} channel on http://{host}:{port}")
    failed: set[str] = set()
    version = release.channel_version(project, channel)
    stamp = None
    try:
        started = await start(version)
        if started is None:
            return 0 if stop.is_set() else 1
        live.update(version=version, process=started[0], port=started[1])
        echo(f"{channel}: {project.name}:{version} is live")
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=poll_s)
                break
            except TimeoutError:
                pass
            if live["process"].poll() is not None:
                echo(f"the server of {live['version']} exited with {live['process'].returncode}")
                return live["process"].returncode or 1
            if _stamp(store) == stamp:  # only open the store (a file lock) when something wrote to it
                continue
            stamp = _stamp(store)
            try:
                current = await asyncio.to_thread(release.channel_version, project, channel)
            except SlipwayError as exc:  # store busy or the channel emptied: keep serving
                echo(f"keeping {live['version']}: cannot read the {channel} channel ({exc.args[0]})")
                stamp = None
                continue
            if current == live["version"] or current in failed:
                continue
            echo(f"{channel} moved from {live['version']} to {current}: starting it beside the live server")
            started = await start(current)
            if started is None:
                failed.add(current)
                echo(f"still serving {live['version']}")
                continue
            old = live["process"]
            live.update(version=current, process=started[0], port=started[1])
            echo(f"{channel}: {project.name}:{current} is live; draining the previous server")
            await asyncio.to_thread(_terminate, old, project.spec.serve.timeout_s + 30)
        return 0
    finally:
        server.close()
        if live.get("process") is not None:
            await asyncio.to_thread(_terminate, live["process"], project.spec.serve.timeout_s + 30)


async def _pipe(reader, writer) -> None:
    """Copy one direction of a relayed connection; pass on end-of-stream so HTTP closes cleanly."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ready(port: int) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


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
