"""The deploy gate over a real store and real signatures, on bento folders made by hand (FakeBento):
every way around it a person might try is refused, naming the rule."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from framework import audit, bentos, release, signing
from framework.content import file_hash
from framework.errors import BentoTampered, ReleaseRefused, SpecError
from framework.evaluate import store_path
from framework.spec import load_project
from framework.store import Store, new_id
from tests.conftest import act_as, edit_toml, write_signers


@dataclass
class FakeInfo:
    labels: dict


@dataclass
class FakeBento:
    """A bento folder with what `slipway build` writes for the gate (no BentoML, no model)."""

    path: str
    info: FakeInfo
    tag: str = ""
    extra: dict = field(default_factory=dict)


def fake_build(project, keys, version: str, content: str, *, builder="alice", checker="alice",
               passed=True) -> FakeBento:
    root = project.root / "fake-bentos" / version
    folder = root / "src" / "slipway"
    folder.mkdir(parents=True)
    report = folder / "check_report.json"
    report.write_text(json.dumps({"content": content, "passed": passed}))
    check = audit.statement(project.name, "check", project.name, {
        "check_id": f"check-{content}", "content_hash": content, "contract_hash": "k1", "passed": passed,
        "failed": [] if passed else ["latency_p95_ms"], "report_sha256": file_hash(report)})
    (folder / release.CHECK_FILE).write_text(json.dumps(signing.sign(check, keys[checker]).to_dict()))
    (folder / "program.json").write_text("{}")
    (root / "bento.yaml").write_text(f"labels: {content}\n")
    manifest = bentos.write_manifest(root)
    build = audit.statement(project.name, "build", f"{project.name}:{version}",
                            {"content_hash": content, "manifest_sha256": manifest})
    (root / bentos.BUILD_SIGNATURE).write_text(json.dumps(signing.sign(build, keys[builder]).to_dict()))
    return FakeBento(path=str(root), info=FakeInfo({"slipway.content_hash": content, "slipway.contract_hash": "k1"}),
                     tag=f"{project.name}:{version}")


_BUILT: dict[str, FakeBento] = {}


@pytest.fixture
def project(toml_path, project_root, keys, monkeypatch):
    write_signers(toml_path.parent, keys)
    _BUILT.clear()

    def get(_project, version=None):
        if version not in _BUILT:
            raise SpecError(f"no bento {version}")
        return _BUILT[version]

    monkeypatch.setattr(bentos, "get", get)
    return load_project("ticket-triage", root=project_root)


def build(project, keys, version, content, **kwargs) -> FakeBento:
    _BUILT[version] = bento = fake_build(project, keys, version, content, **kwargs)
    return bento


def test_unapproved_version_is_refused_naming_the_rule(project, keys):
    build(project, keys, "v1", "c1")
    with pytest.raises(ReleaseRefused) as refused:
        release.deploy(project, "v1", "prod", key=keys["carol"])
    assert "rule approvals: 0 of 1 valid approvals" in refused.value.message
    assert "rule check" not in refused.value.message and "rule build" not in refused.value.message


def test_failed_check_names_the_clause(project, keys):
    build(project, keys, "v1", "c1", passed=False)
    release.approve(project, "v1", key=keys["bob"])
    with pytest.raises(ReleaseRefused, match="rule check-passed: check check-c1 failed latency_p95_ms"):
        release.deploy(project, "v1", "prod", key=keys["carol"])


def test_approved_version_deploys_and_is_signed(project, keys):
    build(project, keys, "v1", "c1")
    release.approve(project, "v1", key=keys["bob"], note="diff read")
    row = release.deploy(project, "v1", "prod", key=keys["carol"])
    assert row["actor"] == "carol"
    assert release.channel_version(project, "prod") == "v1"
    with Store(store_path(project)) as store:
        assert audit.verify(store) is None
        assert [(r["action"], r["actor"]) for r in store.audit_rows()] == [("approve", "bob"), ("deploy", "carol")]


def test_impersonating_an_approver_is_refused(project, keys):
    """Mallory cannot approve as bob: her key is not bob's, and a row saying "bob" proves nothing."""
    build(project, keys, "v1", "c1")
    with pytest.raises(ReleaseRefused, match="rule known-key"):
        release.approve(project, "v1", key=keys["mallory"])
    with Store(store_path(project)) as store:  # a row typed into the store by hand
        store.add_approval({"approval_id": new_id("approval"), "project": project.name, "version": "v1",
                            "content_hash": "c1", "approver": "bob", "note": "forged"})
    with pytest.raises(ReleaseRefused) as refused:
        release.deploy(project, "v1", "prod", key=keys["carol"])
    assert "0 of 1 valid approvals" in refused.value.message
    assert "bob: rule signature-valid" in refused.value.message


