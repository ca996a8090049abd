"""Guardrails: the checks a project declares in `[guardrails]`, run on every request's input and answer.

They are part of the pipeline, not of the HTTP layer: `slipway check` runs them on each eval example
exactly as the served bento runs them on each request (same `Guard`, same order), so the contract
judges the guarded pipeline and the trace of either records every decision with its duration.

Input, in order: size in the model's own tokens (413 when it cannot fit the context; never a 503 from
an overflow later), empty or content-free text, prompt injection (framework/injection.py), topic
scope, then PII (framework/redact.py), which is redacted before the model sees the text. Output:
the business rules (expressions over answer fields, evaluated by simpleeval, never Python's eval)
and the blocklist. Actions: `block` (no answer: a 4xx with the declared message), `redact` (PII
only), `flag` (answer, and say which check fired), `human` (answer, flagged, and the project's
`human_field` set true so the answer goes to a person). Every check is plain Python over strings:
the non-LLM checks together must cost < 5 ms p99 per request (bench/guardrails.py measures it).
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from framework.errors import SpecError
from framework.spec import GuardrailsSpec

BLOCK_STATUS = 400   # a declared block: the request is refused by policy, not malformed (422) or unknown (401)
TOO_LARGE_STATUS = 413


@dataclass(frozen=True)
class Decision:
    """What one check decided on one request. `detail` holds rule names and counts, never matched text."""

    check: str          # input_size | empty | injection | topics | pii | blocklist | rule:<name>
    stage: str          # input | output
    action: str         # pass | block | redact | flag | human
    ms: float
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def fired(self) -> bool:
        return self.action != "pass"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ms": round(self.ms, 4)}


@dataclass(frozen=True)
class Blocked:
    """A request the guardrails refused: the status, an error code for traces and the declared message."""

    status: int
    code: str
    message: str
    check: str


@dataclass
class Outcome:
    """The values after the guardrails of one stage (inputs redacted, or the answer with `human_field`
    set), every decision, and the block if one check blocked."""

    values: dict[str, Any]
    decisions: list[Decision]
    blocked: Blocked | None = None

    @property
    def ms(self) -> float:
        return sum(d.ms for d in self.decisions)


def fired(decisions: Iterable[Decision]) -> dict[str, str]:
    """The response's `guardrails` object: each check that fired and its action (empty when none did)."""
    return {d.check: d.action for d in decisions if d.fired}


def decision_rows(decisions: Iterable[Decision]) -> list[dict[str, Any]]:
    return [d.to_dict() for d in decisions]


# -- single checks: pure functions over text -------------------------------------------------------

def content_chars(text: str, enough: int | None = None) -> int:
    """Letters and digits in `text` (any script): what is left of a message once whitespace,
    punctuation, symbols and emoji are set aside. Stops counting at `enough`."""
    count = 0
    for ch in text:
        if unicodedata.category(ch)[0] in "LN":
            count += 1
            if enough is not None and count >= enough:
                break
    return count


def _phrase_pattern(phrases: Iterable[str]) -> re.Pattern | None:
    """One case-insensitive pattern matching any phrase as whole words (`\\b` only where the phrase
    starts or ends with a word character, so "c++" or "!!" work too)."""
    parts = []
    for phrase in sorted({p.strip() for p in phrases if p.strip()}, key=len, reverse=True):
        body = r"\s+".join(re.escape(word) for word in phrase.split())
        left = r"(?<!\w)" if re.match(r"\w", phrase[0]) else ""
        right = r"(?!\w)" if re.match(r"\w", phrase[-1]) else ""
        parts.append(left + body + right)
    return re.compile("|".join(parts), re.IGNORECASE) if parts else None


def _fold(text: str) -> str:
    """NFKC and case folding, so full-width letters and case do not hide a listed phrase."""
    return unicodedata.normalize("NFKC", text).casefold()


