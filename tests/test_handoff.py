"""Requests handed to a person → the human queue → a person's signed answer (framework/handoff.py).

Queue lines are written by `HandoffWriter` beside the service's own `Tracer`, as a served worker writes them;
signing uses real SSH keys from conftest (carol has the `queue` role, bob only `approve`, mallory is not
listed). The walk-arounds (no key, an unlisted key, a key without the role, an edited row) are refused or
caught and leave nothing recorded."""

from __future__ import annotations

import json
import os
import socket

import duckdb
import pytest
from typer.testing import CliRunner

from framework import audit, signing
from framework.cli import app
from framework.errors import HandoffError, IdentityError, ReleaseRefused
from framework.evaluate import store_path
from framework.fallback import FallbackSpec, decide
from framework.handoff import HandoffWriter, entry_hash, parse_labels, queue, resolve
from framework.spec import TracingSpec, load_project
from framework.store import Store
from framework.traces import RequestIndex, Tracer, ingest
from tests.conftest import act_as, write_signers

IDENTITY = {"project": "ticket-triage", "channel": "prod", "bento": "ticket-triage:v1", "version": "v1",
            "model_sha256": "ab" * 32, "program_hash": "cd" * 32}
ANSWER = {"category": "billing", "priority": "medium", "needs_human": True, "reason": "Handed to a person"}
TYPES = {"category": str, "priority": str, "needs_human": bool, "reason": str}
HUMAN = FallbackSpec(action="human", answer=ANSWER)
runner = CliRunner()


def flat(output: str) -> str:
    return " ".join(output.split())


@pytest.fixture
def project(project_root, keys):
    folder = project_root / "projects" / "ticket-triage"
    write_signers(folder, keys, {"alice": [], "bob": ["approve"], "carol": ["queue"]})
    return load_project(str(folder))


@pytest.fixture
def writer(project):
    return HandoffWriter(Tracer(TracingSpec(), project.trace_dir, IDENTITY, project.model()))


def handed(writer: HandoffWriter, request_id: str, ticket: str = "My invoice is wrong", code: str = "model-timeout",
           **who) -> dict:
    """What the service's failure path writes for a request it hands to a person."""
    return writer.write(request_id, decide(HUMAN, code), error=f"{code}: the model did not answer in 60 s",
                        inputs={"ticket": ticket}, **who)


def resolve_as(project, monkeypatch, keys, name: str, ident: str, labels: dict, **kwargs):
    act_as(monkeypatch, keys, name)
    return resolve(project, ident, labels, output_types=TYPES, **kwargs)


def audit_actions(project) -> list[str]:
    with Store(store_path(project), read_only=True) as store:
        return [row["action"] for row in store.audit_rows()]


# -- the served side ------------------------------------------------------------------------------------------
def test_an_entry_is_one_redacted_line_in_the_handoff_segment(project, writer):
    line = handed(writer, "r-1", "Refund me at ann@example.com, card 4111 1111 1111 1111", tenant="acme",
                  caller="key-1", flags={"terse_prompt": "on"}, program_hash="ef" * 32)
    assert writer.writer.path.parent == project.trace_dir / "handoff"
    assert json.loads(writer.writer.path.read_text()) == json.loads(json.dumps(line))
    assert line["inputs"]["ticket"] == "Refund me at [EMAIL], card [CARD]"   # the Tracer's redactor
    assert line["redactions"] == {"email": 1, "card": 1}
    assert (line["request_id"], line["tenant"], line["caller"], line["bento"], line["channel"]) == (
        "r-1", "acme", "key-1", "ticket-triage:v1", "prod")
    assert (line["failure"], line["error_code"], line["answer"]) == ("timeout", "model-timeout", ANSWER)
    assert line["program_hash"] == "ef" * 32 and line["flags"] == {"terse_prompt": "on"}
    assert line["worker"] == f"{socket.gethostname()}-{os.getpid()}" and line["created_at"]


def test_without_keep_text_no_inputs_are_kept(project):
    writer = HandoffWriter(Tracer(TracingSpec(keep_text=False), project.trace_dir, IDENTITY, project.model()))
    assert handed(writer, "r-1")["inputs"] is None


def test_the_request_index_of_feedback_ignores_handoff_segments(project, writer):
    handed(writer, "r-1")
    index = RequestIndex(project.trace_dir)
    index.refresh()
    assert not index.requests and not index.feedback


