"""A served request that fails → the project's declared fallback answer, never an unhandled error.

`[fallback]` in project.toml (`spec.FallbackSpec`) says what a request answers when the model path fails:
`error` (503 with the request id, as before), `static` (a safe answer, 200, marked as a fallback) or `human`
(the same safe answer, and the request goes to the human queue, framework/handoff.py). `decide()` turns the
spec and the error code of the failure (the service's codes: framework/errors.py) into a `Fallback`: the
status, the answer's fields, the marker the response carries and whether a queue entry must be written.
`check_answer()` says whether an answer fits the program's output fields; `slipway check`, `slipway build`
and the service at start call it through `validate()`. Everything here is pure except `output_fields` and
`validate_project`, which load the program from the notebook.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, get_args

from framework.errors import SpecError
from framework.spec import FailureKind, FallbackSpec

FAILURES: tuple[str, ...] = get_args(FailureKind)   # model-error, timeout, exhausted
# The service's error codes on the failure path that are not a plain model error (everything else the
# model call raises is one: "model-error", "model-invalid", a notebook's own error).
CODE_FAILURES = {"model-timeout": "timeout", "tiers-exhausted": "exhausted"}
HEADER = "X-Slipway-Fallback"
MESSAGES = {"human": "the model could not answer; a person will take this request",
            "static": "the model could not answer; this is the service's default answer",
            "error": ""}


def failure_of(code: str) -> str:
    """The failure kind (`model-error`, `timeout`, `exhausted`) of an error code the service answers when the
    model call fails: `model-timeout` is a timeout, `tiers-exhausted` exhausted, anything else a model error.
    A kind itself maps to itself. Only call it on the failure path: a refusal (4xx) is not a failure."""
    if code in FAILURES:
        return code
    return CODE_FAILURES.get(code, "model-error")


@dataclass(frozen=True)
class Fallback:
    """What a failed request answers instead of its error."""

    action: str                    # human | static | error
    failure: str                   # model-error | timeout | exhausted
    code: str                      # the service's error code it stands in for (model-timeout, model-error, …)
    status: int                    # 200 with an answer; 503 for action "error"
    answer: dict[str, Any] | None  # the output fields answered; None for "error"
    message: str                   # said to the caller ("" when none)
    handoff: bool                  # a human-queue entry must be written before answering

    @property
    def answers(self) -> bool:
        """True when the caller gets an answer (static, human); False for a 503."""
        return self.answer is not None

    @property
    def marker(self) -> dict[str, str]:
        """The response's `served.fallback`: which fallback answered and why."""
        out = {"action": self.action, "reason": self.failure}
        if self.message:
            out["message"] = self.message
        return out

    def body(self, *, request_id: str, version: dict[str, Any], guardrails: dict[str, str] | None = None
             ) -> dict[str, Any]:
        """The response body of an answering fallback: the answer's fields, then what every answer carries,
        and the `fallback` marker. For action "error" use the service's error body with `marker` beside it."""
        if self.answer is None:
            raise ValueError("action 'error' has no answer body; answer the service's 503 with `marker`")
        return {**self.answer, "guardrails": dict(guardrails or {}), "served": {"fallback": self.marker},
                "request_id": request_id, "version": version}


def decide(spec: FallbackSpec, failure_code: str) -> Fallback | None:
    """The fallback for a request whose model call failed with `failure_code` (a service error code such as
    `model-timeout`, or a failure kind), or None when `[fallback] on` does not name that failure: then the
    service answers its 503 as it always did. Pure."""
    failure = failure_of(failure_code)
    if failure not in spec.on:
        return None
    answering = spec.action in ("human", "static")
    return Fallback(action=spec.action, failure=failure, code=failure_code, status=200 if answering else 503,
                    answer=dict(spec.answer) if answering else None,
                    message=spec.message or MESSAGES[spec.action], handoff=spec.action == "human")


# -- does an answer fit the program? --------------------------------------------------------------------------
def _adapter(declared: Any):
    """A pydantic TypeAdapter for an output field: a bare annotation, or a field (DSPy's output fields are
    pydantic FieldInfo) whose constraints (max_length, pattern) count too."""
    from pydantic import TypeAdapter
    from pydantic.fields import FieldInfo

    if isinstance(declared, FieldInfo):
        annotation = declared.annotation if declared.annotation is not None else Any
        return TypeAdapter(Annotated[(annotation, *declared.metadata)] if declared.metadata else annotation)
    return TypeAdapter(declared)


