"""DSPy over llama.cpp, in process: no HTTP hop, no LiteLLM round trip.

DSPy 3.4 deprecates `BaseLM.forward` subclasses in favour of an *engine*
(`complete(Request) -> Response`) handed to `dspy.LM(engine=...)`, which is
itself the `dspy.BaseLM`. `LlamaCppEngine` is that engine: it owns one
`llama_cpp.Llama`, loads it once, serialises calls with a lock (one llama.cpp
context is not safe under concurrent decode), turns DSPy's structured-output
request into a llama.cpp JSON-schema grammar so typed outputs always parse, and
records per call the latency, the tokens it evaluated (cached apart from new)
and generated, and the raw output's schema validity, for the eval harness and
the service. Prompts reach llama.cpp as token ids built by `chat_tokens`: the
chat template's text may carry control tokens, message content never does.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from framework import structured
from framework.errors import ModelError, ModelTimeout, SlipwayError
from framework.spec import ModelSpec


@dataclass
class CallStats:
    """What one model call cost and produced: the raw material of latency/token/cost/format clauses.

    Tokens are counted as the model processed them. `tokens_in_cached` prompt tokens had their KV
    state reused from the previous call (llama.cpp keeps the longest common prefix), so cost no
    compute; `tokens_in_new` were evaluated in batches: the rest of the prompt plus, for skeleton
    decoding, the JSON skeleton the framework forced (framework/structured.py); `tokens_out` were
    sampled one by one. Price them with `metrics.request_cost`.
    """

    latency_ms: float
    tokens_in_new: int
    tokens_in_cached: int
    tokens_out: int
    finish_reason: str
    raw_text: str | None = None               # the text the model wrote, before DSPy parsed it
    format_problems: list[str] | None = None  # against the response schema; None: the call had none
    messages: list[dict] | None = None        # the rendered chat prompt (for traces; redacted before written)
    started: float | None = None              # time.perf_counter() when the call was made, before any wait
    waited_ms: float = 0.0                    # of the call's time, spent waiting for the model (lock, tokenizing)
    # enum/boolean output field → the probability the model gave its value among the allowed values
    # (framework/confidence.py); None: the call decoded no closed-set value with the skeleton decoder
    confidence: dict[str, float] | None = None

    @property
    def tokens_in(self) -> int:
        """Every prompt token, cached or not (what an API would bill as input)."""
        return self.tokens_in_new + self.tokens_in_cached

    @property
    def answer_confidence(self) -> float | None:
        """The lowest probability over the call's closed-set fields; None when none was measured."""
        return min(self.confidence.values()) if self.confidence else None

    @property
    def raw_valid(self) -> bool | None:
        """Did the raw output satisfy the response schema (None: no schema was asked for)."""
        return None if self.format_problems is None else not self.format_problems


_meter: contextvars.ContextVar[list[CallStats] | None] = contextvars.ContextVar("slipway_meter", default=None)


_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("slipway_deadline", default=None)
# Told each structured value as it completes (name, JSON text): the service's streaming endpoint.
_on_value: contextvars.ContextVar[Callable[[str, str], None] | None] = contextvars.ContextVar(
    "slipway_on_value", default=None)


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Bound the model calls inside the block, waiting for the model included, to `seconds` in all.

    A served request queues on the engine's lock behind others; past its deadline it must fail
    with a clear error (the service answers 503) instead of holding its caller until the HTTP
    layer gives up. A skeleton-decoded answer is also cut off mid-generation at the deadline.
    """
    token = _deadline.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _deadline.reset(token)


def _remaining() -> float | None:
    end = _deadline.get()
    return None if end is None else end - time.monotonic()


def _timed_out(waited_for: str) -> ModelTimeout:
    return ModelTimeout(f"model call timed out {waited_for}", field="serve.timeout_s",
                        hint="raise serve.timeout_s, add workers, or send fewer concurrent requests")


@contextlib.contextmanager
def on_values(callback: Callable[[str, str], None]) -> Iterator[None]:
    """Inside the block, structured answers tell `callback(name, json_text)` each value as it completes.
    The sequential engine tells them one by one while decoding; the batched engine when the answer is done."""
    token = _on_value.set(callback)
    try:
        yield
    finally:
        _on_value.reset(token)


def root_cause(exc: BaseException) -> BaseException:
    """The Slipway error behind an exception DSPy wrapped (it re-raises engine errors as its own
    LM errors), so callers can tell a timeout or a bad model file from a bug; else `exc` itself."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, SlipwayError):
            return seen
        seen = seen.__cause__
    return exc


