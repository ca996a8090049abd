"""How many replicas the contract's declared volume needs, from measured throughput (issue 18).

A replica is one served bento with one worker on its own machine, as the figures were measured: 2 CPU cores
(`slipway serve --workers 1`), or one GPU. Demand is the contract's `expected_requests_per_day` spread over the
day, times a peak factor (3 unless given: the busiest hour runs at three times the daily mean), and a replica is
planned at `utilization` (80%) of its measured throughput: run at 100%, random arrivals queue without bound.

    replicas = max(1, ceil(peak requests/s / (requests/s per replica × utilization)))

Requests/s per replica, first source that has a figure for the pipeline's model (the result says which, and
why each earlier one had none):

1. **served**: the store's traces of the newest version served with this model file (among the newest 2,000
   traces of the last 30 days), answers per second per worker while it was saturated, i.e. while at least
   `parallel` requests were in flight (queued ones included). Below that a worker's rate shows the arrivals, not what it
   can do, so at least 60 s of saturated time and 20 answers are needed. The hardware is whatever served them.
2. **bench**: `bench/results/engine.json`, the served bento's throughput with 4 clients at once on the
   benchmark machine (2 cores), for this model file, at the largest measured `parallel` not above the
   project's (never a figure for more batching than the project declares).

The GPU row uses the GPU figures BENCHMARKS.md reports ("GPU (issue 5)"), only for a model measured there.
Memory per replica is an estimate from what is pinned and measured: the weights (the GGUF's size; llama.cpp maps
it, and every token reads all of it) plus the KV cache for the engine's context (tokens × bytes per token, as
measured by the saved prefix state in engine.json). The process itself (Python, BentoML, DSPy, llama.cpp's
compute buffers) is not measured and comes on top. Answers from the cache (docs/cache.md) only lower the need.
"""

from __future__ import annotations

import bisect
import json
import math
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from framework.spec import ModelSpec, Project

SECONDS_PER_DAY = 86_400
PEAK_FACTOR = 3.0          # busiest hour / daily mean, unless the caller gives one
UTILIZATION = 0.8          # share of a replica's measured throughput that is planned for
TRACE_WINDOW = timedelta(days=30)
TRACE_LIMIT = 2000         # newest served answers read from the store
MIN_SATURATED_S = 60.0     # saturated serving time a store figure needs
MIN_ANSWERS = 20           # answers while saturated a store figure needs
MAX_OTHER_LOAD = 0.1       # a bench section with more CPU taken by other processes is no figure (BENCHMARKS.md)
ENGINE_RESULTS = "engine.json"
PACKAGE_DIR = Path(__file__).resolve().parent
# BENCHMARKS.md, "GPU (issue 5)", measured 2026-11-26; no result file travelled back from that machine, so the
# figures are copied here with where they come from. Keyed by the model file's sha256.
GPU_MEASURED: dict[str, dict[str, Any]] = {
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53": {
        "requests_per_s": 1000 / 285, "parallel": 1, "measured_at": "2026-11-26",
        "machine": "one NVIDIA H200, 16 CPU cores, gpu_layers = -1",
        "what": "1 / p50 of the demo call (285 ms), 20 dev tickets one at a time, decoded as the service decodes",
        "reference": 'BENCHMARKS.md, "GPU (issue 5)"'},
}


# -- the arithmetic (pure) ---------------------------------------------------------------------------------------
def peak_rate(requests_per_day: float, peak_factor: float = PEAK_FACTOR) -> float:
    """Requests per second in the busiest hour."""
    return requests_per_day / SECONDS_PER_DAY * peak_factor


def replicas_needed(requests_per_day: float, per_replica: float, *, peak_factor: float = PEAK_FACTOR,
                    utilization: float = UTILIZATION) -> int:
    """Replicas that serve the peak rate with each at `utilization` of `per_replica` requests/s; at least 1.
    Never fewer for more requests, never more for a faster replica. Raises ValueError on a rate <= 0."""
    if per_replica <= 0 or not 0 < utilization <= 1 or peak_factor < 1 or requests_per_day < 0:
        raise ValueError("need per_replica > 0, 0 < utilization <= 1, peak_factor >= 1, requests_per_day >= 0")
    # rounded first so that float noise (2.0000000000000004) does not ask for a third replica
    return max(1, math.ceil(round(peak_rate(requests_per_day, peak_factor) / (per_replica * utilization), 9)))


