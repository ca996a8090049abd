"""Contract gate → bento: the step the product exists for.

`build` refuses unless a *passing* check exists for exactly the current
content (program state, notebook source, model sha256 and settings, eval set,
contract). It then writes an ordinary BentoML bento into the repository's
`bentos/` store (BENTOML_HOME), versioned by that content hash: rebuilding the
same content is a no-op, any change is a new version. The GGUF is stored once
as a BentoML model and referenced by every bento that uses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from framework import audit, release, weights
from framework.check import CheckResult, check, contract_hash
from framework.errors import ContractFailed, ReleaseRefused
from framework.evaluate import content_hashes, git_commit, store_path
from framework.notebook import load_program, program_state
from framework.spec import Project
from framework.store import Store

PACKAGE_DIR = Path(__file__).resolve().parent
RUNTIME_REQUIREMENTS = ["dspy>=3.4.1", "llama-cpp-python>=0.3.36", "pydantic>=2.13", "duckdb>=2.0.0",
                        "marimo>=0.25.2", "prometheus-client>=0.20", "typer>=0.29", "rich>=15.0"]


def bentoml_home(project: Project) -> Path:
    """The repository's own BentoML store: `bentos/` beside `projects/`; always absolute.

    A relative BENTOML_HOME (`BENTOML_HOME=bentos`) is resolved against the current directory here,
    once: BentoML's server processes run from other directories and would resolve it elsewhere."""
    return Path(os.environ.get("BENTOML_HOME") or project.root / "bentos").resolve()


def use_bentoml_home(project: Project) -> Path:
    """Point BentoML at the repository store; must run before `import bentoml`."""
    home = bentoml_home(project)
    home.mkdir(parents=True, exist_ok=True)
    os.environ["BENTOML_HOME"] = str(home)
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    if "bentoml" in sys.modules:
        _repoint_imported_bentoml(home)
    return home


def _repoint_imported_bentoml(home: Path) -> None:
    """BentoML reads BENTOML_HOME once, at first use. A process that builds for two repositories
    (a notebook, the test suite) would otherwise write the second project's bento into the first
    one's store, so override BentoML's store providers with ones rooted at `home`."""
    from bentoml._internal.bento import BentoStore
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore

    dirs = {name: home / name for name in ("bentos", "models", "envs", "tmp")}
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    BentoMLContainer.bentoml_home.set(str(home))
    BentoMLContainer.bento_store_dir.set(str(dirs["bentos"]))
    BentoMLContainer.model_store_dir.set(str(dirs["models"]))
    BentoMLContainer.env_store_dir.set(str(dirs["envs"]))
    BentoMLContainer.tmp_bento_store_dir.set(str(dirs["tmp"]))
    BentoMLContainer.bento_store.set(BentoStore(str(dirs["bentos"])))
    BentoMLContainer.tmp_bento_store.set(BentoStore(str(dirs["tmp"])))
    BentoMLContainer.model_store.set(ModelStore(str(dirs["models"])))


@dataclass
class BuildResult:
    tag: str
    created: bool
    model_tag: str
    labels: dict[str, str]
    path: str


def _stale_parts(project: Project, current: dict[str, str]) -> list[str]:
    """Which inputs changed since the most recent full check (for the refusal message)."""
    with Store(store_path(project)) as store:
        row = store.con.execute(
            "SELECT verdict FROM checks WHERE project = ? ORDER BY created_at DESC LIMIT 1", [project.name]
        ).fetchone()
    if not row:
        return []
    meta = json.loads(row[0]).get("meta", {})
    names = {"program_hash": "program (prompt/demos)", "notebook_hash": "notebook source",
             "dataset_hash": "eval set", "settings_hash": "model or its settings"}
    changed = [label for key, label in names.items() if meta.get(key) and meta.get(key) != current.get(key)]
    if meta.get("contract_hash") and meta["contract_hash"] != current.get("contract_hash"):
        changed.append("contract")
    return changed


def gate(project: Project, *, run_check: bool = False, override: str | None = None,
         actor: str | None = None) -> CheckResult | dict:
    """The passing check for the current content, or raise `ContractFailed` saying why not.

    An admin may pass a *failing* check with `override` (a reason, recorded on the bento and in the
    audit log); content that was never checked cannot be overridden: there is nothing to review.
    """
    program = load_program(project)
    hashes = content_hashes(project, program, "eval", project.spec.pipeline.model, None)
    hashes["contract_hash"] = contract_hash(project)
    found = None
    if store_path(project).exists():
        with Store(store_path(project)) as store:
            found = store.latest_check(hashes["content_hash"], hashes["contract_hash"])
    if found is None and run_check:
        result = check(project)
        found = {"check_id": result.check_id, "run_id": result.run.run_id, "passed": result.passed,
                 "failed_clauses": json.dumps(result.verdict.failed), "report_json": result.report_json,
                 "report_html": result.report_html}
    if found is None:
        stale = _stale_parts(project, hashes)
        why = (f"the last check is stale: {', '.join(stale)} changed since" if stale
               else "no check has been run for this content")
        raise ContractFailed(f"refusing to build: {why}", clauses=[], path=str(project.toml_path),
                             hint=f"run `slipway check {project.name}` (or `slipway build --check`)")
    if not found["passed"]:
        failed = json.loads(found["failed_clauses"])
        if override:
            if not release.is_admin(project, actor or audit.who()):
                raise ReleaseRefused(f"{actor or audit.who()} is not an admin and may not build past failing "
                                     f"clauses ({', '.join(failed)})", path=str(project.toml_path),
                                     field="project.admins",
                                     hint="add the person to [project] admins, or set SLIPWAY_ROLE=admin")
            return {**found, **hashes, "override": override, "failed": failed}
        raise ContractFailed(f"refusing to build: check {found['check_id']} failed {', '.join(failed)}",
                             clauses=failed, path=str(project.toml_path),
                             hint=f"see {found['report_html']}; fix the pipeline, change the contract in review, "
                                  "or an admin may pass --override \"<reason>\"")
    return {**found, **hashes}