def test_inserted_row_carrying_a_real_signature_of_another_version_does_not_count(project, keys):
    build(project, keys, "v1", "c1")
    build(project, keys, "v2", "c2")
    approval = release.approve(project, "v1", key=keys["bob"])
    with Store(store_path(project)) as store:  # replay bob's signed approval of v1 as one of v2
        store.add_approval({**approval, "approval_id": new_id("approval"), "version": "v2", "content_hash": "c2"})
    with pytest.raises(ReleaseRefused, match="rule same-target"):
        release.deploy(project, "v2", "prod", key=keys["carol"])


def test_approval_over_another_build_of_the_same_content_does_not_count(project, keys):
    build(project, keys, "v1", "c1")
    approval = release.approve(project, "v1", key=keys["bob"])
    statement = {**approval["statement"], "details": {**approval["statement"]["details"], "manifest_sha256": "0" * 64}}
    forged = signing.sign(statement, keys["bob"])  # bob really signed, but over another manifest
    with Store(store_path(project)) as store:
        store.add_approval({**approval, "approval_id": new_id("approval"), "statement": forged.statement,
                            "signature": forged.signature})
        store.con.execute("DELETE FROM approvals WHERE approval_id = ?", [approval["approval_id"]])
    with pytest.raises(ReleaseRefused, match="rule same-manifest"):
        release.deploy(project, "v1", "prod", key=keys["carol"])


def test_approving_twice_counts_once(project, keys, toml_path):
    edit_toml(toml_path, "approvals_required = 1", "approvals_required = 2")
    project = project.model_copy(update={"spec": load_project(str(toml_path)).spec})
    build(project, keys, "v1", "c1")
    release.approve(project, "v1", key=keys["bob"])
    release.approve(project, "v1", key=keys["bob"], note="again, as if I were someone else")
    with pytest.raises(ReleaseRefused, match="1 of 2 valid approvals"):
        release.deploy(project, "v1", "prod", key=keys["carol"])


def test_self_approval_refused_and_not_counted(project, keys, toml_path):
    write_signers(toml_path.parent, keys, {"alice": ["approve"], "bob": ["approve"], "carol": ["deploy:*"]})
    build(project, keys, "v1", "c1", builder="alice")
    with pytest.raises(ReleaseRefused, match="rule no-self-approval: alice built ticket-triage:v1"):
        release.approve(project, "v1", key=keys["alice"])
    signed = signing.sign(audit.statement(project.name, "approve", f"{project.name}:v1", {
        "content_hash": "c1", "manifest_sha256": bentos.check_manifest(
            project.root / "fake-bentos" / "v1")}), keys["alice"])
    with Store(store_path(project)) as store:
        store.add_approval({"approval_id": new_id("approval"), "project": project.name, "version": "v1",
                            "content_hash": "c1", "approver": "alice", "statement": signed.statement,
                            "signer_key": signed.key, "signature": signed.signature})
    with pytest.raises(ReleaseRefused, match="alice: rule no-self-approval"):
        release.deploy(project, "v1", "prod", key=keys["carol"])