@contextlib.contextmanager
def _holding(lock: threading.Lock) -> Iterator[None]:
    remaining = _remaining()
    if not lock.acquire(timeout=-1 if remaining is None else max(remaining, 0.0)):
        raise _timed_out("waiting for the model (other requests held it)")
    try:
        yield
    finally:
        lock.release()


def record(stats: CallStats) -> None:
    """Add one call to the `metering()` block around it, if any (engines call this once per call)."""
    calls = _meter.get()
    if calls is not None:
        calls.append(stats)


@contextlib.contextmanager
def metering() -> Iterator[list[CallStats]]:
    """Collect the `CallStats` of every model call made inside the block (this context only)."""
    calls: list[CallStats] = []
    token = _meter.set(calls)
    try:
        yield calls
    finally:
        _meter.reset(token)


class LlamaCppEngine:
    """A DSPy engine over one in-process `llama_cpp.Llama`."""

    supports_response_schema = True
    supports_function_calling = False
    supports_reasoning = False
    supported_params = frozenset({"response_format", "temperature", "max_tokens", "stop", "seed", "top_p"})

    def __init__(self, model_path: str | Path, *, context_size: int = 4096, threads: int | None = None,
                 gpu_layers: int = 0, seed: int = 0, name: str = "local", verbose: bool = False,
                 skeleton: bool = True, parallel: int = 1, batch_size: int = 512):
        self.model_path = str(model_path)
        self.name = name
        self.settings = {"context_size": context_size, "threads": threads, "gpu_layers": gpu_layers, "seed": seed,
                         "parallel": parallel, "batch_size": batch_size}
        self._lock = threading.Lock()
        self._grammars: dict[str, Any] = {}
        self.skeleton = skeleton  # see framework/structured.py; False = llama.cpp's full-schema grammar
        # keep each closed-set value's probability on CallStats.confidence (reads logits, changes no choice)
        self.score = True
        self._llama = self._load(verbose)
        self._formatter = self._chat_formatter()
        # parallel > 1: requests decode together (framework/batch.py); 1: the sequential engine, one at a time
        self.batcher = None
        if parallel > 1:
            from framework.batch import Batcher

            self.batcher = Batcher(self._llama, parallel=parallel, context_size=context_size,
                                   batch_size=batch_size, threads=threads)

    def _load(self, verbose: bool):
        if not Path(self.model_path).exists():
            raise ModelError(f"model file {self.model_path} is missing",
                             hint="run `slipway models pull <project>`")
        import llama_cpp

        try:
            return llama_cpp.Llama(
                model_path=self.model_path,
                # the batched engine makes its own context; this one then only serves the tokenizer
                n_ctx=self.settings["context_size"] if self.settings["parallel"] <= 1 else 256,
                n_threads=self.settings["threads"],
                n_gpu_layers=self.settings["gpu_layers"],
                seed=self.settings["seed"],
                verbose=verbose,
            )
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"llama.cpp could not load {self.model_path}: {exc}",
                             hint="is it a GGUF file for this llama-cpp-python version?") from None

    def _chat_formatter(self):
        """The GGUF's own chat template, as llama-cpp-python's chat handler would apply it."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self._llama.metadata.get("tokenizer.chat_template")
        if not template:
            return None
        eos, bos = self._llama.token_eos(), self._llama.token_bos()
        return Jinja2ChatFormatter(
            template=template, eos_token=self._llama._model.token_get_text(eos) if eos != -1 else "",
            bos_token=self._llama._model.token_get_text(bos) if bos != -1 else "")

    # -- the DSPy engine protocol -------------------------------------------------
    def complete(self, request):
        entered = time.perf_counter()
        messages = _chat_messages(request)
        config = request.config
        temperature = config.temperature if config.temperature is not None else 0.0
        schema = (config.response_format or {}).get("schema") if (config.response_format or {}).get(
            "type") == "json_schema" else None
        steps = structured.plan(schema) if schema is not None and self.skeleton else None
        if steps is not None:
            text, _, _, stats = self.fill(messages, steps, temperature=temperature, max_tokens=config.max_tokens)
        else:
            text, _, _, stats = self.chat(messages, grammar=self._grammar_for(config.response_format),
                                          temperature=temperature, max_tokens=config.max_tokens,
                                          stop=list(config.stop) or None, top_p=config.top_p, seed=config.seed)
        stats.messages, stats.started = messages, entered
        stats.waited_ms = max((time.perf_counter() - entered) * 1000 - stats.latency_ms, 0.0)
        return respond(self.name, text, stats, schema)

    def stream(self, request):
        from dspy.lm15 import response_to_events

        return response_to_events(self.complete(request))

    def close(self) -> None:
        pass  # the model lives as long as the process; closing would break shared copies

    # -- plain calls (used by the engine, the service and benchmarks) -------------
    def prompt_tokens(self, messages: list[dict]) -> list[int]:
        """The chat prompt as token ids: the template's own text may hold control tokens, message
        content never does (see `chat_tokens`)."""
        return self.prompt_split(messages)[0]

    def count_tokens(self, text: str) -> int:
        """How many tokens `text` is as message content (control-token text counts as plain text)."""
        return len(self._llama.tokenize(text.encode("utf-8", "replace"), add_bos=False, special=False))

    def prompt_split(self, messages: list[dict]) -> tuple[list[int], int]:
        """The prompt's token ids and how many of them precede the last message's content: the part
        requests of one program share (instructions, demos), which the batched engine evaluates once."""
        if self._formatter is None:
            raise ModelError(f"{self.model_path} has no chat template in its GGUF metadata",
                             hint="use a chat (instruct) model; Slipway formats prompts with the model's template")
        shared: list[int] = []
        tokens = chat_tokens(lambda msgs: self._formatter(messages=msgs).prompt, messages, self._llama.tokenize,
                             bos=self._llama.token_bos(), add_bos=self._llama._model.add_bos_token(), shared=shared)
        return tokens, shared[0] if shared else 0

    def chat(self, messages: list[dict], *, grammar=None, temperature: float = 0.0, max_tokens: int | None = None,
             stop: list[str] | None = None, top_p: float | None = None,
             seed: int | None = None) -> tuple[str, dict, str, CallStats]:
        """One chat completion under the lock; returns text, usage, finish reason and stats."""
        if self.batcher is not None:
            from framework.batch import Free, Part

            grammar_text = getattr(grammar, "_grammar", grammar)
            tokens, shared = self.prompt_split(messages)
            outcome = self._submit(tokens, shared, [Part("", Free(grammar_text), "text")], max_tokens=max_tokens
                                   or self.settings["context_size"], temperature=temperature, top_p=top_p,
                                   seed=self.settings["seed"] if seed is None else seed, stop=stop)
            stats = _outcome_stats(outcome)
            return outcome.parts[0].text if outcome.parts else "", _usage(stats), outcome.finish, stats
        tokens = self.prompt_tokens(messages)
        with _holding(self._lock):
            start = time.perf_counter()
            result = structured.generate(self._llama, tokens, max_tokens=max_tokens or self.settings["context_size"],
                                         temperature=temperature, grammar=grammar, top_p=top_p,
                                         seed=self.settings["seed"] if seed is None else seed, stop=stop,
                                         stop_at=_deadline.get())
            if result.finish == "deadline":
                raise _timed_out(f"after {(time.perf_counter() - start):.1f} s of generation")
            latency_ms = (time.perf_counter() - start) * 1000
        stats = CallStats(latency_ms=latency_ms, tokens_in_new=result.prompt_new,
                          tokens_in_cached=result.prompt_cached, tokens_out=len(result.ids),
                          finish_reason=result.finish)
        return result.text, _usage(stats), stats.finish_reason, stats

    def fill(self, messages: list[dict], steps: list, *, temperature: float,
             max_tokens: int | None) -> tuple[str, dict, str, CallStats]:
        """Structured answer with the JSON skeleton forced (framework/structured.py), under the lock."""
        if self.batcher is not None:
            return self._fill_batched(messages, steps, temperature=temperature, max_tokens=max_tokens)
        tokens = self.prompt_tokens(messages)
        with _holding(self._lock):
            start = time.perf_counter()
            result = structured.decode(self._llama, tokens, steps, max_tokens=max_tokens, temperature=temperature,
                                       grammar_cache=self._grammars, stop_at=_deadline.get(),
                                       on_value=_on_value.get(), score=self.score)
            if result.finish == "deadline":
                raise _timed_out(f"after {(time.perf_counter() - start):.1f} s of generation")
            latency_ms = (time.perf_counter() - start) * 1000
        stats = CallStats(latency_ms=latency_ms, tokens_in_new=result.prompt_new,
                          tokens_in_cached=result.prompt_cached, tokens_out=result.generated,
                          finish_reason=result.finish, confidence=result.confidence or None)
        return result.text, _usage(stats), result.finish, stats

    # -- the saved prefix state (framework/batch.py) ---------------------------------
    def prefix_settings(self) -> dict:
        """What a saved prefix KV state depends on besides the model file: llama.cpp's state format,
        attention layout and where the layers ran."""
        import llama_cpp

        return {"llama_cpp_python": llama_cpp.__version__, "flash_attn": False, "kv_type": "f16",
                "gpu_layers": self.settings["gpu_layers"]}

    def save_prefix(self, path: Path, model_sha256: str) -> dict:
        """Save the shared prefix the last answer evaluated (its KV state + `<path>.json` saying what it is
        valid for). Only the batched engine keeps a prefix sequence."""
        from framework.batch import prefix_meta

        if self.batcher is None or not self.batcher.prefix:
            raise ModelError("no shared prefix to save: answer once on the batched engine (parallel > 1) first")
        import hashlib

        size = self.batcher.save_prefix(path)
        meta = {**prefix_meta(model_sha256, self.prefix_settings(), len(self.batcher.prefix)), "bytes": size,
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        return meta

    def load_prefix(self, path: Path, model_sha256: str) -> int:
        """Load a saved prefix, refusing one made for another model file or settings (ModelError)."""
        from framework.batch import check_prefix_meta

        if self.batcher is None:
            raise ModelError(f"{path}: a saved prefix needs the batched engine (parallel > 1)")
        check_prefix_meta(path, model_sha256, self.prefix_settings())
        return self.batcher.load_prefix(path)

    def _fill_batched(self, messages: list[dict], steps: list, *, temperature: float,
                      max_tokens: int | None) -> tuple[str, dict, str, CallStats]:
        """`fill` on the batched engine: enums and booleans picked from their closed sets."""
        from framework.batch import Choice, Free, Part

        tokens, shared = self.prompt_split(messages)
        parts = [Part(step.prefix, Choice(list(step.options), score=self.score) if step.options else
                      Free(step.grammar), step.kind) for step in steps]
        outcome = self._submit(tokens, shared, parts, max_tokens=max_tokens or (1 << 20), temperature=temperature,
                               seed=self.settings["seed"])
        answer = ""
        on_value = _on_value.get()
        for step, part in zip(steps, outcome.parts, strict=False):
            answer += step.prefix + (structured._close(part.text, step.kind) if part.finish == "length" else part.text)
            if on_value is not None and part.finish != "length":
                on_value(step.name, part.text)
        if outcome.finish == "length" and len(outcome.parts) < len(steps):
            answer += steps[len(outcome.parts)].prefix + "null"
        stats = _outcome_stats(outcome)
        stats.confidence = {step.name: part.confidence for step, part in zip(steps, outcome.parts, strict=False)
                            if part.confidence is not None} or None
        return answer + "}", _usage(stats), outcome.finish, stats

    def _submit(self, tokens: list[int], shared: int, parts: list, **kwargs):
        assert self.batcher is not None
        return self.batcher.submit(tokens, parts, shared=shared, stop_at=_deadline.get(), **kwargs)

    def _grammar_for(self, response_format: dict | None):
        """A compiled llama.cpp grammar for DSPy's response_format, cached per schema."""
        if not response_format:
            return None
        from llama_cpp import LlamaGrammar
        from llama_cpp.llama_grammar import JSON_GBNF

        schema = response_format.get("schema") if response_format.get("type") == "json_schema" else None
        key = json.dumps(schema, sort_keys=True) if schema is not None else "json_object"
        if key not in self._grammars:
            if schema is None:
                self._grammars[key] = LlamaGrammar.from_string(JSON_GBNF, verbose=False)
            else:
                self._grammars[key] = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
        return self._grammars[key]


