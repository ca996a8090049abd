"""The canary front (issue 17): what per-request routing adds, and how fast a bad canary is found and undone.

1. overhead (no model): one keep-alive client, sequential POSTs of a ticket-sized body, in interleaved
   rounds (so drift on the machine hits every arm alike): direct to a stand-in upstream; through the front
   with no canary; through the front with a canary at 50% (two stand-ins, sticky by caller). Stand-ins are
   stdlib HTTP servers answering in one write with TCP_NODELAY, so the figure is the front's and not
   delayed ACKs. Reported: p50 per arm and the ratio of medians to direct with a bootstrap interval.
2. recovery (the tiny model, real bentos): a throw-away copy of the demo; v1 built and deployed; v2 is v1
   with a 3 s sleep planted in its notebook's forward (read only when served). `slipway serve --channel
   prod --key` with three clients; `slipway deploy v2 --canary 25`; the front rolls it back. Per run, from
   `slipway status --history --json`: time to detect (step start → decision; at least `min_seconds` and
   `min_requests` canary requests by design), time to recover (decision → canary drained, weight 0), and
   the clients' failed requests. `--runs` canaries of v2 in a row on the same front.

    PYTHONPATH=$PWD .venv/bin/python bench/canary.py                 # both parts
    PYTHONPATH=$PWD .venv/bin/python bench/canary.py --skip-recovery # overhead only (seconds)

Writes bench/results/canary.json. Run it alone: 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from bench.engine import (
    BIN,
    REPO,
    Results,
    check_and_build,
    copy_project,
    free_port,
    machine_info,
    median_interval,
    ratio_interval,
    stop,
    throwaway_env,
    wait_ready,
)
from framework.serve import Upstreams
from tests.test_serve import running_proxy

BODY = json.dumps({"ticket": "I was charged twice for my subscription this month, please refund one of them."})


class StandIn:
    """A version stand-in: answers every POST at once, head and body in one write, Nagle off."""

    def __init__(self, name: str) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                self.rfile.read(int(self.headers["content-length"]))
                body = json.dumps({"category": "billing", "version": {"bento": name}}).encode()
                self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                                 + str(len(body)).encode() + b"\r\n\r\n" + body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def overhead(rounds: int, per_round: int) -> dict:
    stable, canary = StandIn("v1"), StandIn("v2")
    plain, split = Upstreams(), Upstreams()
    plain.live = split.live = stable.port
    split.canary, split.weight, split.sticky, split.salt = canary.port, 50, "caller", "bench"
    samples: dict[str, list[float]] = {"direct": [], "front": [], "front_canary_50": []}
    versions: list[str] = []
    with running_proxy(plain) as (plain_base, _, _), running_proxy(split) as (split_base, _, _):
        clients = {"direct": httpx.Client(base_url=f"http://127.0.0.1:{stable.port}"),
                   "front": httpx.Client(base_url=plain_base), "front_canary_50": httpx.Client(base_url=split_base)}
        for _round in range(rounds):
            for arm, client in clients.items():
                for i in range(per_round + 10):
                    # a new caller every request: the sticky draw runs, and both versions are reached
                    headers = {"content-type": "application/json", "authorization": f"Bearer caller-{i}-{_round}"}
                    start = time.perf_counter()
                    answer = client.post("/triage", content=BODY, headers=headers)
                    took = (time.perf_counter() - start) * 1000
                    if i >= 10:   # the first requests of a round warm the connection
                        samples[arm].append(took)
                        if arm == "front_canary_50":
                            versions.append(answer.json()["version"]["bento"])
        for client in clients.values():
            client.close()
    stable.close()
    canary.close()
    out = {arm: {"n": len(v), "p50_ms": statistics.median(v), "p50_interval_ms": median_interval(v),
                 "p95_ms": sorted(v)[int(len(v) * 0.95)]} for arm, v in samples.items()}
    for arm in ("front", "front_canary_50"):
        out[arm]["ratio_to_direct"] = statistics.median(samples[arm]) / statistics.median(samples["direct"])
        out[arm]["ratio_interval"] = ratio_interval(samples[arm], samples["direct"])
        out[arm]["added_p50_ms"] = statistics.median(samples[arm]) - statistics.median(samples["direct"])
    out["front_canary_50"]["canary_share"] = versions.count("v2") / len(versions)
    return out


def _slipway(args: list[str], root: Path, env: dict) -> str:
    done = subprocess.run([str(BIN / "slipway"), *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"slipway {' '.join(args)} exited {done.returncode}: {(done.stdout + done.stderr)[-2000:]}")
    return done.stdout


def recovery(runs: int, folder: Path) -> dict:
    from framework import signing

    root = folder / "repo"
    toml = copy_project(root, model_key="tiny", eval_lines=12, loosen=True)
    env = throwaway_env(folder, root, "bench canary")
    signing.signers_path(toml.parent).unlink(missing_ok=True)
    signing.add_signer(toml.parent, "bench", signing.public_key(Path(env["SLIPWAY_SIGNING_KEY"])),
                       ["deploy:*", "rollback:*"])
    text = toml.read_text().replace("approvals_required = 1", "approvals_required = 0")
    # copy_project(loosen=True) serves without API keys already
    start = text.index("[release]\n")
    end = text.index("\n\n", start)
    text = text[:start] + ('[release]\nsteps = [25, 50, 100]\nmin_requests = 6\nmin_seconds = 5\nsticky = "none"'
                           ) + text[end:]
    toml.write_text(text)
    v1 = check_and_build(root, toml, env)["tag"]
    notebook = root / "notebooks" / "ticket_triage.py"
    notebook.write_text(notebook.read_text().replace(
        "    def forward(self, ticket: str):\n",
        "    def forward(self, ticket: str):\n        import os\n        import time\n\n"
        "        time.sleep(float(os.environ.get('TRIAGE_SLOW_ON_PURPOSE', '0')))\n", 1))
    v2 = check_and_build(root, toml, env)["tag"]
    _slipway(["deploy", v1, "--channel", "prod"], root, env)

    port = free_port()
    log_path = folder / "front.log"
    log = log_path.open("w")
    front = subprocess.Popen([str(BIN / "slipway"), "serve", "ticket-triage", "--channel", "prod", "--port",
                              str(port)], cwd=root, env={**env, "TRIAGE_SLOW_ON_PURPOSE": "3"}, stdout=log,
                             stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    answers: list[tuple[float, int | str]] = []
    done = threading.Event()
    # distinct dev tickets: a repeated one is a cache hit, which the analysis leaves out of latency and cost
    tickets = [json.loads(line)["inputs"]["ticket"] for split in ("dev", "train")
               for line in (toml.parent / "data" / f"{split}.jsonl").read_text().splitlines()]

    def traffic(offset: int) -> None:
        deadline = time.monotonic() + 300 * runs
        with httpx.Client(base_url=base, timeout=90) as client:
            while not done.is_set() and len(answers) < 5000 and time.monotonic() < deadline:
                ticket = tickets[(offset + len(answers)) % len(tickets)]
                try:
                    answers.append((time.monotonic(), client.post("/triage", json={"ticket": ticket}).status_code))
                except httpx.TransportError as exc:
                    answers.append((time.monotonic(), type(exc).__name__))
                time.sleep(0.2)

    incidents = []
    clients = [threading.Thread(target=traffic, args=(i * 37,)) for i in range(3)]
    try:
        wait_ready(f"{base}/readyz", front, log_path, 300)
        for client in clients:
            client.start()
        for run in range(runs):
            began = time.monotonic()
            _slipway(["deploy", v2, "--channel", "prod", "--canary", "25"], root, env)
            while time.monotonic() - began < 300:
                status = json.loads(_slipway(["status", "ticket-triage", "--history", "--json"], root, env))
                if len(status["incidents"]["prod"]) > run:
                    break
                time.sleep(1)
            else:
                raise RuntimeError(f"no rollback after 300 s: {log_path.read_text()[-3000:]}")
            incident = status["incidents"]["prod"][run]
            event = status["canaries"]["prod"]["events"][-1]["details"]
            incidents.append({**incident, "deploy_to_recovered_s": time.monotonic() - began,
                              "canary_requests": event["analysis"]["canary"]["requests"],
                              "canary_p50_ms": event["analysis"]["canary"]["latency_p50_ms"],
                              "stable_p50_ms": event["analysis"]["stable"]["latency_p50_ms"],
                              "sent": event.get("sent")})
            print(f"run {run + 1}: {incident['reason']}; detect {incident['detect_s']:.1f} s, recover "
                  f"{incident['recover_s']:.1f} s", flush=True)
            time.sleep(3)
    finally:
        done.set()
        for client in clients:
            client.join(timeout=120)
        stop(front)
        log.close()
    failed = [a for a in answers if a[1] != 200]
    detect = [i["detect_s"] for i in incidents]
    recover = [i["recover_s"] for i in incidents]
    return {"v1": v1, "v2": v2, "injected_delay_s": 3, "release": {"steps": [25, 50, 100], "min_requests": 6,
                                                                    "min_seconds": 5},
            "clients": 3, "requests": len(answers), "failed_requests": len(failed),
            "detect_s": {"median": statistics.median(detect), "min": min(detect), "max": max(detect)},
            "recover_s": {"median": statistics.median(recover), "min": min(recover), "max": max(recover)},
            "runs": incidents}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3, help="bad canaries rolled back in a row")
    parser.add_argument("--skip-recovery", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "canary.json")
    args = parser.parse_args()
    results = Results(args.out, {"machine": machine_info(), "command": "bench/canary.py"}, wait=120)
    results.section("overhead", overhead, args.rounds, args.per_round)
    if not args.skip_recovery:
        with tempfile.TemporaryDirectory(prefix="slipway-canary-") as folder:
            results.section("recovery", recovery, args.runs, Path(folder))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    main()
