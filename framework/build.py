"""Contract gate → bento: the step the product exists for.

`build` refuses unless a *passing, signed* check exists for exactly the current content
(framework/content.py names every input) and contract. It then writes an ordinary BentoML bento into
the repository's `bentos/` store (framework/bentos.py), versioned by that content: rebuilding the same
content is a no-op, any change is a new version. The bento holds the signed check and its report;
after BentoML writes it, every file is hashed into a manifest, and the builder signs a build statement
naming the manifest's hash, so an edit to any file of the bento afterwards is caught on serve and deploy.
The GGUF is stored once as a BentoML model and referenced by every bento that uses it.
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

from framework import audit, bentos, signing, weights
from framework.alerts import write_alert_rules
from framework.bentos import use_bentoml_home
from framework.check import check, failed_clauses, verified_check
from framework.content import content_hashes, contract_hash
from framework.errors import ContractFailed, ReleaseRefused
from framework.evaluate import git_commit, store_path
from framework.fallback import validate_project
from framework.notebook import load_program, program_state
from framework.release import CHECK_FILE
from framework.spec import Project
from framework.store import Store

PACKAGE_DIR = Path(__file__).resolve().parent
RUNTIME_REQUIREMENTS = ["dspy>=3.4.1", "llama-cpp-python>=0.3.36", "pydantic>=2.13", "duckdb>=2.0.0",
                        "marimo>=0.25.2", "prometheus-client>=0.20", "typer>=0.29", "rich>=15.0", "sshsig>=0.3.1",
                        # [tracing] otlp_endpoint posts spans from inside the bento (framework/otlp.py);
                        # 1.37 is the first whose semantic conventions name gen_ai.provider.name
                        "opentelemetry-exporter-otlp-proto-http>=1.37,<2", "orjson>=3.9"]


@dataclass
class BuildResult:
    tag: str
    created: bool
    model_tag: str | None   # None: a remote model, served from its server, not packed
    labels: dict[str, str]
    path: str
    variants: list[dict] | None = None   # flag variants packed (checked) and left out (why), framework/flags.py


def _stale_parts(project: Project, current: dict[str, str]) -> list[str]:
    """Which inputs changed since the most recent check (for the refusal message)."""
    with Store(store_path(project)) as store:
        rows = store.recent_checks(project.name, 20)
    metas = [(json.loads(r["verdict"]) if isinstance(r["verdict"], str) else r["verdict"]).get("meta", {})
             for r in rows]
    meta = next((m for m in metas if not m.get("variant")), None)   # the pipeline's, not a flag variant's
    if meta is None:
        return []
    names = {"program_hash": "program (prompt/demos)", "prompt_hash": "rendered prompt (adapter)",
             "notebook_hash": "notebook source", "dataset_hash": "eval set", "settings_hash": "model or its settings",
             "code_hash": "Slipway's answer-path code", "versions_hash": "slipway/dspy/llama-cpp-python version"}
    changed = [label for key, label in names.items() if meta.get(key) and meta.get(key) != current.get(key)]
    if meta.get("contract_hash") and meta["contract_hash"] != current.get("contract_hash"):
        changed.append("contract")
    return changed


def gate(project: Project, *, run_check: bool = False, key: Path | None = None) -> dict:
    """The newest passing, signed check for the current content and contract, as
    {hashes…, check row…, "signed": Signed}; a failing one is returned with "failed" set (only an
    override may build it); else raise `ContractFailed` saying why.

    A check row counts only when its signature holds over a statement that says what the row says and
    the report file is the one signed (check.verified_check): inserting a row opens nothing.
    """
    program = load_program(project)
    validate_project(project, program)   # the [fallback] answer must fit what this program answers
    hashes = content_hashes(project, program, "eval", project.spec.pipeline.model, None)
    hashes["contract_hash"] = contract_hash(project)
    found, forged = None, []
    if store_path(project).exists():
        with Store(store_path(project)) as store:
            rows = store.checks_for(hashes["content_hash"], hashes["contract_hash"])
        for row in rows:
            signed = verified_check(project, row)
            if signed is None:
                forged.append(row["check_id"])
                continue
            found = {**row, "signed": signed}
            break
    if found is None and run_check:
        check(project, key=key)
        return gate(project, key=key)
    if found is None:
        # a flag variant's checks are told apart by content only: "stale" would compare it with the pipeline's
        stale = _stale_parts(project, hashes) if store_path(project).exists() and not project.variant else []
        why = (f"check(s) {', '.join(forged)} for this content do not verify (signature or report changed)"
               if forged else f"the last check is stale: {', '.join(stale)} changed since" if stale
               else "no check has been run for this content")
        if project.variant:
            raise ContractFailed(f"refusing: flag variant {project.variant}: {why}", clauses=[],
                                 path=str(project.toml_path),
                                 hint=f"run `slipway check {project.name} --variant {project.variant}`")
        raise ContractFailed(f"refusing to build: {why}", clauses=[], path=str(project.toml_path),
                             hint=f"run `slipway check {project.name}` (or `slipway build --check`)")
    found["failed"] = failed_clauses(found) if not found["passed"] else []
    return {**found, **hashes}


def checked_variants(project: Project) -> tuple[list[dict], list[dict]]:
    """The flag variants a build packs: those whose current content has a passing, signed check (the same
    gate as the pipeline's). Returns (packed, left out with why); a variant left out cannot be switched on."""
    from framework import flags

    packed, left = [], []
    for flag, declared in project.spec.flags.items():
        for variant in declared.variants:
            varied = flags.variant_project(project, flag, variant)
            try:
                found = gate(varied)
            except ContractFailed as exc:
                why = exc.message.removeprefix(f"refusing: flag variant {flag}={variant}: ")
                left.append({"flag": flag, "variant": variant,
                             "why": f"{why} (`slipway check {project.name} --variant {flag}={variant}`)"})
                continue
            if found["failed"]:
                left.append({"flag": flag, "variant": variant,
                             "why": f"check {found['check_id']} failed {', '.join(found['failed'])}"})
                continue
            packed.append({"flag": flag, "variant": variant, "program": varied.spec.pipeline.program,
                           "program_hash": found["program_hash"], "content_hash": found["content_hash"],
                           "check_id": found["check_id"], "file": f"variants/{flag}.{variant}.json",
                           "signed": found["signed"], "project": varied})
    return packed, left


def bento_version(passing: dict, project: Project, variants: list[dict] = ()) -> str:
    """Deterministic: the checked content, the contract, the [serve], [fallback] and [cache] settings baked
    into the bento (endpoint, workers, timeout; the fallback answer; cache bounds) and the framework code that
    packs and serves them. Changing any of them must give a new version, or a rebuild would keep serving the
    old settings under the old tag."""
    from framework.content import json_hash, versions

    package = {p.relative_to(PACKAGE_DIR).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in sorted(PACKAGE_DIR.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}
    key = {"content": passing["content_hash"], "contract": passing["contract_hash"],
           "serve": project.spec.serve.model_dump(mode="json"), "slipway": versions()["slipway"], "code": package,
           "fallback": project.spec.fallback.model_dump(mode="json"),
           "cache": project.spec.cache.model_dump(mode="json")}
    if variants:   # a newly checked variant is a new version (older bentos never had it)
        key["variants"] = sorted(f"{v['flag']}={v['variant']}:{v['content_hash']}" for v in variants)
    return json_hash(key)[:20]


def build(project: Project, *, run_check: bool = False, override: str | None = None,
          key: Path | None = None) -> BuildResult:
    """Build the bento for the current content if its check passed (or, with `override`, a key with the
    override role signs past a failing one). The builder's signature makes them the build's author."""
    key = key or signing.find_key(create=not override)
    passing = gate(project, run_check=run_check, key=key)
    if passing["failed"] and not override:
        raise ContractFailed(f"refusing to build: check {passing['check_id']} failed {', '.join(passing['failed'])}",
                             clauses=passing["failed"], path=str(project.toml_path),
                             hint=f"see {passing['report_html']}; fix the pipeline, change the contract in review, "
                                  "or a key with the override role may pass --override \"<reason>\"")
    signers = signing.load_signers(project.dir)
    if passing["failed"]:
        mine = signing.public_key(key)  # the build statement signed below proves the key is held
        why = signing.key_refusal(mine, "override", signers.by_key(mine), signers.revocation(mine))
        if why:
            raise ReleaseRefused(f"refusing to build past failing clauses ({', '.join(passing['failed'])}): {why}",
                                 path=str(signing.signers_path(project.dir)),
                                 hint="only a key with the override role in signers.toml may override")
    use_bentoml_home(project)
    import bentoml

    model_key = project.spec.pipeline.model
    model_spec = project.model(model_key)
    variants, left_out = checked_variants(project)
    version = bento_version(passing, project, variants)
    name = project.name
    tag = f"{name}:{version}"
    model_tag = _ensure_model(project, model_key)
    # `[pipeline] tiers`: every tier's GGUF is packed as its own BentoML model, pinned by sha256 like the pipeline's
    # (a remote tier packs nothing: its pinned fingerprint is verified when the worker starts)
    tiers = [{"key": k, "model_tag": model_tag if k == model_key else _ensure_model(project, k),
              "sha256": project.model(k).identity} for k in dict.fromkeys(project.spec.pipeline.tiers or ())]
    # models the served side needs besides the tiers: the semantic cache's embedder
    cache = project.spec.cache
    extra = {cache.embedding_model: _ensure_model(project, cache.embedding_model)} if cache.semantic else {}
    try:
        existing = bentoml.get(tag)
    except bentoml.exceptions.NotFound:
        existing = None
    if existing is not None:
        bentos.verify(Path(existing.path), tag)  # the same content, but an edited copy is not "already built"
        return BuildResult(tag=tag, created=False, model_tag=model_tag, labels=dict(existing.info.labels),
                           path=str(existing.path), variants=_variant_summary(variants, left_out))
    labels = {
        "slipway.project": name, "slipway.model_sha256": model_spec.identity,
        "slipway.program_hash": passing["program_hash"], "slipway.notebook_hash": passing["notebook_hash"],
        "slipway.dataset_hash": passing["dataset_hash"], "slipway.contract_hash": passing["contract_hash"],
        "slipway.content_hash": passing["content_hash"], "slipway.check_id": passing["check_id"],
        "slipway.check_run_id": passing["run_id"], "slipway.git_commit": git_commit(project.root) or "none",
        "slipway.build_time": datetime.now(UTC).isoformat(timespec="seconds"),
        "slipway.author_key": signing.fingerprint(signing.public_key(key)),
    }
    if tiers:
        labels["slipway.tiers"] = ",".join(t["key"] for t in tiers)
    if override and passing["failed"]:
        labels["slipway.override"] = override
    with tempfile.TemporaryDirectory(prefix="slipway-build-") as ctx:
        _write_context(Path(ctx), project, model_key, model_tag, labels, passing, version, variants, tiers, extra)
        os.environ["SLIPWAY_BENTO_DIR"] = str(Path(ctx) / "slipway")  # bentoml imports the service to build
        # ...by module name: a module left by an earlier build in this process would be this bento's service,
        # with the other project's name and model (tests/e2e/test_build_serve.py, two projects in one process)
        sys.modules.pop("framework.service", None)
        bento = bentoml.bentos.build(
            "framework.service:SlipwayService", name=name, version=version, labels=labels,
            description=f"{name}: {project.spec.project.description}", build_ctx=ctx,
            include=["framework/**", "slipway/**"],
            models=[tag for tag in dict.fromkeys([model_tag, *(t["model_tag"] for t in tiers), *extra.values()])
                    if tag is not None],
            python={"packages": RUNTIME_REQUIREMENTS},
        )
    root = Path(bento.path)
    try:  # a bento without its signed manifest would be stuck under its tag: remove it if signing fails
        manifest = bentos.write_manifest(root)
        statement = audit.statement(name, "build", tag, {
            "content_hash": passing["content_hash"], "contract_hash": passing["contract_hash"],
            "manifest_sha256": manifest, "check_id": passing["check_id"],
            "override": labels.get("slipway.override"), "failed": passing["failed"]})
        signed = signing.sign(statement, key)
        (root / bentos.BUILD_SIGNATURE).write_text(json.dumps(signed.to_dict(), indent=1, sort_keys=True))
        verified = signing.verify(signed, signers)
        with Store(store_path(project)) as store, store.transaction():
            audit.append(store, signed, verified.name if verified else signed.fingerprint)
    except BaseException:
        bentoml.bentos.delete(tag)
        raise
    return BuildResult(tag=str(bento.tag), created=True, model_tag=model_tag, labels=labels, path=str(bento.path),
                       variants=_variant_summary(variants, left_out))


def _variant_summary(packed: list[dict], left_out: list[dict]) -> list[dict]:
    return ([{"flag": v["flag"], "variant": v["variant"], "packed": True, "check_id": v["check_id"]} for v in packed]
            + [{**v, "packed": False} for v in left_out])


def _ensure_model(project: Project, key: str) -> str | None:
    """The GGUF as a BentoML model, created once per sha256 (hard-linked when possible). A remote model
    packs nothing (None), but its server must answer as the pinned model now (framework/remote.py)."""
    import bentoml

    spec = project.model(key)
    if spec.remote is not None:
        from framework.remote import verify

        verify(spec, f"models.{key}", toml=str(project.toml_path))
        return None
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


PREFIX_FILE = "prefix.kv"


def write_prefix_state(project: Project, program, out: Path) -> dict | None:
    """Compute the program's shared instruction prefix on the model and store its KV state in the bento.

    A served version then loads it and is ready at once, instead of spending its first answer (~10 s
    for the 1.5B model on 2 cores) evaluating the same instructions. The state is only valid for the
    exact model file and llama.cpp settings it was made with: `prefix.json` beside it says which, and
    the service refuses it otherwise. Whether the answer itself succeeds is the served warm-up's question
    (a build past a failing check with --override may hold a program that cannot answer); the prefix is
    evaluated before any token is decoded. Sequential engines (parallel = 1) keep no prefix sequence.
    """
    import dspy

    from framework.evaluate import adapter, language_model
    from framework.lm import deadline
    from framework.notebook import warm_up_inputs

    key = project.spec.pipeline.model
    lm = language_model(project, key)
    if lm.engine.batcher is None:
        return None
    try:
        with deadline(project.spec.serve.startup_timeout_s), dspy.context(lm=lm, adapter=adapter(project)):
            program(**warm_up_inputs(program))
    except Exception:  # noqa: BLE001 - the prefix is evaluated before any answer; the served warm-up judges it
        pass
    if not lm.engine.batcher.prefix:
        return None
    return lm.engine.save_prefix(out / PREFIX_FILE, project.model(key).identity)


def optimize_provenance(project: Project) -> dict | None:
    """The saved program's `program.meta.json`, when it describes exactly the saved file (its sha256): a
    program edited by hand after `slipway optimize` carries no claim about how it was made."""
    from framework.content import file_hash
    from framework.optimize import provenance_path

    saved, meta = project.saved_program_path, provenance_path(project.saved_program_path)
    if not (saved.exists() and meta.exists()):
        return None
    try:
        made = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    return made if isinstance(made, dict) and made.get("program_sha256") == file_hash(saved) else None


def _write_context(ctx: Path, project: Project, key: str, model_tag: str | None, labels: dict, passing: dict,
                   version: str, variants: list[dict] = (), tiers: list[dict] = (), extra: dict | None = None) -> None:
    shutil.copytree(PACKAGE_DIR, ctx / "framework", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = ctx / "slipway"
    out.mkdir()
    program = load_program(project)
    shutil.copyfile(project.notebook_path, out / "notebook.py")
    shutil.copyfile(project.toml_path, out / "project.toml")
    signers = signing.signers_path(project.dir)
    if signers.exists():   # who may sign API keys for this version (framework/apikeys.py), pinned with it
        shutil.copyfile(signers, out / "signers.toml")
    shutil.copyfile(project.split_path("eval"), out / "eval.jsonl")
    program.save(str(out / "program.json"))
    (out / "program_state.json").write_text(json.dumps(program_state(program), indent=2, default=str))
    made = optimize_provenance(project)
    if made is not None:   # how `slipway optimize` made this program: the review shows it
        (out / "optimize.json").write_text(json.dumps(made, indent=2))
    (out / "contract.json").write_text(project.spec.contract.model_dump_json(indent=2))
    write_prefix_state(project, program, out)
    write_alert_rules(project.spec, out / "alerts.yml")   # the contract, watched live by Prometheus
    for kind in ("report_json", "report_html"):
        if passing.get(kind) and Path(passing[kind]).exists():
            shutil.copyfile(passing[kind], out / f"check_report{Path(passing[kind]).suffix}")
    (out / CHECK_FILE).write_text(json.dumps(passing["signed"].to_dict(), indent=1, sort_keys=True))
    for variant in variants:   # each flag variant's program and the signed check that let it in
        from framework import flags

        varied = load_program(variant["project"])
        flags.check_io(project, program, varied, variant["flag"], variant["variant"])
        (out / "variants").mkdir(exist_ok=True)
        varied.save(str(out / variant["file"]))
        (out / variant["file"].replace(".json", ".check.json")).write_text(
            json.dumps(variant["signed"].to_dict(), indent=1, sort_keys=True))
    config = {"project": project.name, "service_name": project.name.replace("-", "_"), "model_key": key,
              "model_tag": model_tag, "program": project.spec.pipeline.program, "labels": labels,
              "bento_version": version, "tiers": list(tiers), "extra_models": dict(extra or {}),
              "variants": [{k: v[k] for k in ("flag", "variant", "program", "program_hash", "content_hash",
                                               "check_id", "file")} for v in variants]}
    (out / "bento.json").write_text(json.dumps(config, indent=2))
