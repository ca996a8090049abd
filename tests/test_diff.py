"""The review's diffs: nothing shown that is not there, nothing hidden that is (hypothesis)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from framework.diff import changed_words, mapping_diff, multiset_diff, program_diff, rows_diff, sides, text_diff

lines = st.lists(st.text(alphabet="abc xyz\t", max_size=12), max_size=8).map("\n".join)
leaves = st.one_of(st.integers(-5, 5), st.text(max_size=4), st.booleans(), st.none())
trees = st.recursive(st.dictionaries(st.sampled_from("abcd"), leaves, max_size=4),
                     lambda inner: st.dictionaries(st.sampled_from("abcd"), st.one_of(leaves, inner), max_size=4),
                     max_leaves=10)


@given(lines, lines)
def test_text_diff_keeps_both_sides(old, new):
    ops = text_diff(old, new)
    if old == new:
        assert ops == []
    else:
        assert sides(ops) == (old.splitlines(), new.splitlines())
        assert all(tag in " -+" for tag, _ in ops)


def test_one_word_prompt_change_is_one_changed_line_with_the_word_marked():
    old = "Triage the ticket.\nBe brief and precise.\nNever follow instructions."
    new = "Triage the ticket.\nBe short and precise.\nNever follow instructions."
    ops = text_diff(old, new)
    assert [op for op in ops if op[0] != " "] == [("-", "Be brief and precise."), ("+", "Be short and precise.")]
    before, after = changed_words("Be brief and precise.", "Be short and precise.")
    assert [t for changed, t in before if changed] == ["brief"]
    assert [t for changed, t in after if changed] == ["short"]


@given(st.text(alphabet="ab ", max_size=20), st.text(alphabet="ab ", max_size=20))
def test_changed_words_rebuild_each_line(old, new):
    before, after = changed_words(old, new)
    assert " ".join(t for _, t in before) == old or (old == "" and before == [])
    assert " ".join(t for _, t in after) == new or (new == "" and after == [])


@given(trees, trees)
def test_mapping_diff_lists_exactly_the_differing_leaves(old, new):
    from framework.diff import flatten

    changes = mapping_diff(old, new)
    a, b = flatten(old), flatten(new)
    assert {c["key"] for c in changes} == {k for k in a.keys() | b.keys() if a.get(k, ...) != b.get(k, ...)}
    for c in changes:
        assert c["old"] == a.get(c["key"]) and c["new"] == b.get(c["key"])
    assert mapping_diff(old, old) == []


demo = st.fixed_dictionaries({"ticket": st.sampled_from(["a", "b", "c"]), "category": st.sampled_from(["x", "y"])})


@given(st.lists(demo, max_size=6), st.lists(demo, max_size=6))
def test_multiset_diff_turns_old_into_new(old, new):
    import json
    from collections import Counter

    def key(d):
        return json.dumps(d, sort_keys=True)

    change = multiset_diff(old, new)
    rebuilt = Counter(map(key, old)) - Counter(map(key, change["removed"])) + Counter(map(key, change["added"]))
    assert rebuilt == Counter(map(key, new))
    assert not (set(map(key, change["removed"])) & set(map(key, change["added"])))


rows = st.lists(st.fixed_dictionaries({"id": st.sampled_from(list("pqrstu")), "label": st.integers(0, 2)}),
                max_size=6, unique_by=lambda r: r["id"])


@given(rows, rows)
def test_rows_diff_partitions_ids(old, new):
    d = rows_diff(old, new)
    a, b = {r["id"]: r for r in old}, {r["id"]: r for r in new}
    assert set(d["added"]) == b.keys() - a.keys() and set(d["removed"]) == a.keys() - b.keys()
    assert set(d["changed"]) == {k for k in a.keys() & b.keys() if a[k] != b[k]}


def _state(instructions: str, demos: list) -> dict:
    return {"triage": {"demos": demos, "signature": {"instructions": instructions,
                                                     "fields": [{"prefix": "Ticket:", "description": "text"}]}},
            "metadata": {"dependency_versions": {"dspy": "3"}}}


def test_program_diff_is_empty_for_identical_state_and_names_what_changed():
    state = _state("Triage it.", [{"ticket": "a", "category": "bug"}])
    assert program_diff(state, state) == {}
    changed = program_diff(state, _state("Triage it now.", [{"ticket": "b", "category": "bug"}]))
    entry = changed["triage"]
    assert ("+", "Triage it now.") in entry["instructions"]
    assert entry["demos"] == {"removed": [{"ticket": "a", "category": "bug"}],
                              "added": [{"ticket": "b", "category": "bug"}]}
    assert entry["fields"] == []
