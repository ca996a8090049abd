"""llama.cpp tokens/s on the CPU vs the GPU, same GGUF, same machine, same run.

Two figures per model and device, as llama-bench reports them: prompt processing (pp: a 512-token
prompt in one batch) and token generation (tg: 128 decode steps, one token each). With `--requests`,
also the demo's own served call, replayed through Slipway's engine (`LlamaCppEngine.fill`, the
skeleton decoding the service uses) on the chat messages and JSON schema the notebook program sends:
latency per ticket, and whether the GPU's answers equal the CPU's.

    # on the dev machine: record what the program sends (DSPy formats it; no answers are needed)
    .venv/bin/python bench/gpu_tokens.py record --project ticket-triage -n 20 requests.json
    # anywhere llama-cpp-python runs (a CUDA build for the GPU rows); pydantic is the only other need
    python bench/gpu_tokens.py run MODEL.gguf [MODEL2.gguf ...] --requests requests.json --out run.json
    python bench/gpu_tokens.py summarize run.json      # the table again, from the saved file
    # the batched engine (framework/batch.py, issue 13): the same requests from P concurrent clients,
    # `parallel = P` against the sequential engine (P = 1), on each device
    python bench/gpu_tokens.py batch MODEL.gguf --requests requests.json --parallel 1 4 8 16 --out batch.json

`run` imports framework.lm without framework/__init__ (which pulls in DuckDB, BentoML and DSPy), so
it runs on a GPU machine that has only llama.cpp, numpy and pydantic.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def record(project_name: str, n: int, out: Path, model: str | None) -> None:
    import dspy

    from framework import adapter, language_model, load_program, load_project, load_split

    project = load_project(project_name)
    tickets = [ex.inputs["ticket"] for ex in load_split(project, "dev")[:n]]
    lm = language_model(project, model or "tiny")  # any model: the messages do not depend on it
    program = load_program(project)
    requests = []
    with dspy.context(lm=lm, adapter=adapter(project)):
        for ticket in tickets:
            program(ticket=ticket)
            entry = lm.history[-1]
            fmt = entry["kwargs"].get("response_format")
            schema = fmt.model_json_schema() if hasattr(fmt, "model_json_schema") else fmt["json_schema"]["schema"]
            requests.append({"messages": entry["messages"], "schema": schema})
    spec = project.model(project.spec.pipeline.model)
    out.write_text(json.dumps({"project": project_name, "max_tokens": spec.max_tokens, "requests": requests}))
    print(f"{len(requests)} requests of {project_name}'s program (dev split) -> {out}")


def _framework_lm():
    """framework.lm and what it imports, without running framework/__init__."""
    if "framework" not in sys.modules:
        package = types.ModuleType("framework")
        package.__path__ = [str(REPO / "framework")]
        sys.modules["framework"] = package
    from framework import lm, structured

    return lm, structured


def _median_rate(seconds: list[float], tokens: int) -> float:
    return tokens / statistics.median(seconds)


def speed(llama, *, pp: int, tg: int, reps: int) -> dict:
    """pp: one batch of `pp` prompt tokens; tg: `tg` single-token decodes after a short prompt.
    The token ids are fixed text; the speed of a decode step does not depend on which token it is."""
    text = " ".join(["Support ticket: the invoice total is wrong and the login page loops."] * 64)
    prompt = llama.tokenize(text.encode())[:pp]
    next_token = llama.tokenize(b" the", add_bos=False)[0]
    pp_s, tg_s = [], []
    llama.reset()
    llama.eval(prompt[:8])  # first call allocates buffers and (on CUDA) loads kernels: not measured
    for _ in range(reps):
        llama.reset()
        start = time.perf_counter()
        llama.eval(prompt)
        pp_s.append(time.perf_counter() - start)
        llama.reset()
        llama.eval(prompt[:16])
        start = time.perf_counter()
        for _ in range(tg):
            llama.eval([next_token])
        tg_s.append(time.perf_counter() - start)
    return {"pp_tokens_per_s": _median_rate(pp_s, len(prompt)), "tg_tokens_per_s": _median_rate(tg_s, tg),
            "pp_tokens": len(prompt), "tg_tokens": tg}


def replay(engine, structured, requests: dict) -> dict:
    answers, latencies, tokens_out = [], [], []
    max_tokens = requests["max_tokens"]
    first = requests["requests"][0]
    engine.fill(first["messages"], structured.plan(first["schema"]), temperature=0.0, max_tokens=max_tokens)
    for request in requests["requests"]:
        text, usage, _, stats = engine.fill(request["messages"], structured.plan(request["schema"]),
                                            temperature=0.0, max_tokens=max_tokens)
        answers.append(text)
        latencies.append(stats.latency_ms)
        tokens_out.append(usage["completion_tokens"])
    return {"p50_ms": statistics.median(latencies), "mean_ms": statistics.mean(latencies),
            "tokens_out_mean": statistics.mean(tokens_out), "answers": answers}


def run(models: list[Path], requests_path: Path | None, *, pp: int, tg: int, reps: int, threads: int,
        out: Path | None) -> None:
    lm, structured = _framework_lm()
    import llama_cpp

    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    requests = json.loads(requests_path.read_text()) if requests_path else None
    rows = []
    for path in models:
        for device, layers in [("cpu", 0)] + ([("gpu", -1)] if gpu else []):
            start = time.perf_counter()
            engine = lm.LlamaCppEngine(path, context_size=4096, threads=threads, gpu_layers=layers)
            row = {"model": path.name, "device": device, "gpu_layers": layers, "threads": threads,
                   "load_s": time.perf_counter() - start, **speed(engine._llama, pp=pp, tg=tg, reps=reps)}
            if requests and not path.name.startswith("synthetic"):
                row["served_call"] = replay(engine, structured, requests)
            engine._llama.close()
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "served_call"}), flush=True)
    doc = {"llama_cpp_python": llama_cpp.__version__, "gpu_offload": gpu, "rows": rows}
    if out:
        out.write_text(json.dumps(doc, indent=1))
    summarize(doc)


def batch_pass(engine, structured, requests: list[dict], max_tokens: int, clients: int) -> dict:
    """Every request answered once, `clients` at a time (a client sends its next as soon as its last
    is answered, as run_eval's workers do); wall time from the first send to the last answer."""
    from concurrent.futures import ThreadPoolExecutor

    def one(request: dict) -> tuple[str, float, int]:
        began = time.perf_counter()
        text, usage, _, _ = engine.fill(request["messages"], structured.plan(request["schema"]), temperature=0.0,
                                        max_tokens=max_tokens)
        return text, (time.perf_counter() - began) * 1000, usage["completion_tokens"]

    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(one, requests))
    wall = time.perf_counter() - began
    latencies = [ms for _, ms, _ in results]
    generated = sum(n for _, _, n in results)
    return {"requests": len(requests), "clients": clients, "wall_s": wall, "requests_per_s": len(requests) / wall,
            "generated_tokens": generated, "generated_tokens_per_s": generated / wall,
            "latency_p50_ms": statistics.median(latencies), "latency_max_ms": max(latencies),
            "answers": [text for text, _, _ in results]}


