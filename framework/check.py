"""check = eval (or reuse a run of identical content) + verdict + reports, signed by whoever ran it.

The verdict is stored with the content hash, the contract hash and the sha256 of its JSON report, in a
statement the checker signs with their SSH key (framework/signing.py), so `build` can later ask "did
exactly this content pass exactly this contract?" without running anything, and without trusting a row
anyone could have inserted: it re-verifies the signature and the report's hash.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from framework import audit, signing
from framework.content import content_hashes, contract_hash, file_hash
from framework.contract import Verdict, judge
from framework.evaluate import EvalRun, Progress, is_routed, load_run, run_eval, store_path, verify_remote
from framework.report import write_reports
from framework.spec import Project
from framework.store import Store, new_id


@dataclass
class CheckResult:
    check_id: str
    run: EvalRun
    verdict: Verdict
    report_json: str
    report_html: str
    signed: signing.Signed | None = None

    @property
    def passed(self) -> bool:
        return self.verdict.passed


def check(project: Project, *, model_key: str | None = None, limit: int | None = None, fresh: bool = False,
          progress: Progress | None = None, key: Path | None = None) -> CheckResult:
    """Judge the project's contract on the eval split; reuse a complete run of identical content."""
    from framework.fallback import validate_project
    from framework.notebook import load_program

    routed = is_routed(project, model_key)   # a tiered project checks the routed pipeline
    model_key = model_key or project.spec.pipeline.model
    key_path = signing.find_key(key, create=True)  # before minutes of eval: a missing key fails now
    validate_project(project)   # so does a [fallback] answer that does not fit the program's output fields
    run = None
    if not fresh and store_path(project).exists():
        program = load_program(project)
        wanted = content_hashes(project, program, "eval", model_key, limit, routed=routed)["content_hash"]
        with Store(store_path(project)) as store:
            found = store.find_complete_run(wanted)
        if found:
            for used in dict.fromkeys(project.tier_keys if routed else [model_key]):
                if project.model(used).remote is not None:
                    # a reused run vouches only for the model it measured, and the server may have changed since
                    # (a fresh run probes when it loads the model)
                    verify_remote(project, used)
            run = load_run(project, found)
    if run is None:
        run = run_eval(project, split="eval", limit=limit, model_key=model_key, progress=progress, routed=routed)
    return judge_run(project, run, key=key_path)


def judge_run(project: Project, run: EvalRun, *, key: Path | None = None) -> CheckResult:
    contract = contract_hash(project)
    detectors = with_detectors(project, run)
    cache = with_cache(project, run)
    verdict = judge(project.spec.contract, run.measurements)
    verdict.meta.update({"project": project.name, "run_id": run.run_id, "model": run.model_key,
                         "model_name": project.model(run.model_key).name, "split": run.split,
                         "reused_run": run.reused, "content_hash": run.content_hash,
                         "contract_hash": contract, "engine": engine_note(project.model(run.model_key)),
                         "detectors": detectors, "cache": cache, "variant": project.variant,
                         "tiers": project.tier_keys if getattr(run.measurements, "routing", None) else None,
                         "compared_with_local": local_comparison(project, run), **run.hashes})
    check_id = new_id("check")
    report_json, report_html = write_reports(project, check_id, run, verdict)
    report_sha256 = file_hash(Path(report_json))
    statement = audit.statement(project.name, "check", project.name, {
        "check_id": check_id, "run_id": run.run_id, "content_hash": run.content_hash, "contract_hash": contract,
        "passed": verdict.passed, "failed": verdict.failed, "report_sha256": report_sha256})
    signed = signing.sign(statement, key)
    name = signing.verify(signed, signing.load_signers(project.dir))
    with Store(store_path(project)) as store, store.transaction():
        store.add_check({"check_id": check_id, "run_id": run.run_id, "project": project.name,
                         "content_hash": run.content_hash, "contract_hash": contract,
                         "passed": verdict.passed, "failed_clauses": verdict.failed, "verdict": verdict.to_dict(),
                         "report_json": str(report_json), "report_html": str(report_html),
                         "report_sha256": report_sha256, "statement": signed.statement,
                         "signer_key": signed.key, "signature": signed.signature})
        audit.append(store, signed, name.name if name else signed.fingerprint)
    return CheckResult(check_id=check_id, run=run, verdict=verdict, report_json=str(report_json),
                       report_html=str(report_html), signed=signed)


