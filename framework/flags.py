"""Feature flags: a declared pipeline variant, switched on for one tenant (or all) and a share of its traffic,
only after the approval a deploy needs.

project.toml declares what may be switched on (`[flags.<name>]`, spec.FlagSpec): each variant is the project's
pipeline with its program (a class in the same notebook) and/or saved program replaced; model, guardrails and
contract stay the project's. A variant is measured like the pipeline: `slipway check <project> --variant
reasoning=on` judges the same contract on the same eval split, and `slipway build` packs every variant whose
signed check passed for its current content (variants without one are left out and cannot be switched on).

Switching is signed statements appended to `projects/<name>/.slipway/flags.jsonl` (and to the audit log):

- `flag-approve` (role `approve`): this flag, variant, tenant (`*` = every tenant), percent and variant content;
- `flag-on` (role `flags`): the same target. It counts only with `contract.approvals_required` approvals of
  exactly that target by other listed keys, written before it: the deploy rule, applied to a capability;
- `flag-off` (role `flags`): needs no approval, as a rollback needs none.

The file is a gate, read by every served worker on the request path, so it counts only what verifies: a line
whose signature fails, whose key is unlisted, revoked or lacks the role, or which names another project or an
undeclared flag is ignored (logged). Each line also names the sha256 of the line before it (`prev`): a line
removed, reordered or copied breaks the chain, and nothing from the break on counts, so the service falls back
to the checked pipeline (fail closed). Cutting lines off the end is not visible in the file; the audit log
holds every statement too (`slipway audit verify`).

Which requests get a variant: the first declared flag with an activation for the caller's tenant (else one
for `*`) whose variant this bento packs with the approved content, when the request's bucket is under the
percent. The bucket is sha256(flag, subject) mod 100, the subject being the `X-Slipway-Subject` header (an end
user or conversation id: the same subject always gets the same variant) or else the request id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from framework import audit, signing
from framework.errors import ReleaseRefused, SpecError
from framework.spec import Project, ProjectSpec, parse_spec

log = logging.getLogger("slipway.flags")

FLAGS_FILE = "flags.jsonl"
APPROVE, ON, OFF = "flag-approve", "flag-on", "flag-off"
ROLES = {APPROVE: "approve", ON: "flags", OFF: "flags"}
ALL_TENANTS = "*"
SUBJECT_HEADER = "x-slipway-subject"


def flags_path(project_dir: Path) -> Path:
    return Path(project_dir) / ".slipway" / FLAGS_FILE


# -- variants of the pipeline ------------------------------------------------------------------------------------

def variant_project(project: Project, flag: str, variant: str) -> Project:
    """The project as this flag's variant runs it: the pipeline's program and saved program replaced.

    Raises `SpecError` naming the flag table for a flag or variant project.toml does not declare."""
    spec = project.spec
    declared = spec.flags.get(flag)
    if declared is None:
        raise SpecError(f"no flag {flag!r} in project.toml (declared: {', '.join(sorted(spec.flags)) or 'none'})",
                        path=str(project.toml_path), field=f"flags.{flag}",
                        hint="declare it under [flags.<name>] (docs/flags.md)")
    chosen = declared.variants.get(variant)
    if chosen is None:
        raise SpecError(f"flag {flag!r} has no variant {variant!r} (declared: {', '.join(sorted(declared.variants))})",
                        path=str(project.toml_path), field=f"flags.{flag}.variants")
    pipeline = spec.pipeline.model_copy(update={
        "program": chosen.program or spec.pipeline.program,
        "saved_program": chosen.saved_program or f"program.{flag}.{variant}.json"})
    return project.model_copy(update={"spec": spec.model_copy(update={"pipeline": pipeline}),
                                      "variant": f"{flag}={variant}"})


def parse_variant(text: str) -> tuple[str, str]:
    """`flag=variant` → (flag, variant); `SpecError` otherwise."""
    flag, sep, variant = text.partition("=")
    if not sep or not flag or not variant:
        raise SpecError(f"{text!r} is not FLAG=VARIANT", field="--variant", hint="e.g. --variant reasoning=on")
    return flag.strip(), variant.strip()


def check_io(project: Project, base, varied, flag: str, variant: str) -> None:
    """A variant answers the same requests with (at least) the same fields, or the served schema would lie."""
    from framework.notebook import input_fields

    def outputs(program) -> dict[str, Any]:
        return {n: f.annotation for n, f in program.predictors()[-1].signature.output_fields.items()}

    if list(input_fields(base)) != list(input_fields(varied)):
        raise SpecError(f"variant {flag}={variant} takes inputs {list(input_fields(varied))}, the pipeline "
                        f"{list(input_fields(base))}", path=str(project.toml_path), field=f"flags.{flag}.variants",
                        hint="a variant must answer the same requests")
    missing = {n: t for n, t in outputs(base).items() if outputs(varied).get(n) != t}
    if missing:
        raise SpecError(f"variant {flag}={variant} does not answer {', '.join(missing)} as the pipeline does",
                        path=str(project.toml_path), field=f"flags.{flag}.variants",
                        hint="a variant keeps every output field of the pipeline, with the same type")


# -- reading the file (the gate) -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """What an approval covers and an activation switches on."""

    flag: str
    variant: str
    tenant: str
    percent: int
    content_hash: str
    check_key: str   # fingerprint of the key that signed the variant's check: its author may not approve it

    def key(self) -> tuple:
        return (self.flag, self.variant, self.tenant, self.percent, self.content_hash, self.check_key)

    def describe(self) -> str:
        who = "every tenant" if self.tenant == ALL_TENANTS else f"tenant {self.tenant!r}"
        return f"{self.flag}={self.variant} for {who} at {self.percent}%"


@dataclass(frozen=True)
class Activation:
    target: Target
    on_by: str
    at: str
    approvers: tuple[str, ...]


@dataclass(frozen=True)
class Ignored:
    line: int
    reason: str


@dataclass
class FlagTable:
    """The flags file as the gate reads it: what is on, per (flag, tenant), and the lines that count for nothing."""

    project: str
    active: dict[tuple[str, str], Activation] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    ignored: list[Ignored] = field(default_factory=list)
    approvals: dict[tuple, dict[str, str]] = field(default_factory=dict)   # target key → {public key: name}
    broken: int | None = None   # the line where the chain breaks: nothing counts from there, nothing is on


@dataclass(frozen=True)
class FlagFiles:
    """The flags file, and the signers.toml and project.toml it is judged against (a bento passes its own)."""

    flags: Path
    signers: Path
    project_toml: Path

    @classmethod
    def of_project(cls, project_dir: Path) -> FlagFiles:
        project_dir = Path(project_dir)
        return cls(flags_path(project_dir), signing.signers_path(project_dir), project_dir / "project.toml")


_lock = threading.Lock()
_tables: dict[FlagFiles, tuple[tuple, FlagTable]] = {}
_signatures: dict[str, bool] = {}


def _stamp(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


def load_flags(files: FlagFiles) -> FlagTable:
    """The table, rebuilt only when one of the three files changed (a stat per request otherwise)."""
    stamp = (_stamp(files.flags), _stamp(files.signers), _stamp(files.project_toml))
    cached = _tables.get(files)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    with _lock:
        cached = _tables.get(files)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        spec = parse_spec(files.project_toml.read_text(encoding="utf-8"), str(files.project_toml))
        try:
            lines = files.flags.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            lines = []
        table = read_lines(lines, spec, signing.load_signers_file(files.signers))
        for skipped in table.ignored:
            log.warning("%s:%d: ignoring flag line: %s", files.flags, skipped.line, skipped.reason)
        _tables[files] = (stamp, table)
        return table


def line_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_lines(lines: list[str], spec: ProjectSpec, signers: signing.SignersSpec) -> FlagTable:
    """Replay the signed lines in order: approvals collect, `on` needs enough of them, `off` clears."""
    table = FlagTable(project=spec.project.name)
    prev = ""
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        statement, signer, why = _check_line(text, spec, signers)
        if why is None and statement["details"].get("prev") != prev:
            why = ("rule chain: this line does not follow the line before it (a line was removed, reordered or "
                   "copied); it and every later line are ignored")
        if why is not None:
            table.ignored.append(Ignored(number, why))
            if why.startswith("rule chain"):
                # fail closed: what was on before the break may have been switched off in a line now missing
                table.active.clear()
                table.broken = number
                table.ignored.extend(Ignored(n, "after a break in the chain")
                                     for n in range(number + 1, len(lines) + 1) if lines[n - 1].strip())
                break
            prev = line_hash(text)   # a bad line is kept in the chain: the next one may still follow it
            continue
        prev = line_hash(text)
        target = _target(statement)
        action = statement["action"]
        row = {"line": number, "action": action, "by": signer.name, "at": statement["at"],
               "reason": statement["details"].get("reason", ""), **target.__dict__, "status": "counted"}
        if action == APPROVE:
            if signing.fingerprint(signer.key) == target.check_key and not spec.contract.allow_self_approval:
                why = "rule no-self-approval: the variant's check was signed with this key"
                table.ignored.append(Ignored(number, why))
                table.history.append({**row, "status": f"ignored: {why}"})
                continue
            table.approvals.setdefault(target.key(), {})[signer.key] = signer.name
        elif action == ON:
            approvers = {k: n for k, n in table.approvals.get(target.key(), {}).items()
                         if k != signer.key or spec.contract.allow_self_approval}
            needed = spec.contract.approvals_required
            if len(approvers) < needed:
                why = (f"rule approvals: {target.describe()} has {len(approvers)} of the {needed} approval(s) "
                       f"it needs from keys other than {signer.name}'s")
                table.ignored.append(Ignored(number, why))
                row["status"] = f"ignored: {why}"
            else:
                table.active[(target.flag, target.tenant)] = Activation(target, signer.name, statement["at"],
                                                                        tuple(sorted(approvers.values())))
        else:
            table.active.pop((target.flag, target.tenant), None)
        table.history.append(row)
    return table


def _target(statement: dict) -> Target:
    d = statement["details"]
    return Target(d["flag"], d["variant"], d["tenant"], int(d["percent"]), d["content_hash"], d["check_key"])


def _check_line(text: str, spec: ProjectSpec, signers: signing.SignersSpec) -> tuple[Any, Any, str | None]:
    """(statement, signer, None) for a line that counts; else (whatever parsed, None, why it does not)."""
    try:
        signed = signing.Signed.from_dict(json.loads(text))
        if not (isinstance(signed.statement, dict) and isinstance(signed.key, str)
                and isinstance(signed.signature, str) and isinstance(signed.statement.get("action"), str)):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        return None, None, "not a signed statement ({statement, key, signature} JSON)"
    statement = signed.statement
    digest = line_hash(text)
    holds = _signatures.get(digest)
    if holds is None:
        try:
            holds = signing.signature_holds(signed)
        except Exception:  # noqa: BLE001 - one odd line must never stop the others (or a request) being judged
            holds = False
        _signatures[digest] = holds
    if not holds:
        return statement, None, "rule signature-valid: the signature does not verify over this statement"
    why = _statement_problem(statement, spec)
    if why is not None:
        return statement, None, why
    try:
        signer, revoked = signers.by_key(signed.key), signers.revocation(signed.key)
    except ValueError:
        return statement, None, "rule known-key: not an OpenSSH public key"
    why = signing.key_refusal(signed.key, ROLES[statement["action"]], signer, revoked)
    return statement, signer, why


def _statement_problem(statement: dict, spec: ProjectSpec) -> str | None:
    action = statement.get("action")
    if action not in ROLES:
        return f"a signed {action!r} statement, not a flag statement"
    if statement.get("project") != spec.project.name:
        return f"signed for project {statement.get('project')!r}, not {spec.project.name!r}"
    d = statement.get("details")
    if not isinstance(d, dict) or not isinstance(statement.get("at"), str):
        return "no details or time stamp"
    if not all(isinstance(d.get(k), str) for k in ("flag", "variant", "tenant", "content_hash", "check_key", "prev")):
        return "flag, variant, tenant, content_hash, check_key and prev must be strings"
    percent = d.get("percent")
    if not (isinstance(percent, int) and not isinstance(percent, bool) and 1 <= percent <= 100):
        return "percent must be an integer from 1 to 100"
    declared = spec.flags.get(d["flag"])
    if declared is None or d["variant"] not in declared.variants:
        return f"{d['flag']}={d['variant']} is not a flag variant project.toml declares"
    if d["tenant"] != ALL_TENANTS and d["tenant"] not in spec.tenants:
        return f"tenant {d['tenant']!r} is not declared in project.toml"
    return None


# -- which variant a request gets ---------------------------------------------------------------------------------

def bucket(flag: str, subject: str) -> int:
    """0..99, stable for a (flag, subject): the same end user keeps the same variant as a rollout widens."""
    digest = hashlib.sha256(f"{flag}\0{subject}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100


def assign(table: FlagTable, order: list[str], tenant: str | None, subject: str,
           packed: Mapping[tuple[str, str], str] | None = None) -> dict[str, str]:
    """{flag: variant} for one request (at most one flag: variants replace the whole program), or {}.

    `order` is the flags in project.toml order; `packed` maps (flag, variant) to the content hash the bento
    holds for it (None: everything counts, for `slipway flags list`)."""
    for flag in order:
        found = (table.active.get((flag, tenant)) if tenant else None) or table.active.get((flag, ALL_TENANTS))
        if found is None:
            continue
        target = found.target
        if packed is not None and packed.get((flag, target.variant)) != target.content_hash:
            continue
        if bucket(flag, subject) < target.percent:
            return {flag: target.variant}
    return {}


# -- writing (the CLI) ------------------------------------------------------------------------------------------

def approve(project: Project, flag: str, variant: str, tenant: str, percent: int, *, reason: str = "",
            key: Path | None = None) -> dict[str, Any]:
    """Sign an approval of switching `flag=variant` on for `tenant` at `percent`, for the variant's current
    content, which must have a passing signed check (reviewers approve exactly what was checked)."""
    target = _checked_target(project, flag, variant, tenant, percent)
    path, signer = _signer(project, key, APPROVE)
    if signing.fingerprint(signer.key) == target.check_key and not project.spec.contract.allow_self_approval:
        raise ReleaseRefused(f"refusing: rule no-self-approval: {signer.name} signed the check of {flag}={variant}",
                             path=str(project.toml_path), hint="another reviewer with the approve role approves it")
    return _append_statement(project, APPROVE, target, reason, key, signed_with=(path, signer))


def switch_on(project: Project, flag: str, variant: str, tenant: str, percent: int, *, reason: str = "",
              key: Path | None = None) -> dict[str, Any]:
    """Switch a variant on, refused (nothing written) unless the approvals the contract requires exist."""
    target = _checked_target(project, flag, variant, tenant, percent)
    path, signer = _signer(project, key, ON)
    table = _intact(project)
    approvers = {k: n for k, n in table.approvals.get(target.key(), {}).items()
                 if k != signer.key or project.spec.contract.allow_self_approval}
    needed = project.spec.contract.approvals_required
    if len(approvers) < needed:
        raise ReleaseRefused(
            f"refusing to switch {target.describe()} on: rule approvals: {len(approvers)} of the {needed} approval(s) "
            f"it needs from keys other than {signer.name}'s", path=str(flags_path(project.dir)),
            hint=f"a reviewer runs `slipway flags approve {project.name} {flag}={variant} --tenant {tenant} "
                 f"--percent {percent}`")
    return _append_statement(project, ON, target, reason, key, signed_with=(path, signer))


def switch_off(project: Project, flag: str, tenant: str, *, reason: str = "",
               key: Path | None = None) -> dict[str, Any]:
    """Switch a flag off for `tenant` (no approval: the pipeline itself is what was approved to ship)."""
    table = _intact(project)
    found = table.active.get((flag, tenant))
    if found is None:
        raise SpecError(f"flag {flag!r} is not on for {tenant!r}", field="flag",
                        hint=f"`slipway flags list {project.name}` shows what is on")
    return _append_statement(project, OFF, found.target, reason, key)


def list_flags(project: Project) -> dict[str, Any]:
    table = load_flags(FlagFiles.of_project(project.dir))
    active = [{**a.target.__dict__, "on_by": a.on_by, "at": a.at, "approvers": list(a.approvers)}
              for a in table.active.values()]
    return {"active": active, "history": table.history,
            "ignored": [{"line": i.line, "reason": i.reason} for i in table.ignored]}


def _intact(project: Project) -> FlagTable:
    """The project's flags table, refused when its chain is broken: a line appended after the break would count
    for nothing, while saying it did."""
    table = load_flags(FlagFiles.of_project(project.dir))
    if table.broken is not None:
        raise ReleaseRefused(
            f"the flags file's chain breaks at line {table.broken}: a line was removed, reordered or copied, so "
            "nothing from there on counts and no flag is on", path=str(flags_path(project.dir)),
            hint="compare it with `slipway audit list` (every flag statement is there too); to start over, move the "
                 "file aside (every flag off) and approve and switch on again")
    return table


def _checked_target(project: Project, flag: str, variant: str, tenant: str, percent: int) -> Target:
    from framework.build import gate

    if tenant != ALL_TENANTS and tenant not in project.spec.tenants:
        raise SpecError(f"no tenant {tenant!r} in project.toml (declared: {', '.join(sorted(project.spec.tenants))})",
                        path=str(project.toml_path), field="--tenant", hint=f"or --tenant '{ALL_TENANTS}' for all")
    if not 1 <= percent <= 100:
        raise SpecError(f"percent {percent} is not 1..100", field="--percent")
    varied = variant_project(project, flag, variant)
    passing = gate(varied)   # raises ContractFailed when the variant's current content has no signed check
    if passing["failed"]:
        raise ReleaseRefused(f"refusing: the check of {flag}={variant} ({passing['check_id']}) failed "
                             f"{', '.join(passing['failed'])}", path=str(project.toml_path),
                             hint="a variant is switched on only when it meets the contract")
    return Target(flag, variant, tenant, percent, passing["content_hash"], passing["signed"].fingerprint)


def _signer(project: Project, key: Path | None, action: str) -> tuple[Path, signing.Signer]:
    path = signing.find_key(key)
    public = signing.public_key(path)
    signers = signing.load_signers(project.dir)
    signer = signers.by_key(public)
    why = signing.key_refusal(public, ROLES[action], signer, signers.revocation(public))
    if why is not None:
        raise ReleaseRefused(f"refusing to sign {action} for {project.name}: {why}",
                             path=str(signing.signers_path(project.dir)),
                             hint=f"a person whose key has the {ROLES[action]!r} role runs it")
    assert signer is not None
    return path, signer


def _append_statement(project: Project, action: str, target: Target, reason: str, key: Path | None,
                      signed_with: tuple[Path, signing.Signer] | None = None) -> dict[str, Any]:
    """Sign and append one line (chained to the file's last line), and the same statement to the audit log."""
    import fcntl

    from framework.evaluate import store_path
    from framework.store import Store

    path, signer = signed_with or _signer(project, key, action)
    _intact(project)
    file = flags_path(project.dir)
    file.parent.mkdir(parents=True, exist_ok=True)
    with open(file.with_name(file.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = file.read_text(encoding="utf-8") if file.exists() else ""
        last = next((line for line in reversed(old.splitlines()) if line.strip()), None)
        details = {**target.__dict__, "reason": reason, "prev": line_hash(last) if last is not None else ""}
        statement = audit.statement(project.name, action, f"{target.flag}={target.variant}@{target.tenant}", details)
        signed = signing.sign(statement, path)
        line = json.dumps(signed.to_dict(), sort_keys=True, ensure_ascii=False)
        with Store(store_path(project)) as store, store.transaction():
            audit.append(store, signed, signer.name)
            with open(file, "a", encoding="utf-8") as out:
                if old and not old.endswith("\n"):
                    out.write("\n")
                out.write(line + "\n")
                out.flush()
                os.fsync(out.fileno())
    return {"action": action, **target.__dict__, "by": signer.name, "at": statement["at"]}