# -- ingestion: idempotent, a torn line waits for its writer -------------------------------------------------------
def test_queue_ingests_once_and_lists_open_entries_oldest_first(project, writer):
    for i in range(3):
        handed(writer, f"r-{i}", f"ticket {i}")
    listed = queue(project)
    assert [e["request_id"] for e in listed.entries] == ["r-0", "r-1", "r-2"] and listed.skipped == []
    assert listed.entries[0]["inputs"] == {"ticket": "ticket 0"} and listed.entries[0]["answer"] == ANSWER
    assert ingest(project).handoff == 0   # already in
    assert [e["request_id"] for e in queue(project).entries] == ["r-0", "r-1", "r-2"]
    handed(writer, "r-3")
    assert ingest(project).handoff == 1
    with Store(store_path(project), read_only=True) as store:
        assert len(store.handoffs()) == 4


def test_a_torn_last_line_waits_for_its_writer_and_is_skipped_once_it_is_gone(project, writer):
    handed(writer, "r-0")
    with open(writer.writer.path, "ab") as fh:
        fh.write(b'{"handoff_id": "cut", "request_id": "r-1", "crea')   # a worker killed mid-write
    listed = queue(project)
    assert [e["request_id"] for e in listed.entries] == ["r-0"] and listed.skipped == []   # its writer lives
    dead = writer.writer.path.with_name(writer.writer.path.name.replace(f"-{os.getpid()}-", "-999999999-"))
    writer.writer.path.rename(dead)
    with Store(store_path(project)) as store:
        store.forget_segment(f"handoff/{writer.writer.path.name}")
    listed = queue(project)
    assert [e["request_id"] for e in listed.entries] == ["r-0"]   # same handoff_id: not twice
    assert len(listed.skipped) == 1 and "cut short" in listed.skipped[0] and dead.name in listed.skipped[0]
    assert queue(project).skipped == []   # reported once; the offset moved past it


def test_an_ingest_killed_before_commit_is_redone_without_duplicates(project, writer, monkeypatch):
    for i in range(3):
        handed(writer, f"r-{i}")

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt

    original = Store.add_segment_rows
    monkeypatch.setattr(Store, "add_segment_rows", killed)
    with pytest.raises(KeyboardInterrupt):
        queue(project)
    monkeypatch.setattr(Store, "add_segment_rows", original)
    assert len(queue(project).entries) == 3 and ingest(project).handoff == 0


# -- resolve: signed, once, by the queue role ----------------------------------------------------------------------
def test_a_resolution_is_signed_logged_and_closes_the_entry(project, writer, monkeypatch, keys):
    first = handed(writer, "r-1", "Refund me at ann@example.com")
    handed(writer, "r-2")
    done = resolve_as(project, monkeypatch, keys, "carol", "r-1",
                      parse_labels(["category=billing", "priority=high", "needs_human=true"]), note="refund issued")
    assert (done.handoff_id, done.request_id, done.resolved_by, done.note) == (
        first["handoff_id"], "r-1", "carol", "refund issued")
    assert done.labels == {"category": "billing", "priority": "high", "needs_human": True}   # read as their types
    assert [e["request_id"] for e in queue(project).entries] == ["r-2"]
    everything = {e["request_id"]: e for e in queue(project, everything=True).entries}
    closed = everything["r-1"]
    assert closed["verified"] is True and closed["resolved_by"] == "carol" and closed["labels"] == done.labels
    assert everything["r-2"]["resolved_at"] is None and "verified" not in everything["r-2"]
    with Store(store_path(project), read_only=True) as store:
        rows = store.audit_rows()
        assert audit.verify(store, signers=signing.load_signers(project.dir)) is None
    assert [r["action"] for r in rows] == ["queue-resolve"] and rows[0]["actor"] == "carol"
    statement = audit.signed_of(rows[0]).statement
    assert statement["target"] == "ticket-triage:r-1" and done.audit_seq == rows[0]["seq"]
    assert statement["details"] == {"handoff_id": first["handoff_id"], "request_id": "r-1", "labels": done.labels,
                                    "note": "refund issued", "entry_sha256": entry_hash(closed)}


def test_resolving_twice_is_refused_and_recorded_once(project, writer, monkeypatch, keys):
    handed(writer, "r-1")
    resolve_as(project, monkeypatch, keys, "carol", "r-1", {"category": "billing"})
    with pytest.raises(ReleaseRefused, match="rule resolve-once: carol resolved it at"):
        resolve_as(project, monkeypatch, keys, "carol", "r-1", {"category": "bug"})
    assert audit_actions(project) == ["queue-resolve"]
    assert queue(project, everything=True).entries[0]["labels"] == {"category": "billing"}


