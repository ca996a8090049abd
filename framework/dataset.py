"""Labelled JSONL splits (train / dev / eval) → `Example`s.

One row per line: {"id", "inputs": {...}, "expected": {...}, "tags": [...]}; a row harvested from
served traffic (framework/harvest.py) also carries "provenance": {request_id, trace_id, accepted_by, ...}.
A corrupt row stops the load before anything runs, with file:line for every
bad row, so a check never silently scores a smaller set than declared.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from framework.errors import DatasetError


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    inputs: dict[str, Any] = Field(min_length=1)
    expected: dict[str, Any] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list)
    provenance: dict[str, Any] | None = None   # where a harvested row came from and who accepted it


@dataclass(frozen=True)
class Example:
    id: str
    inputs: dict[str, Any]
    expected: dict[str, Any]
    tags: tuple[str, ...] = ()
    line: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] | None = None

    def to_dspy(self):
        import dspy

        return dspy.Example(**self.inputs, **self.expected).with_inputs(*self.inputs)


def jsonl_models(text: str, path: str, model: type[BaseModel],
                 problems: list[str]) -> list[tuple[int, BaseModel]]:
    """(line number, validated object) for each line of JSONL `text`; every line that is not JSON, does
    not validate, or repeats an earlier `id` is reported in `problems` as file:line: why (blank lines skipped).
    Shared by the splits and the harvest review file, so both name bad lines the same way."""
    out: list[tuple[int, BaseModel]] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = model.model_validate(json.loads(line))
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        except ValidationError as exc:
            detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'row'}: {e['msg']}" for e in exc.errors())
            problems.append(f"{path}:{number}: {detail}")
            continue
        if row.id in seen:
            problems.append(f"{path}:{number}: duplicate id {row.id!r} (first on line {seen[row.id]})")
            continue
        seen[row.id] = number
        out.append((number, row))
    return out


def parse_rows(text: str, path: str, *, input_fields: tuple[str, ...] = ()) -> list[Example]:
    """Parse JSONL text; raise `DatasetError` listing every bad row as file:line."""
    examples: list[Example] = []
    problems: list[str] = []
    for number, row in jsonl_models(text, path, _Row, problems):
        missing = [name for name in input_fields if name not in row.inputs]
        if missing:
            problems.append(f"{path}:{number}: inputs lacks {', '.join(missing)} (the program's input fields)")
            continue
        examples.append(Example(id=row.id, inputs=row.inputs, expected=row.expected, tags=tuple(row.tags),
                                line=number, provenance=row.provenance))
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise DatasetError(f"{len(problems)} bad row(s); nothing was run or recorded:\n  " + "\n  ".join(shown),
                           path=path, hint="fix or remove those lines; each row is "
                           '{"id": ..., "inputs": {...}, "expected": {...}}')
    if not examples:
        raise DatasetError("no rows", path=path, hint="the split must hold at least one example")
    return examples


def load_examples(path: Path, *, input_fields: tuple[str, ...] = ()) -> list[Example]:
    if not path.exists():
        raise DatasetError("file not found", path=str(path), hint="check [eval] paths in project.toml")
    return parse_rows(path.read_text(encoding="utf-8"), str(path), input_fields=input_fields)


def jsonl_objects(path: Path, *, where: str, what: str, remove: str) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a labelled JSONL file a project.toml key names
    (`where`), or DatasetError naming the file, the line and the key: the file cannot be read (`what` it is,
    and the key to `remove` instead of fixing the path), a line is not JSON, or not a JSON object."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DatasetError(f"cannot read the {what} {path}: {exc.strerror}", path=str(path), field=where,
                           hint=f"fix the path (relative to the project folder) or remove `{remove}`") from None
    found = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{number}: not JSON ({exc.msg})", path=str(path), line=number,
                               field=where) from None
        found.append((number, row))
    return found

