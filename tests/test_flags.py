"""The flags file as a gate (framework/flags.py): signed lines, the approval rule, the chain, and which requests
get a variant. Real SSH signatures (the `keys` fixture); no model. Each test that edits the file is a
walk-around attempt: a line that must not count, and the check that it does not."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from framework import audit, flags, signing
from framework.errors import SpecError
from framework.spec import parse_spec
from tests.conftest import REPO

CONTENT = "c" * 64


@pytest.fixture
def spec():
    return parse_spec((REPO / "projects" / "ticket-triage" / "project.toml").read_text())


@pytest.fixture
def signers(keys, tmp_path):
    roles = {"alice": ["flags"], "bob": ["approve"], "carol": ["approve", "flags"], "dave": []}
    lines = [signing.signer_line(name, signing.public_key(keys[name]), granted) for name, granted in roles.items()]
    path = tmp_path / "signers.toml"
    path.write_text("".join(lines))
    return signing.load_signers_file(path)


CHECKED_BY = "SHA256:the-key-that-signed-the-variants-check"


def line(keys, who: str, action: str, prev: list[str], *, flag="terse_prompt", variant="on", tenant="acme",
         percent=100, content=CONTENT, project="ticket-triage", check_key=CHECKED_BY) -> str:
    """Sign one statement as `who`, chained to the last line of `prev`, and append it there."""
    details = {"flag": flag, "variant": variant, "tenant": tenant, "percent": percent, "content_hash": content,
               "check_key": check_key, "reason": "", "prev": flags.line_hash(prev[-1]) if prev else ""}
    statement = audit.statement(project, action, f"{flag}={variant}@{tenant}", details)
    text = json.dumps(signing.sign(statement, keys[who]).to_dict(), sort_keys=True)
    prev.append(text)
    return text


def test_on_counts_only_with_an_approval_by_another_key(keys, spec, signers):
    lines: list[str] = []
    line(keys, "alice", flags.ON, lines)                 # no approval yet
    table = flags.read_lines(lines, spec, signers)
    assert table.active == {} and "rule approvals" in table.ignored[0].reason
    line(keys, "bob", flags.APPROVE, lines)
    line(keys, "alice", flags.ON, lines)
    table = flags.read_lines(lines, spec, signers)
    on = table.active[("terse_prompt", "acme")]
    assert on.on_by == "alice" and on.approvers == ("bob",)


def test_self_approval_and_approvals_of_another_target_do_not_count(keys, spec, signers):
    lines: list[str] = []
    line(keys, "carol", flags.APPROVE, lines)            # carol approves her own switch
    line(keys, "bob", flags.APPROVE, lines, percent=10)  # bob approved 10%, not 100%
    line(keys, "bob", flags.APPROVE, lines, content="d" * 64)   # other content: not what was checked
    line(keys, "carol", flags.ON, lines)
    table = flags.read_lines(lines, spec, signers)
    assert table.active == {}
    assert "0 of the 1 approval" in table.ignored[-1].reason


def test_the_author_of_the_variants_check_may_not_approve_it(keys, spec, signers):
    bob = signing.fingerprint(signing.public_key(keys["bob"]))
    lines: list[str] = []
    line(keys, "bob", flags.APPROVE, lines, check_key=bob)   # bob checked the variant, then approves it
    line(keys, "alice", flags.ON, lines, check_key=bob)
    table = flags.read_lines(lines, spec, signers)
    assert table.active == {} and "no-self-approval" in table.ignored[0].reason


def test_lines_from_keys_without_the_role_or_unlisted_do_not_count(keys, spec, signers):
    lines: list[str] = []
    line(keys, "dave", flags.APPROVE, lines)             # listed, no approve role
    line(keys, "mallory", flags.APPROVE, lines)          # not listed at all
    line(keys, "bob", flags.ON, lines)                   # approver without the flags role switching on
    table = flags.read_lines(lines, spec, signers)
    reasons = [i.reason for i in table.ignored]
    assert table.active == {} and len(reasons) == 3
    assert "rule role" in reasons[0] and "rule known-key" in reasons[1] and "rule role" in reasons[2]


def test_off_clears_and_needs_no_approval(keys, spec, signers):
    lines: list[str] = []
    line(keys, "bob", flags.APPROVE, lines)
    line(keys, "alice", flags.ON, lines)
    line(keys, "alice", flags.OFF, lines)
    assert flags.read_lines(lines, spec, signers).active == {}


def test_edited_removed_or_replayed_lines_break_the_gate_closed(keys, spec, signers):
    lines: list[str] = []
    line(keys, "bob", flags.APPROVE, lines)
    line(keys, "alice", flags.ON, lines)
    line(keys, "alice", flags.OFF, lines)
    # removing the off line cannot be told from the file alone (the audit log has it): cutting the middle can
    cut = [lines[0], lines[2]]
    table = flags.read_lines(cut, spec, signers)
    assert table.active == {} and "rule chain" in table.ignored[0].reason
    # a line after the break cannot resurrect what the missing line switched off: nothing is on
    table = flags.read_lines([*lines[:2], line(keys, "bob", flags.APPROVE, lines[:2].copy(), tenant="trial")],
                             spec, signers)
    assert ("terse_prompt", "acme") in table.active   # intact: approve, on, approve
    removed_off = [*lines[:2], line(keys, "bob", flags.APPROVE, lines.copy(), tenant="trial")]   # off cut out
    table = flags.read_lines(removed_off, spec, signers)
    assert table.active == {} and table.broken == 3
    # replaying the old `on` after the off: its prev names the approval, not the off line
    table = flags.read_lines([*lines, lines[1]], spec, signers)
    assert table.active == {} and "rule chain" in table.ignored[-1].reason
    # editing a signed line (a wider rollout) voids its signature
    edited = lines[1].replace('"percent": 100', '"percent": 99')
    assert edited != lines[1]
    table = flags.read_lines([lines[0], edited], spec, signers)
    assert table.active == {} and "signature-valid" in table.ignored[0].reason


def test_statements_naming_undeclared_things_do_not_count(keys, spec, signers):
    for kwargs, why in (({"variant": "off"}, "not a flag variant"), ({"flag": "nope"}, "not a flag variant"),
                        ({"tenant": "globex"}, "not declared"), ({"project": "other"}, "signed for project"),
                        ({"percent": 0}, "percent must be")):
        lines: list[str] = []
        line(keys, "bob", flags.APPROVE, lines, **kwargs)
        table = flags.read_lines(lines, spec, signers)
        assert why in table.ignored[0].reason, (kwargs, table.ignored)


def test_hand_typed_lines_of_any_shape_count_for_nothing_and_never_raise(keys, spec, signers):
    odd = [json.dumps({"statement": {"action": flags.ON}, "key": "ssh-ed25519 AAAA", "signature": "x"}),
           json.dumps({"statement": {}, "key": "", "signature": 0}),
           json.dumps({"statement": {"action": []}, "key": "k", "signature": "s"}),
           json.dumps([1, 2]), "not json", json.dumps({"statement": {"action": "flag-on"}})]
    signed_odd = json.dumps(signing.sign({"action": ["flag-on"], "project": "ticket-triage"},
                                         keys["mallory"]).to_dict())
    table = flags.read_lines([*odd, signed_odd], spec, signers)
    assert table.active == {} and len(table.ignored) == len(odd) + 1


def test_appending_to_a_broken_file_is_refused(keys, project_root):
    from framework.errors import ReleaseRefused
    from framework.spec import load_project
    from tests.conftest import write_signers

    project = load_project(str(project_root / "projects" / "ticket-triage"))
    write_signers(project.dir, keys, {"alice": ["flags"], "bob": ["approve"]})
    lines: list[str] = []
    for who, action in (("bob", flags.APPROVE), ("alice", flags.ON), ("alice", flags.OFF)):
        line(keys, who, action, lines)
    path = flags.flags_path(project.dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([lines[0], lines[2]]) + "\n")
    with pytest.raises(ReleaseRefused, match="chain breaks at line 2"):
        flags._intact(project)


def test_assign_prefers_the_tenant_then_every_tenant_and_only_packed_content(keys, spec, signers):
    lines: list[str] = []
    line(keys, "bob", flags.APPROVE, lines, tenant="*")
    line(keys, "alice", flags.ON, lines, tenant="*")
    table = flags.read_lines(lines, spec, signers)
    order = list(spec.flags)
    assert flags.assign(table, order, "acme", "r1", {("terse_prompt", "on"): CONTENT}) == {"terse_prompt": "on"}
    assert flags.assign(table, order, None, "r1", {("terse_prompt", "on"): CONTENT}) == {"terse_prompt": "on"}
    # a bento that packs other content for the variant never serves the approved one's name over it
    assert flags.assign(table, order, "acme", "r1", {("terse_prompt", "on"): "e" * 64}) == {}
    assert flags.assign(table, order, "acme", "r1", {}) == {}


@settings(max_examples=50, deadline=None)
@given(percent=st.integers(1, 100), subjects=st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=30))
def test_a_rollout_is_stable_per_subject_and_widens_monotonically(percent, subjects):
    for subject in subjects:
        bucket = flags.bucket("terse_prompt", subject)
        assert 0 <= bucket < 100 and bucket == flags.bucket("terse_prompt", subject)
        if bucket < percent:   # in at p% means in at every wider rollout
            assert all(bucket < wider for wider in range(percent, 101))


def test_buckets_spread_evenly():
    counts = [0] * 100
    for i in range(20_000):
        counts[flags.bucket("terse_prompt", f"user-{i}")] += 1
    share = sum(counts[:10]) / 20_000
    assert 0.09 < share < 0.11   # a 10% rollout reaches about 10% of subjects (binomial sd 0.002)


def test_variant_project_replaces_only_the_pipeline_program(spec, project_root):
    from framework.spec import load_project

    project = load_project(str(project_root / "projects" / "ticket-triage"))
    varied = flags.variant_project(project, "terse_prompt", "on")
    assert varied.spec.pipeline.program == "TicketTriageTerse" and varied.variant == "terse_prompt=on"
    assert varied.spec.pipeline.saved_program == "program.terse_prompt.on.json"
    assert varied.spec.contract == project.spec.contract and varied.spec.guardrails == project.spec.guardrails
    with pytest.raises(SpecError, match="no flag 'nope'"):
        flags.variant_project(project, "nope", "on")
    with pytest.raises(SpecError, match="no variant 'off'"):
        flags.variant_project(project, "terse_prompt", "off")
    with pytest.raises(SpecError, match="FLAG=VARIANT"):
        flags.parse_variant("terse_prompt")


def test_a_variant_must_change_the_pipeline():
    text = (REPO / "projects" / "ticket-triage" / "project.toml").read_text()
    broken = text.replace('variants.on = { program = "TicketTriageTerse" }', "variants.on = {}")
    with pytest.raises(SpecError, match="program and/or saved_program"):
        parse_spec(broken, "project.toml")


def test_a_variant_with_other_outputs_is_refused(project_root):
    from framework.notebook import load_program
    from framework.spec import load_project

    project = load_project(str(project_root / "projects" / "ticket-triage"))
    notebook = project_root / "notebooks" / "ticket_triage.py"
    notebook.write_text(notebook.read_text().replace(
        "self.triage = dspy.Predict(TriageTicket.with_instructions(self.INSTRUCTIONS))",
        'self.triage = dspy.Predict("ticket -> category")'))
    varied = flags.variant_project(project, "terse_prompt", "on")
    with pytest.raises(SpecError, match="does not answer"):
        flags.check_io(project, load_program(project), load_program(varied), "terse_prompt", "on")

