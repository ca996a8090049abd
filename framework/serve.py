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
    """Serve what `channel` points to, and follow it.

    Every `poll_s` seconds the store is read; when a deploy or rollback has moved the channel, the
    running `bentoml serve` gets SIGTERM (BentoML stops accepting, finishes the requests in flight,
    stops its workers) and the new version starts on the same port. Requests that arrive during the
    switch are refused, not dropped mid-answer; the gap is the new version's model load (measured in
    BENCHMARKS.md). A blue/green swap behind a proxy would close it, at the cost of a second copy of
    the model in memory.
    """
    import signal
    import subprocess
    import time

    from framework import release
    from framework.errors import SlipwayError

    project = load_project(project_name)
    use_bentoml_home(project)
    env = serve_env(project.name.replace("-", "_"), workers)
    stopping = {"signal": None}

    def start(version: str) -> subprocess.Popen:
        _, tag = resolve_tag(f"{project.name}:{version}")
        echo(f"serving {tag} ({channel} channel) on http://{host}:{port}")
        return subprocess.Popen(serve_command(tag, host=host, port=port), env=env)

    def stop(child: subprocess.Popen) -> None:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=project.spec.serve.timeout_s + 30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()

    def on_signal(signum, _frame) -> None:
        stopping["signal"] = signum

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    version = release.channel_version(project, channel)
    child = start(version)
    while True:
        time.sleep(poll_s)
        if stopping["signal"] is not None:
            stop(child)
            return 0
        if child.poll() is not None:
            echo(f"bentoml serve exited with {child.returncode}")
            return child.returncode
        try:
            current = release.channel_version(project, channel)
        except SlipwayError as exc:  # store busy (a check is running) or the channel emptied: keep serving
            echo(f"keeping {version}: cannot read the {channel} channel ({exc.args[0]})")
            continue
        if current != version:
            echo(f"{channel} moved from {version} to {current}: draining and restarting")
            stop(child)
            version = current
            child = start(version)
