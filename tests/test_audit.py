"""The hash-chained audit log: any edit or deletion is found and named; pruning keeps it verifiable."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import duckdb
import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from framework import load_project
from framework.audit import ACTIONS, GENESIS, new_row, row_hash, verify_chain
from framework.cli import app
from framework.evaluate import store_path
from framework.store import AUDIT_COLUMNS, Store

runner = CliRunner()

entries = st.lists(
    st.tuples(st.text(min_size=1, max_size=12), st.sampled_from(ACTIONS), st.text(max_size=20),
              st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8) | st.booleans(), max_size=3)),
    min_size=1, max_size=12)


def chain(items, start=(0, GENESIS)):
    rows, prev = [], start
    base = datetime(2026, 1, 1, tzinfo=UTC)
    for i, (actor, action, subject, details) in enumerate(items):
        row = new_row(prev, actor, action, subject, details, at=base + timedelta(days=i))
        rows.append(row)
        prev = (row["seq"], row["hash"])
    return rows, prev


@given(entries)
def test_an_untouched_chain_verifies(items):
    rows, head = chain(items)
    assert verify_chain(rows, head=head) is None


@given(entries, st.data())
def test_editing_any_field_of_any_row_is_found_and_named(items, data):
    rows, head = chain(items)
    victim = data.draw(st.integers(0, len(rows) - 1))
    field = data.draw(st.sampled_from(["recorded_at", "actor", "action", "subject", "details"]))
    new_value = data.draw(st.text(min_size=1, max_size=10).filter(lambda v: v != rows[victim][field]))
    rows[victim] = {**rows[victim], field: new_value}
    problem = verify_chain(rows, head=head)
    assert problem is not None and problem.seq == rows[victim]["seq"]


@given(entries, st.data())
def test_deleting_any_row_is_found_and_named(items, data):
    rows, head = chain(items)
    victim = data.draw(st.integers(0, len(rows) - 1))
    deleted = rows.pop(victim)
    problem = verify_chain(rows, head=head)
    assert problem is not None and problem.seq == deleted["seq"]


@given(entries, st.data())
def test_a_rehashed_edit_still_breaks_the_next_link_or_the_head(items, data):
    """Someone who edits a row and recomputes its hash is caught by the next row, or by the head."""
    rows, head = chain(items)
    victim = data.draw(st.integers(0, len(rows) - 1))
    forged = {**rows[victim], "actor": rows[victim]["actor"] + "!"}
    forged["hash"] = row_hash(forged["prev_hash"], forged)
    rows[victim] = forged
    assert verify_chain(rows, head=head) is not None


@given(entries, st.data())
def test_pruning_a_prefix_with_a_checkpoint_still_verifies(items, data):
    rows, head = chain(items)
    cut = data.draw(st.integers(0, len(rows)))
    start = (rows[cut - 1]["seq"], rows[cut - 1]["hash"]) if cut else (0, GENESIS)
    assert verify_chain(rows[cut:], start=start, head=head) is None


# -- through the real DuckDB store and the CLI -----------------------------------------------------


def test_store_chain_cli_verify_export_prune_and_hand_edit(toml_path, tmp_path):
    project = load_project(str(toml_path))
    now = datetime.now(UTC)
    with Store(store_path(project)) as store:  # three rows from 90 days ago (written directly), two from today
        prev = store.audit_checkpoint()
        for i in range(3):
            row = new_row(prev, "ana", "check", f"check-{i}", {"i": i}, at=now - timedelta(days=90, minutes=-i))
            store.con.execute("INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [row[k] for k in AUDIT_COLUMNS])
            prev = (row["seq"], row["hash"])
        store.con.execute("INSERT OR REPLACE INTO meta VALUES ('audit_head_seq', ?), ('audit_head_hash', ?)",
                          [str(prev[0]), prev[1]])
        for i in range(3, 5):
            store.append_audit("ana", "build", f"check-{i}", {"i": i})
    ok = runner.invoke(app, ["audit", "verify", str(toml_path)])
    assert ok.exit_code == 0 and "5 audit rows verify" in ok.stdout

    exported = tmp_path / "audit.jsonl"
    assert runner.invoke(app, ["audit", "export", str(toml_path), "-o", str(exported)]).exit_code == 0
    lines = [json.loads(line) for line in exported.read_text().splitlines()]
    assert [row["subject"] for row in lines] == [f"check-{i}" for i in range(5)] and lines[0]["details"] == {"i": 0}
    recent = tmp_path / "recent.parquet"
    since = (now - timedelta(days=1)).date().isoformat()
    assert runner.invoke(app, ["audit", "export", str(toml_path), "-o", str(recent), "--format", "parquet",
                               "--since", since]).exit_code == 0
    assert duckdb.sql(f"SELECT list(seq ORDER BY seq) FROM '{recent}'").fetchall()[0][0] == [4, 5]

    toml_path.write_text(toml_path.read_text() + "\n[audit]\nretention_days = 30\n")
    pruned = runner.invoke(app, ["audit", "prune", str(toml_path)])
    assert pruned.exit_code == 0 and "pruned 3 audit rows" in pruned.stdout
    after = runner.invoke(app, ["audit", "verify", str(toml_path)])
    assert after.exit_code == 0 and "3 audit rows verify" in after.stdout  # seq 4, 5 and the prune record

    con = duckdb.connect(str(store_path(project)))  # a hand edit: verify fails and names the row
    con.execute("UPDATE audit SET actor = 'mallory' WHERE seq = 4")
    con.close()
    broken = runner.invoke(app, ["audit", "verify", str(toml_path)])
    assert broken.exit_code == 1 and "seq=4" in broken.output and "edited" in broken.output


@pytest.mark.model
def test_check_and_build_are_recorded_with_the_actor(tiny_project, tiny_model_present, monkeypatch):
    monkeypatch.setenv("SLIPWAY_USER", "ben")
    assert runner.invoke(app, ["build", "ticket-triage"]).exit_code == 1  # refused: no check yet
    assert runner.invoke(app, ["check", "ticket-triage"]).exit_code == 0
    built = runner.invoke(app, ["build", "ticket-triage", "--json"])
    assert built.exit_code == 0, built.output
    listed = json.loads(runner.invoke(app, ["audit", "list", "ticket-triage", "--json"]).stdout)
    assert [(r["action"], r["actor"]) for r in listed] == [("build-refused", "ben"), ("check", "ben"),
                                                           ("build", "ben")]
    assert listed[2]["subject"] == json.loads(built.stdout)["tag"] and listed[1]["details"]["passed"] is True
    assert runner.invoke(app, ["audit", "verify", "ticket-triage"]).exit_code == 0
