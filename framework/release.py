"""Review and release: approvals of a built version, deploy channels (staging, prod), rollback.

A version is a bento `<project>:<version>`; what is approved is the exact
content hash in its `slipway.content_hash` label, and a deploy is allowed only
when that content passed its contract (a passing check for the label's content
and contract hashes) and holds `[contract] approvals_required` approvals from
people other than its author (unless `allow_self_approval`). An admin
(`[project] admins`, or SLIPWAY_ROLE=admin) may deploy past the gate with
`--override "<reason>"`. Every step is appended to the audit log.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from framework import audit
from framework.errors import ReleaseRefused, SpecError
from framework.evaluate import store_path
from framework.spec import Project
from framework.store import Store, new_id

CHANNELS = ("staging", "prod")


def bento_labels(project: Project, version: str) -> dict[str, str]:
    """The labels `slipway build` wrote on `<project>:<version>`."""
    from framework.build import use_bentoml_home

    use_bentoml_home(project)
    import bentoml

    try:
        return dict(bentoml.get(f"{project.name}:{version}").info.labels)
    except bentoml.exceptions.NotFound:
        raise SpecError(f"no bento {project.name}:{version}", path=str(project.toml_path),
                        hint=f"build it with `slipway build {project.name}`, or list builds with "
                             f"`slipway status {project.name}`") from None


def is_admin(project: Project, actor: str) -> bool:
    return os.environ.get("SLIPWAY_ROLE") == "admin" or actor in project.spec.project.admins


@dataclass
class Readiness:
    """What a version has and lacks for a deploy; `missing` is empty when it may go out."""

    version: str
    content_hash: str
    check_id: str | None
    approvers: list[str]
    required: int
    missing: list[str] = field(default_factory=list)


def readiness(project: Project, store: Store, version: str, labels: dict[str, str]) -> Readiness:
    content_hash = labels.get("slipway.content_hash", "")
    contract = labels.get("slipway.contract_hash", "")
    author = labels.get("slipway.author")
    check = store.latest_check(content_hash, contract) if content_hash else None
    approvers = sorted({a["approver"] for a in store.approvals(project.name, version, content_hash)})
    if not project.spec.contract.allow_self_approval:
        approvers = [a for a in approvers if a != author]
    required = project.spec.contract.approvals_required
    missing = []
    if check is None:
        missing.append(f"no passing check for content {content_hash[:12] or '(unlabelled)'}")
    elif not check["passed"]:
        missing.append(f"check {check['check_id']} failed {', '.join(json.loads(check['failed_clauses']))}")
    if len(approvers) < required:
        missing.append(f"{len(approvers)} of {required} approvals")
    return Readiness(version=version, content_hash=content_hash, check_id=check["check_id"] if check else None,
                     approvers=approvers, required=required, missing=missing)


def approve(project: Project, version: str, *, actor: str, note: str = "",
            labels: dict[str, str] | None = None) -> dict[str, Any]:
    """Record `actor`'s approval of the exact content of `<project>:<version>`."""
    labels = labels if labels is not None else bento_labels(project, version)
    content_hash = labels.get("slipway.content_hash", "")
    author = labels.get("slipway.author")
    if (project.spec.contract.approvals_required >= 1 and not project.spec.contract.allow_self_approval
            and actor == author):
        raise ReleaseRefused(f"{actor} built {project.name}:{version} and may not approve it",
                             path=str(project.toml_path), field="contract.allow_self_approval",
                             hint="ask another reviewer to run `slipway approve`")
    row = {"approval_id": new_id("approval"), "project": project.name, "version": version,
           "content_hash": content_hash, "approver": actor, "note": note}
    with Store(store_path(project)) as store:
        store.add_approval(row)
        audit.append(store, actor=actor, action="approve", target=f"{project.name}:{version}",
                     details={"content_hash": content_hash, "note": note})
    return row


