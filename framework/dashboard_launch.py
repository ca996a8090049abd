"""Start the dashboard (framework/dashboard.py) as a `marimo run` server for one project.

The store is made current first (`traces.ingest`), then marimo serves the notebook read-only: in
`run` mode the code cannot be edited or seen from the browser. It listens on 127.0.0.1 by default,
without marimo's access token, as `marimo run` does: anyone who can reach the port reads the
figures, so pass another host only behind something that authenticates. No browser is opened
with `headless=True` (`slipway dashboard --no-browser`); the page needs nothing from the internet
(marimo's frontend and vega are inside the marimo wheel).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from framework.errors import SlipwayError

NOTEBOOK = Path(__file__).resolve().with_name("dashboard.py")


@dataclass
class Dashboard:
    """A started dashboard server: its process and the address to open."""

    process: subprocess.Popen
    url: str

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Return once marimo answers its health check; raise SlipwayError if it exits or takes longer."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SlipwayError(f"the dashboard server exited with status {self.process.returncode} before "
                                   f"answering on {self.url}", hint="its output above says why")
            try:
                with urllib.request.urlopen(self.url.rstrip("/") + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise SlipwayError(f"the dashboard did not answer on {self.url} within {timeout_s:.0f} s",
                           hint="is the port taken by another server? pass another --port")

    def serve(self, project, *, ingest_every_s: float | None = 30.0, warn=None) -> int:
        """Block until the server exits (or Ctrl-C, which stops it), ingesting `project`'s new traces every
        `ingest_every_s` seconds meanwhile, so a refresh in the page shows current traffic while the notebook
        itself only reads. An ingest that fails (the store busy past its wait) is reported through `warn`
        and tried again next time. Returns the server's exit status."""
        from framework.traces import ingest

        try:
            while True:
                try:
                    return self.process.wait(timeout=ingest_every_s)
                except subprocess.TimeoutExpired:
                    pass
                try:
                    result = ingest(project)
                except Exception as exc:  # noqa: BLE001 - the page stays up on what is already in the store
                    if warn:
                        warn(f"ingest failed, trying again in {ingest_every_s:g} s: {type(exc).__name__}: {exc}")
                    continue
                if warn:
                    for skipped in result.skipped:
                        warn(f"skipped {skipped}")
        except KeyboardInterrupt:
            return self.process.returncode
        finally:
            self.stop()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate the server (and wait for it); kill it if it does not stop in time."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS picks it); marimo binds it a moment later."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def command(host: str, port: int, headless: bool) -> list[str]:
    """The `marimo run` command line for the dashboard notebook."""
    args = [sys.executable, "-m", "marimo", "run", str(NOTEBOOK), "--host", host, "--port", str(port),
            "--no-token", "--no-sandbox"]
    return args + ["--headless"] if headless else args


def launch(project, *, host: str = "127.0.0.1", port: int = 0, headless: bool = False, ingest: bool = True,
           output: IO | int | None = None) -> Dashboard:
    """Ingest `project`'s new traces, then start the dashboard on host:port (0: a free port) and return at
    once; call `.wait_ready()` before opening the URL, `.stop()` to end it. `output` is where marimo's
    own output goes (a file, subprocess.DEVNULL; None: this process's stdout and stderr)."""
    from framework.evaluate import store_path
    from framework.traces import ingest as ingest_traces

    if ingest:
        ingest_traces(project)
    port = port or free_port(host)
    env = dict(os.environ)
    env["SLIPWAY_DASHBOARD_PROJECT"] = str(Path(project.dir).resolve())
    env["SLIPWAY_DASHBOARD_STORE"] = str(Path(store_path(project)).resolve())
    # The notebook imports the framework this process runs, even when another checkout is pip-installed.
    root = str(NOTEBOOK.parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    env["MARIMO_SKIP_UPDATE_CHECK"] = "1"   # no call to pypi.org / marimo.io on start
    process = subprocess.Popen(command(host, port, headless), env=env, cwd=str(project.root),
                               stdout=output, stderr=subprocess.STDOUT if output is not None else None)
    shown = f"[{host}]" if ":" in host else host
    return Dashboard(process=process, url=f"http://{shown}:{port}/")
