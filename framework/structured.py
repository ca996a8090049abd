"""Structured decoding that writes the JSON skeleton itself and lets the model fill the values.

With a plain JSON-schema grammar llama.cpp decodes every token one step at a
time, including keys and punctuation the grammar already fixes
(`{"category": "`, `", "priority": "` …): for a four-field triage answer that
is ~20 of ~40 decode steps, each ~100 ms on a 2-core CPU. Here the skeleton is
appended to the prompt (evaluated as one batch, ~15 ms a token) and the model
only generates each value, under a small grammar for that value. The answer is
the same JSON object the schema describes; the saving is measured in
BENCHMARKS.md (bench/structured_decoding.py). Decoding runs on token ids
(`generate`), so prompt text is never re-tokenized with special tokens parsed,
and it reports what the model evaluated (cached or new) apart from what it
sampled: the forced skeleton is input, not output.

Only flat objects whose properties are all required and are enums, booleans,
integers or strings qualify (`plan` returns None otherwise, and the engine
falls back to the full-schema grammar). A string may carry a `pattern` that is
one repeated character class, `^[A-Za-z ,.-]*$`, or a run of words of one
class, `^[a-z]{1,20}( [a-z]{1,20}){0,7}$`.
"""

from __future__ import annotations

import json
import re
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
    options: tuple[str, ...] = ()  # enum and boolean: every allowed value text (the batched engine picks one)