def batch(models: list[Path], requests_path: Path, *, parallels: list[int], threads: int, devices: list[str],
          cpu_requests: int, gpu_requests: int, out: Path | None) -> None:
    """The batched engine against the sequential one on each device, same requests, same run: for each
    `parallel` P a fresh LlamaCppEngine answers one warm-up request (the shared prefix is evaluated and
    kept; its time is not counted), then the requests from P concurrent clients. P = 1 is the
    sequential engine (one request at a time, under its lock)."""
    lm, structured = _framework_lm()
    import llama_cpp

    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    recorded = json.loads(requests_path.read_text())
    max_tokens = recorded["max_tokens"]
    doc = {"llama_cpp_python": llama_cpp.__version__, "gpu_offload": gpu, "threads": threads,
           "max_tokens": max_tokens, "rows": []}
    for path in models:
        for device in devices:
            if device == "gpu" and not gpu:
                print("no GPU offload in this llama-cpp-python build: GPU rows skipped", flush=True)
                continue
            count = gpu_requests if device == "gpu" else cpu_requests
            requests = [recorded["requests"][i % len(recorded["requests"])] for i in range(count)]
            for parallel in parallels:
                start = time.perf_counter()
                engine = lm.LlamaCppEngine(path, context_size=4096, threads=threads,
                                           gpu_layers=-1 if device == "gpu" else 0, parallel=parallel)
                load_s = time.perf_counter() - start
                warm = batch_pass(engine, structured, requests[:1], max_tokens, 1)
                row = {"model": path.name, "device": device, "parallel": parallel, "load_s": load_s,
                       "warm_up_s": warm["wall_s"], **batch_pass(engine, structured, requests, max_tokens, parallel)}
                if engine.batcher is not None:
                    row["llama_decode_calls"] = engine.batcher.steps
                    engine.batcher.close()
                engine._llama.close()
                doc["rows"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "answers"}), flush=True)
                if out:
                    out.write_text(json.dumps(doc, indent=1))
    summarize_batch(doc)


