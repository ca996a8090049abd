"""Review and release: signed approvals of a built version, deploy channels (staging, prod), rollback.

The gate counts signatures, never plain rows. A version `<project>:<version>` may go to a channel when:
its files match the manifest signed at build time; the check inside it is signed, passed, and is bound
to the bento's content hash, contract hash and report; the check's and the build's keys are listed in
`signers.toml`; and `[contract] approvals_required` distinct listed keys with the `approve` role signed
an approval of exactly that content hash and manifest (not the build's own key, unless
`allow_self_approval`). The deployer signs the deploy with a `deploy:<channel>` key; `--override`
needs an `override` key and is recorded in the signed statement. `serve --channel` re-checks all of
this before it follows a channel, so a row inserted by hand opens nothing. Every step is one store
transaction: the signed record and the audit row that logs it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from framework import audit, bentos, signing
from framework.content import file_hash
from framework.errors import BentoTampered, ReleaseRefused, SpecError
from framework.evaluate import store_path
from framework.spec import Project
from framework.store import Store, new_id

CHANNELS = ("staging", "prod")
CHECK_FILE = "check.json"  # the signed check statement, inside the bento's slipway/ folder


@dataclass
class Readiness:
    """What a version has and lacks for a deploy; `missing` is empty when it may go out."""

    version: str
    content_hash: str
    manifest_sha256: str
    check_id: str | None
    author: str | None
    approvers: list[str]
    required: int
    missing: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # approvals that do not count, each with the rule


def _folder(bento) -> Path:
    return Path(bento.path) / "src" / "slipway"


def signed_check(bento) -> signing.Signed | None:
    """The signed check statement in the bento, or None when missing or malformed (the gate says so)."""
    path = _folder(bento) / CHECK_FILE
    try:
        signed = signing.Signed.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return signed if isinstance(signed.statement, dict) else None


def readiness(project: Project, store: Store | None, version: str, bento=None) -> Readiness:
    """Re-verify everything the deploy gate relies on. Raises `BentoTampered` when the bento's files
    no longer match its signed manifest."""
    signers = signing.load_signers(project.dir)
    bento = bento or bentos.get(project, version)
    root = Path(bento.path)
    manifest = bentos.check_manifest(root, container=False)
    labels = dict(bento.info.labels)
    content, contract = labels.get("slipway.content_hash", ""), labels.get("slipway.contract_hash", "")
    target = f"{project.name}:{version}"
    missing: list[str] = []

    build = signing.Signed.from_dict(bentos.build_statement(root))
    built = signing.verify(build, signers)
    details = build.statement.get("details", {})
    if built is None or (build.statement.get("action"), build.statement.get("target"), details.get("content_hash"),
                         details.get("manifest_sha256")) != ("build", target, content, manifest):
        missing.append("rule build-signed: the signed build statement does not match this bento")
    elif why := signing.refusal(built, "override" if details.get("override") else None):
        missing.append(f"build by {built.name}: {why}")
    author = built.name if built else None

    check = signed_check(bento)
    report = _folder(bento) / "check_report.json"
    checked = signing.verify(check, signers) if check else None
    cd = check.statement.get("details", {}) if check else {}
    check_id = cd.get("check_id")
    if checked is None or check is None:
        missing.append("rule check-signed: the bento's check statement is missing or its signature fails")
    elif (cd.get("content_hash"), cd.get("contract_hash")) != (content, contract):
        missing.append(f"rule check-content: check {check_id} measured other content than this bento")
    elif not report.exists() or file_hash(report) != cd.get("report_sha256"):
        missing.append(f"rule check-report: the report of check {check_id} is not the one it signed")
    elif why := signing.refusal(checked, None):
        missing.append(f"check {check_id} by {checked.name}: {why}")
    elif not cd.get("passed"):
        missing.append(f"rule check-passed: check {check_id} failed {', '.join(cd.get('failed', []))}")

    counted: dict[str, str] = {}
    rejected: list[str] = []
    for row in store.approvals(project.name, version) if store is not None else []:
        why = _approval_refusal(row, signers, target, content, manifest, build.key,
                                project.spec.contract.allow_self_approval)
        who = row["approver"]
        if why:
            rejected.append(f"{who}: {why}")
        else:  # one key counts once, however its line is spelt in the row
            key = signing.normal_key(row["signer_key"])
            counted.setdefault(key, signers.by_key(key).name)  # type: ignore[union-attr]
    required = project.spec.contract.approvals_required
    if len(counted) < required:
        missing.append(f"rule approvals: {len(counted)} of {required} valid approvals"
                       + (f" (not counted: {'; '.join(rejected)})" if rejected else ""))
    return Readiness(version=version, content_hash=content, manifest_sha256=manifest, check_id=check_id,
                     author=author, approvers=sorted(counted.values()), required=required, missing=missing,
                     rejected=rejected)


def _approval_refusal(row: dict, signers: signing.SignersSpec, target: str, content: str, manifest: str,
                      author_key: str, allow_self: bool) -> str | None:
    if not row.get("signature"):
        return "rule signature-valid: the approval row carries no signature"
    signed = audit.signed_of(row)
    why = signing.refusal(signing.verify(signed, signers), "approve")
    if why:
        return why
    st, details = signed.statement, signed.statement.get("details", {})
    if (st.get("action"), st.get("target")) != ("approve", target):
        return f"rule same-target: the signature approves {st.get('target')}, not {target}"
    if details.get("content_hash") != content:
        return "rule same-content: the signature is over another content hash"
    if details.get("manifest_sha256") != manifest:
        return "rule same-manifest: the signature is over another build of this content"
    if not allow_self and signing.normal_key(signed.key) == signing.normal_key(author_key):
        return "rule no-self-approval: the build's author may not approve it (contract.allow_self_approval)"
    return None


def _sign_as(project: Project, statement: dict, role: str | None, key: Path | None) -> tuple[signing.Signed, str]:
    """Sign `statement` with the person's key and check the signers file allows `role`; (signed, name)."""
    signed = signing.sign(statement, key)
    verified = signing.verify(signed, signing.load_signers(project.dir))
    why = signing.refusal(verified, role)
    if why:
        raise ReleaseRefused(f"refusing to {statement['action']} {statement['target']}: {why}",
                             path=str(signing.signers_path(project.dir)),
                             hint=f"a person whose key has the {role!r} role runs it; `slipway signers show` prints "
                                  "your key, `slipway signers add` proposes the entry (a reviewed change)")
    assert verified is not None
    return signed, verified.name