def _outcome_stats(outcome) -> CallStats:
    return CallStats(latency_ms=outcome.latency_ms, tokens_in_new=outcome.prompt_new,
                     tokens_in_cached=outcome.prompt_cached, tokens_out=outcome.generated,
                     finish_reason=outcome.finish)


def _chat_messages(request) -> list[dict]:
    messages = []
    if request.system is not None:
        system = request.system if isinstance(request.system, str) else "".join(
            getattr(part, "text", "") or "" for part in request.system)
        messages.append({"role": "system", "content": system})
    for message in request.messages:
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": message.text or ""})
    return messages


def _usage(stats: CallStats) -> dict:
    return {"prompt_tokens": stats.tokens_in, "completion_tokens": stats.tokens_out,
            "total_tokens": stats.tokens_in + stats.tokens_out, "cached_tokens": stats.tokens_in_cached}


def respond(model: str, text: str, stats: CallStats, schema: dict | None):
    """Finish one engine call: keep the raw text and its schema problems on `stats`, record it, and
    wrap the text as DSPy's `Response`. Every engine (the real one, a test's fake) ends here, so
    format validity is judged on what the model wrote, not on what DSPy managed to parse."""
    from dspy.lm15 import Message, Response, TextPart, Usage

    stats.raw_text = text
    stats.format_problems = structured.schema_problems(schema, text) if schema is not None else None
    record(stats)
    return Response(
        id=None, model=model, message=Message.assistant([TextPart(text)]),
        finish_reason="length" if stats.finish_reason == "length" else "stop",
        usage=Usage(input_tokens=stats.tokens_in, output_tokens=stats.tokens_out,
                    total_tokens=stats.tokens_in + stats.tokens_out),
    )