def summarize_batch(doc: dict) -> None:
    """Throughput per device and parallel, as a ratio to that device's sequential row of the same run,
    and how many answers equal the sequential engine's (near-ties flip in batches of another shape)."""
    print(f"\nllama-cpp-python {doc['llama_cpp_python']}, GPU offload: {doc['gpu_offload']}, "
          f"CPU threads: {doc['threads']}")
    print(f"{'model':32} {'device':6} {'P':>3} {'req/s':>7} {'gen t/s':>8} {'x seq':>6} {'p50 ms':>8} "
          f"{'same as seq':>11}")
    base: dict[tuple[str, str], dict] = {}
    for row in doc["rows"]:
        key = (row["model"], row["device"])
        if row["parallel"] == 1:
            base[key] = row
        seq = base.get(key)
        ratio = row["requests_per_s"] / seq["requests_per_s"] if seq else None
        same = (f"{sum(a == b for a, b in zip(row['answers'], seq['answers'], strict=True))}/{len(row['answers'])}"
                if seq and len(seq["answers"]) == len(row["answers"]) else "-")
        print(f"{row['model'][:32]:32} {row['device']:6} {row['parallel']:>3} {row['requests_per_s']:7.2f} "
              f"{row['generated_tokens_per_s']:8.1f} {(f'{ratio:.2f}' if ratio else '-'):>6} "
              f"{row['latency_p50_ms']:8.0f} {same:>11}")


def _fields(answer: str) -> dict:
    try:
        return json.loads(answer)
    except json.JSONDecodeError:
        return {}


