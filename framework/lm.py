"""DSPy over llama.cpp, in process: no HTTP hop, no LiteLLM round trip.

DSPy 3.4 deprecates `BaseLM.forward` subclasses in favour of an *engine*
(`complete(Request) -> Response`) handed to `dspy.LM(engine=...)`, which is
itself the `dspy.BaseLM`. `LlamaCppEngine` is that engine: it owns one
`llama_cpp.Llama`, loads it once, serialises calls with a lock (one llama.cpp
context is not safe under concurrent decode), turns DSPy's structured-output
request into a llama.cpp JSON-schema grammar so typed outputs always parse, and
records tokens and latency per call for the eval harness and the service.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from framework import structured
from framework.errors import ModelError, ModelTimeout, SlipwayError
from framework.spec import ModelSpec


@dataclass
class CallStats:
    """What one model call cost: the raw material of latency/token/cost clauses."""

    latency_ms: float
    tokens_in: int
    tokens_out: int
    finish_reason: str


_meter: contextvars.ContextVar[list[CallStats] | None] = contextvars.ContextVar("slipway_meter", default=None)


_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("slipway_deadline", default=None)


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
                 skeleton: bool = True):
        self.model_path = str(model_path)
        self.name = name
        self.settings = {"context_size": context_size, "threads": threads, "gpu_layers": gpu_layers, "seed": seed}
        self._lock = threading.Lock()
        self._grammars: dict[str, Any] = {}
        self.skeleton = skeleton  # see framework/structured.py; False = llama.cpp's full-schema grammar
        self._llama = self._load(verbose)
        self._formatter = self._chat_formatter()

    def _load(self, verbose: bool):
        if not Path(self.model_path).exists():
            raise ModelError(f"model file {self.model_path} is missing",
                             hint="run `slipway models pull <project>`")
        import llama_cpp

        try:
            return llama_cpp.Llama(
                model_path=self.model_path,
                n_ctx=self.settings["context_size"],
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
        from dspy.lm15 import Message, Response, TextPart, Usage

        messages = _chat_messages(request)
        config = request.config
        kwargs: dict[str, Any] = {
            "temperature": config.temperature if config.temperature is not None else 0.0,
            "max_tokens": config.max_tokens,
            "stop": list(config.stop) or None,
        }
        if config.top_p is not None:
            kwargs["top_p"] = config.top_p
        if config.seed is not None:
            kwargs["seed"] = config.seed
        schema = (config.response_format or {}).get("schema") if (config.response_format or {}).get(
            "type") == "json_schema" else None
        steps = structured.plan(schema) if schema is not None and self.skeleton else None
        if steps is not None:
            text, usage, finish, stats = self.fill(messages, steps, temperature=kwargs["temperature"],
                                                   max_tokens=kwargs["max_tokens"])
        else:
            grammar = self._grammar_for(config.response_format)
            text, usage, finish, stats = self.chat(messages, grammar=grammar, **kwargs)
        return Response(
            id=None, model=self.name, message=Message.assistant([TextPart(text)]),
            finish_reason="length" if finish == "length" else "stop",
            usage=Usage(input_tokens=usage["prompt_tokens"], output_tokens=usage["completion_tokens"],
                        total_tokens=usage["total_tokens"]),
        )

    def stream(self, request):
        from dspy.lm15 import response_to_events

        return response_to_events(self.complete(request))

    def close(self) -> None:
        pass  # the model lives as long as the process; closing would break shared copies

    # -- plain calls (used by the engine, the service and benchmarks) -------------
    def chat(self, messages: list[dict], *, grammar=None, **kwargs) -> tuple[str, dict, str, CallStats]:
        """One chat completion under the lock; returns text, usage, finish reason and stats."""
        with _holding(self._lock):
            start = time.perf_counter()
            result = self._llama.create_chat_completion(messages=messages, grammar=grammar, **kwargs)
            latency_ms = (time.perf_counter() - start) * 1000
        choice = result["choices"][0]
        usage = result["usage"]
        stats = CallStats(latency_ms=latency_ms, tokens_in=usage["prompt_tokens"],
                          tokens_out=usage["completion_tokens"], finish_reason=choice.get("finish_reason") or "stop")
        calls = _meter.get()
        if calls is not None:
            calls.append(stats)
        return choice["message"]["content"] or "", usage, stats.finish_reason, stats

    def fill(self, messages: list[dict], steps: list, *, temperature: float,
             max_tokens: int | None) -> tuple[str, dict, str, CallStats]:
        """Structured answer with the JSON skeleton forced (framework/structured.py), under the lock."""
        if self._formatter is None:
            raise ModelError(f"{self.model_path} has no chat template; set skeleton=False")
        prompt = self._formatter(messages=messages).prompt
        with _holding(self._lock):
            start = time.perf_counter()
            end = _deadline.get()
            text, finish, _ = structured.decode(self._llama, prompt, steps, max_tokens=max_tokens,
                                                temperature=temperature, grammar_cache=self._grammars,
                                                stop_at=end)
            if finish == "deadline":
                raise _timed_out(f"after {(time.perf_counter() - start):.1f} s of generation")
            latency_ms = (time.perf_counter() - start) * 1000
            tokens_in = len(self._llama.tokenize(prompt.encode(), special=True))
            tokens_out = len(self._llama.tokenize(text.encode(), add_bos=False))
        stats = CallStats(latency_ms=latency_ms, tokens_in=tokens_in, tokens_out=tokens_out, finish_reason=finish)
        calls = _meter.get()
        if calls is not None:
            calls.append(stats)
        usage = {"prompt_tokens": tokens_in, "completion_tokens": tokens_out, "total_tokens": tokens_in + tokens_out}
        return text, usage, finish, stats

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
    key = (str(path), spec.context_size, spec.threads, layers, spec.seed)
    with _ENGINES_LOCK:
        if key not in _ENGINES:
            _ENGINES[key] = LlamaCppEngine(path, context_size=spec.context_size, threads=spec.threads,
                                           gpu_layers=layers, seed=spec.seed, name=spec.name)
        return _ENGINES[key]


def make_lm(spec: ModelSpec, path: Path, *, gpu_layers: int | None = None):
    """A `dspy.LM` (a `dspy.BaseLM`) that runs on the local GGUF.

    DSPy's response cache is off: a check must measure the model, not a disk cache.
    """
    import dspy

    engine = load_engine(spec, path, gpu_layers=gpu_layers)
    return dspy.LM(model=f"llamacpp/{spec.name}", engine=engine, cache=False, temperature=spec.temperature,
                   max_tokens=spec.max_tokens, num_retries=0)