def chat_tokens(render: Callable[[list[dict]], str], messages: list[dict], tokenize, *, bos: int,
                add_bos: bool, shared: list[int] | None = None) -> list[int]:
    """Token ids of a chat prompt in which no message content can become a control token.

    `render` applies the chat template to messages. It runs once with each message's content
    replaced by a unique placeholder; the rendered text is then tokenized piece by piece: the
    template's own text with special tokens parsed (`<|im_start|>` there is the real control
    token), each message's content as plain text (`<|im_start|>` typed into a ticket stays the
    characters it is). `tokenize(bytes, add_bos, special)` is `Llama.tokenize`. The prompt starts
    with exactly one BOS when the model adds one (`add_bos`), whether or not the template already
    renders `bos_token`. `shared`, if given, receives the number of tokens before the last
    message's content (the prefix that requests of one program have in common).
    """
    nonce = secrets.token_hex(8)
    marks = {f"SLIPWAY{nonce}M{index}E": message.get("content") or "" for index, message in enumerate(messages)}
    rendered = render([{**message, "content": mark} for mark, message in zip(marks, messages, strict=True)])
    tokens: list[int] = []
    last = list(marks)[-1] if marks else None
    before_last = 0
    for piece in re.split(f"(SLIPWAY{nonce}M\\d+E)", rendered):
        if piece == last:
            before_last = len(tokens)
        if piece in marks:
            tokens += tokenize(marks[piece].encode(), add_bos=False, special=False)
        elif piece:
            tokens += tokenize(piece.encode(), add_bos=False, special=True)
    if add_bos and bos != -1 and tokens[:1] != [bos]:
        tokens.insert(0, bos)
        before_last += 1
    if shared is not None:
        shared.append(before_last)
    return tokens


