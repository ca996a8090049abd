"""The audit log: every row signed and chained; edits, deletions, forged rows, a re-hashed chain and a
doctored export are each found and named."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from framework import audit, signing
from framework.store import Store
from tests.conftest import write_signers

T0 = datetime(2026, 1, 1)
_SIGNED: dict = {}


def chain(n: int, key) -> list[dict]:
    """n signed rows (signatures cached per content: hypothesis draws the same ones many times)."""
    rows, prev = [], audit.GENESIS
    for i in range(n):
        st_ = audit.statement("p", "check", "p", {"i": i}, at=T0 + timedelta(days=i))
        cache_key = (str(key), i)
        if cache_key not in _SIGNED:
            _SIGNED[cache_key] = signing.sign(st_, key)
        row = audit.make_row(i + 1, prev, _SIGNED[cache_key], f"user{i % 3}")
        rows.append(row)
        prev = row["hash"]
    return rows


def head(rows: list[dict]) -> tuple[int, str]:
    return rows[-1]["seq"], rows[-1]["hash"]


@pytest.fixture(scope="module")
def signed_rows(keys):
    return chain(12, keys["alice"])


@given(st.integers(1, 12))
@settings(deadline=None, max_examples=20)
def test_intact_chain_verifies(signed_rows, n):
    rows = signed_rows[:n]
    assert audit.verify_rows(rows, None, head(rows)) is None


@given(st.data())
@settings(max_examples=150, deadline=None)
def test_any_single_edit_is_named(signed_rows, data):
    rows = signed_rows[: data.draw(st.integers(1, 12))]
    index = data.draw(st.integers(0, len(rows) - 1))
    column = data.draw(st.sampled_from(["actor", "action", "target", "details", "logged_at", "prev_hash", "hash",
                                        "statement", "signature", "signer_key"]))
    edited = dict(rows[index])
    edited[column] = {"details": json.dumps({"i": -1}), "logged_at": T0 - timedelta(days=1),
                      "prev_hash": "f" * 64, "hash": "e" * 64,
                      "statement": json.dumps({**json.loads(edited["statement"]), "target": "q"}),
                      "signature": rows[index - 1]["signature"] if index else "x",
                      "signer_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB"}.get(column, "mallory")
    tampered = [*rows[:index], edited, *rows[index + 1:]]
    problem = audit.verify_rows(tampered, None, head(rows))
    assert problem is not None
    assert problem.seq == index + 1


@given(st.data())
@settings(max_examples=100, deadline=None)
def test_any_single_deletion_is_named(signed_rows, data):
    rows = signed_rows[: data.draw(st.integers(1, 12))]
    index = data.draw(st.integers(0, len(rows) - 1))
    problem = audit.verify_rows([*rows[:index], *rows[index + 1:]], None, head(rows))
    assert problem is not None
    assert problem.seq == index + 1
    assert "missing" in problem.message


def test_rehashed_chain_with_forged_row_fails_on_signature(keys):
    """Mallory rewrites a row and recomputes every hash: the chain links, but her row's signature
    does not hold over the statement it claims (she cannot sign as alice)."""
    rows = chain(4, keys["alice"])
    forged_statement = {**json.loads(rows[1]["statement"]), "details": {"i": 99}}
    forged = signing.Signed(statement=forged_statement, key=rows[1]["signer_key"], signature=rows[1]["signature"])
    rebuilt, prev = [], audit.GENESIS
    for i, row in enumerate(rows):
        signed = forged if i == 1 else audit.signed_of(row)
        new = audit.make_row(i + 1, prev, signed, row["actor"])
        rebuilt.append(new)
        prev = new["hash"]
    problem = audit.verify_rows(rebuilt, None, head(rebuilt))
    assert problem is not None and problem.seq == 2 and "signature" in problem.message


def test_rewritten_chain_is_caught_by_the_anchor(keys, project_root, tmp_path):
    """Dropping the newest row and re-pointing the stored head hides it from the chain check; the
    anchor kept in git (outside the store) still names it."""
    folder = project_root / "projects" / "ticket-triage"
    write_signers(folder, keys)
    path = tmp_path / "store.duckdb"
    with Store(path) as store:
        for i in range(3):
            audit.append(store, signing.sign(audit.statement("p", "build", f"p:{i}"), keys["alice"]), "alice")
        audit.anchor(store, folder, "p", key=keys["root"], signers=signing.load_signers(folder))
        assert audit.verify(store, anchor=audit.read_anchor(folder), signers=signing.load_signers(folder)) is None
        store.con.execute("DELETE FROM audit WHERE seq = 3")
        second = store.audit_rows()[-1]
        store.con.execute("UPDATE meta SET value = ? WHERE key = 'audit_head'", [f"2:{second['hash']}"])
        assert audit.verify(store) is None  # the store alone cannot tell
        problem = audit.verify(store, anchor=audit.read_anchor(folder), signers=signing.load_signers(folder))
    assert problem is not None and problem.seq == 3 and "anchor" in problem.message


def test_anchor_needs_the_audit_role(keys, project_root, tmp_path):
    from framework.errors import ReleaseRefused

    folder = project_root / "projects" / "ticket-triage"
    write_signers(folder, keys)
    with Store(tmp_path / "s.duckdb") as store:
        audit.append(store, signing.sign(audit.statement("p", "build", "p:1"), keys["alice"]), "alice")
        with pytest.raises(ReleaseRefused, match="rule role: bob lacks the role 'audit'"):
            audit.anchor(store, folder, "p", key=keys["bob"], signers=signing.load_signers(folder))


def test_prune_is_signed_chained_and_verify_never_deletes(keys, project_root, tmp_path):
    folder = project_root / "projects" / "ticket-triage"
    write_signers(folder, keys)
    signers = signing.load_signers(folder)
    with Store(tmp_path / "b.duckdb") as store:
        for i in range(5):
            at = T0 + timedelta(days=i)
            audit.append(store, signing.sign(audit.statement("p", "build", f"p:{i}", at=at), keys["alice"]), "alice")
        assert audit.verify(store) is None
        assert len(store.audit_rows()) == 5  # verify only reads
        assert audit.prune(store, "p", 30, key=keys["root"], signers=signers, at=T0 + timedelta(days=32, hours=1)) == 3
        assert [r["seq"] for r in store.audit_rows()] == [4, 5, 6]
        assert store.audit_rows()[-1]["action"] == "prune"
        assert audit.verify(store) is None
        # A fake checkpoint hiding more deleted rows does not match the signed prune row.
        store.con.execute("DELETE FROM audit WHERE seq = 4")
        store.con.execute("INSERT INTO audit_checkpoint VALUES (4, ?, now())", [store.audit_rows()[0]["prev_hash"]])
        problem = audit.verify(store)
    assert problem is not None and "checkpoint" in problem.message


def test_export_verifies_on_its_own_and_catches_a_doctored_file(keys, project_root, tmp_path):
    folder = project_root / "projects" / "ticket-triage"
    write_signers(folder, keys)
    signers = signing.load_signers(folder)
    with Store(tmp_path / "s.duckdb") as store:
        for i in range(4):
            audit.append(store, signing.sign(audit.statement("p", "deploy", f"p:{i}", {"i": i}), keys["carol"]),
                         "carol")
        rows = store.audit_rows()
    out = tmp_path / "a.jsonl"
    audit.export(rows, out, "jsonl", head=audit.export_head(rows, "p", keys["root"]))
    assert audit.verify_file(out, signers) == (4, None)
    lines = out.read_text().splitlines()
    (tmp_path / "dropped.jsonl").write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    assert audit.verify_file(tmp_path / "dropped.jsonl", signers)[1].seq == 3
    (tmp_path / "nohead.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    assert "no signed head" in audit.verify_file(tmp_path / "nohead.jsonl", signers)[1].message
    doctored = json.loads(lines[1])
    doctored["actor"] = "mallory"
    (tmp_path / "edited.jsonl").write_text("\n".join([lines[0], json.dumps(doctored), *lines[2:]]) + "\n")
    assert audit.verify_file(tmp_path / "edited.jsonl", signers)[1].seq == 2


def test_export_parquet_carries_signatures(keys, tmp_path):
    import duckdb

    rows = chain(3, keys["alice"])
    audit.export(rows, tmp_path / "a.parquet", "parquet", head=audit.export_head(rows, "p", keys["alice"]))
    con = duckdb.connect()
    assert con.execute(f"SELECT count(signature) FROM '{tmp_path / 'a.parquet'}'").fetchone()[0] == 3
    assert (tmp_path / "a.parquet.head.json").exists()


def test_a_log_rebuilt_behind_a_fake_prune_by_an_unlisted_key_fails(keys, project_root, tmp_path):
    """Everything deleted, a checkpoint past the anchor, and a prune row signed with a throw-away key:
    the chain and signatures hold, but the prune row does not count, so the checkpoint is not trusted."""
    folder = project_root / "projects" / "ticket-triage"
    write_signers(folder, keys)
    signers = signing.load_signers(folder)
    with Store(tmp_path / "s.duckdb") as store:
        for i in range(3):
            audit.append(store, signing.sign(audit.statement("p", "build", f"p:{i}"), keys["alice"]), "alice")
        audit.anchor(store, folder, "p", key=keys["root"], signers=signers)
        store.con.execute("DELETE FROM audit")
        store.con.execute("DELETE FROM meta WHERE key = 'audit_head'")
        store.con.execute("INSERT INTO audit_checkpoint VALUES (100, ?, now())", ["a" * 64])
        fake = signing.sign(audit.statement("p", "prune", "p", {"through_seq": 100, "through_hash": "a" * 64}),
                            keys["mallory"])
        audit.append(store, fake, "root")
        assert audit.verify(store) is None  # the chain alone holds
        problem = audit.verify(store, anchor=audit.read_anchor(folder), signers=signers)
    assert problem is not None and "rule known-key" in problem.message


def test_gated_rows_need_listed_keys_with_the_role(keys, project_root, tmp_path):
    folder = project_root / "projects" / "ticket-triage"
    write_signers(folder, keys)
    with Store(tmp_path / "s.duckdb") as store:
        audit.append(store, signing.sign(audit.statement("p", "check", "p"), keys["mallory"]), "mallory")
        assert audit.verify(store, signers=signing.load_signers(folder)) is None  # anyone may sign a check
        audit.append(store, signing.sign(audit.statement("p", "approve", "p:1"), keys["carol"]), "carol")
        problem = audit.verify(store, signers=signing.load_signers(folder))
    assert problem.seq == 2 and "lacks the role 'approve'" in problem.message
