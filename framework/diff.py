"""What changed between two builds: prompts, demos, settings, eval rows. Pure functions over plain data.

Each diff keeps enough to rebuild both sides (see the property tests), so the
review page can never show a change that is not there or hide one that is.
"""

from __future__ import annotations

import difflib
import json
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any


def text_diff(old: str, new: str) -> list[tuple[str, str]]:
    """Line diff as (tag, line) with tag ' ' kept, '-' removed, '+' added; [] when equal."""
    if old == new:
        return []
    ops = []
    for line in difflib.ndiff(old.splitlines(), new.splitlines()):
        if line.startswith("? "):  # ndiff's intraline hints: the page marks words itself
            continue
        ops.append((line[0], line[2:]))
    return ops


def sides(ops: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """The old and new lines a `text_diff` was made from."""
    return [line for tag, line in ops if tag in " -"], [line for tag, line in ops if tag in " +"]


def changed_words(old_line: str, new_line: str) -> tuple[list[tuple[bool, str]], list[tuple[bool, str]]]:
    """Word runs of two versions of a line, each marked changed or not: '…respond in one word…'."""
    a, b = old_line.split(" "), new_line.split(" ")
    old_out: list[tuple[bool, str]] = []
    new_out: list[tuple[bool, str]] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if a[i1:i2]:
            old_out.append((tag != "equal", " ".join(a[i1:i2])))
        if b[j1:j2]:
            new_out.append((tag != "equal", " ".join(b[j1:j2])))
    return old_out, new_out


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay whole (they are compared as values)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def mapping_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Leaves that differ, as {"key", "old", "new"} (None on the side where the key is absent)."""
    a, b = flatten(old), flatten(new)
    return [{"key": key, "old": a.get(key), "new": b.get(key)}
            for key in sorted(set(a) | set(b)) if key not in a or key not in b or a[key] != b[key]]


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def multiset_diff(old: Iterable[Any], new: Iterable[Any]) -> dict[str, list[Any]]:
    """Items (e.g. few-shot demos) removed and added, counting duplicates, order ignored."""
    old, new = list(old), list(new)
    a, b = Counter(map(_canonical, old)), Counter(map(_canonical, new))
    removed, added = a - b, b - a
    by_key = {_canonical(x): x for x in [*old, *new]}
    return {"removed": [by_key[k] for k in sorted(removed.elements())],
            "added": [by_key[k] for k in sorted(added.elements())]}


def program_diff(old_state: Mapping[str, Any], new_state: Mapping[str, Any]) -> dict[str, Any]:
    """Per predictor: instruction text diff, signature field changes, demos added/removed.

    Takes DSPy's `dump_state()` of each program (what `program_state.json` in a bento holds).
    """
    out: dict[str, Any] = {}
    names = sorted(k for k in set(old_state) | set(new_state) if k != "metadata")
    for name in names:
        old, new = old_state.get(name) or {}, new_state.get(name) or {}
        old_sig, new_sig = old.get("signature") or {}, new.get("signature") or {}
        entry = {
            "instructions": text_diff(old_sig.get("instructions", ""), new_sig.get("instructions", "")),
            "fields": mapping_diff({str(i): f for i, f in enumerate(old_sig.get("fields", []))},
                                   {str(i): f for i, f in enumerate(new_sig.get("fields", []))}),
            "demos": multiset_diff(old.get("demos", []), new.get("demos", [])),
            "only_in": "old" if name not in new_state else "new" if name not in old_state else None,
        }
        if entry["instructions"] or entry["fields"] or entry["demos"]["added"] or entry["demos"]["removed"] \
                or entry["only_in"]:
            out[name] = entry
    return out


def rows_diff(old_rows: Iterable[Mapping[str, Any]], new_rows: Iterable[Mapping[str, Any]],
              key: str = "id") -> dict[str, list[str]]:
    """Eval-set rows added, removed, or changed under the same id."""
    a = {str(r[key]): _canonical(r) for r in old_rows}
    b = {str(r[key]): _canonical(r) for r in new_rows}
    return {"added": sorted(b.keys() - a.keys()), "removed": sorted(a.keys() - b.keys()),
            "changed": sorted(k for k in a.keys() & b.keys() if a[k] != b[k])}
