"""Served cost and latency controls (issue 16's BENCHMARKS.md figures): streaming, load shedding, the cache.

One invocation, one machine, one served bento: the demo program on `--model`, checked on `--build-tickets`
eval tickets with a loosened contract (the check only opens the build gate) and built in a throw-away copy
of the repository (bench/engine.py's helpers), then `slipway serve <tag> --workers 1` on 127.0.0.1 with
`parallel = 1`, `serve.max_queue = --max-queue`. Dev tickets only; each section uses tickets no other
section sent, so no answer comes from the cache unless the section is about the cache.

1. baseline: `--latency-requests` plain POSTs one at a time: seconds per answer (the worker's capacity is
   parallel / that).
2. ttft: POST /<endpoint>/stream, time to the first `field` event and to the `answer` event, measured by the
   client: at 1 client (`--latency-requests` streams one after another) and at 4 clients (`--stream-requests`
   streams, 4 at a time; with one model slot, queueing is part of their first-field time).
3. shed: open-loop arrivals at `--overload` x the measured capacity (one request every
   seconds_per_answer / (overload x parallel) s, each on its own thread, `--shed-requests` of them, so the
   offered load does not slow down when the server does): the share answered 429 (Wilson 95% interval),
   latency of the 429s and of the 200s, and any 5xx (the goal: none).
4. cache (when the project enables [cache]): the same ticket twice; the second answer's latency (served,
   over HTTP) and `served.cache`.

The result file (`--out`) is rewritten after each section; each section records the other processes' CPU
(`machine_load`): above ~0.1 core its timings are not figures.

    PYTHONPATH=$PWD .venv/bin/python bench/controls.py --model tiny --latency-requests 4 --shed-requests 12
    PYTHONPATH=$PWD .venv/bin/python bench/controls.py                  # qwen15, the demo's model
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.engine import (
    BIN,
    REPO,
    Results,
    check_and_build,
    copy_project,
    cpu_snapshot,
    dev_tickets,
    free_port,
    machine_info,
    median_interval,
    other_load,
    pct,
    set_parallel_in_toml,
    stop,
    throwaway_env,
    wait_ready,
)


def wilson_interval(k: int, n: int) -> list[float] | None:
    from framework.guardrails import wilson

    return list(wilson(k, n)) if n else None


def build(folder: Path, model: str, max_queue: int, build_tickets: int) -> tuple[str, dict, Path]:
    """A bento of the demo program (parallel 1, the given max_queue), checked and built in a throw-away repo."""
    root = folder / "repo"
    toml = copy_project(root, model_key=model, eval_lines=build_tickets, loosen=True)
    set_parallel_in_toml(toml, model, 1)
    text = toml.read_text().replace("[serve]\n", f"[serve]\nmax_queue = {max_queue}\n", 1)
    toml.write_text(text)
    env = throwaway_env(folder, root, "bench@controls")
    from framework import signing

    signing.signers_path(toml.parent).unlink(missing_ok=True)
    signing.add_signer(toml.parent, "bench", signing.public_key(Path(env["SLIPWAY_SIGNING_KEY"])), [])
    return check_and_build(root, toml, env)["tag"], env, root


def post(base: str, endpoint: str, ticket: str, timeout: float) -> tuple[int, float, dict]:
    began = time.perf_counter()
    response = httpx.post(f"{base}/{endpoint}", json={"ticket": ticket}, timeout=timeout)
    return response.status_code, (time.perf_counter() - began) * 1000, response.json()


def streamed(base: str, endpoint: str, ticket: str, timeout: float) -> dict:
    """Client-side times of one streamed answer: to the first `field` event and to the `answer` event."""
    began = time.perf_counter()
    first = None
    body = ""
    with httpx.stream("POST", f"{base}/{endpoint}/stream", json={"ticket": ticket}, timeout=timeout) as response:
        status = response.status_code
        for chunk in response.iter_text():
            body += chunk
            if first is None and "event: field" in body:
                first = (time.perf_counter() - began) * 1000
    events = [block.split("\n", 1)[0].removeprefix("event: ") for block in body.strip().split("\n\n") if block]
    return {"status": status, "first_field_ms": first, "total_ms": (time.perf_counter() - began) * 1000,
            "events": events}


def summary(values: list[float]) -> dict:
    return {"n": len(values), "p50_ms": pct(values, 50), "p95_ms": pct(values, 95),
            "p50_interval_95": median_interval(values), "values_ms": [round(v, 1) for v in values]}


def baseline(base, endpoint, tickets, timeout) -> dict:
    times = []
    for ticket in tickets:
        status, ms, body = post(base, endpoint, ticket, timeout)
        if status != 200:
            raise RuntimeError(f"baseline answer {status}: {body}")
        times.append(ms)
    return {**summary(times), "seconds_per_answer": pct(times, 50) / 1000}


def ttft(base, endpoint, tickets_1, tickets_4, timeout) -> dict:
    one = [streamed(base, endpoint, t, timeout) for t in tickets_1]
    four: list[dict] = []
    lock = threading.Lock()
    pending = list(tickets_4)

    def client():
        while True:
            with lock:
                if not pending:
                    return
                ticket = pending.pop()
            result = streamed(base, endpoint, ticket, timeout)
            with lock:
                four.append(result)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    def part(results):
        ok = [r for r in results if r["status"] == 200 and r["first_field_ms"] is not None]
        return {"requests": len(results), "streamed": len(ok),
                "statuses": sorted({r["status"] for r in results}),
                "first_field": summary([r["first_field_ms"] for r in ok]),
                "answer": summary([r["total_ms"] for r in ok]),
                "events_per_stream_min": min((len(r["events"]) for r in ok), default=None)}

    return {"one_client": part(one), "four_clients": part(four)}


def shed(base, endpoint, tickets, seconds_per_answer: float, overload: float, timeout) -> dict:
    interval = seconds_per_answer / overload   # parallel = 1
    results: list[tuple[int, float]] = []
    lock = threading.Lock()

    def one(ticket):
        try:
            status, ms, _ = post(base, endpoint, ticket, timeout)
        except httpx.HTTPError as exc:
            status, ms = -1, float("nan")
            print(f"transport error: {exc}", flush=True)
        with lock:
            results.append((status, ms))

    threads = []
    began = time.perf_counter()
    for i, ticket in enumerate(tickets):
        delay = began + i * interval - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        thread = threading.Thread(target=one, args=(ticket,))
        thread.start()
        threads.append(thread)
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    shed_n = sum(1 for s, _ in results if s == 429)
    return {"offered_per_s": 1 / interval, "capacity_per_s": 1 / seconds_per_answer, "overload": overload,
            "requests": len(results), "wall_s": wall,
            "statuses": {str(s): sum(1 for x, _ in results if x == s) for s in sorted({s for s, _ in results})},
            "shed_share": shed_n / len(results), "shed_share_interval_95": wilson_interval(shed_n, len(results)),
            "server_errors_5xx": sum(1 for s, _ in results if s >= 500 or s < 0),
            "shed_latency": summary([ms for s, ms in results if s == 429]),
            "answered_latency": summary([ms for s, ms in results if s == 200])}


def cache(base, endpoint, tickets, timeout) -> dict:
    first, second, kinds = [], [], []
    for ticket in tickets:
        first.append(post(base, endpoint, ticket, timeout)[1])
        status, ms, body = post(base, endpoint, ticket, timeout)
        second.append(ms)
        kinds.append((body.get("served") or {}).get("cache"))
    return {"miss": summary(first), "exact_hit": summary(second), "served_cache": kinds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen15", choices=["qwen15", "qwen05", "tiny"])
    parser.add_argument("--max-queue", type=int, default=3)
    parser.add_argument("--latency-requests", type=int, default=10)
    parser.add_argument("--stream-requests", type=int, default=12, help="streams in the 4-client pass")
    parser.add_argument("--shed-requests", type=int, default=40)
    parser.add_argument("--overload", type=float, default=2.0, help="offered load / measured capacity")
    parser.add_argument("--cache-requests", type=int, default=8)
    parser.add_argument("--build-tickets", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=180)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "controls.json")
    args = parser.parse_args()

    from framework.spec import load_project

    results = Results(args.out, {"machine": machine_info(), "model": args.model, "settings": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}})
    with tempfile.TemporaryDirectory(prefix="slipway-bench-controls-") as tmp:
        folder = Path(tmp)
        tag, env, root = build(folder, args.model, args.max_queue, args.build_tickets)
        project = load_project(str(root / "projects" / "ticket-triage"))
        endpoint = project.spec.serve.endpoint.strip("/")
        need = 2 * args.latency_requests + args.stream_requests + args.shed_requests + args.cache_requests
        tickets = dev_tickets(project, need)
        if len(set(tickets)) < need:
            raise SystemExit(f"the dev split has fewer than {need} distinct tickets")
        take = iter(tickets)
        port = free_port()
        log = folder / "serve.log"
        snapshot = cpu_snapshot()
        with log.open("w") as handle:
            server = subprocess.Popen([str(BIN / "slipway"), "serve", tag, "--port", str(port), "--workers", "1"],
                                      cwd=root, env=env, stdout=handle, stderr=subprocess.STDOUT)
            try:
                results.figures["bento"] = {"tag": tag, "start_to_ready_s": wait_ready(
                    f"http://127.0.0.1:{port}/readyz", server, log, 600)}
                base = f"http://127.0.0.1:{port}"
                post(base, endpoint, next(take), args.timeout)   # warm, not counted
                base_fig = results.section("baseline", baseline, base, endpoint,
                                           [next(take) for _ in range(args.latency_requests - 1)], args.timeout)
                results.section("ttft", ttft, base, endpoint, [next(take) for _ in range(args.latency_requests)],
                                [next(take) for _ in range(args.stream_requests)], args.timeout)
                results.section("shed", shed, base, endpoint, [next(take) for _ in range(args.shed_requests)],
                                base_fig["seconds_per_answer"], args.overload, args.timeout)
                if getattr(getattr(project.spec, "cache", None), "exact", False):
                    results.section("cache", cache, base, endpoint,
                                    [next(take) for _ in range(args.cache_requests)], args.timeout)
                results.figures["server_machine_load"] = other_load(snapshot)
            finally:
                stop(server)
        results.save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