def served_throughput(rows: list[dict[str, Any]], parallel: int) -> dict[str, Any]:
    """Answers per second per worker while saturated, from served traces (`started_at`, `duration_ms`, `status`,
    `worker`, `served`): per worker, the time with at least `parallel` model requests in flight (queued ones
    included), and the answers worked on then, each counted by the share of its own time that fell in it (a
    request that waited alone and finished as others arrived counts for little). Cache hits and fallback answers
    never reach the model, and failures answer nothing: all are left out. `requests_per_s` is None unless there
    were MIN_SATURATED_S seconds and MIN_ANSWERS answers."""
    requests: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        served = row.get("served") or {}
        if (not row.get("duration_ms") or not 200 <= int(row.get("status") or 0) < 400
                or served.get("cache") or served.get("fallback")):
            continue
        start = _seconds(row["started_at"])
        requests[str(row.get("worker"))].append((start, start + row["duration_ms"] / 1000))
    saturated, answers = 0.0, 0.0
    for spans in requests.values():
        change: dict[float, int] = defaultdict(int)
        for begin, end in spans:
            change[begin] += 1
            change[end] -= 1
        busy: list[list[float]] = []   # the worker's saturated stretches, merged
        level, prev = 0, 0.0
        for t in sorted(change):
            if level >= parallel and t > prev:
                if busy and busy[-1][1] == prev:
                    busy[-1][1] = t
                else:
                    busy.append([prev, t])
            level, prev = level + change[t], t
        saturated += sum(b - a for a, b in busy)
        starts = [a for a, _ in busy]
        for begin, end in spans:
            i = max(bisect.bisect_right(starts, begin) - 1, 0)
            inside = 0.0
            while i < len(busy) and busy[i][0] < end:
                inside += max(0.0, min(end, busy[i][1]) - max(begin, busy[i][0]))
                i += 1
            answers += inside / (end - begin)
    enough = saturated >= MIN_SATURATED_S and answers >= MIN_ANSWERS
    return {"answers": round(answers, 3), "saturated_s": round(saturated, 3), "workers": len(requests),
            "requests": sum(len(spans) for spans in requests.values()),
            "requests_per_s": answers / saturated if enough else None}


def kv_tokens(spec: ModelSpec) -> int:
    """Tokens of KV cache the engine allocates (framework/lm.py, framework/batch.py): the sequential engine's
    context, or the batched engine's shared context plus the 256-token one its tokenizer model keeps."""
    return spec.context_size if spec.parallel <= 1 else spec.context_size * min(spec.parallel, 4) + 256


# -- the measured figures ------------------------------------------------------------------------------------------
def bench_throughput(results: Path, sha256: str, parallel: int) -> tuple[dict | None, str | None]:
    """(figure, None) from engine.json's served section for this model file, or (None, why not)."""
    path = results / ENGINE_RESULTS
    data = _read_json(path)
    if data is None:
        return None, f"{path} is missing or not JSON"
    measured = data.get("model_file") or {}
    if measured.get("sha256") != sha256:
        return None, (f"{path.name} measured {measured.get('name', 'another model')} "
                      f"({str(measured.get('sha256'))[:12]}…), not this model file")
    served, rows, why = data.get("served") or {}, [], None
    for mode, bento in (served.get("bentos") or {}).items():
        section = served.get(f"bento_{mode}") or {}
        rate = (section.get("concurrent") or {}).get("requests_per_s")
        load = (section.get("machine_load") or {}).get("other_cpu_cores_mean") or 0.0
        if not rate or bento.get("parallel", 0) > parallel:
            continue
        if load > MAX_OTHER_LOAD:
            why = f"{path.name}'s {mode} section ran beside {load:.2f} other busy cores: not a figure"
            continue
        rows.append((bento["parallel"], mode, rate, section))
    if not rows:
        return None, why or f"{path.name} has no served throughput at parallel <= {parallel}"
    bento_parallel, mode, rate, section = max(rows)
    machine = data.get("machine") or {}
    concurrent = section["concurrent"]
    return {"source": "bench", "device": "cpu", "requests_per_s": rate, "parallel": bento_parallel,
            "cores": machine.get("nproc"), "threads": measured.get("threads"),
            "measured_at": machine.get("date"), "file": str(path),
            "field": f"served.bento_{mode}.concurrent.requests_per_s",
            "what": f"`slipway serve --workers 1`, {concurrent.get('clients')} clients at once, "
                    f"{concurrent.get('requests')} requests, on {machine.get('nproc')} cores ({machine.get('cpu')})"
            }, None