def check_answer(answer: Mapping[str, Any], output_types: Mapping[str, Any], *, where: str = "fallback.answer",
                 complete: bool = True) -> list[str]:
    """Every reason `answer` does not fit the program's output fields (empty when it does), each naming
    `<where>.<field>`: a field the program does not have, a missing one (with `complete`), or a value its type
    refuses, strictly as project.toml's types are exact (`"true"` is not a bool). `output_types` maps each
    output field to its type, or to its pydantic field (DSPy's `signature.output_fields`), whose constraints
    are checked too. Pure."""
    from pydantic import ValidationError

    problems = _unknown(answer, output_types, where)
    if complete:
        problems += [f"{where}.{name}: missing; the answer gives every output field of the program"
                     for name in output_types if name not in answer]
    for name, declared in output_types.items():
        if name not in answer:
            continue
        try:
            _adapter(declared).validate_python(answer[name], strict=True)
        except ValidationError as exc:
            problems.append(f"{where}.{name}: {exc.errors()[0]['msg']}, got {answer[name]!r}")
        except Exception as exc:  # noqa: BLE001 - a type pydantic cannot check is reported, not a crash
            problems.append(f"{where}.{name}: cannot check a value of {declared!r}: {exc}")
    return problems


def _unknown(names, output_types: Mapping[str, Any], where: str) -> list[str]:
    known = ", ".join(output_types) or "none"
    return [f"{where}.{name}: not an output field of the program (its fields: {known})"
            for name in names if name not in output_types]


def coerce_labels(labels: Mapping[str, Any], output_types: Mapping[str, Any], *, where: str = "labels"
                  ) -> tuple[dict[str, Any], list[str]]:
    """Labels a person typed (`category=billing`, `needs_human=true`: strings) as values of the output fields'
    types, and every problem (`<where>.<field>: …`). A string is read as the field's type would read it (lax:
    "true" is a bool, "3" an int), then as JSON (lists, objects). Pure."""
    from pydantic import ValidationError

    values: dict[str, Any] = {}
    problems = _unknown(labels, output_types, where)
    for name, raw in labels.items():
        if name not in output_types:
            continue
        adapter = _adapter(output_types[name])
        try:
            values[name] = adapter.validate_python(raw)
            continue
        except ValidationError as exc:
            first = f"{where}.{name}: {exc.errors()[0]['msg']}, got {raw!r}"
        if isinstance(raw, str):
            try:
                values[name] = adapter.validate_json(raw)
                continue
            except ValidationError:
                pass
        problems.append(first)
    return values, problems


def output_fields(program) -> dict[str, Any]:
    """The program's output fields (name → pydantic field, constraints included), from its last predictor."""
    predictors = program.predictors()
    return dict(predictors[-1].signature.output_fields) if predictors else {}


def validate(spec: FallbackSpec, output_types: Mapping[str, Any], *, path: str | Path = "project.toml",
             text: str | None = None) -> None:
    """Raise `SpecError` listing every way `[fallback] answer` does not fit the program, each at its line of
    project.toml when its `text` is given (nothing to check for action "error")."""
    if spec.action == "error":
        return
    problems = check_answer(spec.answer, output_types)
    if not problems:
        return
    lines = [_line(text, problem) for problem in problems]
    hint = ("give every output field of the program a value of its type, e.g. answer = { category = \"billing\", "
            "priority = \"medium\", needs_human = true, reason = \"Handed to a person\" }")
    if len(problems) == 1:
        raise SpecError(problems[0], path=str(path), line=lines[0], hint=hint)
    where = [f"{path}:{line}" if line else str(path) for line in lines]
    raise SpecError(f"{len(problems)} problems:\n  " + "\n  ".join(f"{w}: {p}" for w, p in zip(where, problems,
                                                                                              strict=True)),
                    path=str(path), hint=hint)


def _line(text: str | None, problem: str) -> int | None:
    """The project.toml line of a `fallback.answer.<field>: …` problem (the answer's line for an inline table)."""
    from framework.spec import locate

    if text is None:
        return None
    return locate(text, problem.split(":", 1)[0].split("."))


def validate_project(project, program=None) -> None:
    """`validate` against the project's program (loaded from the notebook when not given, and only when the
    fallback has an answer to check). Called by `slipway check` and `slipway build`."""
    if project.spec.fallback.action == "error":
        return
    if program is None:
        from framework.notebook import load_program

        program = load_program(project, saved=False)
    validate(project.spec.fallback, output_fields(program), path=project.toml_path,
             text=project.toml_path.read_text(encoding="utf-8"))
