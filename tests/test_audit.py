"""The audit chain: any single edit or deletion is found and named; pruning with a checkpoint still verifies."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from framework import audit
from framework.store import Store

T0 = datetime(2026, 1, 1)


def chain(n: int) -> list[dict]:
    rows, prev = [], audit.GENESIS
    for i in range(n):
        row = audit.make_row(i + 1, prev, actor=f"user{i % 3}", action="check", target="p",
                             details={"i": i}, at=T0 + timedelta(days=i))
        rows.append(row)
        prev = row["hash"]
    return rows


def head(rows: list[dict]) -> tuple[int, str]:
    return rows[-1]["seq"], rows[-1]["hash"]


@given(st.integers(1, 15))
def test_intact_chain_verifies(n):
    rows = chain(n)
    assert audit.verify_rows(rows, None, head(rows)) is None


@given(st.data())
@settings(max_examples=200)
def test_any_single_edit_is_named(data):
    rows = chain(data.draw(st.integers(1, 12)))
    index = data.draw(st.integers(0, len(rows) - 1))
    column = data.draw(st.sampled_from(["actor", "action", "target", "details", "logged_at", "prev_hash", "hash"]))
    edited = dict(rows[index])
    edited[column] = {"details": json.dumps({"i": -1}), "logged_at": T0 - timedelta(days=1),
                      "prev_hash": "f" * 64, "hash": "e" * 64}.get(column, "mallory")
    tampered = [*rows[:index], edited, *rows[index + 1:]]
    problem = audit.verify_rows(tampered, None, head(rows))
    assert problem is not None
    assert problem.seq == index + 1


@given(st.data())
@settings(max_examples=200)
def test_any_single_deletion_is_named(data):
    rows = chain(data.draw(st.integers(1, 12)))
    index = data.draw(st.integers(0, len(rows) - 1))
    problem = audit.verify_rows([*rows[:index], *rows[index + 1:]], None, head(rows))
    assert problem is not None
    assert problem.seq == index + 1
    assert "missing" in problem.message


@given(st.integers(2, 12), st.data())
def test_pruning_with_checkpoint_verifies_and_still_catches_edits(n, data):
    rows = chain(n)
    cut = data.draw(st.integers(1, n - 1))
    last = audit.prune_upto(rows, T0 + timedelta(days=cut))
    assert last["seq"] == cut
    kept = [r for r in rows if r["seq"] > cut]
    assert audit.verify_rows(kept, (last["seq"], last["hash"]), head(rows)) is None
    assert audit.verify_rows(kept, None, head(rows)) is not None  # without the checkpoint it would not
    kept[0] = {**kept[0], "actor": "mallory"}
    assert audit.verify_rows(kept, (last["seq"], last["hash"]), head(rows)).seq == cut + 1


def test_store_append_prune_verify_and_detect_sql_edit(tmp_path):
    path = tmp_path / "store.duckdb"
    with Store(path) as store:
        for i in range(5):
            audit.append(store, actor="ann", action="build", target=f"p:{i}", details={"i": i})
        assert audit.verify(store) is None
        store.con.execute("UPDATE audit SET logged_at = logged_at - INTERVAL 40 DAY WHERE seq <= 2")
        # Changing the timestamps is itself an edit the chain must see.
        assert audit.verify(store).seq == 1
    with Store(tmp_path / "b.duckdb") as store:
        for i in range(5):
            audit.append(store, actor="ann", action="build", target=f"p:{i}")
        rows = store.audit_rows()
        assert audit.prune(store, 30, at=rows[2]["logged_at"] + timedelta(days=30, microseconds=1)) == 3
        assert [r["seq"] for r in store.audit_rows()] == [4, 5]
        assert audit.verify(store) is None
        audit.append(store, actor="bob", action="deploy", target="p:4")
        assert audit.verify(store) is None
        store.con.execute("DELETE FROM audit WHERE seq = 6")
        assert audit.verify(store).seq == 6


def test_who_prefers_explicit_then_env(monkeypatch):
    monkeypatch.setenv("SLIPWAY_USER", "env-user")
    assert audit.who("given") == "given"
    assert audit.who() == "env-user"


def test_export_jsonl_and_parquet(tmp_path):
    import duckdb

    rows = chain(3)
    assert audit.export(rows, tmp_path / "a.jsonl", "jsonl") == 3
    lines = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["seq"] for r in lines] == [1, 2, 3] and lines[1]["details"] == {"i": 1}
    audit.export(rows, tmp_path / "a.parquet", "parquet")
    assert duckdb.connect().execute(f"SELECT count(*) FROM '{tmp_path / 'a.parquet'}'").fetchone()[0] == 3
