"""API keys (framework/apikeys.py): real SSH keys sign every row; the ways around the gate are refused."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import stat

import pytest
from typer.testing import CliRunner

from framework import apikeys, signing
from framework.apikeys import Caller, KeyFiles, KeyRefusal, verify_key
from framework.cli import app
from framework.errors import ReleaseRefused, SpecError
from framework.spec import load_project
from tests.conftest import edit_toml, write_signers

runner = CliRunner()
# alice creates keys; bob approves releases but may not touch API keys; mallory is in no signers file.
ROLES = {"alice": ["keys"], "bob": ["approve"], "carol": ["keys", "deploy:*"]}


@pytest.fixture
def project(project_root, keys):
    folder = project_root / "projects" / "ticket-triage"
    write_signers(folder, keys, ROLES)
    return load_project(str(folder / "project.toml"))


def keys_file(project):
    return apikeys.keys_path(project.dir)


def append_line(project, row: dict) -> None:
    keys_file(project).parent.mkdir(parents=True, exist_ok=True)
    with keys_file(project).open("a") as out:
        out.write(json.dumps(row) + "\n")


def statement_for(project, secret: str, tenant: str = "acme", **extra) -> dict:
    digest = apikeys.key_hash(secret)
    return {"action": apikeys.CREATE, "project": project.name, "key_id": apikeys.key_id_for(digest),
            "sha256": digest, "tenant": tenant, "endpoints": None, "channels": None,
            "at": "2026-11-26T12:00:00+00:00", **extra}


def test_a_created_key_lets_its_tenant_in_and_only_its_hash_is_kept(project, keys):
    secret, entry = apikeys.create_key(project, "acme")
    assert secret.startswith("sk-slipway-") and len(secret) == len("sk-slipway-") + 43
    caller = verify_key(project.dir, secret, "triage", "prod")
    assert caller == Caller(tenant="acme", key_id=entry.key_id, limits=project.spec.tenants["acme"])
    assert verify_key(project.dir, secret, "/feedback", None) == caller   # acme may call every route and channel
    text = keys_file(project).read_text()
    assert secret not in text and hashlib.sha256(secret.encode()).hexdigest() in text
    assert stat.S_IMODE(keys_file(project).stat().st_mode) == 0o600
    row = json.loads(text)
    assert signing.refusal(signing.verify(signing.Signed.from_dict(row), signing.load_signers(project.dir)),
                           "keys") is None
    assert entry.created_by == "alice" and entry.key_id == apikeys.key_id_for(apikeys.key_hash(secret))


def test_each_key_is_new(project):
    made = {apikeys.create_key(project, "acme")[0] for _ in range(3)}
    assert len(made) == 3


@pytest.mark.parametrize("presented, code", [(None, "api-key-missing"), ("", "api-key-missing"),
                                             ("sk-slipway-" + "A" * 43, "api-key-unknown"),
                                             ("not even a key", "api-key-unknown")])
def test_no_key_or_an_unknown_one_is_401(project, presented, code):
    apikeys.create_key(project, "acme")
    refusal = verify_key(project.dir, presented, "triage", "prod")
    assert isinstance(refusal, KeyRefusal) and (refusal.status, refusal.code) == (401, code)


def test_no_keys_file_refuses_everyone(project):
    assert verify_key(project.dir, "sk-slipway-x", "triage", "prod").status == 401


def test_scope_of_the_tenant_and_of_the_key_is_403(project):
    trial, _ = apikeys.create_key(project, "trial")     # trial: endpoints ["triage"], channels ["prod"]
    assert verify_key(project.dir, trial, "triage", "prod").tenant == "trial"
    for endpoint, channel in (("feedback", "prod"), ("triage", "staging"), ("triage", None)):
        refusal = verify_key(project.dir, trial, endpoint, channel)
        assert (refusal.status, refusal.code) == (403, "api-key-scope"), (endpoint, channel)
        assert refusal.key_id in refusal.message
    narrow, _ = apikeys.create_key(project, "acme", endpoints=["/feedback"], channels=["staging"])
    assert verify_key(project.dir, narrow, "feedback", "staging").tenant == "acme"
    assert verify_key(project.dir, narrow, "triage", "staging").status == 403
    assert verify_key(project.dir, narrow, "feedback", "prod").status == 403


def test_a_key_cannot_reach_past_its_tenant_or_name_an_unserved_route(project):
    with pytest.raises(SpecError, match="a key cannot reach past its tenant") as info:
        apikeys.create_key(project, "trial", channels=["staging"])
    assert info.value.field == "tenants.trial.channels"
    with pytest.raises(SpecError, match="not a route the bento serves"):
        apikeys.create_key(project, "acme", endpoints=["admin"])
    with pytest.raises(SpecError, match="no tenant 'globex'") as info:
        apikeys.create_key(project, "globex")
    assert info.value.field == "tenants.globex" and "acme, trial" in info.value.message
    assert not keys_file(project).exists()


def test_a_key_whose_tenant_was_removed_is_403(project):
    secret, _ = apikeys.create_key(project, "trial")
    text = project.toml_path.read_text()
    project.toml_path.write_text(text[:text.index("[tenants.trial]")] + text[text.index("# Thresholds are set"):])
    refusal = verify_key(project.dir, secret, "triage", "prod")
    assert (refusal.status, refusal.code) == (403, "api-key-tenant")


def test_a_revoked_key_is_refused_from_the_next_request(project):
    secret, entry = apikeys.create_key(project, "acme")
    other, _ = apikeys.create_key(project, "acme")
    assert verify_key(project.dir, secret, "triage", "prod").tenant == "acme"   # cached from here on
    revoked, changed = apikeys.revoke_key(project, entry.key_id, reason="leaked in a CI log")
    assert changed and revoked.revoked_by == "alice" and revoked.revoke_reason == "leaked in a CI log"
    refusal = verify_key(project.dir, secret, "triage", "prod")
    assert (refusal.status, refusal.code) == (401, "api-key-revoked")
    assert verify_key(project.dir, other, "triage", "prod").tenant == "acme"
    assert apikeys.revoke_key(project, entry.key_id)[1] is False     # already revoked: nothing appended
    assert len(keys_file(project).read_text().splitlines()) == 3
    with pytest.raises(SpecError, match="no API key 'key-000000000000'"):
        apikeys.revoke_key(project, "key-000000000000")


def test_replaying_the_create_line_after_a_revocation_does_not_revive_the_key(project):
    secret, entry = apikeys.create_key(project, "acme")
    create_line = keys_file(project).read_text()
    apikeys.revoke_key(project, entry.key_id)
    with keys_file(project).open("a") as out:
        out.write(create_line)
    assert verify_key(project.dir, secret, "triage", "prod").code == "api-key-revoked"


# -- walking around the gate ---------------------------------------------------------------------------------

def test_a_hand_added_row_with_a_made_up_hash_is_refused(project, keys, caplog):
    secret = apikeys.new_key()
    statement = statement_for(project, secret)
    apikeys.create_key(project, "acme")   # the file exists, with one honest row
    append_line(project, {"statement": statement, "key": signing.public_key(keys["alice"]),
                          "signature": "-----BEGIN SSH SIGNATURE-----\nAAAA\n-----END SSH SIGNATURE-----\n"})
    append_line(project, {"key_id": statement["key_id"], "sha256": statement["sha256"], "tenant": "acme"})
    with caplog.at_level(logging.WARNING, logger="slipway.apikeys"):
        assert verify_key(project.dir, secret, "triage", "prod").code == "api-key-unknown"
    assert "rule signature-valid" in caplog.text and "not a signed statement" in caplog.text
    statuses = [row["status"] for row in apikeys.list_keys(project)]
    assert statuses[0] == "active" and all(s.startswith("ignored: ") for s in statuses[1:]) and len(statuses) == 3


@pytest.mark.parametrize("signer, rule", [("mallory", "rule known-key"),
                                          ("bob", "rule role: bob lacks the role 'keys'")])
def test_a_row_signed_by_an_unlisted_key_or_one_without_the_keys_role_is_refused(project, keys, signer, rule, caplog):
    secret = apikeys.new_key()
    append_line(project, signing.sign(statement_for(project, secret), keys[signer]).to_dict())
    with caplog.at_level(logging.WARNING, logger="slipway.apikeys"):
        assert verify_key(project.dir, secret, "triage", "prod").code == "api-key-unknown"
    assert rule in caplog.text
    with pytest.raises(ReleaseRefused, match=rule):   # and the CLI path refuses before writing
        apikeys.create_key(project, "acme", key=keys[signer])


def test_a_key_signed_by_a_signer_later_revoked_or_removed_stops_working(project, keys):
    secret, _ = apikeys.create_key(project, "acme", key=keys["carol"])
    assert verify_key(project.dir, secret, "triage", "prod").tenant == "acme"
    path = signing.signers_path(project.dir)
    path.write_text(path.read_text() + f'\n[[revoked]]\nkey = "{signing.public_key(keys["carol"])}"\n'
                                       'reason = "laptop lost"\n')
    assert verify_key(project.dir, secret, "triage", "prod").code == "api-key-unknown"
    write_signers(project.dir, keys, {"alice": ["keys"]})   # carol no longer listed at all
    assert verify_key(project.dir, secret, "triage", "prod").code == "api-key-unknown"


@pytest.mark.parametrize("edit", [
    lambda s: {**s, "tenant": "acme"},                                  # promote a trial key to acme's budget
    lambda s: {**s, "endpoints": None},                                 # widen its routes
    lambda s: {**s, "channels": ["prod", "staging"]},                   # widen its channels
    lambda s: {**s, "sha256": apikeys.key_hash("sk-slipway-mine"),      # put my own key under the signature
               "key_id": apikeys.key_id_for(apikeys.key_hash("sk-slipway-mine"))},
])
def test_editing_a_row_after_signing_is_refused(project, edit):
    secret, _ = apikeys.create_key(project, "trial", endpoints=["triage"], channels=["prod"])
    row = json.loads(keys_file(project).read_text())
    row["statement"] = edit(row["statement"])
    keys_file(project).write_text(json.dumps(row) + "\n")
    for presented in (secret, "sk-slipway-mine"):
        for endpoint, channel in (("triage", "prod"), ("feedback", "staging")):
            assert verify_key(project.dir, presented, endpoint, channel).status == 401


def test_a_row_signed_for_another_project_or_a_signed_non_key_statement_is_refused(project, keys):
    secret = apikeys.new_key()
    for change in ({"project": "other-project"}, {"action": "approve"}):
        append_line(project, signing.sign({**statement_for(project, secret), **change}, keys["alice"]).to_dict())
    assert verify_key(project.dir, secret, "triage", "prod").code == "api-key-unknown"
    reasons = [row["status"] for row in apikeys.list_keys(project)]
    assert any("signed for project 'other-project'" in r for r in reasons)
    assert any("a signed 'approve' statement" in r for r in reasons)


def test_a_revocation_signed_without_the_role_is_ignored(project, keys):
    secret, entry = apikeys.create_key(project, "acme")
    revoke = {"action": apikeys.REVOKE, "project": project.name, "key_id": entry.key_id, "sha256": entry.sha256,
              "tenant": "acme", "reason": "", "at": "2026-11-26T12:00:00+00:00"}
    append_line(project, signing.sign(revoke, keys["bob"]).to_dict())
    assert verify_key(project.dir, secret, "triage", "prod").tenant == "acme"
    append_line(project, signing.sign(revoke, keys["carol"]).to_dict())
    assert verify_key(project.dir, secret, "triage", "prod").code == "api-key-revoked"


# -- where the served bento reads them, and what it costs ----------------------------------------------------

def test_a_bento_verifies_against_its_own_copies_of_signers_and_project_toml(project, tmp_path):
    secret, _ = apikeys.create_key(project, "acme")
    bento = tmp_path / "bento" / "slipway"
    bento.mkdir(parents=True)
    shutil.copy(signing.signers_path(project.dir), bento / "signers.toml")
    shutil.copy(project.toml_path, bento / "project.toml")
    files = KeyFiles(keys=keys_file(project), signers=bento / "signers.toml", project_toml=bento / "project.toml")
    assert verify_key(files, secret, "triage", "prod").tenant == "acme"
    (bento / "signers.toml").write_text("")    # a bento whose signers list nobody: no key counts
    assert verify_key(files, secret, "triage", "prod").code == "api-key-unknown"


def test_the_table_is_read_once_per_change_and_each_signature_checked_once(project, monkeypatch):
    secret, _ = apikeys.create_key(project, "acme")
    reads, checks = [], []
    real_read, real_holds = apikeys._read, signing.signature_holds
    monkeypatch.setattr(apikeys, "_read", lambda files: reads.append(1) or real_read(files))
    monkeypatch.setattr(signing, "signature_holds", lambda signed: checks.append(1) or real_holds(signed))
    apikeys._tables.clear()
    apikeys._signatures.clear()
    for _ in range(50):
        assert verify_key(project.dir, secret, "triage", "prod").tenant == "acme"
    assert (len(reads), len(checks)) == (1, 1)
    apikeys.create_key(project, "acme")   # the file is replaced: read again, only the new line's signature checked
    assert verify_key(project.dir, secret, "triage", "prod").tenant == "acme"
    assert (len(reads), len(checks)) == (2, 3)   # create_key's own sign() checks its signature once


def test_a_broken_signers_file_fails_closed_and_loudly(project):
    secret, _ = apikeys.create_key(project, "acme")
    signing.signers_path(project.dir).write_text("[[signers]\n")
    with pytest.raises(SpecError, match="not valid TOML"):
        verify_key(project.dir, secret, "triage", "prod")


@pytest.mark.parametrize("header, key", [("Bearer sk-slipway-abc", "sk-slipway-abc"), ("bearer  sk-x ", "sk-x"),
                                         ("Basic dXNlcjpwYXNz", None), ("Bearer", None), ("", None), (None, None)])
def test_bearer_reads_the_authorization_header(header, key):
    assert apikeys.bearer(header) == key


# -- the CLI ----------------------------------------------------------------------------------------------------

def test_keys_create_list_revoke_through_the_cli(project, keys):
    made = runner.invoke(app, ["keys", "create", str(project.toml_path), "--tenant", "acme"])
    assert made.exit_code == 0, made.output
    secret = made.stdout.strip()
    assert secret.startswith("sk-slipway-") and "\n" not in secret
    assert "only time the key is shown" in made.stderr and "signed by alice" in made.stderr
    made = runner.invoke(app, ["keys", "create", str(project.toml_path), "--tenant", "trial", "--endpoint", "triage",
                               "--channel", "prod", "--json", "--key", str(keys["carol"])])
    assert made.exit_code == 0, made.output
    data = json.loads(made.stdout)
    assert set(data) == {"key", "tenant", "key_id"} and data["tenant"] == "trial"
    assert verify_key(project.dir, data["key"], "triage", "prod").key_id == data["key_id"]

    listed = runner.invoke(app, ["keys", "list", str(project.toml_path), "--json"])
    rows = json.loads(listed.stdout)
    assert [(r["tenant"], r["created_by"], r["status"]) for r in rows] == [("acme", "alice", "active"),
                                                                          ("trial", "carol", "active")]
    assert rows[1]["endpoints"] == ["triage"] and rows[1]["channels"] == ["prod"]
    assert secret not in listed.stdout and data["key"] not in listed.stdout

    revoked = runner.invoke(app, ["keys", "revoke", str(project.toml_path), data["key_id"], "--reason", "trial over"])
    assert revoked.exit_code == 0 and f"revoked {data['key_id']} (tenant 'trial') as alice" in revoked.stdout
    table = runner.invoke(app, ["keys", "list", str(project.toml_path)], env={"COLUMNS": "200"})
    assert "revoked" in table.stdout and "trial over" in table.stdout and secret not in table.stdout
    assert verify_key(project.dir, data["key"], "triage", "prod").code == "api-key-revoked"


def test_keys_create_by_a_key_without_the_role_exits_1_naming_the_rule(project, keys):
    result = runner.invoke(app, ["keys", "create", str(project.toml_path), "--tenant", "acme", "--key",
                                 str(keys["bob"])])
    assert result.exit_code == 1, result.output
    assert "release-refused" in result.output and "bob lacks the role 'keys'" in result.output
    assert "--roles keys" in result.output and not keys_file(project).exists()


def test_signers_commands_and_the_old_keys_names(project, keys, tmp_path):
    listed = runner.invoke(app, ["signers", "list", str(project.toml_path), "--json"])
    assert listed.exit_code == 0 and [r["name"] for r in json.loads(listed.stdout)] == ["alice", "bob", "carol"]
    for group in ("signers", "keys"):
        shown = runner.invoke(app, [group, "show"])
        assert shown.exit_code == 0 and shown.stdout.strip() == signing.public_key(keys["alice"])
        note = "note: `slipway keys show` is now `slipway signers show`"
        assert (note in shown.stderr) == (group == "keys")
    added = runner.invoke(app, ["keys", "add", str(project.toml_path), "dave", "--public-key",
                                str(keys["dave"].with_suffix(".pub")), "--roles", "keys"])
    assert added.exit_code == 0, added.output
    assert "`slipway keys add` is now `slipway signers add`" in added.stderr and "added dave" in added.stdout
    assert signing.load_signers(project.dir).signers[-1].roles == ["keys"]
    init = runner.invoke(app, ["keys", "init"], env={"SLIPWAY_SIGNING_KEY": ""})
    assert init.exit_code == 0 and "is now `slipway signers init`" in init.stderr
    helptext = runner.invoke(app, ["keys", "--help"]).stdout
    assert "create" in helptext and "revoke" in helptext and "init" not in helptext and " add " not in helptext


def test_the_demo_declares_two_tenants(toml_path):
    project = load_project(str(toml_path))
    acme, trial = project.spec.tenants["acme"], project.spec.tenants["trial"]
    assert acme.daily_tokens > trial.daily_tokens and acme.requests_per_minute > trial.requests_per_minute
    assert trial.endpoints == ["triage"] and trial.channels == ["prod"]


def test_tenant_errors_name_the_field(toml_path):
    from framework.spec import parse_spec

    def problem(old: str, new: str) -> str:
        text = toml_path.read_text()
        with pytest.raises(SpecError) as info:
            parse_spec(text.replace(old, new, 1), str(toml_path))
        return str(info.value)

    assert "tenants.trial.endpoints: 'admin' is not a route the bento serves" in problem(
        'endpoints = ["triage"]', 'endpoints = ["triage", "admin"]')
    assert "an empty list allows nothing" in problem('channels = ["prod"]', "channels = []")
    assert "tenants.trial.daily_token" in problem("daily_tokens = 20_000", "daily_token = 20_000")
    assert "tenants.Trial" in problem("[tenants.trial]", "[tenants.Trial]")
    assert "tenants.acme.requests_per_minute" in problem("requests_per_minute = 120", "requests_per_minute = 0")
    edit_toml(toml_path, 'endpoints = ["triage"]', 'endpoints = ["/triage", "feedback", "triage"]')
    assert load_project(str(toml_path)).spec.tenants["trial"].endpoints == ["feedback", "triage"]