def summarize(doc: dict) -> None:
    """The table, GPU/CPU ratios, and how often the GPU's answer matches the CPU's, field by field
    (float sums run in another order on the GPU; greedy decoding can then pick another token)."""
    rows = doc["rows"]
    threads = rows[0]["threads"] if rows else "-"
    print(f"\nllama-cpp-python {doc['llama_cpp_python']}, GPU offload: {doc['gpu_offload']}, CPU threads: {threads}")
    print(f"{'model':44} {'device':6} {'pp t/s':>9} {'tg t/s':>8} {'call p50 ms':>12} {'load s':>7}")
    for row in rows:
        call = row.get("served_call", {}).get("p50_ms")
        print(f"{row['model']:44} {row['device']:6} {row['pp_tokens_per_s']:9.0f} {row['tg_tokens_per_s']:8.1f} "
              f"{(f'{call:.0f}' if call is not None else '-'):>12} {row['load_s']:7.2f}")
    by_model: dict[str, dict] = {}
    for row in rows:
        by_model.setdefault(row["model"], {})[row["device"]] = row
    for name, pair in by_model.items():
        if "gpu" not in pair:
            continue
        cpu, gpu_row = pair["cpu"], pair["gpu"]
        print(f"{name}: GPU/CPU pp x{gpu_row['pp_tokens_per_s'] / cpu['pp_tokens_per_s']:.1f}, "
              f"tg x{gpu_row['tg_tokens_per_s'] / cpu['tg_tokens_per_s']:.1f}")
        if "served_call" not in cpu:
            continue
        pairs = list(zip(cpu["served_call"]["answers"], gpu_row["served_call"]["answers"], strict=True))
        print(f"  served call p50 {cpu['served_call']['p50_ms']:.0f} -> {gpu_row['served_call']['p50_ms']:.0f} ms "
              f"(x{cpu['served_call']['p50_ms'] / gpu_row['served_call']['p50_ms']:.1f}); answers identical to the "
              f"CPU's: {sum(a == b for a, b in pairs)}/{len(pairs)}")
        keys = sorted({k for a, _ in pairs for k in _fields(a)})
        same = {k: sum(_fields(a).get(k) == _fields(b).get(k) for a, b in pairs) for k in keys}
        print("  same field value on GPU and CPU: " + ", ".join(f"{k} {n}/{len(pairs)}" for k, n in same.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="save the chat messages + schema the program sends for n dev tickets")
    r.add_argument("out", type=Path)
    r.add_argument("--project", default="ticket-triage")
    r.add_argument("--model", default=None, help="model key used to run the program (default: tiny)")
    r.add_argument("-n", type=int, default=20)
    m = sub.add_parser("run", help="pp/tg tokens/s (and the replayed served call) on CPU and GPU")
    m.add_argument("models", type=Path, nargs="+")
    m.add_argument("--requests", type=Path, default=None)
    m.add_argument("--pp", type=int, default=512)
    m.add_argument("--tg", type=int, default=128)
    m.add_argument("--reps", type=int, default=3)
    m.add_argument("--threads", type=int, default=os.cpu_count())
    m.add_argument("--out", type=Path, default=None)
    b = sub.add_parser("batch", help="the batched engine vs the sequential one, P concurrent clients, per device")
    b.add_argument("models", type=Path, nargs="+")
    b.add_argument("--requests", type=Path, required=True)
    b.add_argument("--parallel", type=int, nargs="+", default=[1, 4, 8, 16])
    b.add_argument("--devices", nargs="+", default=["cpu", "gpu"], choices=["cpu", "gpu"])
    b.add_argument("--cpu-requests", type=int, default=32)
    b.add_argument("--gpu-requests", type=int, default=64)
    b.add_argument("--threads", type=int, default=os.cpu_count())
    b.add_argument("--out", type=Path, default=None)
    s = sub.add_parser("summarize", help="print the table of a saved `run --out` or `batch --out` file")
    s.add_argument("saved", type=Path)
    args = ap.parse_args()
    if args.cmd == "record":
        record(args.project, args.n, args.out, args.model)
    elif args.cmd == "summarize":
        doc = json.loads(args.saved.read_text())
        summarize_batch(doc) if doc["rows"] and "parallel" in doc["rows"][0] else summarize(doc)
    else:
        missing = [p for p in args.models if not p.exists()]
        if missing:
            sys.exit(f"no such model file: {', '.join(map(str, missing))}")
        if importlib.util.find_spec("llama_cpp") is None:
            sys.exit("llama_cpp is not importable: install llama-cpp-python (a CUDA build for GPU rows)")
        if args.cmd == "batch":
            batch(args.models, args.requests, parallels=args.parallel, threads=args.threads, devices=args.devices,
                  cpu_requests=args.cpu_requests, gpu_requests=args.gpu_requests, out=args.out)
        else:
            run(args.models, args.requests, pp=args.pp, tg=args.tg, reps=args.reps, threads=args.threads,
                out=args.out)


if __name__ == "__main__":
    main()
