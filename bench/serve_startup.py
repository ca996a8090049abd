"""Where `slipway serve` spends its time from start to `/readyz` = 200 (issue 13: why the saved prefix
cannot make start-up 3x faster on its own).

`slipway serve <tag>` starts `bentoml serve`, whose arbiter process imports the service module (to read
its configuration) and then spawns the worker, which imports it again and loads the model. This script
builds two bentos of the demo program on the `tiny` model in a throw-away repository (bench/engine.py's
helpers: sequential `parallel = 1`, batched `parallel = 4` with the build's saved prefix), then serves
each `--runs` times and times start → ready, plus one more run of the batched bento with
`PYTHONPROFILEIMPORTTIME=1`, from which it sums the top-level imports of every Python process the
command starts (by the process that printed them: the slipway CLI, BentoML's arbiter, the worker), and
reads the phase times from the server log's own timestamps. The model is tiny on purpose: what is left
is the part of start-up that does not depend on the model.

    PYTHONPATH=$PWD .venv/bin/python bench/serve_startup.py          # ~3 min on 2 cores

`--switch MODEL` measures `slipway serve --channel prod` switching between a sequential and a batched
bento of MODEL instead (the demo's qwen15 by default): both built in a throw-away repository, the
sequential one deployed and served behind the channel's front, then `slipway deploy` of the other, `--runs`
times each way; the figure is from the deploy command's return until the front's log says the version
is live (it starts the new version beside the live one and waits for its /readyz). Written to
bench/results/serve_switch.json.

    PYTHONPATH=$PWD .venv/bin/python bench/serve_startup.py --switch qwen15   # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench import engine as bench  # project copies, the throw-away repository, server helpers
from bench.canary import _slipway

REPO = Path(__file__).resolve().parents[1]
IMPORT = re.compile(r"^import time:\s+(\d+)\s+\|\s+(\d+)\s+\| ( *)(\S+)")
STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)[+-]\d{4} \[INFO\] \[([^\]]+)\] (.*)")


def serve_once(root: Path, env: dict, tag: str, folder: Path, label: str, profile: bool) -> dict:
    port = bench.free_port()
    log = folder / f"{label}.log"
    run_env = {**env, **({"PYTHONPROFILEIMPORTTIME": "1"} if profile else {})}
    began_wall = time.time()
    with log.open("w") as handle:
        process = subprocess.Popen([str(bench.BIN / "slipway"), "serve", tag, "--port", str(port), "--workers", "1"],
                                   cwd=root, env=run_env, stdout=handle, stderr=subprocess.STDOUT)
        try:
            ready = bench.wait_ready(f"http://127.0.0.1:{port}/readyz", process, log, 300)
        finally:
            bench.stop(process)
    return {"start_to_ready_s": ready, "began": began_wall, "log": log}


def import_breakdown(log: Path) -> list[dict]:
    """Top-level imports per process, in the order the processes printed them. Each Python process starts
    by importing `site`; a new `site` line therefore starts the next process's block."""
    blocks: list[dict] = []
    for line in log.read_text(errors="replace").splitlines():
        m = IMPORT.match(line)
        if not m or m.group(3):   # nested imports are inside their top-level parent's cumulative time
            continue
        name, cumulative_s = m.group(4), int(m.group(2)) / 1e6
        if name == "site" or not blocks:
            blocks.append({"imports_s": 0.0, "top": {}})
        block = blocks[-1]
        block["imports_s"] += cumulative_s
        block["top"][name] = block["top"].get(name, 0.0) + cumulative_s
    for block in blocks:
        block["top"] = dict(sorted(((k, round(v, 3)) for k, v in block["top"].items() if v >= 0.05),
                                   key=lambda kv: -kv[1]))
        block["imports_s"] = round(block["imports_s"], 3)
    return [b for b in blocks if b["imports_s"] >= 0.05]


def phases(log: Path, began: float) -> dict:
    """Seconds after the command's start at which the server log says each phase began (1 s resolution:
    BentoML's log stamps whole seconds)."""
    marks = {"arbiter_starting_server": "Starting production", "worker_started": "Applying user config",
             "worker_initialized": "initialized"}
    out = {}
    for line in log.read_text(errors="replace").splitlines():
        m = STAMP.match(line)
        if not m:
            continue
        at = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp()
        for key, text in marks.items():
            if key not in out and text in m.group(3) and (key == "arbiter_starting_server") == (m.group(2) == "cli"):
                out[key] = round(at - began, 1)
    return out