def approve(project: Project, version: str, *, key: Path | None = None, note: str = "") -> dict[str, Any]:
    """Sign an approval of the exact content and manifest of `<project>:<version>`."""
    bento = bentos.get(project, version)
    manifest = bentos.check_manifest(Path(bento.path), container=False)
    labels = dict(bento.info.labels)
    target = f"{project.name}:{version}"
    statement = audit.statement(project.name, "approve", target,
                                {"content_hash": labels.get("slipway.content_hash", ""),
                                 "manifest_sha256": manifest, "note": note})
    signed, name = _sign_as(project, statement, "approve", key)
    build = signing.Signed.from_dict(bentos.build_statement(Path(bento.path)))
    contract = project.spec.contract
    if (contract.approvals_required >= 1 and not contract.allow_self_approval
            and signing.normal_key(signed.key) == signing.normal_key(build.key)):
        raise ReleaseRefused(f"rule no-self-approval: {name} built {target} and may not approve it",
                             path=str(project.toml_path), field="contract.allow_self_approval",
                             hint="ask another reviewer to run `slipway approve`")
    row = {"approval_id": new_id("approval"), "project": project.name, "version": version,
           "content_hash": statement["details"]["content_hash"], "approver": name, "note": note,
           "statement": signed.statement, "signer_key": signed.key, "signature": signed.signature}
    with Store(store_path(project)) as store, store.transaction():
        store.add_approval(row)
        audit.append(store, signed, name)
    return row


