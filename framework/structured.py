"""Structured decoding that writes the JSON skeleton itself and lets the model fill the values.

With a plain JSON-schema grammar llama.cpp decodes every token one step at a
time, including keys and punctuation the grammar already fixes
(`{"category": "`, `", "priority": "` …): for a four-field triage answer that
is ~20 of ~40 decode steps, each ~100 ms on a 2-core CPU. Here the skeleton is
appended to the prompt (evaluated as one batch, ~15 ms a token) and the model
only generates each value, under a small grammar for that value. The answer is
the same JSON object the schema describes; the saving is measured in
BENCHMARKS.md (bench/structured_decoding.py).

Only flat objects whose properties are all required and are enums, booleans,
integers or strings qualify (`plan` returns None otherwise, and the engine
falls back to the full-schema grammar).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

_CHAR = r'[^"\\\x7F\x00-\x1F]'


@dataclass(frozen=True)
class Step:
    """One property: the text to force before it, and the grammar for its value."""

    name: str
    prefix: str
    grammar: str
    kind: str  # enum | boolean | integer | string


def _gbnf_literal(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid GBNF string literal


def plan(schema: dict) -> list[Step] | None:
    """Steps for a flat object schema, or None when the schema needs the general grammar."""
    if schema.get("type") != "object" or "$defs" in schema or "$ref" in json.dumps(schema):
        return None
    props = schema.get("properties") or {}
    if not props or list(schema.get("required") or []) != list(props):
        return None
    steps = []
    for index, (name, prop) in enumerate(props.items()):
        # No trailing space in the forced text: a lone " " token is out of distribution (the model
        # writes ` "` as one token) and skews every answer. The value grammar allows the space instead.
        prefix = ("{" if index == 0 else ",") + json.dumps(name) + ":"
        if "enum" in prop and all(isinstance(v, str) for v in prop["enum"]):
            options = " | ".join(_gbnf_literal(json.dumps(v)) for v in prop["enum"])
            steps.append(Step(name, prefix, f'root ::= " "? ({options})', "enum"))
        elif prop.get("type") == "boolean":
            steps.append(Step(name, prefix, 'root ::= " "? ("true" | "false")', "boolean"))
        elif prop.get("type") == "integer":
            steps.append(Step(name, prefix, 'root ::= " "? "-"? ("0" | [1-9] [0-9]{0,15})', "integer"))
        elif prop.get("type") == "string" and not (set(prop) - {"type", "title", "description", "maxLength",
                                                                 "minLength"}):
            low, high = prop.get("minLength", 0), prop.get("maxLength")
            repeat = f"{{{low},{high}}}" if high is not None else (f"{{{low},}}" if low else "*")
            steps.append(Step(name, prefix, f'root ::= " "? "\\"" char{repeat} "\\""\nchar ::= {_CHAR}', "string"))
        else:
            return None
    return steps


def decode(llama, prompt: str, steps: list[Step], *, max_tokens: int | None, temperature: float,
           grammar_cache: dict, stop_at: float | None = None) -> tuple[str, str, int]:
    """Fill the steps on `llama` (a llama_cpp.Llama). Returns (json text, finish reason, generated tokens).

    `stop_at` is a `time.monotonic()` deadline: generation stops at the next token past it and the
    finish reason is "deadline" (the caller turns that into a timeout error).

    Each step is one `create_completion` whose prompt extends the previous one,
    so llama.cpp's prefix cache evaluates only the new skeleton text.
    """
    from llama_cpp import LlamaGrammar, StoppingCriteriaList

    stopping = None
    if stop_at is not None:
        stopping = StoppingCriteriaList([lambda _ids, _logits: time.monotonic() > stop_at])
    answer = ""
    generated = 0
    finish = "stop"
    budget = max_tokens if max_tokens is not None else 1 << 30
    for step in steps:
        answer += step.prefix
        if step.grammar not in grammar_cache:
            grammar_cache[step.grammar] = LlamaGrammar.from_string(step.grammar, verbose=False)
        if stop_at is not None and time.monotonic() > stop_at:
            return answer, "deadline", generated
        result = llama.create_completion(prompt + answer, max_tokens=max(budget - generated, 1),
                                         temperature=temperature, grammar=grammar_cache[step.grammar],
                                         stopping_criteria=stopping)
        choice = result["choices"][0]
        generated += result["usage"]["completion_tokens"]
        value = choice["text"]
        if stop_at is not None and time.monotonic() > stop_at:
            return answer + value, "deadline", generated
        if choice.get("finish_reason") == "length":
            finish = "length"
            value = _close(value, step.kind)
        answer += value
        if finish == "length":
            break
    return answer + "}", finish, generated


def _close(value: str, kind: str) -> str:
    """Keep the answer parseable when the token budget ran out mid-value.

    A cut string is closed; a cut number, boolean or empty value becomes null.
    DSPy then reports the wrong or missing field as an error, which is what it is.
    """
    value = value.strip()
    if value.startswith('"'):
        body = value[1:].rstrip("\\")
        if body.endswith('"') and not body.endswith('\\"'):
            return '"' + body
        return '"' + body + '"'
    if kind == "boolean" and value not in ("true", "false"):
        return "null"
    if kind == "integer" and not value.lstrip("-").isdigit():
        return "null"
    return value or "null"
