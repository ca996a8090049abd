"""Run a program over a split on the real model and record every example.

This is where the pieces meet: the spec names the model (weights, verified),
the notebook supplies the program, llama.cpp answers through DSPy, each
example's output, scores, latency, tokens and cost go to the store as soon as
it finishes, and the run ends as `Measurements` the contract can judge.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from framework import weights
from framework.content import content_hashes
from framework.dataset import Example, load_examples
from framework.guardrails import decision_rows
from framework.lm import make_lm, metering
from framework.metrics import Measurements, exact_match, measure, metric_name, request_cost
from framework.notebook import input_fields, load_program, notebook_function, output_fields
from framework.routing import answer_confidence
from framework.spec import Project
from framework.store import Store, new_id

Progress = Callable[[int, int], None]
# The content-hash parts the runs table keeps (framework/content.py has them all).
RUN_HASH_COLUMNS = ("program_hash", "notebook_hash", "dataset_hash", "settings_hash", "content_hash")


@dataclass
class EvalRun:
    """One scored pass over a split; `records` mirror the store's results rows."""

    run_id: str
    split: str
    model_key: str
    content_hash: str
    records: list[dict[str, Any]]
    measurements: Measurements
    recorded: bool = True
    reused: bool = False
    hashes: dict[str, str] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.records)

    @property
    def metrics(self) -> dict[str, float]:
        return self.measurements.metrics


def store_path(project: Project):
    return project.state_dir / "store.duckdb"


def language_model(project: Project, model_key: str | None = None, *, gpu_layers: int | None = None):
    """The project's `dspy.LM`: on the verified local GGUF (loaded once per process), or on the remote
    server after its fingerprint is verified (framework/remote.py)."""
    key = model_key or project.spec.pipeline.model
    spec = project.model(key)
    if spec.remote is not None:
        return _remote_lm(project, key)
    path = weights.ensure(spec, project.dir, toml=str(project.toml_path), field=f"models.{key}")
    return make_lm(spec, path, gpu_layers=gpu_layers)


_REMOTE_LMS: dict[tuple, Any] = {}


def verify_remote(project: Project, key: str) -> str:
    """Probe a remote model now and refuse it unless it answers as pinned (RemoteModelError); its fingerprint."""
    from framework.remote import verify

    return verify(project.model(key), f"models.{key}", toml=str(project.toml_path))


def _remote_lm(project: Project, key: str, *, verified: bool = False):
    """The remote model's LM, its fingerprint verified on every call unless `verified` (the server may swap the
    model between two checks of one process); the LM itself is made once per (project.toml, model)."""
    from framework.remote import make_remote_lm

    spec = project.model(key)
    if not verified:
        verify_remote(project, key)
    cache_key = (str(project.toml_path), key, spec.model_dump_json())
    if cache_key not in _REMOTE_LMS:
        _REMOTE_LMS[cache_key] = make_remote_lm(spec, f"models.{key}", toml=str(project.toml_path), verified=True)
    return _REMOTE_LMS[cache_key]


def project_guard(project: Project, program, model_key: str | None = None):
    """The project's guardrails for `program`, counting input tokens with the model's tokenizer (the
    engine `language_model` loaded: call that first)."""
    from framework.guardrails import guard_for
    from framework.lm import load_engine

    key = model_key or project.spec.pipeline.model
    spec = project.model(key)
    engine = (_remote_lm(project, key, verified=True).engine if spec.remote is not None
              else load_engine(spec, weights.model_path(spec, project.dir)))
    return guard_for(project.spec.guardrails, program, engine=engine, adapter=adapter(project), model=spec)


def adapter(project: Project):
    import dspy

    from framework.lm import json_adapter

    return json_adapter() if project.spec.pipeline.adapter == "json" else dspy.ChatAdapter()


def load_split(project: Project, split: str, program=None) -> list[Example]:
    fields = input_fields(program if program is not None else load_program(project))
    return load_examples(project.split_path(split), input_fields=fields)


def git_commit(root) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _custom_metrics(project: Project) -> dict[str, Callable]:
    return {metric_name(item): notebook_function(project, item.partition(":")[2])
            for item in project.spec.eval.metrics if item.startswith("notebook:")}


def score_example(example: Example, output: dict | None, error: str | None, metric_items: list[str],
                  custom: dict[str, Callable], prediction=None, calls: list | None = None) -> dict[str, float]:
    """Per-example scores in [0, 1]. An errored example scores 0 on everything.

    `format_validity` judges the model's raw output, not DSPy's parse of it: 1.0 only when every
    model call (`calls`, the example's `lm.CallStats`) wrote text valid under its response schema.
    A call made without a schema (a chat adapter) counts as valid when the example parsed.
    """
    scores: dict[str, float] = {}
    for item in metric_items:
        kind, _, arg = item.partition(":")
        name = metric_name(item)
        if kind == "macro_f1":
            continue  # a run-level metric: see metrics.measure
        if error is not None or output is None:
            scores[name] = 0.0
        elif kind == "exact_match":
            scores[name] = exact_match(example.expected.get(arg), output.get(arg))
        elif kind == "format_validity":
            scores[name] = float(all(c.raw_valid is not False for c in calls or ()))
        elif kind == "notebook":
            import dspy

            value = custom[name](dspy.Example(**example.inputs, **example.expected), prediction, None)
            scores[name] = float(value)
    return scores


