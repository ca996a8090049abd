"""Served requests with negative feedback → review file → signed rows of the eval set (framework/harvest.py).

Traces and feedback are written by `Tracer` and its feedback writer exactly as the service writes them
(tests/test_traces.py does the same for ingestion); signing uses real SSH keys from conftest."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from framework import audit, signing
from framework.content import file_hash
from framework.dataset import load_examples
from framework.errors import DatasetError, ReleaseRefused
from framework.evaluate import store_path
from framework.harvest import Candidate, accept, harvest, label_problems, read_candidates, review_path
from framework.spec import TracingSpec, load_project
from framework.store import Store
from framework.traces import Tracer, feedback_id, is_negative, iso, utc_now
from tests.conftest import act_as, write_signers

IDENTITY = {"project": "ticket-triage", "channel": "prod", "bento": "ticket-triage:v1", "version": "v1",
            "model_sha256": "ab" * 32, "program_hash": "cd" * 32}
ANSWER = {"category": "billing", "priority": "low", "needs_human": False, "reason": "invoice question"}


@pytest.fixture
def project(project_root, keys):
    folder = project_root / "projects" / "ticket-triage"
    roles = {"alice": [], "bob": ["approve"], "carol": ["curate"]}
    write_signers(folder, keys, roles)
    return load_project(str(folder))


@pytest.fixture
def tracer(project):
    return Tracer(TracingSpec(), project.trace_dir, IDENTITY, project.model())


def served(tracer: Tracer, request_id: str, ticket: str, outputs: dict | None = None) -> dict:
    t0 = time.perf_counter()
    return tracer.record(request_id=request_id, started_at=utc_now(), t0=t0, t_valid=t0 + 0.0005, t_end=t0 + 0.05,
                         status=200, inputs={"ticket": ticket}, outputs=outputs or dict(ANSWER))


def feedback(tracer: Tracer, trace: dict, score: float, comment: str | None = None,
             correct_labels: dict | None = None) -> str:
    """What POST /feedback appends (framework/service.py)."""
    fid = feedback_id(trace["request_id"], score, comment, correct_labels)
    tracer.feedback_writer.append({
        "feedback_id": fid, "request_id": trace["request_id"], "trace_id": trace["trace_id"],
        "bento": trace["bento"], "version": trace["version"], "score": score, "negative": is_negative(score),
        "comment": comment, "correct_labels": correct_labels, "received_at": iso(utc_now())})
    return fid


def edit_review(project, change) -> None:
    path = review_path(project)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(change(row)) + "\n" for row in rows))


def candidates(project) -> dict[str, Candidate]:
    return {c.id: c for c in read_candidates(review_path(project))}


FIXED = {"category": "outage", "priority": "urgent", "needs_human": True}


def traffic(tracer):
    """Four requests: a corrected one, a thumbs-down, a thumbs-up, and one corrected then thumbed down."""
    corrected = served(tracer, "r-fixed", "Nothing loads for anyone on our team, 502 everywhere. Mail me at "
                                          "ops@example.com")
    feedback(tracer, corrected, -1, "this is an outage, not billing", FIXED)
    down = served(tracer, "r-down", "Our SSO login loops back to the sign-in page since this morning")
    feedback(tracer, down, -1, "wrong category")
    up = served(tracer, "r-up", "Can I get a copy of invoice INV-1?")
    feedback(tracer, up, 1)
    twice = served(tracer, "r-twice", "Someone keeps sending phishing links from your domain")
    feedback(tracer, twice, 0.0, "abuse", {"category": "abuse", "priority": "high", "needs_human": True})
    feedback(tracer, twice, -1, "still wrong")
    return corrected, down, up, twice


# -- harvest ----------------------------------------------------------------------------------------------
def test_harvest_writes_one_candidate_per_request_with_negative_or_corrected_feedback(project, tracer):
    corrected, *_ = traffic(tracer)
    result = harvest(project)
    assert result.path == project.dir / "harvest" / "candidates.jsonl" and result.path.exists()
    assert sorted(result.added) == ["served-r-down", "served-r-fixed", "served-r-twice"]
    found = candidates(project)
    assert "served-r-up" not in found   # a thumbs-up is not a candidate
    fixed = found["served-r-fixed"]
    assert fixed.expected == FIXED and fixed.needs_labels is False and fixed.accept is False
    assert fixed.inputs["ticket"].endswith("[EMAIL]") and "redaction" in fixed.note   # served text is redacted
    assert fixed.output == ANSWER and fixed.feedback[0]["comment"] == "this is an outage, not billing"
    assert fixed.provenance == {"request_id": "r-fixed", "trace_id": corrected["trace_id"],
                                "bento": "ticket-triage:v1", "version": "v1",
                                "feedback_ids": [fixed.feedback[0]["feedback_id"]]}
    down = found["served-r-down"]   # no labels given: the model's answer, for a reviewer to fix
    assert down.expected == {k: ANSWER[k] for k in ("category", "priority", "needs_human")}
    assert down.needs_labels is True
    twice = found["served-r-twice"]   # the later thumbs-down keeps the earlier correction and both comments
    assert twice.expected["category"] == "abuse" and twice.needs_labels is False
    assert [f["comment"] for f in twice.feedback] == ["abuse", "still wrong"]
    assert result.needs_labels == 1 and result.to_accept == 0 and "3 candidate(s)" in result.lines()[0]


def test_a_partial_correction_still_needs_labels(project, tracer):
    trace = served(tracer, "r-part", "The export button does nothing in Firefox")
    feedback(tracer, trace, -1, None, {"category": "bug"})
    harvest(project)
    candidate = candidates(project)["served-r-part"]
    assert candidate.expected["category"] == "bug" and candidate.expected["priority"] == "low"
    assert candidate.needs_labels is True


def test_the_latest_feedback_wins(project, tracer):
    trace = served(tracer, "r-flip", "How do I export my data?")
    feedback(tracer, trace, -1, "bad")
    feedback(tracer, trace, 1, "actually fine")
    assert harvest(project).added == []


def test_rerunning_harvest_keeps_reviewer_edits_and_adds_new_feedback(project, tracer):
    _, down, *_ = traffic(tracer)
    harvest(project)
    edit_review(project, lambda row: {**row, "accept": True, "expected": FIXED, "needs_labels": False,
                                      "tags": ["served", "sso"]} if row["id"] == "served-r-down" else row)
    feedback(tracer, down, -1, "please look again")
    new = served(tracer, "r-new", "Le tableau de bord ne charge plus")
    feedback(tracer, new, -1)
    result = harvest(project)
    assert result.added == ["served-r-new"] and result.updated == ["served-r-down"]
    kept = candidates(project)["served-r-down"]
    assert kept.accept is True and kept.expected == FIXED and kept.tags == ["served", "sso"]
    assert [f["comment"] for f in kept.feedback] == ["wrong category", "please look again"]
    assert len(kept.provenance["feedback_ids"]) == 2
    assert harvest(project).added == [] and len(candidates(project)) == 4


def test_a_corrupt_review_file_names_file_and_line(project, tracer):
    traffic(tracer)
    harvest(project)
    path = review_path(project)
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:40]   # cut short by hand
    lines[2] = lines[2].replace('"accept": false', '"acept": true')
    path.write_text("\n".join(lines) + "\n")
    for action in (harvest, accept):
        with pytest.raises(DatasetError) as info:
            action(project)
        message = str(info.value)
        assert f"{path}:2: not valid JSON" in message and f"{path}:3: acept: Extra inputs" in message


# -- accept -----------------------------------------------------------------------------------------------
def accept_as(project, monkeypatch, keys, name: str, **kwargs):
    act_as(monkeypatch, keys, name)
    return accept(project, **kwargs)


def test_round_trip_feedback_to_signed_eval_rows(project, tracer, monkeypatch, keys):
    corrected, down, _, twice = traffic(tracer)
    harvest(project)
    eval_path = project.split_path("eval")
    before_hash, before_rows = file_hash(eval_path), len(load_examples(eval_path))
    mode = eval_path.stat().st_mode & 0o777
    edit_review(project, lambda row: {**row, "accept": True} if row["id"] == "served-r-fixed" else row)

    result = accept_as(project, monkeypatch, keys, "carol", ids=None)
    assert result.ok and [row["id"] for row in result.added] == ["served-r-fixed"]
    assert result.accepted_by == "carol"
    examples = load_examples(eval_path)   # still a valid split, one row longer
    assert len(examples) == before_rows + 1
    row = examples[-1]
    assert row.id == "served-r-fixed" and row.expected == FIXED and row.tags == ("served",)
    assert row.inputs == corrected["inputs"]
    provenance = row.provenance
    assert provenance["request_id"] == "r-fixed" and provenance["trace_id"] == corrected["trace_id"]
    assert provenance["bento"] == "ticket-triage:v1" and provenance["version"] == "v1"
    assert provenance["accepted_by"] == "carol"
    assert provenance["key_fingerprint"] == signing.fingerprint(signing.public_key(keys["carol"]))
    assert provenance["acceptance_id"] == result.acceptance_id and provenance["accepted_at"]
    assert eval_path.stat().st_mode & 0o777 == mode   # replaced atomically, readable as before
    # the next check measures another dataset: its hash (content.py's dataset_hash) changed
    assert file_hash(eval_path) != before_hash and file_hash(eval_path) == result.dataset_sha256
    # the audit log holds the signed statement, naming the rows and the new file
    with Store(store_path(project), read_only=True) as store:
        rows = store.audit_rows()
        assert audit.verify(store, signers=signing.load_signers(project.dir)) is None
    logged = audit.signed_of(rows[-1])
    assert rows[-1]["action"] == "harvest-accept" and rows[-1]["actor"] == "carol"
    assert logged.statement["target"] == "ticket-triage:data/eval.jsonl"
    details = logged.statement["details"]
    assert details["ids"] == ["served-r-fixed"] and details["acceptance_id"] == result.acceptance_id
    assert details["dataset_sha256"] == file_hash(eval_path)
    added = eval_path.read_bytes().splitlines(keepends=True)[-1]
    assert details["rows_sha256"] == file_hash_of(added)
    assert signing.signature_holds(logged)
    # accepted candidates leave the review file; the others stay
    assert sorted(candidates(project)) == ["served-r-down", "served-r-twice"]

    # the second one by id; the one still needing labels is refused and stays
    result = accept_as(project, monkeypatch, keys, "carol", ids=["served-r-twice", "served-r-down", "nope"])
    assert [row["id"] for row in result.added] == ["served-r-twice"]
    reasons = {r.id: r.reason for r in result.refused}
    assert "needs_labels is true" in reasons["served-r-down"] and "no such candidate" in reasons["nope"]
    assert not result.ok and sorted(candidates(project)) == ["served-r-down"]

    # a second harvest does not bring accepted requests back
    assert harvest(project).added == [] and sorted(candidates(project)) == ["served-r-down"]


def file_hash_of(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_an_unlisted_key_or_one_without_the_role_is_refused(project, tracer, monkeypatch, keys):
    traffic(tracer)
    harvest(project)
    edit_review(project, lambda row: {**row, "accept": True})
    eval_path = project.split_path("eval")
    before = eval_path.read_bytes()
    with pytest.raises(ReleaseRefused, match="rule known-key: key SHA256:.* is not in signers.toml") as info:
        accept_as(project, monkeypatch, keys, "mallory")
    assert "signers.toml" in info.value.path and "'curate' role" in info.value.hint
    with pytest.raises(ReleaseRefused, match="rule role: bob lacks the role 'curate'"):
        accept_as(project, monkeypatch, keys, "bob")
    assert eval_path.read_bytes() == before and len(candidates(project)) == 3
    assert not store_path(project).exists() or not _audit_actions(project)


def _audit_actions(project) -> list[str]:
    with Store(store_path(project), read_only=True) as store:
        return [row["action"] for row in store.audit_rows()]


def test_a_repeated_accept_adds_nothing_twice(project, tracer, monkeypatch, keys):
    traffic(tracer)
    harvest(project)
    edit_review(project, lambda row: {**row, "accept": True} if row["id"] == "served-r-fixed" else row)
    saved = review_path(project).read_text()
    assert len(accept_as(project, monkeypatch, keys, "carol").added) == 1
    after = project.split_path("eval").read_bytes()
    review_path(project).write_text(saved)   # as if the first run died before rewriting the review file
    again = accept_as(project, monkeypatch, keys, "carol")
    assert again.added == [] and again.already == ["served-r-fixed"]
    assert project.split_path("eval").read_bytes() == after
    assert "served-r-fixed" not in candidates(project)
    assert _audit_actions(project).count("harvest-accept") == 1


def test_text_already_in_train_or_dev_is_refused(project, tracer, monkeypatch, keys):
    dev_ticket = load_examples(project.split_path("dev"))[0].inputs["ticket"]
    train = load_examples(project.split_path("train"))[1]
    a = served(tracer, "r-dev", "  " + dev_ticket.upper() + " ")   # case and spacing do not make it new
    feedback(tracer, a, -1, None, FIXED)
    b = served(tracer, "r-train", train.inputs["ticket"])
    feedback(tracer, b, -1, None, FIXED)
    c = served(tracer, "r-c", "Totally new ticket about exports")
    feedback(tracer, c, -1, None, FIXED)
    d = served(tracer, "r-d", "totally new  ticket about EXPORTS")   # the same text twice in one batch
    feedback(tracer, d, -1, None, FIXED)
    harvest(project)
    edit_review(project, lambda row: {**row, "accept": True})
    result = accept_as(project, monkeypatch, keys, "carol")
    reasons = {r.id: r.reason for r in result.refused}
    assert f"already in dev row {load_examples(project.split_path('dev'))[0].id}" in reasons["served-r-dev"]
    assert f"already in train row {train.id}" in reasons["served-r-train"]
    assert "must stay apart" in reasons["served-r-train"]
    assert [row["id"] for row in result.added] == ["served-r-c"] and "this batch" in reasons["served-r-d"]


def test_labels_must_fit_the_eval_set_and_the_programs_output_types(project, tracer, monkeypatch, keys):
    trace = served(tracer, "r-bad", "App crashes on start")
    feedback(tracer, trace, -1)
    harvest(project)
    edit_review(project, lambda row: {**row, "accept": True, "needs_labels": False,
                                      "expected": {"category": "crash", "priority": "low", "needs_human": "no",
                                                   "team": "mobile"}})
    result = accept_as(project, monkeypatch, keys, "carol")
    reason = result.refused[0].reason
    assert result.added == [] and "expected.category" in reason and "'crash'" in reason
    assert "expected.needs_human" in reason and "expected.team is not a label" in reason
    assert "nothing added" in result.lines()[0]


@given(st.dictionaries(st.sampled_from(["category", "priority", "needs_human", "x"]),
                       st.one_of(st.text(max_size=10), st.booleans(), st.integers(), st.none(),
                                 st.sampled_from(["billing", "low", "urgent"])), max_size=4))
@settings(max_examples=200, deadline=None)
def test_label_problems_accepts_exactly_complete_well_typed_labels(expected):
    from typing import Literal

    keys = ("category", "priority", "needs_human")
    types = {"category": Literal["billing", "bug"], "priority": Literal["low", "urgent"], "needs_human": bool}
    problems = label_problems(expected, keys, types)
    valid = (set(expected) == set(keys) and expected["category"] in ("billing", "bug")
             and expected["priority"] in ("low", "urgent") and isinstance(expected["needs_human"], bool))
    assert (problems == []) == valid


@given(st.lists(st.text(max_size=80), max_size=6))
@settings(max_examples=100, deadline=None)
def test_any_hand_edited_line_is_read_or_reported_with_its_line(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("review") / "candidates.jsonl"
    path.write_text("\n".join(line.replace("\n", " ").replace("\r", " ") for line in lines) + "\n")
    try:
        read_candidates(path)
    except DatasetError as exc:
        assert str(path) in str(exc) and ":" in exc.render()


def test_an_eval_file_changed_while_signing_is_not_overwritten(project, tracer, monkeypatch, keys):
    """Two curators at once: the second must not replace the file the first just extended."""
    traffic(tracer)
    harvest(project)
    edit_review(project, lambda row: {**row, "accept": True} if row["id"] == "served-r-fixed" else row)
    dataset = project.split_path("eval")
    real_sign = signing.sign

    def sign_while_someone_else_writes(statement, key_path=None):
        signed = real_sign(statement, key_path)
        with open(dataset, "a") as fh:   # the other curator's row lands between our read and our commit
            fh.write(json.dumps({"id": "other-curator", "inputs": {"ticket": "x"}, "expected": {}}) + "\n")
        return signed

    monkeypatch.setattr(signing, "sign", sign_while_someone_else_writes)
    with pytest.raises(ReleaseRefused, match="changed while these rows were being signed"):
        accept_as(project, monkeypatch, keys, "carol")
    assert dataset.read_text().splitlines()[-1].startswith('{"id": "other-curator"')
    assert _audit_actions(project).count("harvest-accept") == 0
