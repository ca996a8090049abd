"""Signatures and the signers file: real SSH keys, `ssh-keygen -Y sign`, verified in process."""

from __future__ import annotations

import dataclasses
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from framework import signing
from framework.errors import IdentityError, SpecError
from tests.conftest import write_signers


def test_signature_holds_and_any_change_breaks_it(keys):
    signed = signing.sign({"action": "approve", "target": "p:v1", "details": {"content_hash": "c1"}}, keys["bob"])
    assert signing.signature_holds(signed)
    assert not signing.signature_holds(dataclasses.replace(signed, statement={**signed.statement, "target": "p:v2"}))
    # Claiming someone else's key for bob's signature fails too.
    assert not signing.signature_holds(dataclasses.replace(signed, key=signing.public_key(keys["alice"])))


def test_openssh_verifies_what_slipway_signs(keys, tmp_path):
    """The format is OpenSSH's own SSHSIG: `ssh-keygen -Y verify` accepts it, as for git commits."""
    signed = signing.sign({"x": 1}, keys["bob"])
    (tmp_path / "allowed").write_text(f"bob {signed.key}\n")
    (tmp_path / "sig").write_text(signed.signature)
    done = subprocess.run(["ssh-keygen", "-Y", "verify", "-f", str(tmp_path / "allowed"), "-I", "bob", "-n",
                           signing.NAMESPACE, "-s", str(tmp_path / "sig")], input=signing.canonical({"x": 1}),
                          capture_output=True)
    assert done.returncode == 0, done.stderr


@given(st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=20), st.booleans()),
                       max_size=5))
@settings(max_examples=50, deadline=None)
def test_canonical_is_order_independent(data):
    reordered = dict(reversed(list(data.items())))
    assert signing.canonical(data) == signing.canonical(reordered)


def test_refusals_name_the_rule(keys, project_root):
    folder = project_root / "projects" / "ticket-triage"
    write_signers(folder, keys, {"bob": ["approve"], "carol": ["deploy:prod"]})
    text = signing.signers_path(folder).read_text()
    signing.signers_path(folder).write_text(text + f'\n[[revoked]]\nkey = "{signing.public_key(keys["dave"])}"\n'
                                                   'reason = "laptop lost"\n')
    signers = signing.load_signers(folder)

    def why(name, role):
        return signing.refusal(signing.verify(signing.sign({"a": 1}, keys[name]), signers), role)

    assert why("bob", "approve") is None
    assert why("carol", "deploy:prod") is None
    assert "rule role" in why("carol", "deploy:staging")
    assert "rule role" in why("bob", "deploy:prod")
    assert "rule known-key" in why("mallory", "approve")
    assert "rule key-not-revoked" in why("dave", None) and "laptop lost" in why("dave", None)
    forged = dataclasses.replace(signing.sign({"a": 1}, keys["mallory"]), key=signing.public_key(keys["bob"]))
    assert "rule signature-valid" in signing.refusal(signing.verify(forged, signers), "approve")


def test_one_key_cannot_be_two_people(keys, project_root):
    folder = project_root / "projects" / "ticket-triage"
    signing.add_signer(folder, "bob", signing.public_key(keys["bob"]), ["approve"])
    with pytest.raises(SpecError, match="share one key"):
        signing.add_signer(folder, "robert", signing.public_key(keys["bob"]), ["approve"])
    with pytest.raises(SpecError, match="appears twice"):
        signing.add_signer(folder, "bob", signing.public_key(keys["carol"]), ["approve"])


@given(st.text(max_size=30))
@settings(max_examples=100, deadline=None)
def test_roles_outside_the_grammar_are_refused(role):
    import re

    valid = re.fullmatch(signing.ROLE_PATTERN, role) is not None
    try:
        signing.Signer(name="x", key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB", roles=[role])
        accepted = True
    except ValueError:
        accepted = False
    assert accepted == valid


def test_bad_signers_file_names_the_file(project_root):
    folder = project_root / "projects" / "ticket-triage"
    signing.signers_path(folder).write_text('[[signers]]\nname = "bob"\nkey = "not a key"\n')
    with pytest.raises(SpecError) as info:
        signing.load_signers(folder)
    assert "signers.toml" in str(info.value) and "OpenSSH public key" in str(info.value)


def test_missing_key_says_how_to_make_one(monkeypatch, tmp_path):
    monkeypatch.delenv("SLIPWAY_SIGNING_KEY")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "gitconfig"))
    with pytest.raises(IdentityError, match="no SSH signing key") as info:
        signing.find_key()
    assert "slipway signers init" in info.value.hint
    made = signing.find_key(create=True)  # checks and builds make one rather than fail on a fresh machine
    assert made == signing.default_key_path() and made.exists()
    assert signing.find_key() == made


def test_a_stale_pub_file_is_caught_when_signing(keys, tmp_path):
    import shutil

    shutil.copy(keys["bob"], tmp_path / "bob")
    shutil.copy(keys["carol"].with_suffix(".pub"), tmp_path / "bob.pub")  # the wrong public half
    with pytest.raises(IdentityError, match="match"):  # ssh-keygen refuses; were it not to, sign() checks
        signing.sign({"x": 1}, tmp_path / "bob")