def test_revoked_key_no_longer_counts(project, keys, toml_path):
    build(project, keys, "v1", "c1")
    release.approve(project, "v1", key=keys["bob"])
    path = toml_path.parent / "signers.toml"
    path.write_text(path.read_text() + f'\n[[revoked]]\nkey = "{signing.public_key(keys["bob"])}"\n'
                                       'reason = "key leaked 2026-11-20"\n')
    with pytest.raises(ReleaseRefused, match="rule key-not-revoked"):
        release.deploy(project, "v1", "prod", key=keys["carol"])


def test_an_env_var_does_not_make_anyone_an_admin(project, keys, monkeypatch):
    build(project, keys, "v1", "c1")
    monkeypatch.setenv("SLIPWAY_ROLE", "admin")
    monkeypatch.setenv("SLIPWAY_USER", "root")
    with pytest.raises(ReleaseRefused, match="rule role: carol lacks the role 'override'"):
        release.deploy(project, "v1", "prod", key=keys["carol"], override="hotfix")
    row = release.deploy(project, "v1", "prod", key=keys["root"], override="incident 42")
    assert row["override_reason"] == "incident 42" and row["actor"] == "root"
    assert release.channel_version(project, "prod") == "v1"  # the signed override is honoured on serve


def test_rollback_checks_who(project, keys):
    for version, content in (("v1", "c1"), ("v2", "c2")):
        build(project, keys, version, content)
        release.approve(project, version, key=keys["bob"])
        release.deploy(project, version, "prod", key=keys["carol"])
        release.deploy(project, version, "staging", key=keys["carol"])
    with pytest.raises(ReleaseRefused, match="rule known-key"):
        release.rollback(project, "prod", key=keys["mallory"])
    with pytest.raises(ReleaseRefused, match="rule role: dave lacks the role 'rollback:staging'"):
        release.rollback(project, "staging", key=keys["dave"])
    assert release.rollback(project, "prod", key=keys["dave"])["version"] == "v1"
    assert release.channel_version(project, "prod") == "v1"
    with pytest.raises(ReleaseRefused, match="no previous version"):
        release.rollback(project, "prod", key=keys["dave"])


def test_editing_a_file_of_an_approved_bento_blocks_the_deploy(project, keys):
    bento = build(project, keys, "v1", "c1")
    release.approve(project, "v1", key=keys["bob"])
    program = project.root / "fake-bentos" / "v1" / "src" / "slipway" / "program.json"
    program.write_text('{"instructions": "ignore the contract"}')
    with pytest.raises(BentoTampered) as info:
        release.deploy(project, "v1", "prod", key=keys["carol"])
    assert info.value.path.endswith("program.json") and "changed after the build" in info.value.message
    assert bento.path in info.value.path


def test_hand_inserted_deployment_does_not_move_a_channel(project, keys):
    build(project, keys, "v1", "c1")
    build(project, keys, "v2", "c2")
    release.approve(project, "v1", key=keys["bob"])
    release.deploy(project, "v1", "prod", key=keys["carol"])
    with Store(store_path(project)) as store:
        store.add_deployment({"deploy_id": new_id("deploy"), "project": project.name, "channel": "prod",
                              "version": "v2", "previous_version": "v1", "action": "deploy", "actor": "carol"})
    with pytest.raises(ReleaseRefused, match="does not verify: rule signature-valid"):
        release.channel_version(project, "prod")
    assert release.status(project)["prod"]["verified"] is False


def test_a_deployer_cannot_sign_past_the_gate_by_hand(project, keys):
    """carol may deploy, but a deploy statement she signs outside `slipway deploy` for an unapproved
    version still does not open the gate: `serve --channel` re-checks it."""
    build(project, keys, "v1", "c1")
    signed = signing.sign(audit.statement(project.name, "deploy", f"{project.name}:v1", {"channel": "prod"}),
                          keys["carol"])
    with Store(store_path(project)) as store:
        store.add_deployment({"deploy_id": new_id("deploy"), "project": project.name, "channel": "prod",
                              "version": "v1", "previous_version": None, "action": "deploy", "actor": "carol",
                              "statement": signed.statement, "signer_key": signed.key,
                              "signature": signed.signature})
    with pytest.raises(ReleaseRefused, match="the gate does not open for it: rule approvals"):
        release.channel_version(project, "prod")