def switches(key: str, runs: int, folder: Path) -> dict:
    from framework import signing

    root = folder / "switch-repo"
    env = bench.throwaway_env(folder, root, "bench@switch")
    toml = bench.copy_project(root, model_key=key, eval_lines=8, loosen=True)
    signing.signers_path(toml.parent).unlink(missing_ok=True)
    signing.add_signer(toml.parent, "bench", signing.public_key(Path(env["SLIPWAY_SIGNING_KEY"])),
                       ["deploy:*", "rollback:*"])
    toml.write_text(toml.read_text().replace("approvals_required = 1", "approvals_required = 0"))
    tags = {}
    for name, parallel in (("sequential", 1), ("batched", 4)):
        bench.set_parallel_in_toml(toml, key, parallel)
        tags[name] = bench.check_and_build(root, toml, env)["tag"]

    _slipway(["deploy", tags["sequential"], "--channel", "prod"], root, env)
    port = bench.free_port()
    log_path = folder / "front.log"
    times: dict[str, list[float]] = {"sequential": [], "batched": []}
    with log_path.open("w") as log:
        front = subprocess.Popen([str(bench.BIN / "slipway"), "serve", "ticket-triage", "--channel", "prod",
                                  "--port", str(port)], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            bench.wait_ready(f"http://127.0.0.1:{port}/readyz", front, log_path, 600)
            for _ in range(runs):
                for name in ("batched", "sequential"):
                    live = f"{tags[name]} is live"
                    seen = log_path.read_text(errors="replace").count(live)
                    _slipway(["deploy", tags[name], "--channel", "prod"], root, env)
                    began = time.perf_counter()
                    while log_path.read_text(errors="replace").count(live) == seen:
                        if time.perf_counter() - began > 600 or front.poll() is not None:
                            raise RuntimeError(f"{tags[name]} not live: {log_path.read_text()[-3000:]}")
                        time.sleep(0.1)
                    times[name].append(time.perf_counter() - began)
                    print(f"switch to {name}: {times[name][-1]:.1f} s", flush=True)
        finally:
            bench.stop(front)
    medians = {name: statistics.median(v) for name, v in times.items()}
    return {"what": "`slipway deploy <tag> --channel prod` returned → the `serve --channel` front's log says the "
                    "version is live (started beside the live one, its /readyz 200, traffic moved); no client traffic",
            "model": key, "tags": tags, "switch_to_s": times, "median_s": medians,
            "ratio_sequential_over_batched": medians["sequential"] / medians["batched"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed start-ups of each bento")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/serve_startup.json, "
                        "with --switch bench/results/serve_switch.json")
    parser.add_argument("--switch", choices=["qwen15", "tiny"], default=None,
                        help="measure `serve --channel` switches on this model instead of start-up")
    args = parser.parse_args()
    if args.switch:
        out = args.out or REPO / "bench" / "results" / "serve_switch.json"
        machine = {**bench.machine_info(), "command": " ".join(["bench/serve_startup.py", *sys.argv[1:]])}
        with tempfile.TemporaryDirectory(prefix="slipway-switch-") as tmp:
            result = {"machine": machine, "idle_before": bench.wait_idle(120),
                      **switches(args.switch, args.runs, Path(tmp))}
        out.write_text(json.dumps(result, indent=1, default=str))
        print(json.dumps(result["median_s"]), f"-> {out}")
        return
    args.out = args.out or REPO / "bench" / "results" / "serve_startup.json"
    machine = {**bench.machine_info(), "command": " ".join(["bench/serve_startup.py", *sys.argv[1:]])}
    results: dict = {"machine": machine, "model": "tiny", "runs": args.runs,
                     "when": datetime.now(UTC).isoformat(timespec="seconds")}
    with tempfile.TemporaryDirectory(prefix="slipway-startup-") as tmp:
        folder = Path(tmp)
        root = folder / "repo"
        env = bench.throwaway_env(folder, root, "bench@startup")
        results["idle_before"] = bench.wait_idle(120)
        built = bench.build_bentos(root, "tiny", 4, 8, env)
        results["bentos"] = built
        for name in ("sequential", "batched"):
            times = [serve_once(root, env, built[name]["tag"], folder, f"{name}-{i}", False)["start_to_ready_s"]
                     for i in range(args.runs)]
            results[name] = {"start_to_ready_s": times, "median_s": statistics.median(times)}
            print(f"{name}: start -> ready {[round(t, 2) for t in times]} s", flush=True)
        profiled = serve_once(root, env, built["batched"]["tag"], folder, "batched-profiled", True)
        processes = import_breakdown(profiled["log"])
        results["batched_profiled"] = {
            "what": "one more start of the batched bento with PYTHONPROFILEIMPORTTIME=1 (printing the import "
                    "times slows it a little): top-level imports summed per process, in start order "
                    "(slipway CLI, BentoML arbiter, worker), and the server log's phase times",
            "start_to_ready_s": profiled["start_to_ready_s"], "processes": processes,
            "imports_s_all_processes": round(sum(p["imports_s"] for p in processes), 3),
            "phases_s_after_start": phases(profiled["log"], profiled["began"])}
        for i, p in enumerate(processes):
            print(f"process {i}: imports {p['imports_s']:.2f} s: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in list(p["top"].items())[:6]), flush=True)
        print(json.dumps(results["batched_profiled"]["phases_s_after_start"]), flush=True)
    results["ratio_sequential_over_batched"] = results["sequential"]["median_s"] / results["batched"]["median_s"]
    args.out.write_text(json.dumps(results, indent=1, default=str))
    print(f"-> {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    main()