def is_routed(project: Project, model_key: str | None, routed: bool | None = None) -> bool:
    """Does a run on `model_key` run the routed pipeline? A tiered project routes unless one model is asked
    for by key (`--model`, the top tier's included: optimize scores the model it compiles on) or
    `routed=False` (calibration runs tiers alone)."""
    if routed is not None:
        return routed and bool(project.spec.pipeline.tiers)
    return bool(project.spec.pipeline.tiers) and model_key is None


def run_eval(project: Project, *, split: str = "eval", limit: int | None = None, program=None,
             model_key: str | None = None, record: bool = True, progress: Progress | None = None,
             routed: bool | None = None) -> EvalRun:
    """Score every example of `split` (or the first `limit`) on the real model; on a tiered project, the
    routed pipeline (framework/routing.py) unless `is_routed` says a single model was asked for."""
    import dspy

    routed = is_routed(project, model_key, routed)
    model_key = model_key or project.spec.pipeline.model
    model = project.model(model_key)
    tiers = None
    if routed:
        from framework.routing import tiers_for

        tiers = tiers_for(project)
        model = max((t.model for t in tiers), key=lambda m: m.parallel)   # the pool's width below
    lm = language_model(project, model_key)
    program = program if program is not None else load_program(project)
    examples = load_split(project, split, program)[: limit or None]
    outputs = output_fields(program)
    metric_items = project.spec.eval.metrics
    custom = _custom_metrics(project)
    guard = project_guard(project, program, model_key)
    hashes = content_hashes(project, program, split, model_key, limit, routed=routed)
    run_id = new_id("run")
    path = store_path(project)
    if record:  # the store is opened per write: a check that runs for minutes never locks out a deploy
        with Store(path) as store:
            store.start_run({"run_id": run_id, "project": project.name, "split": split, "model_key": model_key,
                             "model_name": model.name, "model_sha256": model.identity, "git_commit":
                             git_commit(project.root), "n_examples": len(examples),
                             **{k: v for k, v in hashes.items() if k in RUN_HASH_COLUMNS}})
    records: list[dict[str, Any]] = []
    status = "interrupted"
    lock = threading.Lock()

    def one(position: int, example: Example) -> None:
        if tiers is not None:
            result = _run_routed(program, example, position, outputs, metric_items, custom, tiers, project.routing,
                                 guard, adapter(project))
        else:
            with dspy.context(lm=lm, adapter=adapter(project)):
                result = _run_one(program, example, position, outputs, metric_items, custom, model, guard)
        with lock:  # each result is recorded as soon as it is known: an interrupted run keeps what it did
            records.append(result)
            if record:
                with Store(path) as store:
                    store.add_result(run_id, result)
            if progress:
                progress(len(records), len(examples))

    # Examples are submitted together up to the model's `parallel`: the batched engine decodes them
    # in one llama.cpp batch (framework/batch.py). parallel = 1 keeps the old one-at-a-time order.
    pool = ThreadPoolExecutor(max_workers=max(1, model.parallel), thread_name_prefix="slipway-eval")
    try:
        futures = [pool.submit(one, position, example) for position, example in enumerate(examples)]
        for future in as_completed(futures):
            future.result()
        status = "complete"
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        records.sort(key=lambda r: r["position"])
        measurements = measure(records, metric_items, bootstrap_samples=project.spec.eval.bootstrap_samples)
        if record:
            with Store(path) as store:
                store.finish_run(run_id, status, measurements.to_dict() if status == "complete" else None)
    return EvalRun(run_id=run_id, split=split, model_key=model_key, content_hash=hashes["content_hash"],
                   records=records, measurements=measurements, recorded=record, hashes=hashes)


