"""Canary rollouts: signed records of a rollout's start and every decision, and the figures each step is judged on.

`slipway deploy <project>:<v> --channel prod --canary 10` does not move the channel: it records a signed
`canary-start` (the deploy gate must open for the version, as for a plain deploy) and the serving front
(`slipway serve --channel prod`, framework/serve.py) starts the version beside the stable one and sends it
the step's share of requests. At each step the front gathers both versions' requests of the same window
from the traces (`arms`), judges them (framework/canary.py) and records the decision here, signed with the
front's key: `canary-step` (next weight; a deploy), `canary-rollback` (weight 0; a rollback), and after the
last judged step a plain signed deploy of the version (release.deploy, the gate re-checked) followed by
`canary-complete`. A person stops a canary with `slipway rollback`, which records `canary-rollback` too.

Nothing here trusts a row: a rollout's state is read from events whose signatures verify, whose keys hold
the role (`deploy:<channel>` to start and promote, `rollback:<channel>` to stop), whose columns say what the
statement says, numbered 0, 1, 2 … without a gap, and whose newest row is the audit log's newest canary row
of the channel. A rollout that fails any of it is not followed: the front sends it nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from framework import audit, signing
from framework.canary import Analysis, Arm, analyse
from framework.errors import ReleaseRefused
from framework.evaluate import store_path
from framework.spec import Project
from framework.store import Store, new_id

START, STEP, ROLLBACK, COMPLETE = "canary-start", "canary-step", "canary-rollback", "canary-complete"
ROLE = {START: "deploy", STEP: "deploy", COMPLETE: "deploy", ROLLBACK: "rollback"}
RUNNING, ROLLED_BACK, COMPLETED = "running", "rolled-back", "complete"


@dataclass
class Rollout:
    """One rollout as its verified events say: where it stands and since when."""

    rollout_id: str
    project: str
    channel: str
    version: str                    # the canary
    stable: str                     # what the channel pointed to when it started
    steps: list[int]
    sticky: str
    step: int                       # index into steps
    weight: int                     # percent of requests the canary gets now
    state: str                      # running | rolled-back | complete
    changed_at: datetime            # when the newest event was recorded: the current step's start
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def last_judged(self) -> bool:
        """Is the current step the last one judged (the next is 100%: promotion)?"""
        return self.steps[self.step + 1] == 100

    def to_dict(self) -> dict[str, Any]:
        return {"rollout_id": self.rollout_id, "channel": self.channel, "version": self.version,
                "stable": self.stable, "steps": self.steps, "sticky": self.sticky, "step": self.step,
                "weight": self.weight, "state": self.state, "changed_at": self.changed_at.isoformat(),
                "events": [{k: e[k] for k in ("seq", "action", "weight", "actor", "created_at", "details")}
                           for e in self.events]}


def plan(project: Project, first: int | None) -> list[int]:
    """The steps of a rollout: `--canary N` first, then the declared steps above it, ending at 100."""
    declared = project.spec.release.steps
    if first is None:
        return list(declared)
    if not 1 <= first < 100:
        raise ReleaseRefused(f"--canary {first}: a canary gets 1 to 99 percent of requests at its first step",
                             hint="deploy without --canary to move the whole channel at once")
    return [first, *[s for s in declared if s > first]]


def start(project: Project, version: str, channel: str, *, first: int | None = None,
          key: Path | None = None) -> dict[str, Any]:
    """Record the signed start of a canary of `version` on `channel` (refused unless the deploy gate opens)."""
    from framework import release

    release._check_channel(channel)
    target = f"{project.name}:{version}"
    stable = release.channel_version(project, channel)  # nothing deployed: refused (a canary needs a baseline)
    if stable == version:
        raise ReleaseRefused(f"{target} is what {channel} serves already", hint="nothing to roll out")
    steps = plan(project, first)
    with Store(store_path(project)) as store:
        ready = release.readiness(project, store, version)
        running = [r for r in rollouts(project, store, channel) if r.state == RUNNING and r.stable == stable]
    if ready.missing:
        raise ReleaseRefused(f"refusing to start a canary of {target} on {channel}: {'; '.join(ready.missing)}",
                             path=str(project.toml_path),
                             hint=f"see `slipway review {target}`; a canary passes the same gate as a deploy")
    if running:
        raise ReleaseRefused(f"{channel} already runs canary {running[0].rollout_id} of {running[0].version}",
                             hint=f"wait for it, or stop it: `slipway rollback {project.name} --channel {channel}`")
    rollout_id = new_id("rollout")
    details = {"content_hash": ready.content_hash, "manifest_sha256": ready.manifest_sha256,
               "check_id": ready.check_id, "approvers": ready.approvers, "steps": steps,
               "sticky": project.spec.release.sticky, "release": project.spec.release.model_dump(mode="json")}
    return _record(project, key, rollout_id=rollout_id, seq=0, action=START, channel=channel, version=version,
                   stable=stable, step=0, weight=steps[0], details=details)


def record(project: Project, rollout: Rollout, action: str, *, details: dict[str, Any],
           key: Path | None = None) -> dict[str, Any]:
    """Record a decision on a running rollout (signed; the key needs the action's role on the channel)."""
    if rollout.state != RUNNING:
        raise ReleaseRefused(f"rollout {rollout.rollout_id} is {rollout.state}: nothing to decide")
    if action == STEP:
        step, weight = rollout.step + 1, rollout.steps[rollout.step + 1]
    elif action == COMPLETE:
        step, weight = len(rollout.steps) - 1, 100
    elif action == ROLLBACK:
        step, weight = rollout.step, 0
    else:
        raise ValueError(action)
    return _record(project, key, rollout_id=rollout.rollout_id, seq=len(rollout.events), action=action,
                   channel=rollout.channel, version=rollout.version, stable=rollout.stable, step=step,
                   weight=weight, details=details)


def _record(project: Project, key: Path | None, *, rollout_id: str, seq: int, action: str, channel: str,
            version: str, stable: str, step: int, weight: int, details: dict[str, Any]) -> dict[str, Any]:
    from framework.release import _sign_as

    statement = audit.statement(project.name, action, f"{project.name}:{version}", {
        **details, "rollout_id": rollout_id, "seq": seq, "channel": channel, "stable_version": stable,
        "step": step, "weight": weight})
    signed, name = _sign_as(project, statement, f"{ROLE[action]}:{channel}", key)
    row = {"event_id": new_id("canary"), "rollout_id": rollout_id, "seq": seq, "project": project.name,
           "channel": channel, "action": action, "version": version, "stable_version": stable, "step": step,
           "weight": weight, "actor": name, "details": signed.statement["details"], "statement": signed.statement,
           "signer_key": signed.key, "signature": signed.signature}
    with Store(store_path(project)) as store, store.transaction():
        store.add_rollout_event(row)
        audit.append(store, signed, name)
    return row


def stop(project: Project, channel: str, *, key: Path | None = None, reason: str = "") -> dict[str, Any] | None:
    """A person stops the running canary on `channel` (signed `canary-rollback`, the `rollback:<channel>`
    role); the front sends it nothing from its next poll on. None when no canary runs."""
    from framework import release

    stable = release.channel_version(project, channel)
    running = active(project, channel, stable)
    if running is None:
        return None
    return record(project, running, ROLLBACK, key=key,
                  details={"reason": f"stopped by hand: {reason}" if reason else "stopped by hand"})


def signer_refusal(project: Project, key: Path | None, channel: str) -> str | None:
    """Why the front's key could not sign a canary's decisions (None: it can): it needs the channel's
    deploy role to promote and its rollback role to roll back."""
    from framework.errors import SlipwayError

    try:
        public = signing.public_key(signing.find_key(key))
        signers = signing.load_signers(project.dir)
    except SlipwayError as exc:
        return exc.args[0]
    for role in (f"deploy:{channel}", f"rollback:{channel}"):
        if why := signing.key_refusal(public, role, signers.by_key(public), signers.revocation(public)):
            return why
    return None


# -- reading: only what verifies ------------------------------------------------------------------------


def _event_refusal(project: Project, row: dict[str, Any], signers: signing.SignersSpec) -> str | None:
    if not row.get("signature"):
        return "rule signature-valid: the row carries no signature"
    signed = audit.signed_of(row)
    st, d = signed.statement, signed.statement.get("details") or {}
    if why := signing.refusal(signing.verify(signed, signers), f"{ROLE.get(row['action'], '?')}:{row['channel']}"):
        return why
    if (st.get("project"), st.get("action"), st.get("target"), d.get("rollout_id"), d.get("seq"), d.get("channel"),
        d.get("stable_version"), d.get("step"), d.get("weight")) != (
            project.name, row["action"], f"{project.name}:{row['version']}", row["rollout_id"], row["seq"],
            row["channel"], row["stable_version"], row["step"], row["weight"]):
        return "rule same-target: the row's columns differ from the statement its signature covers"
    return None


def rollouts(project: Project, store: Store, channel: str) -> list[Rollout]:
    """The channel's rollouts, oldest first, from verified events; raises ReleaseRefused when any event fails
    verification or a rollout's events do not form one sequence (edited, replayed or deleted rows)."""
    signers = signing.load_signers(project.dir)
    rows = store.rollout_events(project.name, channel)
    by_id: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if why := _event_refusal(project, row, signers):
            raise ReleaseRefused(f"{project.name} {channel}: canary event {row['event_id']} ({row['action']} of "
                                 f"{row['version']}) does not verify: {why}", path=str(store.path),
                                 hint="the store was edited outside slipway; see `slipway audit verify`")
        by_id.setdefault(row["rollout_id"], []).append(row)
    logged = [r for r in store.audit_rows() if r["action"] in ROLE
              and (audit.signed_of(r).statement.get("details") or {}).get("channel") == channel]
    if rows and (not logged or logged[-1]["signature"] != rows[-1]["signature"]):
        raise ReleaseRefused(f"{project.name} {channel}: the audit log's newest canary row is not the newest "
                             "canary event (rows deleted or inserted)", path=str(store.path),
                             hint="the store was edited outside slipway; see `slipway audit verify`")
    out = []
    for rollout_id, events in by_id.items():
        events.sort(key=lambda e: e["seq"])
        if [e["seq"] for e in events] != list(range(len(events))) or events[0]["action"] != START or any(
                e["action"] == START for e in events[1:]):
            raise ReleaseRefused(f"{project.name} {channel}: rollout {rollout_id}'s events are not one sequence "
                                 "(a gap, a replayed row, or two starts)", path=str(store.path))
        first, last = events[0], events[-1]
        steps = list(first["details"]["steps"])
        state = {ROLLBACK: ROLLED_BACK, COMPLETE: COMPLETED}.get(last["action"], RUNNING)
        if any(e["action"] in (ROLLBACK, COMPLETE) for e in events[:-1]):
            raise ReleaseRefused(f"{project.name} {channel}: rollout {rollout_id} has events after its end",
                                 path=str(store.path))
        out.append(Rollout(rollout_id=rollout_id, project=project.name, channel=channel, version=first["version"],
                           stable=first["stable_version"], steps=steps, sticky=first["details"].get("sticky", "none"),
                           step=last["step"], weight=last["weight"], state=state, changed_at=last["created_at"],
                           events=events))
    return out


def active(project: Project, channel: str, stable: str) -> Rollout | None:
    """The running rollout on top of `stable` (what the channel points to now), if any. One that started
    on top of another version was overtaken by a deploy or rollback: it is over."""
    if not store_path(project).exists():
        return None
    with Store(store_path(project), read_only=True) as store:
        found = [r for r in rollouts(project, store, channel) if r.state == RUNNING and r.stable == stable]
    return found[-1] if found else None


def latest(project: Project, channel: str) -> Rollout | None:
    """The channel's newest rollout, whatever its state (for `slipway status`)."""
    if not store_path(project).exists():
        return None
    with Store(store_path(project), read_only=True) as store:
        found = rollouts(project, store, channel)
    return found[-1] if found else None


# -- judging a step ---------------------------------------------------------------------------------------


def arm(version: str, rows: list[dict[str, Any]]) -> Arm:
    """One version's requests → the figures canary.analyse compares (the rules of Store.slo_figures: a
    caller's 4xx is not the service's; a guardrail block is counted apart; a fallback is a failure; and a
    cache hit is counted but left out of latency and cost)."""
    import json

    out = Arm(version=version)
    for row in rows:
        status = int(row["status"] or 0)
        if row["error_code"] == "guardrail-blocked":
            out.blocked += 1
            out.requests += 1
            continue
        if 400 <= status < 500:
            continue
        out.requests += 1
        out.n += 1
        if status >= 500 or row["fallback"]:
            out.failures += 1
            out.costs.append(float(row["cost"] or 0.0))
        elif row.get("cache_hit"):
            # Answered from the answer cache: a stable version's cache is warm, a new canary's cold, so a hit
            # says nothing about either model path; latency and cost compare answers the model gave.
            out.cache_hits += 1
        else:
            out.latencies_ms.append(float(row["duration_ms"]))
            out.tokens.append(float(row["tokens"] or 0))
            out.costs.append(float(row["cost"] or 0.0))
        if row["negative"] is not None:
            out.feedback += 1
            out.negative += bool(row["negative"])
        labels = row["correct_labels"]
        if labels:
            labels = json.loads(labels) if isinstance(labels, str) else labels
            outputs = row["outputs"]
            outputs = json.loads(outputs) if isinstance(outputs, str) else (outputs or {})
            out.labelled += 1
            out.wrong += any(outputs.get(k) != v for k, v in labels.items())
    return out


def judge(project: Project, rollout: Rollout, *, since: datetime, now: datetime) -> Analysis:
    """Ingest the newest traces, gather both versions' requests on the channel since `since`, judge them."""
    from framework import traces

    traces.ingest(project)
    with Store(store_path(project), read_only=True) as store:
        canary = arm(rollout.version, store.served_requests(since=since, until=now, channel=rollout.channel,
                                                            version=rollout.version))
        stable = arm(rollout.stable, store.served_requests(since=since, until=now, channel=rollout.channel,
                                                           version=rollout.stable))
    return analyse(project.spec.contract, project.spec.release, canary, stable,
                   elapsed_s=(now - since).total_seconds())


def incidents(project: Project, channel: str) -> list[dict[str, Any]]:
    """Every automatic or manual rollback of a canary, with what caused it and how long recovery took."""
    out = []
    for rollout in _all(project, channel):
        for event in rollout.events:
            if event["action"] == ROLLBACK:
                d = event["details"]
                out.append({"rollout_id": rollout.rollout_id, "version": rollout.version, "stable": rollout.stable,
                            "at": event["created_at"].isoformat(), "by": event["actor"], "reason": d.get("reason"),
                            "weight": rollout.events[-2]["weight"] if len(rollout.events) > 1 else None,
                            "detect_s": d.get("detect_s"), "recover_s": d.get("recover_s"),
                            "breach_to_recovered_s": d.get("breach_to_recovered_s")})
    return out


def _all(project: Project, channel: str) -> list[Rollout]:
    if not store_path(project).exists():
        return []
    with Store(store_path(project), read_only=True) as store:
        return rollouts(project, store, channel)