def deploy(project: Project, version: str, channel: str, *, actor: str, override: str | None = None,
           labels: dict[str, str] | None = None) -> dict[str, Any]:
    """Point `channel` at `version` if it passed its contract and holds its approvals (or an admin overrides)."""
    _check_channel(channel)
    labels = labels if labels is not None else bento_labels(project, version)
    with Store(store_path(project)) as store:
        ready = readiness(project, store, version, labels)
        target = f"{project.name}:{version}"
        if ready.missing and not override:
            steps = []
            if ready.check_id is None:
                steps.append(f"run `slipway check {project.name}` on this content")
            elif ready.missing[0].startswith("check "):
                steps.append(f"fix the failing clauses (see `slipway review {target}`)")
            if len(ready.approvers) < ready.required:
                steps.append(f"a reviewer other than the author runs `slipway approve {target}`")
            raise ReleaseRefused(f"refusing to deploy {target} to {channel}: {'; '.join(ready.missing)}",
                                 path=str(project.toml_path),
                                 hint="; ".join(steps) + "; or an admin may pass --override \"<reason>\"")
        if ready.missing and not is_admin(project, actor):
            raise ReleaseRefused(f"{actor} is not an admin and may not override ({'; '.join(ready.missing)})",
                                 path=str(project.toml_path), field="project.admins",
                                 hint="add the person to [project] admins, or set SLIPWAY_ROLE=admin")
        history = store.deployments(project.name, channel)
        row = {"deploy_id": new_id("deploy"), "project": project.name, "channel": channel, "version": version,
               "previous_version": history[0]["version"] if history else None, "action": "deploy",
               "actor": actor, "override_reason": override if ready.missing else None}
        store.add_deployment(row)
        if row["override_reason"]:
            audit.append(store, actor=actor, action="override", target=target,
                         details={"channel": channel, "reason": override, "missing": ready.missing})
        audit.append(store, actor=actor, action="deploy", target=target,
                     details={"channel": channel, "content_hash": ready.content_hash, "check_id": ready.check_id,
                              "approvers": ready.approvers, "previous_version": row["previous_version"]})
    return row


def rollback(project: Project, channel: str, *, actor: str) -> dict[str, Any]:
    """Point `channel` back at the version it served before the current one."""
    _check_channel(channel)
    with Store(store_path(project)) as store:
        history = store.deployments(project.name, channel)
        if not history or not history[0]["previous_version"]:
            raise ReleaseRefused(f"{project.name} {channel} has no previous version to roll back to",
                                 hint=f"see `slipway status {project.name}`")
        current, target = history[0]["version"], history[0]["previous_version"]
        # The version before `target` is what `target`'s own deploy replaced, so rollbacks walk back in order.
        earlier = next((h["previous_version"] for h in history[1:] if h["version"] == target), None)
        row = {"deploy_id": new_id("deploy"), "project": project.name, "channel": channel, "version": target,
               "previous_version": earlier, "action": "rollback", "actor": actor, "override_reason": None}
        store.add_deployment(row)
        audit.append(store, actor=actor, action="rollback", target=f"{project.name}:{target}",
                     details={"channel": channel, "from": current})
    return row


def status(project: Project) -> dict[str, dict[str, Any] | None]:
    """Each channel's current deployment row (version, when, by whom), or None when never deployed."""
    if not store_path(project).exists():
        return dict.fromkeys(CHANNELS)
    with Store(store_path(project), read_only=True) as store:
        return {channel: next(iter(store.deployments(project.name, channel)), None) for channel in CHANNELS}


def channel_version(project: Project, channel: str) -> str:
    """The version `channel` points to, for `slipway serve --channel`."""
    _check_channel(channel)
    current = status(project)[channel]
    if current is None:
        raise SpecError(f"{project.name} has nothing deployed to {channel}", path=str(project.toml_path),
                        hint=f"run `slipway deploy {project.name}:<version> --channel {channel}`")
    return current["version"]


def _check_channel(channel: str) -> None:
    if channel not in CHANNELS:
        raise SpecError(f"unknown channel {channel!r}", hint=f"use one of: {', '.join(CHANNELS)}")
