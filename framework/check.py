"""check = eval (or reuse a run of identical content) + verdict + reports.

The verdict of a check is stored with the content hash and the contract hash,
so `build` can later ask "did exactly this content pass exactly this
contract?" without running anything.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from framework import audit
from framework.contract import Verdict, judge
from framework.evaluate import EvalRun, Progress, load_run, run_eval, store_path
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

    @property
    def passed(self) -> bool:
        return self.verdict.passed


def contract_hash(project: Project) -> str:
    # Review policy is not a clause: changing who must approve does not invalidate a check.
    data = project.spec.contract.model_dump(mode="json", exclude={"approvals_required", "allow_self_approval"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def check(project: Project, *, model_key: str | None = None, limit: int | None = None, fresh: bool = False,
          progress: Progress | None = None) -> CheckResult:
    """Judge the project's contract on the eval split; reuse a complete run of identical content."""
    from framework.evaluate import content_hashes
    from framework.notebook import load_program

    model_key = model_key or project.spec.pipeline.model
    run = None
    if not fresh and store_path(project).exists():
        program = load_program(project)
        wanted = content_hashes(project, program, "eval", model_key, limit)["content_hash"]
        with Store(store_path(project)) as store:
            found = store.find_complete_run(wanted)
        if found:
            run = load_run(project, found)
    if run is None:
        run = run_eval(project, split="eval", limit=limit, model_key=model_key, progress=progress)
    return judge_run(project, run)


def judge_run(project: Project, run: EvalRun) -> CheckResult:
    verdict = judge(project.spec.contract, run.measurements)
    verdict.meta.update({"project": project.name, "run_id": run.run_id, "model": run.model_key,
                         "model_name": project.model(run.model_key).name, "split": run.split,
                         "reused_run": run.reused, "content_hash": run.content_hash,
                         "contract_hash": contract_hash(project), **run.hashes})
    check_id = new_id("check")
    report_json, report_html = write_reports(project, check_id, run, verdict)
    with Store(store_path(project)) as store:
        store.add_check({"check_id": check_id, "run_id": run.run_id, "project": project.name,
                         "content_hash": run.content_hash, "contract_hash": contract_hash(project),
                         "passed": verdict.passed, "failed_clauses": verdict.failed, "verdict": verdict.to_dict(),
                         "report_json": str(report_json), "report_html": str(report_html)})
        audit.append(store, actor=audit.who(), action="check", target=project.name,
                     details={"check_id": check_id, "passed": verdict.passed, "failed": verdict.failed,
                              "content_hash": run.content_hash, "contract_hash": contract_hash(project)})
    return CheckResult(check_id=check_id, run=run, verdict=verdict, report_json=str(report_json),
                       report_html=str(report_html))