_SCHEMA_KEYS = {"max_length": "maxLength", "min_length": "minLength", "ge": "minimum", "le": "maximum",
                "gt": "exclusiveMinimum", "lt": "exclusiveMaximum", "pattern": "pattern"}


def json_adapter():
    """DSPy's JSONAdapter, keeping field constraints in the response schema.

    `dspy.OutputField(max_length=60)` shows the limit in the prompt, but DSPy
    3.4 drops it from the structured-output schema. Put back, it becomes part
    of the llama.cpp grammar: the model cannot write a 400-character "short"
    reason, which on a 2-core CPU is the difference between 2 s and 6 s a ticket.
    """
    import dspy

    class GrammarJSONAdapter(dspy.JSONAdapter):
        def format_field_structure(self, signature):
            # The output reminder DSPy appends after every input moves into the system prompt: the
            # grammar enforces the format anyway, and in the shared prefix llama.cpp evaluates it once
            # instead of ~70 tokens per request (~1 s on 2 cores).
            reminder = super().user_message_output_requirements(signature)
            return super().format_field_structure(signature) + "\n\n" + reminder

        def user_message_output_requirements(self, signature):
            return None

        def _prepare_response_format(self, lm, lm_kwargs, signature):
            super()._prepare_response_format(lm, lm_kwargs, signature)
            model = lm_kwargs.get("response_format")
            if not (isinstance(model, type) and hasattr(model, "model_json_schema")):
                return
            schema = model.model_json_schema()
            for name, field in signature.output_fields.items():
                prop = schema.get("properties", {}).get(name)
                for meta in field.metadata if prop is not None else ():
                    for attr, key in _SCHEMA_KEYS.items():
                        if getattr(meta, attr, None) is not None:
                            prop[key] = getattr(meta, attr)
            model.model_json_schema = lambda *args, **kwargs: schema

    return GrammarJSONAdapter()