def bento_version(passing: dict, project: Project) -> str:
    """Deterministic: the checked content, the contract, the [serve] settings baked into the bento
    (endpoint, workers, timeout) and the framework release that packs them. Changing any of them
    must give a new version, or a rebuild would keep serving the old settings under the old tag."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        framework = version("slipway")
    except PackageNotFoundError:
        framework = "dev"
    serve = project.spec.serve.model_dump_json()
    key = f"{passing['content_hash']}:{passing['contract_hash']}:{serve}:{framework}"
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def build(project: Project, *, run_check: bool = False, override: str | None = None,
          actor: str | None = None) -> BuildResult:
    actor = actor or audit.who()
    passing = gate(project, run_check=run_check, override=override, actor=actor)
    use_bentoml_home(project)
    import bentoml

    key = project.spec.pipeline.model
    model_spec = project.model(key)
    version = bento_version(passing, project)
    name = project.name
    tag = f"{name}:{version}"
    model_tag = _ensure_model(project, key)
    try:
        existing = bentoml.get(tag)
        return BuildResult(tag=tag, created=False, model_tag=model_tag, labels=dict(existing.info.labels),
                           path=str(existing.path))
    except bentoml.exceptions.NotFound:
        pass
    labels = {
        "slipway.project": name, "slipway.model_sha256": model_spec.sha256,
        "slipway.program_hash": passing["program_hash"], "slipway.notebook_hash": passing["notebook_hash"],
        "slipway.dataset_hash": passing["dataset_hash"], "slipway.contract_hash": passing["contract_hash"],
        "slipway.content_hash": passing["content_hash"], "slipway.check_id": passing["check_id"],
        "slipway.check_run_id": passing["run_id"], "slipway.git_commit": git_commit(project.root) or "none",
        "slipway.build_time": datetime.now(UTC).isoformat(timespec="seconds"), "slipway.author": actor,
    }
    if passing.get("override"):
        labels["slipway.override"] = passing["override"]
    with tempfile.TemporaryDirectory(prefix="slipway-build-") as ctx:
        _write_context(Path(ctx), project, key, model_tag, labels, passing)
        os.environ["SLIPWAY_BENTO_DIR"] = str(Path(ctx) / "slipway")  # bentoml imports the service to build
        bento = bentoml.bentos.build(
            "framework.service:SlipwayService", name=name, version=version, labels=labels,
            description=f"{name}: {project.spec.project.description}", build_ctx=ctx,
            include=["framework/**", "slipway/**"], models=[model_tag],
            python={"packages": RUNTIME_REQUIREMENTS},
        )
    if passing.get("override"):
        audit.record(store_path(project), actor=actor, action="override", target=str(bento.tag),
                     details={"step": "build", "reason": passing["override"], "failed": passing["failed"]})
    audit.record(store_path(project), actor=actor, action="build", target=str(bento.tag),
                 details={"content_hash": passing["content_hash"], "check_id": passing["check_id"]})
    return BuildResult(tag=str(bento.tag), created=True, model_tag=model_tag, labels=labels, path=str(bento.path))


def _ensure_model(project: Project, key: str) -> str:
    """The GGUF as a BentoML model, created once per sha256 (hard-linked when possible)."""
    import bentoml

    spec = project.model(key)
    source = weights.ensure(spec, project.dir, toml=str(project.toml_path), field=f"models.{key}")
    tag = f"{project.name}-{key}:{spec.sha256[:20]}"
    try:
        return str(bentoml.models.get(tag).tag)
    except bentoml.exceptions.NotFound:
        pass
    with bentoml.models.create(tag, labels={"sha256": spec.sha256, "license": spec.license},
                               metadata={"name": spec.name, "origin": spec.origin, "sha256": spec.sha256}) as model:
        target = Path(model.path) / "model.gguf"
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
    return tag


def _write_context(ctx: Path, project: Project, key: str, model_tag: str, labels: dict, passing: dict) -> None:
    shutil.copytree(PACKAGE_DIR, ctx / "framework", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = ctx / "slipway"
    out.mkdir()
    program = load_program(project)
    shutil.copyfile(project.notebook_path, out / "notebook.py")
    shutil.copyfile(project.toml_path, out / "project.toml")
    shutil.copyfile(project.split_path("eval"), out / "eval.jsonl")
    program.save(str(out / "program.json"))
    (out / "program_state.json").write_text(json.dumps(program_state(program), indent=2, default=str))
    (out / "contract.json").write_text(project.spec.contract.model_dump_json(indent=2))
    for kind in ("report_json", "report_html"):
        if passing.get(kind) and Path(passing[kind]).exists():
            shutil.copyfile(passing[kind], out / f"check_report{Path(passing[kind]).suffix}")
    config = {"project": project.name, "service_name": project.name.replace("-", "_"), "model_key": key,
              "model_tag": model_tag, "program": project.spec.pipeline.program, "labels": labels,
              "bento_version": bento_version(passing, project)}
    (out / "bento.json").write_text(json.dumps(config, indent=2))
