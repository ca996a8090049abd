"""What the `serve --channel` proxy adds per request: one keep-alive client, sequential GETs, direct to a
stand-in upstream (a stdlib HTTP server) and through the proxy (framework.serve.proxy_app on uvicorn).

    PYTHONPATH=$PWD .venv/bin/python bench/proxy_overhead.py [-n 300]

Writes bench/results/proxy_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from framework.serve import Upstreams
from tests.test_serve import FakeUpstream, running_proxy


def timings(base: str, n: int) -> tuple[float, float]:
    """(p50, p95) in ms of `n` sequential GETs on one kept-alive connection, after 20 unmeasured ones."""
    with httpx.Client(base_url=base) as client:
        for _ in range(20):
            client.get("/")
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            client.get("/")
            samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples), sorted(samples)[int(n * 0.95)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=300)
    n = parser.parse_args().n
    upstream = FakeUpstream("stand-in")
    upstreams = Upstreams()
    upstreams.live = upstream.port
    direct = timings(f"http://127.0.0.1:{upstream.port}", n)
    with running_proxy(upstreams) as (base, _, _):
        proxied = timings(base, n)
    upstream.close()
    print(f"direct p50 {direct[0]:.2f} ms p95 {direct[1]:.2f} ms; through the proxy p50 {proxied[0]:.2f} ms "
          f"p95 {proxied[1]:.2f} ms ({n} requests each)")
    out = Path(__file__).parent / "results" / "proxy_overhead.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
                               "machine": platform.node(), "requests": n,
                               "direct_ms": {"p50": direct[0], "p95": direct[1]},
                               "proxied_ms": {"p50": proxied[0], "p95": proxied[1]},
                               "added_p50_ms": proxied[0] - direct[0]}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