def kv_bytes_per_token(results: Path, sha256: str) -> dict | None:
    """Bytes of KV cache per token for this model file: the saved prefix state's size over its tokens, as
    engine.json measured it (llama.cpp's default f16 cache). None when not measured for this model."""
    data = _read_json(results / ENGINE_RESULTS)
    if data is None or (data.get("model_file") or {}).get("sha256") != sha256:
        return None
    prefix = (((data.get("startup") or {}).get("in_process") or {}).get("batched_saved_prefix") or {})
    if not prefix.get("prefix_bytes") or not prefix.get("prefix_tokens"):
        return None
    return {"bytes_per_token": prefix["prefix_bytes"] / prefix["prefix_tokens"], "file": str(results / ENGINE_RESULTS),
            "field": "startup.in_process.batched_saved_prefix (prefix_bytes / prefix_tokens)"}


def memory_per_replica(spec: ModelSpec, weights_bytes: int | None, kv: dict | None) -> dict[str, Any]:
    """Estimated bytes one replica holds for the model: weights + KV cache (None where not known)."""
    tokens = kv_tokens(spec)
    kv_bytes = round(tokens * kv["bytes_per_token"]) if kv else None
    return {"weights_bytes": weights_bytes, "kv_tokens": tokens,
            "kv_bytes_per_token": kv["bytes_per_token"] if kv else None, "kv_bytes": kv_bytes,
            "estimate_bytes": weights_bytes + kv_bytes if weights_bytes and kv_bytes is not None else None,
            "kv_source": kv and f"{kv['file']}: {kv['field']}",
            "not_counted": "the process itself (Python, BentoML, DSPy) and llama.cpp's compute buffers: not measured"}


