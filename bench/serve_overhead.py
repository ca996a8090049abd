"""What serving costs: the served bento vs the same program in process vs a bare llama_cpp.server.

One run, same GGUF, same dev tickets, requests sent one at a time (latency,
not throughput), all on 127.0.0.1:

  in-process      the notebook program called directly (skeleton decoding)
  served          POST /<endpoint> on `slipway serve` (BentoML, 1 worker), same program
  in-process/full the program with llama.cpp's full-schema grammar (skeleton off)
  llama_cpp.server the same chat messages and JSON schema sent to llama-cpp-python's own server

Needs a build of the project (`slipway build`); the last mode needs llama-cpp-python's server
dependencies, `.venv/bin/pip install -e '.[bench]'` (skipped with a note when missing).

    .venv/bin/python bench/serve_overhead.py --model qwen15 -n 20
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import dspy
import httpx

from framework import adapter, language_model, load_program, load_project, load_split
from framework.metrics import percentile
from framework.weights import model_path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def timed(fn, items) -> list[float]:
    out = []
    for item in items:
        start = time.perf_counter()
        fn(item)
        out.append((time.perf_counter() - start) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", default="ticket-triage")
    parser.add_argument("--model", default=None, help="model key; must match the build's model")
    parser.add_argument("-n", type=int, default=20)
    parser.add_argument("--key", default=os.environ.get("SLIPWAY_API_KEY"),
                        help="an API key of the project (`slipway keys create`), unless [serve] auth = \"none\"")
    args = parser.parse_args()
    project = load_project(args.project)
    key = args.model or project.spec.pipeline.model
    tickets = [ex.inputs["ticket"] for ex in load_split(project, "dev")[: args.n]]
    lm = language_model(project, key)
    program = load_program(project)
    results: dict[str, list[float]] = {}

    with dspy.context(lm=lm, adapter=adapter(project)):
        program(ticket="warm-up")
        results["in-process"] = timed(lambda t: program(ticket=t), tickets)
        lm.engine.skeleton = False
        messages = []

        def full(t):
            program(ticket=t)
            messages.append((lm.history[-1]["messages"], lm.history[-1]["kwargs"].get("response_format")))
        program(ticket="warm-up")
        results["in-process/full"] = timed(full, tickets)
        lm.engine.skeleton = True

    port = free_port()
    env = {**os.environ, "BENTOML_HOME": str(project.root / "bentos")}
    server = subprocess.Popen([str(BIN / "slipway"), "serve", project.name, "--port", str(port), "--workers", "1"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", server)
        route = f"http://127.0.0.1:{port}/{project.spec.serve.endpoint.strip('/')}"
        auth = {"Authorization": f"Bearer {args.key}"} if args.key else {}
        with httpx.Client(timeout=120, headers=auth) as client:
            client.post(route, json={"ticket": "warm-up"})
            results["served"] = timed(lambda t: client.post(route, json={"ticket": t}).raise_for_status(), tickets)
    finally:
        server.terminate()
        server.wait(timeout=60)

    if importlib.util.find_spec("sse_starlette") is None:
        print("note: llama_cpp.server needs `.venv/bin/pip install -e '.[bench]'`; mode skipped")
    else:
        spec = project.model(key)
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(model_path(spec)),
                                   "--n_ctx", str(spec.context_size), "--n_threads", str(spec.threads or 2),
                                   "--host", "127.0.0.1", "--port", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(f"http://127.0.0.1:{port}/v1/models", server)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            with httpx.Client(timeout=120) as client:
                def bare(item):
                    msgs, fmt = item
                    schema = fmt.model_json_schema() if hasattr(fmt, "model_json_schema") else None
                    client.post(url, json={"messages": msgs, "temperature": 0, "max_tokens": spec.max_tokens,
                                           "response_format": {"type": "json_object", "schema": schema}}
                                ).raise_for_status()
                bare(messages[0])
                results["llama_cpp.server"] = timed(bare, messages)
        finally:
            server.terminate()
            server.wait(timeout=60)

    print(f"model {key} ({project.model(key).name}), {len(tickets)} dev tickets, sequential requests")
    print(f"{'mode':18} {'p50 ms':>8} {'p95 ms':>8} {'mean ms':>8}")
    for mode, values in results.items():
        print(f"{mode:18} {percentile(values, 50):8.0f} {percentile(values, 95):8.0f} {statistics.mean(values):8.0f}")
    paired = [s - i for s, i in zip(results["served"], results["in-process"], strict=True)]
    print(f"served - in-process, per ticket: p50 {percentile(paired, 50):+.1f} ms (goal <= +2 ms)")
    if "llama_cpp.server" in results:
        paired = [s - i for s, i in zip(results["llama_cpp.server"], results["in-process/full"], strict=True)]
        print(f"llama_cpp.server - in-process/full, per ticket: p50 {percentile(paired, 50):+.1f} ms")


if __name__ == "__main__":
    main()
