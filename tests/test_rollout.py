"""Canary records (framework/rollout.py) over a real store and real signatures, on hand-made bento folders
(tests/test_release.py's FakeBento): who may start, promote and stop a canary, and every way around the
records a person might try. The front running a canary on real bentos is tests/e2e/test_canary_served.py."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import pytest

from framework import audit, release, rollout, signing
from framework.canary import PROMOTE, ROLLBACK
from framework.errors import ReleaseRefused
from framework.evaluate import store_path
from framework.store import Store, new_id
from framework.traces import SegmentWriter, iso, utc_now
from tests.test_release import build, project  # noqa: F401 - the fixture, and the fake builder it pairs with


@pytest.fixture
def stable_v1(project, keys):  # noqa: F811
    for version, content in (("v1", "c1"), ("v2", "c2")):
        build(project, keys, version, content)
        release.approve(project, version, key=keys["bob"])
    release.deploy(project, "v1", "prod", key=keys["carol"])
    return project


def test_a_canary_passes_the_deploy_gate_first(project, keys):  # noqa: F811
    build(project, keys, "v1", "c1")
    release.approve(project, "v1", key=keys["bob"])
    release.deploy(project, "v1", "prod", key=keys["carol"])
    build(project, keys, "v2", "c2")   # not approved
    with pytest.raises(ReleaseRefused, match="rule approvals: 0 of 1"):
        rollout.start(project, "v2", "prod", first=10, key=keys["carol"])
    assert rollout.latest(project, "prod") is None


def test_a_canary_needs_a_stable_version_to_compare_with(project, keys):  # noqa: F811
    build(project, keys, "v2", "c2")
    release.approve(project, "v2", key=keys["bob"])
    with pytest.raises(Exception, match="nothing deployed to prod"):
        rollout.start(project, "v2", "prod", first=10, key=keys["carol"])


def test_starting_a_canary_is_signed_and_leaves_the_channel_where_it_was(stable_v1, keys):
    row = rollout.start(stable_v1, "v2", "prod", first=5, key=keys["carol"])
    assert row["actor"] == "carol" and row["weight"] == 5 and row["details"]["steps"] == [5, 10, 50, 100]
    assert release.channel_version(stable_v1, "prod") == "v1"
    running = rollout.active(stable_v1, "prod", "v1")
    assert running.version == "v2" and running.stable == "v1" and running.weight == 5 and running.step == 0
    assert running.sticky == "caller"   # the demo's [release] sticky
    with Store(store_path(stable_v1), read_only=True) as store:
        assert store.audit_rows()[-1]["action"] == "canary-start"
    with pytest.raises(ReleaseRefused, match="already runs canary"):
        rollout.start(stable_v1, "v2", "prod", key=keys["carol"])


def test_only_a_deployer_starts_or_promotes_and_only_a_rollback_key_stops(stable_v1, keys):
    with pytest.raises(ReleaseRefused, match="lacks the role 'deploy:prod'"):
        rollout.start(stable_v1, "v2", "prod", key=keys["bob"])
    rollout.start(stable_v1, "v2", "prod", key=keys["carol"])
    running = rollout.active(stable_v1, "prod", "v1")
    with pytest.raises(ReleaseRefused, match="lacks the role 'deploy:prod'"):
        rollout.record(stable_v1, running, rollout.STEP, details={}, key=keys["dave"])
    assert rollout.signer_refusal(stable_v1, keys["dave"], "prod") is not None   # may stop, not promote
    assert rollout.signer_refusal(stable_v1, keys["carol"], "prod") is None
    stopped = rollout.stop(stable_v1, "prod", key=keys["dave"], reason="looks off")
    assert stopped["action"] == rollout.ROLLBACK and stopped["weight"] == 0
    assert rollout.active(stable_v1, "prod", "v1") is None
    assert rollout.latest(stable_v1, "prod").state == rollout.ROLLED_BACK
    assert release.channel_version(stable_v1, "prod") == "v1"
    with pytest.raises(ReleaseRefused, match="rolled-back: nothing to decide"):
        rollout.record(stable_v1, rollout.latest(stable_v1, "prod"), rollout.STEP, details={}, key=keys["carol"])


def test_steps_then_completion_move_the_channel_with_a_signed_deploy(stable_v1, keys):
    rollout.start(stable_v1, "v2", "prod", key=keys["carol"])   # [10, 50, 100]
    running = rollout.active(stable_v1, "prod", "v1")
    assert not running.last_judged
    rollout.record(stable_v1, running, rollout.STEP, details={"reason": "held"}, key=keys["carol"])
    running = rollout.active(stable_v1, "prod", "v1")
    assert running.weight == 50 and running.last_judged
    deployed = release.deploy(stable_v1, "v2", "prod", key=keys["carol"], rollout_id=running.rollout_id)
    assert deployed["statement"]["details"]["rollout_id"] == running.rollout_id
    rollout.record(stable_v1, running, rollout.COMPLETE, details={}, key=keys["carol"])
    assert release.channel_version(stable_v1, "prod") == "v2"
    assert rollout.active(stable_v1, "prod", "v2") is None and rollout.latest(stable_v1, "prod").state == "complete"


def test_edited_columns_of_a_canary_event_are_caught(stable_v1, keys):
    rollout.start(stable_v1, "v2", "prod", key=keys["carol"])
    for column, value in (("weight", 100), ("stable_version", "v0"), ("version", "v1"), ("step", 2)):
        with Store(store_path(stable_v1)) as store:
            original = store.con.execute(f"SELECT {column} FROM rollout_events").fetchone()[0]
            store.con.execute(f"UPDATE rollout_events SET {column} = ?", [value])
        with pytest.raises(ReleaseRefused, match="rule same-target"):
            rollout.active(stable_v1, "prod", "v1")
        with Store(store_path(stable_v1)) as store:
            store.con.execute(f"UPDATE rollout_events SET {column} = ?", [original])
    assert rollout.active(stable_v1, "prod", "v1").weight == 10


def test_a_hand_made_promotion_or_a_deleted_rollback_does_not_count(stable_v1, keys):
    rollout.start(stable_v1, "v2", "prod", key=keys["carol"])
    running = rollout.active(stable_v1, "prod", "v1")
    # an unsigned row: the weight a person would like the canary to have
    with Store(store_path(stable_v1)) as store:
        store.add_rollout_event({**running.events[0], "event_id": new_id("canary"), "seq": 1, "action": "canary-step",
                                 "weight": 100, "step": 2, "signature": None})
    with pytest.raises(ReleaseRefused, match="rule signature-valid"):
        rollout.active(stable_v1, "prod", "v1")
    with Store(store_path(stable_v1)) as store:
        store.con.execute("DELETE FROM rollout_events WHERE seq = 1")
    # a signed rollback, then deleting it to bring the canary back
    rollout.stop(stable_v1, "prod", key=keys["carol"])
    with Store(store_path(stable_v1)) as store:
        store.con.execute("DELETE FROM rollout_events WHERE action = 'canary-rollback'")
    with pytest.raises(ReleaseRefused, match="audit log's newest canary row"):
        rollout.active(stable_v1, "prod", "v1")


def test_a_replayed_step_from_another_rollout_breaks_the_sequence(stable_v1, keys):
    rollout.start(stable_v1, "v2", "prod", key=keys["carol"])
    first = rollout.active(stable_v1, "prod", "v1")
    rollout.record(stable_v1, first, rollout.STEP, details={}, key=keys["carol"])
    step = rollout.active(stable_v1, "prod", "v1").events[1]
    rollout.stop(stable_v1, "prod", key=keys["carol"])
    rollout.start(stable_v1, "v2", "prod", key=keys["carol"])
    with Store(store_path(stable_v1)) as store:   # the old signed step, replayed as the newest row
        store.add_rollout_event({**step, "event_id": new_id("canary")})
    with pytest.raises(ReleaseRefused, match="audit log's newest canary row|not one sequence"):
        rollout.active(stable_v1, "prod", "v1")


def test_the_signed_statement_is_the_audit_row(stable_v1, keys):
    row = rollout.start(stable_v1, "v2", "prod", key=keys["carol"])
    with Store(store_path(stable_v1), read_only=True) as store:
        logged = store.audit_rows()[-1]
        assert audit.verify(store, signers=signing.load_signers(stable_v1.dir)) is None
    assert audit.signed_of(logged).signature == row["signature"]


# -- the figures a step is judged on -------------------------------------------------------------------------


def trace(version: str, duration_ms: float, status: int = 200, *, at=None, **extra) -> dict:
    return {"trace_id": uuid.uuid4().hex, "request_id": uuid.uuid4().hex, "started_at": iso(at or utc_now()),
            "duration_ms": duration_ms, "status": status, "channel": "prod", "version": version,
            "bento": f"ticket-triage:{version}", "tokens_in_new": 50, "tokens_out": 20, "cost": 0.0, **extra}


def test_arm_counts_what_the_canary_is_judged_on():
    rows = [{"duration_ms": 100.0, "status": 200, "error_code": None, "cost": 0.0, "tokens": 70, "fallback": None,
             "outputs": {"category": "bug"}, "negative": None, "correct_labels": None},
            {"duration_ms": 5.0, "status": 400, "error_code": "guardrail-blocked", "cost": 0.0, "tokens": 0,
             "fallback": None, "outputs": None, "negative": None, "correct_labels": None},
            {"duration_ms": 3.0, "status": 401, "error_code": "api-key-missing", "cost": 0.0, "tokens": 0,
             "fallback": None, "outputs": None, "negative": None, "correct_labels": None},
            {"duration_ms": 900.0, "status": 200, "error_code": "model-timeout", "cost": 0.0, "tokens": 0,
             "fallback": "human", "outputs": {}, "negative": True, "correct_labels": None},
            {"duration_ms": 120.0, "status": 200, "error_code": None, "cost": 0.0, "tokens": 70, "fallback": None,
             "outputs": json.dumps({"category": "bug"}), "negative": False,
             "correct_labels": json.dumps({"category": "billing"})},
            {"duration_ms": 60000.0, "status": 503, "error_code": "model-timeout", "cost": 0.0, "tokens": 0,
             "fallback": None, "outputs": None, "negative": None, "correct_labels": None},
            {"duration_ms": 2.0, "status": 200, "error_code": None, "cost": 0.0, "tokens": 0, "fallback": None,
             "cache_hit": "exact", "outputs": {"category": "bug"}, "negative": None, "correct_labels": None}]
    found = rollout.arm("v2", rows)
    assert (found.requests, found.n, found.blocked, found.failures) == (6, 5, 1, 2)   # the 401 is the caller's
    assert found.latencies_ms == [100.0, 120.0]      # failures, fallbacks and cache hits are not the model's latency
    assert found.cache_hits == 1 and len(found.costs) == 4
    assert (found.feedback, found.negative, found.labelled, found.wrong) == (2, 1, 1, 1)


def test_judging_a_step_reads_both_versions_traces_of_the_same_window(stable_v1, keys):
    rollout.start(stable_v1, "v2", "prod", key=keys["carol"])
    running = rollout.active(stable_v1, "prod", "v1")
    since = utc_now()
    writer = SegmentWriter(stable_v1.trace_dir, "traces", fsync="never")
    before = since - timedelta(minutes=5)
    for _ in range(200):        # old, slow stable traffic outside the window must not count
        writer.append(trace("v1", 9000, at=before))
    for i in range(150):
        writer.append(trace("v1", 800 + i))
    for i in range(25):
        writer.append(trace("v2", 2500 + 10 * i))
    writer.close()
    now = utc_now() + timedelta(seconds=1)
    found = rollout.judge(stable_v1, running, since=since - timedelta(seconds=60), now=now)
    assert found.decision == ROLLBACK and "regression latency" in found.reason, found.reason
    assert found.canary["requests"] == 25 and found.stable["requests"] == 150
    writer = SegmentWriter(stable_v1.trace_dir, "traces", fsync="never")
    later = utc_now() + timedelta(seconds=2)
    for i in range(25):
        writer.append(trace("v2", 800 + i * 6, at=later))
        writer.append(trace("v1", 800 + i * 6, at=later))
    writer.close()
    fine = rollout.judge(stable_v1, running, since=later, now=later + timedelta(seconds=61))
    assert fine.decision == PROMOTE, fine.reason