class _Expression:
    """A rule expression parsed once by simpleeval over the answer's field names."""

    def __init__(self, source: str, names: Iterable[str], where: str):
        from simpleeval import SimpleEval

        self.source = source
        self.names = set(names)
        self.evaluator = SimpleEval(functions={"len": len, "lower": str.lower})
        try:
            self.parsed = self.evaluator.parse(source)
        except SyntaxError as exc:
            raise SpecError(f"{where} = {source!r} is not a valid expression: {exc.msg}", field=where,
                            hint='write a comparison over output fields, e.g. category == "abuse"') from None
        import ast

        called = {node.func.id for node in ast.walk(self.parsed)
                  if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
        used = {node.id for node in ast.walk(self.parsed) if isinstance(node, ast.Name)}
        unknown = used - self.names - {"True", "False", "None"} - (called & set(self.evaluator.functions))
        if unknown:
            raise SpecError(f"{where} = {source!r} names {', '.join(sorted(unknown))}, not an output field of "
                            f"the program ({', '.join(sorted(self.names))})", field=where,
                            hint="use the answer's field names; strings in double quotes")

    def holds(self, values: dict[str, Any]) -> bool:
        self.evaluator.names = values
        return bool(self.evaluator.eval(self.source, previously_parsed=self.parsed))


# -- the guard --------------------------------------------------------------------------------------

class Guard:
    """The declared guardrails of one project, compiled once per process.

    `text_fields` are the program's string inputs (what is checked); `output_types` its answer fields
    (what rules may name); `count_tokens` the model's tokenizer and `token_limit` the input tokens that
    fit beside the prompt and answer (see `input_token_limit`); without them only characters are known
    and the size check is skipped."""

    def __init__(self, spec: GuardrailsSpec, *, text_fields: Iterable[str], output_types: dict[str, Any],
                 count_tokens: Callable[[str], int] | None = None, token_limit: int | None = None):
        from framework.injection import injection_signals
        from framework.redact import find_pii, redact_pii

        self.spec = spec
        self.text_fields = tuple(text_fields)
        self.output_types = dict(output_types)
        self.count_tokens = count_tokens
        self.prompt_tokens = 0   # the program's longest prompt around empty inputs (guard_for measures it)
        limit = spec.input_size.max_tokens
        self.token_limit = min(x for x in (limit, token_limit) if x is not None) if (limit or token_limit) else None
        self._injection = injection_signals
        self._find_pii, self._redact_pii = find_pii, redact_pii
        human = spec.human_field
        if human is not None and human not in self.output_types:
            raise SpecError(f"guardrails.human_field = {human!r} is not an output field of the program "
                            f"({', '.join(self.output_types)})", field="guardrails.human_field")
        if human is not None and self.output_types[human] is not bool:
            raise SpecError(f"guardrails.human_field = {human!r} is not a boolean output field",
                            field="guardrails.human_field", hint="name a bool field such as needs_human")
        topics = spec.topics
        self._deny = {name: _phrase_pattern(map(_fold, phrases)) for name, phrases in topics.deny.items()} \
            if topics else {}
        self._allow = _phrase_pattern(_fold(p) for ps in topics.allow.values() for p in ps) if topics else None
        self._blocklist = _phrase_pattern(map(_fold, spec.blocklist.words)) if spec.blocklist else None
        names = list(self.output_types)
        self._rules = [(rule, _Expression(rule.when, names, f"guardrails.rules[{i}].when"),
                        _Expression(rule.require, names, f"guardrails.rules[{i}].require"))
                       for i, rule in enumerate(spec.rules)]

    # input -----------------------------------------------------------------------------------------
    def check_input(self, inputs: dict[str, Any]) -> Outcome:
        """Run the input checks in order; the first `block` ends them. Returns the inputs the model may
        see (PII redacted when declared)."""
        values = dict(inputs)
        decisions: list[Decision] = []
        if not self.spec.enabled:
            return Outcome(values, decisions)
        texts = {name: values[name] for name in self.text_fields if isinstance(values.get(name), str)}
        joined = "\n".join(texts.values())

        def run(check: str, body: Callable[[], tuple[str, dict]]) -> Decision:
            t0 = time.perf_counter()
            action, detail = body()
            decision = Decision(check, "input", action, (time.perf_counter() - t0) * 1000, detail)
            decisions.append(decision)
            return decision

        if self.count_tokens is not None and self.token_limit is not None:
            def size():
                size = len(joined.encode("utf-8", "replace"))
                if size <= self.token_limit:   # a token is at least a byte: no need to tokenize
                    return "pass", {"at_most": size, "limit": self.token_limit}
                tokens = self.count_tokens(joined)
                return ("block" if tokens > self.token_limit else "pass"), {"tokens": tokens,
                                                                             "limit": self.token_limit}
            decision = run("input_size", size)
            if decision.action == "block":
                message = (f"{self.spec.input_size.message}: the input is {decision.detail['tokens']} tokens, "
                           f"at most {self.token_limit} fit (guardrails.input_size)")
                return Outcome(values, decisions, Blocked(TOO_LARGE_STATUS, "input-too-large", message, "input_size"))
        if self.spec.empty is not None:
            empty = self.spec.empty
            decision = run("empty", lambda: ((empty.action if any(content_chars(t, empty.min_chars) < empty.min_chars
                                                                   for t in texts.values()) else "pass"), {}))
            if decision.action == "block":
                return Outcome(values, decisions, Blocked(BLOCK_STATUS, "guardrail-blocked", empty.message, "empty"))
        if self.spec.injection is not None:
            guard = self.spec.injection

            def injection():
                signals = self._injection(joined)
                return (guard.action if signals else "pass"), ({"signals": signals} if signals else {})
            decision = run("injection", injection)
            if decision.action == "block":
                return Outcome(values, decisions, Blocked(BLOCK_STATUS, "guardrail-blocked",
                                                          guard.message or "the input was refused", "injection"))
        if self.spec.topics is not None:
            decision = run("topics", lambda: self._topics(joined))
            if decision.action == "block":
                return Outcome(values, decisions, Blocked(BLOCK_STATUS, "guardrail-blocked",
                                                          self.spec.topics.message or "this topic is out of scope",
                                                          "topics"))
        if self.spec.pii is not None:
            pii = self.spec.pii

            def personal():
                if pii.action == "redact":
                    counts: dict[str, int] = {}
                    for name, text in texts.items():
                        values[name], found = self._redact_pii(text, pii.kinds)
                        for kind, n in found.items():
                            counts[kind] = counts.get(kind, 0) + n
                else:
                    counts = {}
                    for finding in self._find_pii(joined, pii.kinds):
                        counts[finding.kind] = counts.get(finding.kind, 0) + 1
                return (pii.action if counts else "pass"), ({"counts": counts} if counts else {})
            decision = run("pii", personal)
            if decision.action == "block":
                return Outcome(values, decisions, Blocked(BLOCK_STATUS, "guardrail-blocked", pii.message, "pii"))
        return Outcome(values, decisions)

    def _topics(self, text: str) -> tuple[str, dict]:
        folded = _fold(text)
        denied = [name for name, pattern in self._deny.items() if pattern is not None and pattern.search(folded)]
        if denied:
            return self.spec.topics.action, {"denied": denied}
        if self._allow is not None and not self._allow.search(folded):
            return self.spec.topics.action, {"outside": "no allowed topic mentioned"}
        return "pass", {}

    # output ----------------------------------------------------------------------------------------
    def check_output(self, outputs: dict[str, Any], earlier: Iterable[Decision] = ()) -> Outcome:
        """Run the business rules and the blocklist over an answer. `earlier` are the input decisions:
        a `human` there routes this answer to a person too."""
        values = dict(outputs)
        decisions: list[Decision] = []
        if not self.spec.enabled:
            return Outcome(values, decisions)
        blocked: Blocked | None = None
        for rule, when, require in self._rules:
            t0 = time.perf_counter()
            try:
                broken = when.holds(values) and not require.holds(values)
                detail: dict[str, Any] = {}
            except Exception as exc:  # noqa: BLE001 - a rule that cannot be evaluated on this answer fails it
                broken, detail = True, {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            action = rule.action if broken else "pass"
            decisions.append(Decision(f"rule:{rule.name}", "output", action, (time.perf_counter() - t0) * 1000,
                                      detail))
            if action == "block" and blocked is None:
                blocked = Blocked(BLOCK_STATUS, "guardrail-blocked",
                                  rule.message or f"the answer broke the rule {rule.name}", f"rule:{rule.name}")
        if self._blocklist is not None:
            t0 = time.perf_counter()
            hits = sorted({name for name, value in values.items()
                           if isinstance(value, str) and self._blocklist.search(_fold(value))})
            action = self.spec.blocklist.action if hits else "pass"
            decisions.append(Decision("blocklist", "output", action, (time.perf_counter() - t0) * 1000,
                                      {"fields": hits} if hits else {}))
            if action == "block" and blocked is None:
                blocked = Blocked(BLOCK_STATUS, "guardrail-blocked",
                                  self.spec.blocklist.message or "the answer was withheld", "blocklist")
        human = self.spec.human_field
        if human is not None and any(d.action == "human" for d in [*earlier, *decisions]):
            values[human] = True
        return Outcome(values, decisions, blocked)


# -- building one for a program -------------------------------------------------------------------

def prompt_tokens(engine, program, adapter) -> int:
    """The longest prompt, in tokens, that the program's predictors render around empty inputs."""
    longest = 0
    for _, predictor in program.named_predictors():
        signature = predictor.signature
        messages = adapter.format(signature, predictor.demos, {name: "" for name in signature.input_fields})
        longest = max(longest, len(engine.prompt_tokens(messages)))
    return longest


def input_token_limit(prompt: int, model) -> int:
    """Input tokens that fit one model call: the context minus the prompt around them, minus the answer's
    `max_tokens`, minus 32 for the JSON skeleton's forced text."""
    return max(model.context_size - prompt - model.max_tokens - 32, 1)


def guard_for(spec: GuardrailsSpec, program, *, engine=None, adapter=None, model=None) -> Guard:
    """The project's `Guard` for `program`; with `engine`, `adapter` and `model` the size check counts
    tokens with the model's own tokenizer."""
    from framework.notebook import input_fields

    signature = program.predictors()[-1].signature
    text_fields = [name for name in input_fields(program)
                   if signature.input_fields.get(name) is None or signature.input_fields[name].annotation is str]
    output_types = {name: f.annotation for name, f in signature.output_fields.items()}
    count, limit, prompt = None, None, 0
    if engine is not None and adapter is not None and model is not None:
        count = engine.count_tokens
        prompt = prompt_tokens(engine, program, adapter)
        limit = input_token_limit(prompt, model)
    guard = Guard(spec, text_fields=text_fields, output_types=output_types, count_tokens=count, token_limit=limit)
    guard.prompt_tokens = prompt
    # One pass before any real input: first calls fill the detectors' caches (about 1 ms), which is not
    # a request's cost and must not land on the first example's guardrail time.
    guard.check_input({name: "Warm-up: my invoice 4111 1111 1111 1111 is wrong." for name in text_fields})
    return guard


# -- measuring the detectors on labelled sets (`slipway check`) ---------------------------------------

def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score 95% interval of a proportion: sound at 0 and 1 and for small n, where the
    normal approximation is not."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    low = 0.0 if successes == 0 else max(0.0, min(p, centre - half))    # exact at the ends: float rounding
    high = 1.0 if successes == n else min(1.0, max(p, centre + half))   # must not leave p outside
    return (low, high)


@dataclass(frozen=True)
class DetectorScore:
    """Precision and recall of one detector on one labelled file, with the counts behind them."""

    detector: str
    path: str
    sha256: str
    tp: int
    fp: int
    fn: int
    n: int

    def figures(self) -> dict[str, tuple[float, tuple[float, float]]]:
        found, labelled = self.tp + self.fp, self.tp + self.fn
        precision = self.tp / found if found else float("nan")
        recall = self.tp / labelled if labelled else float("nan")
        return {f"{self.detector}_precision": (precision, wilson(self.tp, found)),
                f"{self.detector}_recall": (recall, wilson(self.tp, labelled))}


def _labelled_rows(path, where: str) -> list[dict]:
    from framework.dataset import jsonl_objects
    from framework.errors import DatasetError

    rows = []
    for number, row in jsonl_objects(path, where=where, what="labelled set", remove="dataset"):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DatasetError(f"{path}:{number}: each row needs a string `text`", path=str(path), line=number,
                               field=where)
        rows.append(row)
    return rows


def score_injection(path, where: str = "guardrails.injection.dataset") -> DetectorScore:
    """Rows `{"text", "injection": true|false}`: a row is detected when any injection rule fires."""
    from framework.content import file_hash
    from framework.errors import DatasetError
    from framework.injection import injection_signals

    tp = fp = fn = 0
    rows = _labelled_rows(path, where)
    for number, row in enumerate(rows, 1):
        if not isinstance(row.get("injection"), bool):
            raise DatasetError(f"{path}: row {number} ({row.get('id')}) needs `injection`: true or false",
                               path=str(path), field=where)
        hit = bool(injection_signals(row["text"]))
        tp += hit and row["injection"]
        fp += hit and not row["injection"]
        fn += (not hit) and row["injection"]
    return DetectorScore("injection", str(path), file_hash(path), tp, fp, fn, len(rows))


def score_pii(path, kinds: Iterable[str], where: str = "guardrails.pii.dataset") -> DetectorScore:
    """Rows `{"text", "pii": [{"kind", "text"}]}`, judged per value: a labelled value is found (tp) when a
    finding overlaps it, missed (fn) otherwise; a finding overlapping no labelled value is a false
    positive. Only the declared `kinds` count."""
    from framework.content import file_hash
    from framework.errors import DatasetError
    from framework.redact import find_pii

    kinds = tuple(kinds)
    tp = fp = fn = 0
    rows = _labelled_rows(path, where)
    for number, row in enumerate(rows, 1):
        text, labels = row["text"], row.get("pii")
        if not isinstance(labels, list):
            raise DatasetError(f"{path}: row {number} ({row.get('id')}) needs `pii`: a list of {{kind, text}}",
                               path=str(path), field=where)
        spans = []
        for label in labels:
            start = text.find(label.get("text", "")) if isinstance(label, dict) and label.get("text") else -1
            if start < 0:
                raise DatasetError(f"{path}: row {number} ({row.get('id')}): labelled value "
                                   f"{label!r} is not in its text", path=str(path), field=where)
            if label.get("kind") in kinds:
                spans.append((start, start + len(label["text"])))
        findings = find_pii(text, kinds)
        covered = [any(f.start < end and start < f.end for f in findings) for start, end in spans]
        tp += sum(covered)
        fn += len(covered) - sum(covered)
        fp += sum(1 for f in findings if not any(f.start < end and start < f.end for start, end in spans))
    return DetectorScore("pii", str(path), file_hash(path), tp, fp, fn, len(rows))


def score_detectors(spec: GuardrailsSpec, project_dir) -> list[DetectorScore]:
    """Every declared detector that names a labelled `dataset`, scored on it (milliseconds: no model)."""
    from pathlib import Path

    scores = []
    if spec.injection is not None and spec.injection.dataset:
        scores.append(score_injection(Path(project_dir) / spec.injection.dataset))
    if spec.pii is not None and spec.pii.dataset:
        scores.append(score_pii(Path(project_dir) / spec.pii.dataset, spec.pii.kinds))
    return scores
