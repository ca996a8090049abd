"""The demo through a remote model server (issue 18): the same GGUF behind `python -m llama_cpp.server` on
127.0.0.1, checked against the demo contract unchanged, and compared with the model in process.

On a copy of the demo project (the real project, its store and bentos are never touched):

1. server: llama-cpp-python's OpenAI-compatible server with the demo's qwen15 GGUF (the sha256-verified
   file from the model cache), 2 threads, 4,096-token context, one slot; the time to first /v1/models.
2. pin: `[models.remote]` = that server (`response_format = "json_object+schema"`, the schema as
   llama-cpp-python's server takes it; `extra_body = { repeat_penalty = 1.0 }`, since that server's default
   1.1 penalises every token already in the prompt or answer, which the in-process engine never does;
   `parallel = 1` as the demo's qwen15), the demo's prices per token; its
   fingerprint is probed and pinned; `[pipeline] model = "remote"`.
3. remote_check: `framework.check` on the eval split (all 200 by default) with the demo's contract as it is:
   the verdict per clause.
4. compare: on the first `--compare` eval tickets, in process, paired per ticket with the remote run's
   records: (a) the demo's engine (skeleton decoding, docs/engine.md) and (b) the same engine with llama.cpp's
   full-schema grammar, as the server decodes: identical answers and p50 latency remote / local (paired
   bootstrap interval of the ratio).

Run it alone (2 cores: a second busy process slows llama.cpp many times over):

    PYTHONPATH=$PWD .venv/bin/python bench/remote.py --limit 12 --compare 6     # a quick try
    PYTHONPATH=$PWD .venv/bin/python bench/remote.py                            # the figures
    PYTHONPATH=$PWD .venv/bin/python bench/remote.py --server llama-server --server-bin /path/to/llama-server

llama.cpp's own server reports the prompt tokens it reused from its cache (`prompt_tokens_details`), which
llama-cpp-python's does not: the token and cost clauses see the difference. Its binary is not on PyPI; build
it from the llama.cpp sources inside llama-cpp-python's sdist (docs/remote.md has the commands).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.engine import REPO, Results, copy_project, free_port, machine_info
from bench.routing import ratio_interval

# How each server is asked for the schema, and the sampling fields that make its greedy answers the engine's:
# llama-cpp-python's server refuses OpenAI's json_schema and penalises repeats by default (1.1); llama.cpp's
# own server takes json_schema and defaults to no penalty.
SERVERS = {
    "llama-cpp-python": {"response_format": "json_object+schema", "extra_body": "{ repeat_penalty = 1.0 }"},
    "llama-server": {"response_format": "json_schema", "extra_body": "{ repeat_penalty = 1.0 }"},
}


def server_command(kind: str, binary: str | None, gguf: Path, port: int) -> list[str]:
    if kind == "llama-cpp-python":
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "qwen15",
                "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--n_threads", "2", "--seed", "0"]
    if not binary:
        raise SystemExit("--server llama-server needs --server-bin (llama.cpp's llama-server; docs/remote.md)")
    return [binary, "-m", str(gguf), "--alias", "qwen15", "--host", "127.0.0.1", "--port", str(port), "-c", "4096",
            "-t", "2", "-np", "1", "--seed", "0", "--jinja"]


def start_server(command: list[str], port: int, log: Path) -> tuple[subprocess.Popen, float]:
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    while time.perf_counter() - started < 300:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return process, time.perf_counter() - started
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise SystemExit(f"llama_cpp.server exited: {log.read_text()[-2000:]}")
        time.sleep(0.5)
    raise SystemExit("llama_cpp.server did not answer within 300 s")


def point_at_server(toml: Path, url: str, fingerprint: str | None, kind: str = "llama-cpp-python") -> None:
    text = toml.read_text()
    prices = {key: re.search(rf"(?ms)^\[models\.qwen15\].*?^{key} = ([0-9.e-]+)", text).group(1)
              for key in ("price_per_1k_input", "price_per_1k_output")}
    text = re.sub(r"(?ms)^\[models\.remote\]\n.*?\n\n", "", text)
    server = SERVERS[kind]
    table = (f'[models.remote]\nname = "Qwen2.5-Coder-1.5B Q4_K_M via {kind}"\n'
             + (f'fingerprint = "{fingerprint}"\n' if fingerprint else "")
             + f'source = {{ openai_compatible = {{ base_url = "{url}", model = "qwen15", '
               f'response_format = "{server["response_format"]}", extra_body = {server["extra_body"]} }} }}\n'
             + "max_tokens = 96\nparallel = 1\n"
             + "".join(f"{key} = {value}\n" for key, value in prices.items()) + "\n")
    text = text.replace("[models.qwen15]\n", table + "[models.qwen15]\n", 1)
    text = re.sub(r'(?m)^model = "qwen15"', 'model = "remote"', text, count=1)
    toml.write_text(text)


def remote_check(toml: Path, limit: int | None) -> dict:
    from framework.check import check
    from framework.spec import load_project

    project = load_project(str(toml.parent))
    result = check(project, limit=limit, progress=lambda i, n: print(f"remote check {i}/{n}", flush=True))
    verdict = result.verdict
    return {"passed": verdict.passed, "n": result.run.n, "run_id": result.run.run_id,
            "clauses": [{"clause": c.name, "target": str(c.target), "measured": c.measured, "passed": c.passed}
                        for c in verdict.clauses],
            "metrics": result.run.metrics, "engine": verdict.meta.get("engine")}


def compare(toml: Path, remote_run: str, count: int) -> dict:
    import numpy as np

    from framework.evaluate import language_model, run_eval, store_path
    from framework.spec import load_project
    from framework.store import Store

    project = load_project(str(toml.parent))
    with Store(store_path(project)) as store:
        rows = store.con.execute("SELECT example_id, output, latency_ms FROM results WHERE run_id = ?",
                                 [remote_run]).fetchall()
    remote = {example: (output, latency) for example, output, latency in rows}
    out: dict = {}
    for name, skeleton in (("skeleton", True), ("grammar", False)):
        language_model(project, "qwen15").engine.skeleton = skeleton
        local = run_eval(project, split="eval", limit=count, model_key="qwen15", record=False,
                         progress=lambda i, n, name=name: print(f"local {name} {i}/{n}", flush=True))
        pairs = [(r, remote[r["example_id"]]) for r in local.records if r["example_id"] in remote]
        def parsed(output):
            return json.loads(output) if isinstance(output, str) else output

        same = [r for r, (output, _) in pairs if json.dumps(r["output"], sort_keys=True) ==
                json.dumps(parsed(output), sort_keys=True)]
        fields = sorted({k for r, (output, _) in pairs for k in (r["output"] or {}) | (parsed(output) or {})})
        per_field = {f: sum((r["output"] or {}).get(f) == (parsed(output) or {}).get(f) for r, (output, _) in pairs)
                     for f in fields}
        differing = [{"example_id": r["example_id"], "local": r["output"], "remote": parsed(output)}
                     for r, (output, _) in pairs if r not in same][:8]
        lat_local = [r["latency_ms"] for r, _ in pairs]
        lat_remote = [latency for _, (_, latency) in pairs]
        out[name] = {"n": len(pairs), "identical_answers": len(same), "identical_per_field": per_field,
                     "first_differences": differing,
                     "latency_p50_ms": {"local": float(np.median(lat_local)), "remote": float(np.median(lat_remote)),
                                        "ratio": float(np.median(lat_remote) / np.median(lat_local)),
                                        "ratio_interval_95": ratio_interval(lat_remote, lat_local, np.median)},
                     "metrics": local.metrics}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="eval tickets for the remote check (default: all)")
    parser.add_argument("--compare", type=int, default=40, help="eval tickets compared with the local engine")
    parser.add_argument("--server", choices=sorted(SERVERS), default="llama-cpp-python")
    parser.add_argument("--server-bin", default=None, help="llama-server's path (for --server llama-server)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default bench/results/remote.json (llama-cpp-python) or remote-llama-server.json")
    args = parser.parse_args()
    args.out = args.out or REPO / "bench" / "results" / (
        "remote.json" if args.server == "llama-cpp-python" else "remote-llama-server.json")

    from framework import weights
    from framework.remote import fingerprint
    from framework.spec import load_project

    results = Results(args.out, {"machine": machine_info(), "settings": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}})
    with tempfile.TemporaryDirectory(prefix="slipway-bench-remote-") as tmp:
        toml = copy_project(Path(tmp))
        demo = load_project(str(toml.parent))
        gguf = weights.ensure(demo.model("qwen15"), demo.dir, field="models.qwen15")
        port = free_port()
        url = f"http://127.0.0.1:{port}/v1"
        command = server_command(args.server, args.server_bin, gguf, port)
        server, ready_s = start_server(command, port, Path(tmp) / "server.log")
        try:
            results.figures["server"] = {"kind": args.server, "command": command, "url": url,
                                         "gguf_sha256": demo.model("qwen15").sha256,
                                         "ready_seconds": round(ready_s, 1), "slots": 1}
            point_at_server(toml, url, None, args.server)
            pin = fingerprint(load_project(str(toml.parent)).model("remote"), "models.remote")
            point_at_server(toml, url, pin, args.server)
            results.figures["fingerprint"] = pin
            results.save()
            checked = results.section("remote_check", remote_check, toml, args.limit)
            if checked.get("run_id"):
                results.section("compare", compare, toml, checked["run_id"], args.compare)
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