# -- the project -------------------------------------------------------------------------------------------------
def capacity(project: Project, *, peak_factor: float | None = None, utilization: float = UTILIZATION,
             results: Path | None = None, ingest: bool = True, now: datetime | None = None) -> dict[str, Any]:
    """The capacity plan for the project's pipeline model: demand, per-replica rows (served, cpu, gpu), the
    replicas the first measured source needs, memory per replica, and why each source had no figure.

    `results` is the bench result folder (default: `bench/results` beside the project's repository, else
    beside this package). `ingest` first copies new served traces into the store, as `slipway slo` does."""
    from framework.errors import SpecError

    if not 0 < utilization <= 1:
        raise SpecError(f"utilization {utilization} is not a share of a replica's throughput", field="utilization",
                        hint="a number in (0, 1], e.g. 0.8")
    if peak_factor is not None and not peak_factor >= 1:
        raise SpecError(f"peak factor {peak_factor} is below 1: the busiest hour is at least the daily mean",
                        field="peak_factor", hint="e.g. 3 for office-hours traffic")
    key = project.spec.pipeline.model
    spec = project.model(key)
    results = results or _results_dir(project)
    factor = PEAK_FACTOR if peak_factor is None else peak_factor
    volume = project.spec.contract.expected_requests_per_day
    demand = None if volume is None else {
        "requests_per_day": volume, "mean_per_s": volume / SECONDS_PER_DAY, "peak_factor": factor,
        "peak_factor_source": "default: the busiest hour at 3x the daily mean" if peak_factor is None else "given",
        "peak_per_s": peak_rate(volume, factor), "utilization": utilization}
    tried: list[dict[str, str]] = []
    rows: list[dict[str, Any]] = []
    served, why = _served_figure(project, spec, key, now or datetime.now(UTC), ingest)
    if served:
        rows.append(served)
    else:
        tried.append({"source": "served", "why": why})
    bench, why = bench_throughput(results, spec.identity, spec.parallel)
    if bench:
        rows.append(bench)
    else:
        tried.append({"source": "bench", "why": why})
    gpu = GPU_MEASURED.get(spec.identity)
    if gpu:
        rows.append({"source": "gpu", "device": "gpu", **gpu})
    for row in rows:
        row["replicas"] = (replicas_needed(volume, row["requests_per_s"], peak_factor=factor, utilization=utilization)
                           if volume is not None else None)
    chosen = next((row for row in rows if row["source"] in ("served", "bench")), None)
    weights = spec.size_bytes or _file_size(project, spec)
    notes = []
    if project.spec.serve.workers > 1:
        notes.append(f"[serve] workers = {project.spec.serve.workers}: the figures are per worker on its own cores; "
                     "workers sharing one machine's cores are not that many times faster (not measured)")
    if gpu and spec.gpu_layers == 0:
        notes.append("the GPU row needs gpu_layers set (e.g. -1) and its own check: on a GPU the model's answers "
                     "change (BENCHMARKS.md, \"GPU\"), so the CPU check does not vouch for them")
    return {
        "project": project.name,
        "model": {"key": key, "name": spec.name, "sha256": spec.identity, "parallel": spec.parallel,
                  "context_size": spec.context_size, "threads": spec.threads, "gpu_layers": spec.gpu_layers,
                  "workers": project.spec.serve.workers},
        "demand": demand,
        "rows": rows,
        "source": chosen["source"] if chosen else None,
        "replicas": chosen["replicas"] if chosen else None,
        "gpu": None if gpu else "not measured on a GPU for this model file (BENCHMARKS.md, \"GPU\")",
        "memory": memory_per_replica(spec, weights, kv_bytes_per_token(results, spec.identity)),
        "tried": tried,
        "notes": notes,
    }


def describe(plan: dict[str, Any]) -> list[str]:
    """The plan as plain lines for a terminal: what was measured where, and what follows from it."""
    model, demand, memory = plan["model"], plan["demand"], plan["memory"]
    lines = [f"{plan['project']}: model {model['key']} ({model['name']}), parallel {model['parallel']}, "
             f"{model['workers']} worker(s) per replica"]
    if demand is None:
        lines.append("demand: not declared: set [contract] expected_requests_per_day to get a replica count")
    else:
        lines.append(f"demand: {demand['requests_per_day']:,.0f} requests/day = {demand['mean_per_s']:.3f}/s mean; "
                     f"peak x{demand['peak_factor']:g} ({demand['peak_factor_source']}) = "
                     f"{demand['peak_per_s']:.3f}/s; "
                     f"replicas planned at {demand['utilization']:.0%} of their measured throughput")
    for row in plan["rows"]:
        if row["source"] == "served":
            label, where = "served (store)", f"store, version {row['version']}: {row['what']}"
        elif row["source"] == "bench":
            label, where = f"cpu ({row['cores']} cores)", f"{_short(row['file'])}, {row['field']}: {row['what']}"
        else:
            label, where = "gpu", f"{row['reference']}: {row['what']}; {row['machine']}"
        count = "" if row["replicas"] is None else f" -> {row['replicas']} replica(s)"
        lines.append(f"{label}: {row['requests_per_s']:.3f} requests/s per replica{count} "
                     f"[{where}; measured {str(row.get('measured_at') or '?')[:10]}]")
    if plan["gpu"]:
        lines.append(f"gpu: {plan['gpu']}")
    if plan["source"]:
        lines.append(f"used: {plan['source']} -> {plan['replicas'] if plan['replicas'] is not None else '?'} "
                     "replica(s)" + "".join(f"; {t['source']} had none: {t['why']}" for t in plan["tried"]
                                           if t["source"] != plan["source"]))
    else:
        lines.append("used: no measured throughput for this model: "
                     + "; ".join(f"{t['source']}: {t['why']}" for t in plan["tried"]))
    if memory["estimate_bytes"]:
        lines.append(f"memory per replica (estimate): {_size(memory['weights_bytes'])} weights + "
                     f"{_size(memory['kv_bytes'])} KV cache ({memory['kv_tokens']:,} tokens x "
                     f"{memory['kv_bytes_per_token'] / 1000:.1f} kB) = {_size(memory['estimate_bytes'])}; "
                     f"not counted: {memory['not_counted']}")
    else:
        weights = _size(memory["weights_bytes"]) if memory["weights_bytes"] else "unknown"
        lines.append(f"memory per replica: weights {weights}; KV cache per token not measured for this model")
    return lines + [f"note: {note}" for note in plan["notes"]]