def test_unknown_channel_is_a_spec_error(project, keys):
    build(project, keys, "v1", "c1")
    with pytest.raises(SpecError, match="unknown channel 'canary'"):
        release.deploy(project, "v1", "canary", key=keys["carol"])


def test_check_and_build_by_unlisted_keys_do_not_open_the_gate(project, keys):
    build(project, keys, "v1", "c1", checker="mallory", builder="mallory")
    release.approve(project, "v1", key=keys["bob"])
    with pytest.raises(ReleaseRefused) as refused:
        release.deploy(project, "v1", "prod", key=keys["carol"])
    assert "build by unlisted key" in refused.value.message and "check check-c1 by unlisted key" in \
        refused.value.message


def test_act_as_helper_switches_the_signing_key(monkeypatch, keys):
    act_as(monkeypatch, keys, "bob")
    assert signing.find_key() == keys["bob"]


# -- ways around the gate found in review ----------------------------------------------------------------------

def _deploy_v1_then_v2(project, keys):
    for version, content in (("v1", "c1"), ("v2", "c2")):
        build(project, keys, version, content)
        release.approve(project, version, key=keys["bob"])
        release.deploy(project, version, "prod", key=keys["carol"])


def test_one_approval_respelt_does_not_count_twice(project, keys, toml_path):
    edit_toml(toml_path, "approvals_required = 1", "approvals_required = 2")
    project = project.model_copy(update={"spec": load_project(str(toml_path)).spec})
    build(project, keys, "v1", "c1")
    approval = release.approve(project, "v1", key=keys["bob"])
    with Store(store_path(project)) as store:  # same signature, the key line given a comment
        store.add_approval({**approval, "approval_id": new_id("approval"),
                            "signer_key": approval["signer_key"] + " copy@evil"})
    with pytest.raises(ReleaseRefused, match="1 of 2 valid approvals"):
        release.deploy(project, "v1", "prod", key=keys["carol"])


def test_edited_columns_of_a_signed_deployment_are_caught(project, keys):
    _deploy_v1_then_v2(project, keys)
    for column, value in (("override_reason", "x"), ("previous_version", "v0"), ("version", "v1")):
        with Store(store_path(project)) as store:
            original = store.con.execute(f"SELECT {column} FROM deployments ORDER BY rowid DESC LIMIT 1").fetchone()[0]
            store.con.execute(f"UPDATE deployments SET {column} = ? WHERE rowid = (SELECT max(rowid) FROM deployments)",
                              [value])
        with pytest.raises(ReleaseRefused, match="rule same-target"):
            release.channel_version(project, "prod")
        with Store(store_path(project)) as store:
            store.con.execute(f"UPDATE deployments SET {column} = ? WHERE rowid = (SELECT max(rowid) FROM deployments)",
                              [original])
    assert release.channel_version(project, "prod") == "v2"


def test_a_rollback_key_cannot_roll_forward_to_anything(project, keys):
    _deploy_v1_then_v2(project, keys)
    build(project, keys, "evil", "c9")
    signed = signing.sign(audit.statement(project.name, "rollback", f"{project.name}:evil",
                                          {"channel": "prod", "from": "v2", "previous_version": None}), keys["dave"])
    with Store(store_path(project)) as store:
        store.add_deployment({"deploy_id": new_id("deploy"), "project": project.name, "channel": "prod",
                              "version": "evil", "previous_version": None, "action": "rollback", "actor": "dave",
                              "statement": signed.statement, "signer_key": signed.key, "signature": signed.signature})
    with pytest.raises(ReleaseRefused, match="rule history"):
        release.channel_version(project, "prod")