def deploy(project: Project, version: str, channel: str, *, key: Path | None = None,
           override: str | None = None, rollout_id: str | None = None) -> dict[str, Any]:
    """Point `channel` at `version` if the gate opens (or, with `override`, an `override` key signs past it).
    `rollout_id`: the canary whose steps all passed (framework/rollout.py), named in the signed statement."""
    _check_channel(channel)
    target = f"{project.name}:{version}"
    with Store(store_path(project)) as store:
        ready = readiness(project, store, version)
        history = verified_history(project, store, channel)
    if ready.missing and not override:
        raise ReleaseRefused(f"refusing to deploy {target} to {channel}: {'; '.join(ready.missing)}",
                             path=str(project.toml_path),
                             hint=f"see `slipway review {target}`; reviewers sign with `slipway approve {target}`; "
                                  "or a key with the override role passes --override \"<reason>\"")
    previous = history[0]["version"] if history else None
    statement = audit.statement(project.name, "deploy", target, {
        "channel": channel, "content_hash": ready.content_hash, "manifest_sha256": ready.manifest_sha256,
        "check_id": ready.check_id, "approvers": ready.approvers, "previous_version": previous,
        "override": override if ready.missing else None, "missing": ready.missing,
        **({"rollout_id": rollout_id} if rollout_id else {})})
    signed, name = _sign_as(project, statement, f"deploy:{channel}", key)
    if ready.missing:
        verified = signing.verify(signed, signing.load_signers(project.dir))
        if why := signing.refusal(verified, "override"):
            raise ReleaseRefused(f"refusing to override the gate for {target}: {why} "
                                 f"(missing: {'; '.join(ready.missing)})", path=str(project.toml_path))
    row = {"deploy_id": new_id("deploy"), "project": project.name, "channel": channel, "version": version,
           "previous_version": previous, "action": "deploy", "actor": name,
           "override_reason": override if ready.missing else None, "statement": signed.statement,
           "signer_key": signed.key, "signature": signed.signature}
    with Store(store_path(project)) as store, store.transaction():
        store.add_deployment(row)
        audit.append(store, signed, name)
    return row


def rollback(project: Project, channel: str, *, key: Path | None = None) -> dict[str, Any]:
    """Point `channel` back at the version it served before the current one (signed, `rollback:<channel>`)."""
    _check_channel(channel)
    with Store(store_path(project)) as store:
        history = verified_history(project, store, channel)
    if not history or not history[0]["previous_version"]:
        raise ReleaseRefused(f"{project.name} {channel} has no previous version to roll back to",
                             hint=f"see `slipway status {project.name}`")
    current, back_to = history[0]["version"], history[0]["previous_version"]  # verified against the statement
    # The version before `back_to` is what `back_to`'s own deploy replaced, so rollbacks walk back in order.
    earlier = next((h["previous_version"] for h in history[1:] if h["version"] == back_to), None)
    statement = audit.statement(project.name, "rollback", f"{project.name}:{back_to}",
                                {"channel": channel, "from": current, "previous_version": earlier})
    signed, name = _sign_as(project, statement, f"rollback:{channel}", key)
    row = {"deploy_id": new_id("deploy"), "project": project.name, "channel": channel, "version": back_to,
           "previous_version": earlier, "action": "rollback", "actor": name, "override_reason": None,
           "statement": signed.statement, "signer_key": signed.key, "signature": signed.signature}
    with Store(store_path(project)) as store, store.transaction():
        store.add_deployment(row)
        audit.append(store, signed, name)
    return row


def _deployment_refusal(project: Project, row: dict, signers: signing.SignersSpec) -> str | None:
    """Why a deployments row may not move a channel: bad signature, wrong role, or any column that says
    something else than the signed statement (only the statement is trusted; columns are for queries)."""
    if not row.get("signature"):
        return "rule signature-valid: the row carries no signature (inserted by hand, or from before signing)"
    signed = audit.signed_of(row)
    st, details = signed.statement, signed.statement.get("details") or {}
    role = f"{row['action']}:{row['channel']}"
    if why := signing.refusal(signing.verify(signed, signers), role):
        return why
    override = details.get("override") if row["action"] == "deploy" else None
    if (st.get("project"), st.get("action"), st.get("target"), details.get("channel"),
        details.get("previous_version"), override) != (
            project.name, row["action"], f"{project.name}:{row['version']}", row["channel"],
            row["previous_version"], row["override_reason"]):
        return "rule same-target: the row's columns differ from the statement its signature covers"
    if override and signing.refusal(signing.verify(signed, signers), "override"):
        return "rule role: the override was not signed by a key with the override role"
    return None


def _history_refusal(rows: list[dict[str, Any]], audit_rows: list[dict[str, Any]], channel: str) -> str | None:
    """Do the channel's rows (newest first) form one history? Each deploy names the version it replaced,
    each rollback the version it left and goes back to what that one replaced; so a replayed old row or a
    row whose link was edited breaks the chain. The newest row must also be the newest deploy or rollback
    of the channel in the audit log, which catches deleting the newest rows."""
    for index, row in enumerate(rows):
        details = audit.signed_of(row).statement.get("details") or {}
        older = rows[index + 1] if index + 1 < len(rows) else None
        if row["action"] == "deploy" and details.get("previous_version") != (older["version"] if older else None):
            return (f"rule history: deployment {row['deploy_id']} says it replaced {details.get('previous_version')}, "
                    f"but the row before it is {older['version'] if older else 'none'} (replayed or reordered)")
        if row["action"] == "rollback" and (older is None or details.get("from") != older["version"]
                                            or row["version"] != older["previous_version"]):
            return f"rule history: rollback {row['deploy_id']} does not undo the row before it (replayed or edited)"
    logged = [r for r in audit_rows if r["action"] in ("deploy", "rollback")
              and (audit.signed_of(r).statement.get("details") or {}).get("channel") == channel]
    if rows and logged and logged[-1]["signature"] != rows[0]["signature"]:
        return ("rule history: the audit log's newest deploy or rollback of this channel is not the deployments "
                "table's newest row (rows deleted or inserted)")
    return None