def local_comparison(project: Project, run: EvalRun) -> dict | None:
    """For a remote model's run: the latest complete run of the same program on the same eval set with a model
    run in process, paired per example: identical answers and p50 latency of each. What a reviewer asks of a
    move to a model server; None when the model is local or no such run is in the store."""
    import json
    import statistics

    if project.model(run.model_key).remote is None or not run.hashes.get("dataset_hash"):
        return None
    local_keys = [key for key, model in project.spec.models.items() if model.remote is None]
    if not local_keys:
        return None
    with Store(store_path(project)) as store:
        marks = ", ".join("?" * len(local_keys))
        found = store.con.execute(
            "SELECT run_id, model_key FROM runs WHERE project = ? AND split = ? AND status = 'complete' AND "
            f"run_id != ? AND dataset_hash = ? AND program_hash = ? AND model_key IN ({marks}) "
            "ORDER BY finished_at DESC LIMIT 1",
            [project.name, run.split, run.run_id, run.hashes["dataset_hash"], run.hashes.get("program_hash"),
             *local_keys]).fetchone()
        if found is None:
            return None
        local = {example: (output, latency, error) for example, output, latency, error in store.con.execute(
            "SELECT example_id, output, latency_ms, error FROM results WHERE run_id = ?", [found[0]]).fetchall()}

    def same(a, b) -> bool:
        return a is not None and b is not None and json.loads(a) == (b if isinstance(b, dict) else json.loads(b))

    pairs = [(local[r["example_id"]], r) for r in run.records if r["example_id"] in local]
    answered = [(lo, r) for lo, r in pairs if not lo[2] and not r["error"]]
    return {"local_run_id": found[0], "local_model": found[1], "paired": len(pairs),
            "identical_answers": sum(same(lo[0], r["output"]) for lo, r in pairs),
            "latency_p50_ms": {"local": statistics.median([lo[1] for lo, _ in answered]) if answered else None,
                               "remote": statistics.median([r["latency_ms"] for _, r in answered]) if answered
                               else None}}


def with_detectors(project: Project, run: EvalRun) -> list[dict]:
    """Score the guardrail detectors on their labelled sets (no model: milliseconds) and add precision and
    recall to the run's metrics, so `[contract.eval]` can hold them to thresholds like any quality metric.
    Returns the counts behind each figure and the sha256 of each set, for the report and the statement."""
    from framework.guardrails import score_detectors

    rows = []
    for score in score_detectors(project.spec.guardrails, project.dir):
        for name, (value, interval) in score.figures().items():
            run.measurements.metrics[name] = value
            run.measurements.intervals[name] = interval
        rows.append({"detector": score.detector, "path": str(Path(score.path).relative_to(project.dir))
                     if Path(score.path).is_relative_to(project.dir) else score.path, "sha256": score.sha256,
                     "n": score.n, "tp": score.tp, "fp": score.fp, "fn": score.fn})
    return rows


def with_cache(project: Project, run: EvalRun) -> dict | None:
    """Measure the answer cache on its paraphrase set (`[cache] paraphrases`, with the embedding model: 29 s
    for the demo's on 2 cores) and add cache_hit_rate and cache_wrong_hit_rate (Wilson intervals) to the
    run's metrics, like the detectors. Returns the counts and the set's sha256 for the report; None when no
    set is declared. A measurement is kept under the state folder by `content.cache_hash` (the set, the
    [cache] settings, the embedder's sha256, cache.py), so a check that reuses a run reuses it too."""
    from framework.cache import measure
    from framework.content import cache_hash

    key = cache_hash(project)
    if key is None:
        return None
    kept = project.state_dir / "cache-scores" / f"{key}.json"
    try:
        found = json.loads(kept.read_text())
    except (OSError, ValueError):
        score = measure(project)
        assert score is not None   # cache_hash is None exactly when no set is declared
        found = {"path": score.path, "sha256": score.sha256, "model": score.model, "threshold": score.threshold,
                 "exact": project.spec.cache.exact, "n_same": score.n_same, "hits": score.hits,
                 "n_different": score.n_different, "wrong_hits": score.wrong_hits, "by_kind": score.by_kind,
                 **{name: {"value": value, "interval": list(interval)} for name, (value, interval)
                    in score.figures().items()}}
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text(json.dumps(found, indent=2))
    for name in ("cache_hit_rate", "cache_wrong_hit_rate"):
        run.measurements.metrics[name] = found[name]["value"]
        run.measurements.intervals[name] = tuple(found[name]["interval"])
    return {**found, "semantic": project.spec.cache.semantic}


def engine_note(model) -> dict:
    """How the run was decoded, for the report: latency clauses mean latency at this concurrency."""
    if model.remote is not None:
        return {"engine": "remote", "parallel": model.parallel, "server": model.remote.base_url,
                "remote_model": model.remote.model, "fingerprint": model.fingerprint,
                "latency": (f"measured over HTTP from {model.remote.base_url} with up to {model.parallel} requests "
                            "in flight: the server's own queueing and batching included")}
    batched = model.parallel > 1
    return {"engine": "batched" if batched else "sequential", "parallel": model.parallel,
            "batch_size": model.batch_size,
            "latency": (f"measured with up to {model.parallel} requests in flight, decoded together (as a served "
                        f"version under {model.parallel} concurrent clients)") if batched else
                       "measured one request at a time"}


def verified_check(project: Project, row: dict) -> signing.Signed | None:
    """The row's signed statement when its signature holds, it says what the row says, and the report
    file on disk is the one that was signed; else None (a forged or edited row counts for nothing)."""
    if not row.get("signature"):
        return None
    signed = audit.signed_of(row)
    details = signed.statement.get("details", {})
    if not signing.signature_holds(signed):
        return None
    if (signed.statement.get("action"), signed.statement.get("project"), details.get("check_id"),
        details.get("content_hash"), details.get("contract_hash"), bool(details.get("passed"))) != (
            "check", project.name, row["check_id"], row["content_hash"], row["contract_hash"], bool(row["passed"])):
        return None
    report = Path(row["report_json"] or "")
    if not report.exists() or file_hash(report) != details.get("report_sha256"):
        return None
    return signed


def failed_clauses(row: dict) -> list[str]:
    value = row["failed_clauses"]
    return json.loads(value) if isinstance(value, str) else list(value or [])
