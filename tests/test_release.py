"""Approvals, deploy gate, channels and rollback over a real DuckDB store (bento labels passed in)."""

from __future__ import annotations

import json

import pytest

from framework import audit, release
from framework.errors import ReleaseRefused
from framework.evaluate import store_path
from framework.spec import load_project
from framework.store import Store
from tests.conftest import edit_toml


def labels(content: str, author: str = "alice") -> dict[str, str]:
    return {"slipway.content_hash": content, "slipway.contract_hash": "k1", "slipway.author": author}


def add_check(project, content: str, passed: bool = True) -> None:
    with Store(store_path(project)) as store:
        store.add_check({"check_id": f"check-{content}", "run_id": "r", "project": project.name,
                         "content_hash": content, "contract_hash": "k1", "passed": passed,
                         "failed_clauses": [] if passed else ["latency_p95_ms"], "verdict": {},
                         "report_json": "", "report_html": "report.html"})


@pytest.fixture
def project(toml_path, project_root):
    edit_toml(toml_path, 'owner = "support-platform"\n', 'owner = "support-platform"\nadmins = ["root"]\n')
    return load_project("ticket-triage", root=project_root)


def test_deploy_unchecked_version_names_the_missing_check_and_approvals(project):
    with pytest.raises(ReleaseRefused) as refused:
        release.deploy(project, "v1", "prod", actor="bob", labels=labels("c1"))
    assert "no passing check for content c1" in refused.value.message
    assert "0 of 1 approvals" in refused.value.message
    assert refused.value.exit_code == 1


def test_deploy_failed_check_names_the_clause(project):
    add_check(project, "c1", passed=False)
    with pytest.raises(ReleaseRefused, match="check check-c1 failed latency_p95_ms"):
        release.deploy(project, "v1", "prod", actor="bob", labels=labels("c1"))


def test_checked_but_unapproved_names_only_approvals(project):
    add_check(project, "c1")
    with pytest.raises(ReleaseRefused) as refused:
        release.deploy(project, "v1", "staging", actor="bob", labels=labels("c1"))
    assert "0 of 1 approvals" in refused.value.message
    assert "no passing check" not in refused.value.message


def test_self_approval_refused_when_approvals_required(project):
    with pytest.raises(ReleaseRefused, match="alice built ticket-triage:v1 and may not approve it"):
        release.approve(project, "v1", actor="alice", labels=labels("c1", author="alice"))


def test_approval_of_other_content_does_not_count(project):
    add_check(project, "c1")
    add_check(project, "c2")
    release.approve(project, "v1", actor="bob", labels=labels("c1"))
    with pytest.raises(ReleaseRefused, match="0 of 1 approvals"):
        release.deploy(project, "v1", "prod", actor="bob", labels=labels("c2"))


def test_deploy_status_rollback_and_audit(project):
    for version, content in (("v1", "c1"), ("v2", "c2"), ("v3", "c3")):
        add_check(project, content)
        release.approve(project, version, actor="bob", note="looks right", labels=labels(content))
        release.deploy(project, version, "prod", actor="carol", labels=labels(content))
    release.deploy(project, "v1", "staging", actor="carol", labels=labels("c1"))
    status = release.status(project)
    assert status["prod"]["version"] == "v3" and status["prod"]["actor"] == "carol"
    assert status["staging"]["version"] == "v1"

    assert release.rollback(project, "prod", actor="dave")["version"] == "v2"
    assert release.channel_version(project, "prod") == "v2"
    assert release.rollback(project, "prod", actor="dave")["version"] == "v1"
    with pytest.raises(ReleaseRefused, match="no previous version"):
        release.rollback(project, "prod", actor="dave")
    assert release.channel_version(project, "staging") == "v1"

    with Store(store_path(project)) as store:
        actions = [(r["action"], r["actor"], r["target"]) for r in store.audit_rows()]
        assert audit.verify(store) is None
    assert actions.count(("approve", "bob", "ticket-triage:v2")) == 1
    assert ("deploy", "carol", "ticket-triage:v3") in actions
    assert actions[-2:] == [("rollback", "dave", "ticket-triage:v2"), ("rollback", "dave", "ticket-triage:v1")]


def test_override_needs_admin_and_is_audited(project, monkeypatch):
    with pytest.raises(ReleaseRefused, match="bob is not an admin"):
        release.deploy(project, "v1", "prod", actor="bob", override="hotfix", labels=labels("c1"))
    row = release.deploy(project, "v1", "prod", actor="root", override="hotfix", labels=labels("c1"))
    assert row["override_reason"] == "hotfix"
    monkeypatch.setenv("SLIPWAY_ROLE", "admin")
    release.deploy(project, "v2", "prod", actor="bob", override="again", labels=labels("c2"))
    with Store(store_path(project)) as store:
        overrides = [r for r in store.audit_rows() if r["action"] == "override"]
    assert [(r["actor"], json.loads(r["details"])["reason"]) for r in overrides] == [("root", "hotfix"),
                                                                                    ("bob", "again")]
    assert "no passing check for content c1" in json.loads(overrides[0]["details"])["missing"][0]


def test_unknown_channel_is_a_spec_error(project):
    from framework.errors import SpecError

    with pytest.raises(SpecError, match="unknown channel 'canary'"):
        release.deploy(project, "v1", "canary", actor="bob", labels=labels("c1"))