_ENGINES: dict[tuple, LlamaCppEngine] = {}
_ENGINES_LOCK = threading.Lock()


@atexit.register
def _close_engines() -> None:
    """Free models before interpreter teardown; llama_cpp's __del__ fails noisily once ctypes is gone."""
    for engine in _ENGINES.values():
        with contextlib.suppress(Exception):
            engine._llama.close()
    _ENGINES.clear()


def load_engine(spec: ModelSpec, path: Path, *, gpu_layers: int | None = None) -> LlamaCppEngine:
    """One engine per (file, settings) per process: loading a GGUF takes seconds and memory."""
    layers = spec.gpu_layers if gpu_layers is None else gpu_layers
    key = (str(path), spec.context_size, spec.threads, layers, spec.seed, spec.parallel, spec.batch_size)
    with _ENGINES_LOCK:
        if key not in _ENGINES:
            _ENGINES[key] = LlamaCppEngine(path, context_size=spec.context_size, threads=spec.threads,
                                           gpu_layers=layers, seed=spec.seed, name=spec.name,
                                           parallel=spec.parallel, batch_size=spec.batch_size)
        return _ENGINES[key]


def make_lm(spec: ModelSpec, path: Path, *, gpu_layers: int | None = None):
    """A `dspy.LM` (a `dspy.BaseLM`) that runs on the local GGUF.

    DSPy's response cache is off: a check must measure the model, not a disk cache.
    """
    import dspy

    engine = load_engine(spec, path, gpu_layers=gpu_layers)
    return dspy.LM(model=f"llamacpp/{spec.name}", engine=engine, cache=False, temperature=spec.temperature,
                   max_tokens=spec.max_tokens, num_retries=0)