def _run_one(program, example: Example, position: int, outputs: tuple[str, ...], metric_items: list[str],
             custom: dict[str, Callable], model, guard=None) -> dict[str, Any]:
    """One example through the guarded pipeline, as the served bento answers a request: input guardrails,
    the program, output guardrails. A blocked example has no answer (it scores 0, like a wrong one) and
    is not an error: the service answers it with a 4xx, which the error rate does not count either.
    Without a `guard` the program runs on the example as written."""
    if guard is None:
        from framework.guardrails import Guard
        from framework.spec import GuardrailsSpec

        guard = Guard(GuardrailsSpec(enabled=False), text_fields=(), output_types={})
    error = None
    output = None
    prediction = None
    decisions: list = []
    blocked = None
    with metering() as calls:
        start = time.perf_counter()
        try:
            checked = guard.check_input(example.inputs)
            decisions += checked.decisions
            blocked = checked.blocked
            if blocked is None:
                prediction = program(**checked.values)
                answer = guard.check_output({name: prediction.get(name) for name in outputs}, decisions)
                decisions += answer.decisions
                blocked = answer.blocked
                output = answer.values if blocked is None else None
                if output is not None:   # notebook metrics score the guarded answer too (human_field set)
                    for name, value in output.items():
                        prediction[name] = value
        except Exception as exc:  # a failing example is a measurement, not a crash
            error = f"{type(exc).__name__}: {str(exc)[:500]}"
        latency_ms = (time.perf_counter() - start) * 1000
    new = sum(c.tokens_in_new for c in calls)
    cached = sum(c.tokens_in_cached for c in calls)
    generated = sum(c.tokens_out for c in calls)
    return {
        "example_id": example.id, "position": position, "inputs": example.inputs, "expected": example.expected,
        "tags": list(example.tags),
        "output": json.loads(json.dumps(output, default=str)) if output is not None else None,
        "scores": score_example(example, output, error, metric_items, custom, prediction, calls),
        "latency_ms": latency_ms, "tokens_in": new + cached, "tokens_cached": cached, "tokens_out": generated,
        "cost": request_cost(model, new, cached, generated), "error": error,
        "guardrails": decision_rows(decisions), "blocked": blocked.check if blocked else None,
        # not stored: what calibration (framework/routing.py) needs of an unrouted run
        "confidence": answer_confidence(calls), "raw_valid": all(c.raw_valid is not False for c in calls),
    }


def _run_routed(program, example: Example, position: int, outputs: tuple[str, ...], metric_items: list[str],
                custom: dict[str, Callable], tiers, routing, guard, answer_adapter) -> dict[str, Any]:
    """One example through the routed pipeline, as the served bento answers it: input guardrails once, then
    tier after tier (framework/routing.py). The record is the routed request's: the answer of the tier that
    kept it (scored on that tier's calls), latency, tokens and cost over every attempt, each tier's calls
    priced at its own prices, and `routing` saying which tier answered and why each escalation happened.
    An exhausted request has no answer: it is an error (`tiers-exhausted`), scoring 0, as an unrouted model
    error is; the served bento's [fallback] answers it."""
    from framework.routing import route

    decisions: list = []
    blocked = routed = None
    error = None
    start = time.perf_counter()
    try:
        checked = guard.check_input(example.inputs)
        decisions += checked.decisions
        blocked = checked.blocked
        if blocked is None:
            routed = route(program, checked.values, tiers, routing, guard=guard, outputs=outputs,
                           adapter=answer_adapter, earlier=checked.decisions)
    except Exception as exc:  # a timeout, or a guardrail that raised: a measurement, not a crash
        error = f"{type(exc).__name__}: {str(exc)[:500]}"
    latency_ms = (time.perf_counter() - start) * 1000
    answer = routed.answer if routed is not None else None
    output = prediction = None
    if answer is not None:
        decisions += answer.decisions
        blocked = answer.blocked
        output, prediction = answer.output, answer.prediction
        if output is not None:
            for name, value in output.items():
                prediction[name] = value
    if routed is not None and error is None:
        error = routed.error
    attempts = routed.attempts if routed is not None else []
    new = sum(a.tokens_in_new for a in attempts)
    cached = sum(a.tokens_in_cached for a in attempts)
    return {
        "example_id": example.id, "position": position, "inputs": example.inputs, "expected": example.expected,
        "tags": list(example.tags),
        "output": json.loads(json.dumps(output, default=str)) if output is not None else None,
        "scores": score_example(example, output, error, metric_items, custom, prediction,
                                answer.calls if answer is not None else []),
        "latency_ms": latency_ms, "tokens_in": new + cached, "tokens_cached": cached,
        "tokens_out": sum(a.tokens_out for a in attempts), "cost": sum(a.cost for a in attempts), "error": error,
        "guardrails": decision_rows(decisions), "blocked": blocked.check if blocked else None,
        "routing": routed.to_dict() if routed is not None else None,
        "confidence": answer.confidence if answer is not None else None,
    }


def load_run(project: Project, run_id: str) -> EvalRun:
    """A run from the store as an `EvalRun` (a check reuses complete ones; partial ones are re-measured)."""
    with Store(store_path(project), read_only=True) as store:
        row = store.run(run_id)
        records = store.results(run_id)
    measurements = (Measurements.from_dict(row["measurements"]) if row["measurements"] else
                    measure(records, project.spec.eval.metrics, bootstrap_samples=project.spec.eval.bootstrap_samples))
    hashes = {k: row[k] for k in RUN_HASH_COLUMNS}
    return EvalRun(run_id=run_id, split=row["split"], model_key=row["model_key"], content_hash=row["content_hash"],
                   records=records, measurements=measurements, reused=True, hashes=hashes)