def verified_history(project: Project, store: Store, channel: str) -> list[dict[str, Any]]:
    """The channel's deployments, newest first, refusing if any row fails verification or the rows do not
    form one history: a channel whose history was tampered with must not move until someone looks."""
    signers = signing.load_signers(project.dir)
    rows = store.deployments(project.name, channel)
    for row in rows:
        if why := _deployment_refusal(project, row, signers):
            raise ReleaseRefused(f"{project.name} {channel}: deployment {row['deploy_id']} ({row['action']} of "
                                 f"{row['version']}) does not verify: {why}", path=str(store.path),
                                 hint="the store was edited outside slipway; see `slipway audit verify`")
    if why := _history_refusal(rows, store.audit_rows(), channel):
        raise ReleaseRefused(f"{project.name} {channel}: {why}", path=str(store.path),
                             hint="the store was edited outside slipway; see `slipway audit verify`")
    return rows


def status(project: Project) -> dict[str, dict[str, Any] | None]:
    """Each channel's current deployment row (version, when, by whom), or None when never deployed;
    `verified` says whether the row's signature and role hold."""
    if not store_path(project).exists():
        return dict.fromkeys(CHANNELS)
    signers = signing.load_signers(project.dir)
    out: dict[str, dict[str, Any] | None] = {}
    with Store(store_path(project), read_only=True) as store:
        for channel in CHANNELS:
            row = next(iter(store.deployments(project.name, channel)), None)
            if row is not None:
                verified = _deployment_refusal(project, row, signers) is None
                row = {k: v for k, v in row.items() if k not in ("statement", "signature", "signer_key")}
                row["verified"] = verified
            out[channel] = row
    return out


def channel_version(project: Project, channel: str) -> str:
    """The version `channel` points to, re-verified (signatures, roles, and for a deploy the whole gate),
    for `slipway serve --channel`."""
    _check_channel(channel)
    if not store_path(project).exists():
        raise SpecError(f"{project.name} has nothing deployed to {channel}", path=str(project.toml_path),
                        hint=f"run `slipway deploy {project.name}:<version> --channel {channel}`")
    with Store(store_path(project), read_only=True) as store:
        history = verified_history(project, store, channel)
        if not history:
            raise SpecError(f"{project.name} has nothing deployed to {channel}", path=str(project.toml_path),
                            hint=f"run `slipway deploy {project.name}:<version> --channel {channel}`")
        current = history[0]
        version = current["version"]
        # The bento must still be the one whose manifest the deploy signed (for a rollback: the deploy that
        # first put this version on the channel); a plain deploy must also still pass the whole gate.
        signed_by = current if current["action"] == "deploy" else next(
            (r for r in history[1:] if r["action"] == "deploy" and r["version"] == version), current)
        signed_manifest = (audit.signed_of(signed_by).statement.get("details") or {}).get("manifest_sha256")
        try:
            manifest = bentos.check_manifest(Path(bentos.get(project, version).path),
                                                 container=False)
            ready = readiness(project, store, version) if current["action"] == "deploy" and not \
                current["override_reason"] else None
        except BentoTampered as exc:
            raise ReleaseRefused(f"{project.name}:{version} ({channel}) fails its manifest: {exc.render()}") from None
        if ready is not None and ready.missing:
            raise ReleaseRefused(f"{project.name}:{version} is on {channel} but the gate does not open for it: "
                                 f"{'; '.join(ready.missing)}", path=str(store.path))
        if manifest != signed_manifest:
            raise ReleaseRefused(f"{project.name}:{version} ({channel}) is not the build its deploy signed for "
                                 "(rule same-manifest)", path=str(store.path))
    return current["version"]


def _check_channel(channel: str) -> None:
    if channel not in CHANNELS:
        raise SpecError(f"unknown channel {channel!r}", hint=f"use one of: {', '.join(CHANNELS)}")