def test_unknown_and_ambiguous_ids_are_refused_and_a_handoff_id_picks_one(project, writer, monkeypatch, keys):
    with pytest.raises(HandoffError, match="no entry 'nope' in the human queue of ticket-triage"):
        resolve_as(project, monkeypatch, keys, "carol", "nope", {"category": "billing"})
    one = handed(writer, "r-same", tenant="acme")
    other = handed(writer, "r-same", tenant="trial")   # two tenants may send the same X-Request-ID
    with pytest.raises(HandoffError, match="names 2 entries") as info:
        resolve_as(project, monkeypatch, keys, "carol", "r-same", {"category": "billing"})
    assert one["handoff_id"] in info.value.message and other["handoff_id"] in info.value.message
    assert resolve_as(project, monkeypatch, keys, "carol", other["handoff_id"], {"category": "bug"}).request_id == \
        "r-same"
    assert [e["tenant"] for e in queue(project).entries] == ["acme"]


def test_labels_that_do_not_fit_the_output_fields_are_refused(project, writer, monkeypatch, keys):
    handed(writer, "r-1")
    with pytest.raises(HandoffError) as info:
        resolve_as(project, monkeypatch, keys, "carol", "r-1", {"mood": "calm", "needs_human": "perhaps"})
    assert "labels.mood: not an output field" in info.value.message
    assert "labels.needs_human: Input should be a valid boolean" in info.value.message
    with pytest.raises(HandoffError, match="no labels"):
        resolve_as(project, monkeypatch, keys, "carol", "r-1", {})
    for bad in (["category"], ["=billing"], ["category=a", "category=b"]):
        with pytest.raises(HandoffError):
            parse_labels(bad)
    assert not audit_actions(project) and len(queue(project).entries) == 1


def test_labels_are_checked_against_the_notebooks_program_by_default(project, writer, monkeypatch, keys):
    handed(writer, "r-1")
    act_as(monkeypatch, keys, "carol")
    with pytest.raises(HandoffError, match="labels.category: Input should be 'billing'"):
        resolve(project, "r-1", {"category": "other"})
    assert resolve(project, "r-1", {"category": "abuse", "needs_human": "true"}).labels == {
        "category": "abuse", "needs_human": True}


# -- walk-arounds: refused, and nothing recorded ---------------------------------------------------------------------
def test_without_a_key_nothing_is_recorded(project, writer, monkeypatch, tmp_path):
    handed(writer, "r-1")
    monkeypatch.delenv("SLIPWAY_SIGNING_KEY")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "gitconfig"))
    with pytest.raises(IdentityError, match="no SSH signing key"):
        resolve(project, "r-1", {"category": "billing"}, output_types=TYPES)
    assert not signing.default_key_path().exists()   # a gated action never makes a key
    assert not audit_actions(project) and len(queue(project).entries) == 1


@pytest.mark.parametrize(("name", "rule"), [("mallory", r"rule known-key: key SHA256:.* is not in signers.toml"),
                                            ("bob", "rule role: bob lacks the role 'queue'")])
def test_an_unlisted_key_or_one_without_the_role_is_refused(project, writer, monkeypatch, keys, name, rule):
    handed(writer, "r-1")
    with pytest.raises(ReleaseRefused, match=rule) as info:
        resolve_as(project, monkeypatch, keys, name, "r-1", {"category": "billing"})
    assert "signers.toml" in info.value.path and "'queue' role" in info.value.hint
    assert not audit_actions(project) and len(queue(project).entries) == 1


def test_a_revoked_key_is_refused(project, writer, monkeypatch, keys):
    handed(writer, "r-1")
    with signing.signers_path(project.dir).open("a") as fh:
        fh.write(f'\n[[revoked]]\nkey = "{signing.public_key(keys["carol"])}"\nreason = "laptop lost"\n')
    with pytest.raises(ReleaseRefused, match=r"rule key-not-revoked: .*\(laptop lost\)"):
        resolve_as(project, monkeypatch, keys, "carol", "r-1", {"category": "billing"})
    assert not audit_actions(project)


def test_an_edited_audit_row_is_caught_by_audit_verify(project, writer, monkeypatch, keys):
    handed(writer, "r-1")
    resolve_as(project, monkeypatch, keys, "carol", "r-1", {"category": "billing"})
    assert runner.invoke(app, ["audit", "verify", str(project.toml_path)]).exit_code == 0
    con = duckdb.connect(str(store_path(project)))
    con.execute("""UPDATE audit SET details = '{"labels": {"category": "abuse"}}' WHERE action = 'queue-resolve'""")
    con.close()
    result = runner.invoke(app, ["audit", "verify", str(project.toml_path)])
    assert result.exit_code == 1 and "audit-broken" in result.output
    assert "row 1 (queue-resolve) was edited" in flat(result.output)


