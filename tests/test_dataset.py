"""JSONL splits: a corrupt row is reported as file:line and nothing runs."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from framework import DatasetError, load_project
from framework.dataset import load_examples, parse_rows
from tests.conftest import REPO

GOOD = json.dumps({"id": "a", "inputs": {"ticket": "hi"}, "expected": {"category": "bug"}})


def test_demo_splits_load_and_are_disjoint():
    project = load_project("ticket-triage", root=REPO)
    splits = {name: load_examples(project.split_path(name), input_fields=("ticket",))
              for name in ("train", "dev", "eval")}
    assert len(splits["eval"]) >= 200
    tickets = {name: {ex.inputs["ticket"].strip().lower() for ex in rows} for name, rows in splits.items()}
    assert not tickets["eval"] & tickets["train"]
    assert not tickets["eval"] & tickets["dev"]
    assert not tickets["train"] & tickets["dev"]


def test_corrupt_row_names_file_and_line(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text(GOOD + "\n" + '{"id": "b", "inputs": {"ticket": "x"' + "\n" + GOOD.replace('"a"', '"c"') + "\n")
    with pytest.raises(DatasetError) as info:
        load_examples(path, input_fields=("ticket",))
    assert f"{path}:2: not valid JSON" in str(info.value)
    assert "nothing was run or recorded" in str(info.value)


def test_missing_input_field_and_duplicate_id_are_reported(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join([GOOD, GOOD, json.dumps({"id": "z", "inputs": {"text": "x"}})]))
    with pytest.raises(DatasetError) as info:
        load_examples(path, input_fields=("ticket",))
    assert f"{path}:2: duplicate id 'a'" in str(info.value)
    assert f"{path}:3: inputs lacks ticket" in str(info.value)


def test_unknown_row_key_is_an_error():
    with pytest.raises(DatasetError, match="labels"):
        parse_rows(json.dumps({"id": "a", "inputs": {"ticket": "x"}, "labels": {}}), "f.jsonl")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="file not found"):
        load_examples(tmp_path / "nope.jsonl")


@given(st.lists(st.text(max_size=40), max_size=8))
def test_parser_never_crashes_on_garbage(lines):
    try:
        examples = parse_rows("\n".join(lines), "fuzz.jsonl")
    except DatasetError as exc:
        assert "fuzz.jsonl" in str(exc)
    else:
        assert all(ex.id for ex in examples)