def _gbnf_literal(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid GBNF string literal


_CLASS_RE = re.compile(r'^\^(\[[^\]\\"^][^\]\\"]*\])\*\$$')


def _char_class(pattern: str) -> str | None:
    """`^[A-Za-z ,.-]*$` (one character class, repeated) → the GBNF `[A-Za-z ,.-]`; None for anything else.

    A pattern like this is how a signature keeps a free-text field in one script (`reason` in English,
    never a switch to another alphabet mid-sentence): the grammar cannot emit a character outside the
    class. A class with a quote, a backslash or a negation is refused: it could leave the JSON string.
    """
    found = _CLASS_RE.match(pattern)
    return found.group(1) if found else None


_WORDS_RE = re.compile(r'^\^(\[[^\]\\" ^][^\]\\" ]*\])\{(\d+),(\d+)\}\( \1\{\2,\3\}\)\{(\d+),(\d+)\}\$$')


def _words(pattern: str) -> str | None:
    """`^[A-Za-z,]{1,20}( [A-Za-z,]{1,20}){0,7}$` (one to eight words of one class, single spaces) → a GBNF
    body; None for anything else.

    A word count is how a free-text field stays a short phrase *and* ends on a whole word: a character
    cap cuts the last word in half when the model rambles, while here the model can only close the
    string where it would have written a space.
    """
    found = _WORDS_RE.match(pattern)
    if not found:
        return None
    cls, low, high, least, most = found.group(1), *map(int, found.groups()[1:])
    if not (1 <= low <= high and least <= most):
        return None
    word = f"{cls}{{{low},{high}}}"
    return f'{word} (" " {word}){{{least},{most}}}'


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
            texts = tuple(json.dumps(v) for v in prop["enum"])
            steps.append(Step(name, prefix, f'root ::= " "? ({options})', "enum",
                              tuple(" " + t for t in texts) + texts))
        elif prop.get("type") == "boolean":
            steps.append(Step(name, prefix, 'root ::= " "? ("true" | "false")', "boolean",
                              (" true", " false", "true", "false")))
        elif prop.get("type") == "integer":
            steps.append(Step(name, prefix, 'root ::= " "? "-"? ("0" | [1-9] [0-9]{0,15})', "integer"))
        elif (prop.get("type") == "string" and set(prop) - {"title", "description"} == {"type", "pattern"}
              and _words(prop["pattern"])):
            steps.append(Step(name, prefix, f'root ::= " "? "\\"" {_words(prop["pattern"])} "\\""', "string"))
        elif prop.get("type") == "string" and not (set(prop) - {"type", "title", "description", "maxLength",
                                                                 "minLength", "pattern"}):
            char = _CHAR if "pattern" not in prop else _char_class(prop["pattern"])
            if char is None:
                return None
            low, high = prop.get("minLength", 0), prop.get("maxLength")
            repeat = f"{{{low},{high}}}" if high is not None else (f"{{{low},}}" if low else "*")
            steps.append(Step(name, prefix, f'root ::= " "? "\\"" char{repeat} "\\""\nchar ::= {char}', "string"))
        else:
            return None
    return steps


def count_evals(llama) -> list[int]:
    """The sizes of the batches llama.cpp evaluates on `llama`, appended as they happen.

    `Llama.generate` reuses the longest prefix its KV cache shares with the new prompt and
    evaluates only the rest, in one `eval` call before the first token is sampled; counting those
    calls is how a call knows how much of its prompt was cached instead of guessing. Installed once
    per `Llama` instance (an instance attribute shadows the method).
    """
    counts = getattr(llama, "_slipway_evals", None)
    if counts is None:
        counts = []
        evaluate = llama.eval

        def counting_eval(tokens):
            counts.append(len(tokens))
            return evaluate(tokens)

        llama.eval = counting_eval
        llama._slipway_evals = counts
    return counts


@dataclass(frozen=True)
class Generation:
    """One generation from a token prompt: what the model sampled and what it evaluated to get there."""

    ids: list[int]       # sampled tokens, end-of-generation token excluded
    text: str
    finish: str          # stop | length | deadline
    prompt_new: int      # prompt tokens llama.cpp evaluated for this call
    prompt_cached: int   # prompt tokens whose KV state was reused from the previous call


def generate(llama, tokens: list[int], *, max_tokens: int, temperature: float, grammar=None,
             top_p: float | None = None, seed: int | None = None, stop: list[str] | None = None,
             stop_at: float | None = None, rows: list | None = None) -> Generation:
    """Sample up to `max_tokens` after the token prompt `tokens` (the caller holds the model's lock).

    The prompt goes in as token ids, never as text: text would be tokenized again with special
    tokens parsed, and a ticket containing `<|im_start|>` would become a control token.
    Generation ends at an end-of-generation token ("stop"), at a `stop` string (cut off, "stop"),
    after `max_tokens` ("length") or past `stop_at`, a `time.monotonic()` deadline ("deadline").
    `rows`, if given, receives a copy of the logits row each token (the end-of-generation one included)
    was sampled from: the raw logits, before the grammar masked them (framework/confidence.py). Reading
    them changes nothing: llama.cpp's sampler works on its own copy.
    """
    import llama_cpp

    if len(tokens) >= llama.n_ctx():
        raise ValueError(f"prompt of {len(tokens)} tokens does not fit the context window of {llama.n_ctx()}")
    max_tokens = max(1, min(max_tokens, llama.n_ctx() - len(tokens)))
    evals = count_evals(llama)
    evals.clear()
    llama.set_seed(seed if seed is not None else 0)
    vocab = llama._model.vocab
    ids: list[int] = []
    finish = "length"
    for token in llama.generate(tokens, temp=temperature, top_p=0.95 if top_p is None else top_p,
                                grammar=grammar):
        if rows is not None:
            rows.append(_last_logits(llama))
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            finish = "stop"
            break
        ids.append(token)
        if stop_at is not None and time.monotonic() > stop_at:
            finish = "deadline"
            break
        if stop and any(s in _detokenize(llama, ids) for s in stop):
            finish = "stop"
            break
        if len(ids) >= max_tokens:
            break
    text = _detokenize(llama, ids)
    if stop:
        cuts = [text.index(s) for s in stop if s in text]
        text = text[: min(cuts)] if cuts else text
    new = evals[0] if evals else len(tokens)
    return Generation(ids=ids, text=text, finish=finish, prompt_new=new, prompt_cached=len(tokens) - new)


def _last_logits(llama):
    """A copy of the logits of the last evaluated position: what `Llama.generate` just sampled from
    (llama-cpp-python 0.3.x keeps no `scores` without logits_all; the context still has the row)."""
    import numpy as np

    pointer = llama._ctx.get_logits_ith(-1)
    return np.ctypeslib.as_array(pointer, shape=(llama.n_vocab(),)).copy()


def _detokenize(llama, ids: list[int]) -> str:
    return llama.detokenize(ids).decode("utf-8", errors="ignore")


@dataclass(frozen=True)
class Decoded:
    """A skeleton-decoded answer and what producing it cost, in tokens.

    `prompt_cached + prompt_new` is every token the model took as input: the chat prompt and the
    skeleton text forced between values. `generated` counts only sampled value tokens, so
    `prompt_cached + prompt_new + generated` is the length of the sequence the model ended on.
    """

    text: str
    finish: str
    generated: int
    prompt_new: int
    prompt_cached: int
    confidence: dict[str, float] | None = None  # enum/boolean field → probability of its value (confidence.py)


def decode(llama, prompt: list[int], steps: list[Step], *, max_tokens: int | None, temperature: float,
           grammar_cache: dict, stop_at: float | None = None, on_value=None, score: bool = True) -> Decoded:
    """Fill the steps on `llama` (a llama_cpp.Llama) after the token prompt `prompt`.

    `stop_at` is a `time.monotonic()` deadline: generation stops at the next token past it and the
    finish reason is "deadline" (the caller turns that into a timeout error). `on_value(name, text)` is
    told each value as soon as it is complete (its JSON text), so a streamed answer can send it on.
    `score`: keep each complete enum/boolean value's probability among the allowed values
    (framework/confidence.py) in `Decoded.confidence`; it reads logits and never changes a choice.

    Each step extends the previous step's tokens (prompt, forced skeleton, sampled ids), so
    llama.cpp's prefix cache evaluates only the new skeleton text. The skeleton is tokenized as
    plain text; the values are the model's own token ids, so no text is ever re-tokenized.
    """
    from llama_cpp import LlamaGrammar

    tokens = list(prompt)
    answer = ""
    generated = 0
    skeleton = 0
    cached: int | None = None
    finish = "stop"
    budget = max_tokens if max_tokens is not None else 1 << 30
    scores: dict[str, float] = {}
    for step in steps:
        prefix = llama.tokenize(step.prefix.encode(), add_bos=False, special=False)
        tokens += prefix
        skeleton += len(prefix)
        answer += step.prefix
        if step.grammar not in grammar_cache:
            grammar_cache[step.grammar] = LlamaGrammar.from_string(step.grammar, verbose=False)
        if stop_at is not None and time.monotonic() > stop_at:
            finish = "deadline"
            break
        rows: list | None = [] if score and step.options else None
        result = generate(llama, tokens, max_tokens=max(budget - generated, 1), temperature=temperature,
                          grammar=grammar_cache[step.grammar], stop_at=stop_at, rows=rows)
        if cached is None:  # later steps re-use everything up to the new skeleton text by construction
            cached = result.prompt_cached
        tokens += result.ids
        generated += len(result.ids)
        value = result.text
        if result.finish == "deadline":
            return Decoded(answer + value, "deadline", generated, len(prompt) + skeleton - (cached or 0),
                           cached or 0)
        if result.finish == "length":
            finish = "length"
            value = _close(value, step.kind)
        answer += value
        if finish == "length":
            break
        if rows is not None and value in step.options:
            scores[step.name] = _value_confidence(llama, step, result.ids, rows, grammar_cache)
        if on_value is not None:
            on_value(step.name, value)
    cached = cached or 0
    return Decoded(answer + ("}" if finish != "deadline" else ""), finish, generated,
                   len(prompt) + skeleton - cached, cached, scores if score else None)


def _value_confidence(llama, step: Step, ids: list[int], rows: list, cache: dict) -> float:
    """The probability of the value the grammar let the model write, among the step's options."""
    import llama_cpp

    from framework.confidence import confidence, sequence_branches, value_of

    def tokenize(text: str) -> list[int]:
        return llama.tokenize(text.encode(), add_bos=False, special=False)

    canonical = {}
    for option in step.options:
        if ("canonical", option) not in cache:
            cache[("canonical", option)] = tokenize(option)
        canonical[option] = cache[("canonical", option)]
    eog = llama_cpp.llama_vocab_eos(llama._model.vocab)
    branches = sequence_branches(step.options, canonical, ids, rows, text=lambda part: _detokenize(llama, list(part)),
                                 tokenize=tokenize, eog=eog)
    return confidence(branches, value_of(_detokenize(llama, ids)))


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


_TYPES: dict[str, tuple[type, ...]] = {"string": (str,), "integer": (int,), "number": (int, float),
                                       "boolean": (bool,), "object": (dict,), "array": (list,),
                                       "null": (type(None),)}


def schema_problems(schema: dict, text: str) -> list[str]:
    """Every reason the raw model output `text` is not a JSON document valid under `schema`; [] if valid.

    Covers the JSON Schema subset DSPy response schemas use: `type`, `enum`, `const`, `required`,
    `properties`, `additionalProperties: false`, `items`, string and number limits, `anyOf` and local
    `$ref`s. Each problem names its location (`$.reason: ...`), like pydantic's `loc`. This judges the
    text the model wrote, before DSPy's lenient parsing (which extracts JSON from prose and ignores
    length limits) gets to it.
    """
    try:
        value = json.loads(text)
    except ValueError as exc:
        return [f"$: not JSON: {exc}"]
    return _check(schema, value, "$", schema)


def _check(schema: dict, value, loc: str, root: dict) -> list[str]:
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target = root
        for part in ref[2:].split("/"):
            target = target.get(part, {})
        schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
    if "anyOf" in schema:
        options = [_check(option, value, loc, root) for option in schema["anyOf"]]
        if all(options):
            return [f"{loc}: matches none of the anyOf options ({'; '.join(p[0] for p in options)})"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{loc}: {value!r} is not one of {schema['enum']}"]
    if "const" in schema and value != schema["const"]:
        return [f"{loc}: expected {schema['const']!r}, got {value!r}"]
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        if not any(_is(value, kind) for kind in kinds):
            return [f"{loc}: expected {' or '.join(kinds)}, got {type(value).__name__} {value!r}"[:200]]
    problems: list[str] = []
    if isinstance(value, str):
        if len(value) > schema.get("maxLength", len(value)):
            problems.append(f"{loc}: {len(value)} characters, more than maxLength {schema['maxLength']}")
        if len(value) < schema.get("minLength", 0):
            problems.append(f"{loc}: {len(value)} characters, fewer than minLength {schema['minLength']}")
        if "pattern" in schema:
            import re

            if not re.search(schema["pattern"], value):
                problems.append(f"{loc}: does not match pattern {schema['pattern']!r}")
    if _is(value, "number"):
        for key, bad in (("minimum", value < schema.get("minimum", value)),
                         ("maximum", value > schema.get("maximum", value)),
                         ("exclusiveMinimum", "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]),
                         ("exclusiveMaximum", "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"])):
            if bad:
                problems.append(f"{loc}: {value!r} violates {key} {schema[key]!r}")
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        problems += [f"{loc}.{name}: required field is missing" for name in schema.get("required") or ()
                     if name not in value]
        if schema.get("additionalProperties") is False:
            problems += [f"{loc}.{name}: unexpected field" for name in value if name not in props]
        for name, item in value.items():
            if name in props:
                problems += _check(props[name], item, f"{loc}.{name}", root)
    if isinstance(value, list):
        if isinstance(schema.get("items"), dict):
            for index, item in enumerate(value):
                problems += _check(schema["items"], item, f"{loc}[{index}]", root)
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", len(value)):
            problems.append(f"{loc}: {len(value)} items, outside [minItems, maxItems]")
    return problems


def _is(value, kind: str) -> bool:
    if isinstance(value, bool):
        return kind == "boolean"
    if kind == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _TYPES.get(kind, (object,)))