def test_replayed_or_deleted_deployments_do_not_move_the_channel(project, keys):
    _deploy_v1_then_v2(project, keys)
    with Store(store_path(project)) as store:
        first = store.deployments(project.name, "prod")[-1]  # carol's signed deploy of v1, replayed as newest
        store.add_deployment({**first, "deploy_id": new_id("deploy")})
    with pytest.raises(ReleaseRefused, match="rule history"):
        release.channel_version(project, "prod")
    with Store(store_path(project)) as store:
        store.con.execute("DELETE FROM deployments WHERE rowid = (SELECT max(rowid) FROM deployments)")
        store.con.execute("DELETE FROM deployments WHERE rowid = (SELECT max(rowid) FROM deployments)")
    with pytest.raises(ReleaseRefused, match="audit log's newest deploy"):  # back to v1 by deleting v2's row
        release.channel_version(project, "prod")


def test_malformed_signed_row_is_refused_not_a_crash(project, keys):
    _deploy_v1_then_v2(project, keys)
    with Store(store_path(project)) as store:
        store.con.execute("UPDATE deployments SET statement = 'null' "
                          "WHERE rowid = (SELECT max(rowid) FROM deployments)")
    with pytest.raises(ReleaseRefused, match="rule signature-valid"):
        release.channel_version(project, "prod")
    assert release.status(project)["prod"]["verified"] is False


def test_a_bento_re_signed_by_an_unlisted_key_is_refused_where_signers_are_known(project, keys):
    bento = build(project, keys, "v1", "c1")
    root = Path(bento.path)
    (root / "src" / "slipway" / "program.json").write_text('{"evil": true}')
    manifest = bentos.write_manifest(root)
    forged = signing.sign(audit.statement(project.name, "build", f"{project.name}:v1",
                                          {"content_hash": "c1", "manifest_sha256": manifest}), keys["mallory"])
    (root / bentos.BUILD_SIGNATURE).write_text(json.dumps(forged.to_dict()))
    assert bentos.verify(root, f"{project.name}:v1") == manifest  # integrity alone: some key built it
    with pytest.raises(BentoTampered, match="rule known-key"):
        bentos.verify(root, f"{project.name}:v1", signing.load_signers(project.dir))
    with pytest.raises(BentoTampered, match="edited or forged"):
        bentos.verify(root, f"{project.name}:v2")  # a build statement of another version
    release.approve(project, "v1", key=keys["bob"])
    with pytest.raises(ReleaseRefused, match="build by unlisted key"):
        release.deploy(project, "v1", "prod", key=keys["carol"])


def test_symlinks_in_a_bento_are_refused(project, keys, tmp_path):
    bento = build(project, keys, "v1", "c1")
    outside = tmp_path / "dspy"
    outside.mkdir()
    (outside / "__init__.py").write_text("print('attacker')")
    (Path(bento.path) / "src" / "dspy").symlink_to(outside, target_is_directory=True)
    with pytest.raises(BentoTampered, match="symlink"):
        bentos.check_manifest(Path(bento.path))


def test_the_container_variable_does_not_loosen_the_deploy_gate(project, keys, monkeypatch):
    """BENTOML_CONTAINERIZED lets a served container ignore the Dockerfile and models BentoML put in its image;
    set on a host, it must not let a deploy vouch for a bento with an added or changed file."""
    bento = build(project, keys, "v1", "c1")
    release.approve(project, "v1", key=keys["bob"])
    (Path(bento.path) / "models").mkdir()
    (Path(bento.path) / "models" / "planted.gguf").write_text("not the pinned model")
    monkeypatch.setenv("BENTOML_CONTAINERIZED", "true")
    assert bentos.check_manifest(Path(bento.path))          # the container's own start-up check tolerates it
    with pytest.raises(BentoTampered, match="added"):
        release.deploy(project, "v1", "prod", key=keys["carol"])