# -- helpers -------------------------------------------------------------------------------------------------------
def _served_figure(project: Project, spec: ModelSpec, key: str, now: datetime, ingest: bool
                   ) -> tuple[dict | None, str]:
    """The served row from the store, or (None, why not)."""
    from framework.errors import SlipwayError
    from framework.evaluate import store_path
    from framework.store import Store

    path = store_path(project)
    if not path.exists():
        return None, "no store yet: nothing served"
    try:
        if ingest:
            from framework import traces

            traces.ingest(project)
        with Store(path, read_only=True) as store:
            rows = store.traces(since=(now - TRACE_WINDOW).replace(tzinfo=None), limit=TRACE_LIMIT)
    except SlipwayError as exc:
        return None, f"the store could not be read: {exc.message}"
    rows = [r for r in rows if r.get("model_sha256") == spec.identity]
    if not rows:
        return None, f"no served traces of this model file in the last {TRACE_WINDOW.days} days"
    version = rows[0].get("version") or rows[0].get("bento")
    rows = [r for r in rows if (r.get("version") or r.get("bento")) == version]
    parallel = _served_parallel(project, version, key)
    if parallel is not None and parallel != spec.parallel:
        return None, (f"the newest served version {version} decodes {parallel} at a time; the project now declares "
                      f"parallel = {spec.parallel}")
    figure = served_throughput(rows, parallel or spec.parallel)
    if figure["requests_per_s"] is None:
        return None, (f"version {version}: {figure['saturated_s']:.0f} s saturated with "
                      f"{figure['answers']:.0f} answers "
                      f"in its newest {len(rows)} traces (needs {MIN_SATURATED_S:.0f} s and {MIN_ANSWERS}): "
                      "it has not been served under load")
    return {"source": "served", "device": "as served", "version": version, "parallel": parallel or spec.parallel,
            "measured_at": str(max(r["started_at"] for r in rows)),
            "what": (f"{figure['answers']:.0f} answers in {figure['saturated_s']:.0f} s saturated, "
                     f"{figure['workers']} worker(s)"), **figure}, ""


def _served_parallel(project: Project, version: str | None, key: str) -> int | None:
    """`parallel` as the served bento packed it (its own project.toml), when the bento is still in the store."""
    from framework import bentos
    from framework.errors import SlipwayError
    from framework.spec import parse_spec

    if not version:
        return None
    try:
        bento = bentos.get(project, version.split(":")[-1])
        toml = Path(bento.path) / "src" / "slipway" / "project.toml"
        return parse_spec(toml.read_text(), str(toml)).models[key].parallel
    except (SlipwayError, OSError, KeyError):
        return None


def _results_dir(project: Project) -> Path:
    for candidate in (project.root / "bench" / "results", PACKAGE_DIR.parent / "bench" / "results"):
        if candidate.is_dir():
            return candidate
    return project.root / "bench" / "results"


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _file_size(project: Project, spec: ModelSpec) -> int | None:
    from framework.weights import model_path

    if spec.remote is not None:
        return 0   # the weights live on the model server, not in the replica
    path = model_path(spec, project.dir)
    return path.stat().st_size if path.is_file() else None


def _seconds(moment: datetime | str) -> float:
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _size(count: int | None) -> str:
    if count is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count} B"


def _short(path: str) -> str:
    parts = Path(path).parts
    return "/".join(parts[-3:]) if len(parts) >= 3 else path