def test_an_edited_or_typed_in_resolution_does_not_verify(project, writer, monkeypatch, keys):
    handed(writer, "r-1")
    handed(writer, "r-2")
    resolve_as(project, monkeypatch, keys, "carol", "r-1", {"category": "billing"})
    con = duckdb.connect(str(store_path(project)))
    con.execute("""UPDATE human_queue SET labels = '{"category": "abuse"}' WHERE request_id = 'r-1'""")
    con.execute("""UPDATE human_queue SET resolved_at = now(), resolved_by = 'carol',
                   labels = '{"category": "bug"}' WHERE request_id = 'r-2'""")
    con.close()
    assert [e["verified"] for e in queue(project, everything=True).entries] == [False, False]
    shown = flat(runner.invoke(app, ["queue", "list", str(project.toml_path), "--all"]).output)
    assert shown.count("NOT VERIFIED") == 2


def test_a_policy_change_after_resolving_shows_in_audit_verify(project, writer, monkeypatch, keys):
    """A resolution counts only while its signer holds the role: audit verify re-checks who signed it."""
    handed(writer, "r-1")
    resolve_as(project, monkeypatch, keys, "carol", "r-1", {"category": "billing"})
    write_signers(project.dir, keys, {"alice": [], "carol": []})
    result = runner.invoke(app, ["audit", "verify", str(project.toml_path)])
    assert result.exit_code == 1 and "carol lacks the role 'queue'" in flat(result.output)


# -- the CLI ------------------------------------------------------------------------------------------------------
def test_cli_lists_and_resolves(project, writer, monkeypatch, keys):
    toml = str(project.toml_path)
    empty = runner.invoke(app, ["queue", toml])
    assert empty.exit_code == 0 and "no open requests in the human queue of ticket-triage" in flat(empty.output)
    handed(writer, "r-1", "The export button does nothing", tenant="acme")
    listed = runner.invoke(app, ["queue", toml])   # `queue <project>` is `queue list <project>`
    assert listed.exit_code == 0, listed.output
    shown = flat(listed.output)
    assert "r-1" in shown and "acme" in shown and "timeout" in shown and "open" in shown
    assert "The export button does nothing" in shown
    rows = json.loads(runner.invoke(app, ["queue", "list", toml, "--json"]).stdout)
    assert [r["request_id"] for r in rows] == ["r-1"] and "signature" not in rows[0]

    act_as(monkeypatch, keys, "bob")
    refused = runner.invoke(app, ["queue", "resolve", toml, "r-1", "-l", "category=bug"])
    assert refused.exit_code == 1 and "bob lacks the role 'queue'" in flat(refused.output)
    bad = runner.invoke(app, ["queue", "resolve", toml, "r-1", "-l", "category=other", "--key", str(keys["carol"])])
    assert bad.exit_code == 2 and "handoff-invalid" in bad.output and "labels.category" in flat(bad.output)
    unknown = runner.invoke(app, ["queue", "resolve", toml, "nope", "-l", "category=bug"])
    assert unknown.exit_code == 2 and "no entry 'nope'" in flat(unknown.output)
    done = runner.invoke(app, ["queue", "resolve", toml, "r-1", "--labels", "category=bug", "--label",
                               "needs_human=false", "--note", "answered by mail", "--key", str(keys["carol"])])
    assert done.exit_code == 0, done.output
    assert "resolved r-1" in flat(done.output) and "signed by carol" in flat(done.output)
    again = runner.invoke(app, ["queue", "resolve", toml, "r-1", "-l", "category=bug", "--key", str(keys["carol"]),
                                "--json"])
    assert again.exit_code == 1 and "rule resolve-once" in flat(again.output)
    assert "no open requests" in flat(runner.invoke(app, ["queue", toml]).output)
    closed = json.loads(runner.invoke(app, ["queue", toml, "--all", "--json"]).stdout)
    assert closed[0]["labels"] == {"category": "bug", "needs_human": False} and closed[0]["verified"] is True
    assert closed[0]["note"] == "answered by mail"
    table = runner.invoke(app, ["queue", toml, "--all"]).output
    assert "resolved: carol" in table and "category=bug" in table and "needs_human=false" in flat(table)


def test_cli_resolve_json_and_help(project, writer, monkeypatch, keys):
    handed(writer, "r-1")
    act_as(monkeypatch, keys, "carol")
    done = runner.invoke(app, ["queue", "resolve", str(project.toml_path), "r-1", "-l", "category=billing", "--json"])
    assert done.exit_code == 0, done.output
    body = json.loads(done.stdout)
    assert body["resolved_by"] == "carol" and body["labels"] == {"category": "billing"} and body["audit_seq"] == 1
    helped = flat(runner.invoke(app, ["queue", "resolve", "--help"]).output)
    assert "needs the `queue` role" in helped and "Example: slipway queue resolve" in helped
