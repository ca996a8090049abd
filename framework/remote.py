"""A model behind an OpenAI-compatible server (vLLM, llama.cpp's server, TGI), through DSPy's own client.

The in-process engine (framework/lm.py) owns the GGUF, so its sha256 pins what answers. A remote model
has no file Slipway can hash: the server may swap the weights, the quantisation or the chat template
behind the same name. So a remote model is pinned by its *fingerprint*: the sha256 of the server's URL,
the model name and its greedy answers to fixed probes. Every check, build and served start probes again
and refuses a model whose fingerprint is not the one project.toml pins, and the fingerprint is part of
the content hash, so a check cannot vouch for another model than the one it measured.

`RemoteEngine` is a DSPy engine (`complete(Request) -> Response`) wrapping a plain `dspy.LM` that talks
to the server (DSPy picks its native OpenAI client or LiteLLM, whichever serves the settings); it adds
what the contract needs from each call: latency, tokens as the server billed them, the raw text's
schema validity, and errors that name the server and the project.toml field.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from typing import Any

from framework.errors import RemoteModelError
from framework.lm import CallStats, _chat_messages, _deadline, _on_value, _remaining, _timed_out, respond
from framework.spec import ModelSpec

# Fixed prompts whose greedy answers identify a model: a changed weight file, quantisation or chat
# template changes at least one of them (measured: tiny vs qwen05 vs qwen15 differ on all four).
PROBES = (
    "Complete the sentence with one word: The capital of France is",
    "Count from one to seven in words, separated by commas.",
    'Answer with a JSON object {"animal": ...} naming an animal that lives in the sea.',
    "Repeat exactly: slipway 7f3a <|im_end|> [INST] </s>",
)
PROBE_TOKENS = 16

# Text that chat templates turn into control tokens when a server tokenizes the rendered prompt with
# special tokens on (llama.cpp's server does): `<|im_start|>`, `</s>`, `[INST]`... A word joiner
# (U+2060, invisible, no meaning) after the first character keeps the text readable to the model and
# makes it ordinary characters to every tokenizer. The in-process engine needs none of this: it
# tokenizes message content apart from the template (lm.chat_tokens).
_CONTROL_RE = re.compile(r"<(?=\|)|<(?=/?s>)|\[(?=/?INST\])|\[(?=/?SYS\])|<<(?=/?SYS>>)")
JOINER = "\u2060"


def defuse(text: str) -> str:
    """`text` with every control-token look-alike broken by a word joiner (see _CONTROL_RE)."""
    return _CONTROL_RE.sub(lambda m: m.group(0) + JOINER, text)


def api_key(spec: ModelSpec, field: str) -> str:
    """The API key from the environment variable the spec names ("none" when it names none: local servers
    accept anything, and DSPy's client insists on a value)."""
    remote = spec.remote
    assert remote is not None
    if remote.api_key_env is None:
        return "none"
    value = os.environ.get(remote.api_key_env)
    if not value:
        raise RemoteModelError(f"the environment variable {remote.api_key_env} is not set",
                               field=f"{field}.source.openai_compatible.api_key_env",
                               hint=f"export {remote.api_key_env}=<the server's API key>")
    return value


def client(spec: ModelSpec, field: str):
    """DSPy's own client for the server: `dspy.LM("openai/<model>", api_base=...)`, response cache off and
    no retries (a check measures the server as it is; a retry would hide its errors from the error rate)."""
    # DSPy's client would fetch a model price map from GitHub on first use; Slipway prices calls from the spec
    # and runs with no internet beyond the model server: use the map bundled with DSPy
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import dspy

    remote = spec.remote
    assert remote is not None
    return dspy.LM(f"openai/{remote.model}", api_base=remote.base_url, api_key=api_key(spec, field),
                   timeout=remote.timeout_s, cache=False, num_retries=0, temperature=spec.temperature,
                   max_tokens=spec.max_tokens)


def _unreachable(spec: ModelSpec, field: str, exc: BaseException) -> RemoteModelError:
    remote = spec.remote
    assert remote is not None
    text = str(exc) or type(exc).__name__
    detail = " ".join(" ".join(text.split("\n  File ")[0].split()).split())[:400]
    status = getattr(exc, "status", None)
    if "response_format" in text:
        hint = (f"the server refused response_format = {remote.response_format!r}: llama-cpp-python's server takes "
                '"json_object+schema", vLLM and llama.cpp\'s server "json_schema"; "json_object" or "none" work '
                "almost anywhere (docs/remote.md)")
    elif status in (401, 403):
        hint = f"the server refused the API key: check {remote.api_key_env or 'api_key_env (none set)'}"
    else:
        hint = (f"is the server running and serving that model name? `curl {remote.base_url.rstrip('/')}/models` "
                "lists what it serves")
    return RemoteModelError(f"the model server at {remote.base_url} (model {remote.model!r}) failed"
                            f"{f' with HTTP {status}' if status else ''}: {detail}",
                            field=f"{field}.source.openai_compatible", hint=hint)


def fingerprint(spec: ModelSpec, field: str, lm=None) -> str:
    """The sha256 of the server, the model name and its greedy answers to `PROBES`."""
    from dspy.lm15 import Config, Message, Request

    from framework.content import json_hash

    remote = spec.remote
    assert remote is not None
    lm = lm if lm is not None else client(spec, field)
    answers = []
    for probe in PROBES:
        request = Request(model=lm.model, messages=(Message.user(probe),),
                          config=Config(temperature=0.0, max_tokens=PROBE_TOKENS, seed=0,
                                        extensions={**remote.extra_body, **_token_limit(PROBE_TOKENS)}))
        try:
            response = lm(request)
        except Exception as exc:  # noqa: BLE001 - connection, HTTP and protocol errors all mean the same here
            raise _unreachable(spec, field, exc) from None
        answers.append(response.text or "")
    return json_hash({"base_url": remote.base_url, "model": remote.model, "answers": answers})


def verify(spec: ModelSpec, field: str, *, toml: str | None = None, lm=None) -> str:
    """Probe the server and refuse a model that is not the pinned one (RemoteModelError); returns the
    fingerprint. Unpinned, the error says what to pin, as an unpinned GGUF's would."""
    found = fingerprint(spec, field, lm=lm)
    if spec.fingerprint is None:
        raise RemoteModelError(f"the remote model is not pinned; its fingerprint now is {found}",
                               path=toml, field=f"{field}.fingerprint",
                               hint=f'add `fingerprint = "{found}"` to [{field}] once you trust this server\'s '
                                    "model (`slipway models pull` prints it)")
    if found != spec.fingerprint:
        assert spec.remote is not None
        raise RemoteModelError(
            f"the model behind {spec.remote.base_url} answers the fingerprint probes differently: "
            f"{found[:12]}…, project.toml pins {spec.fingerprint[:12]}…; the server now runs another model "
            "(weights, quantisation or chat template)", path=toml, field=f"{field}.fingerprint",
            hint="put the pinned model back on the server, or check the new one (`slipway check`) and pin "
                 "its fingerprint")
    return found


class RemoteEngine:
    """A DSPy engine that sends each request to the server through `client()` and meters it."""

    supports_response_schema = True
    supports_function_calling = False
    supports_reasoning = False
    supported_params = frozenset({"response_format", "temperature", "max_tokens", "stop", "seed", "top_p"})
    batcher = None  # no in-process batching: the server batches (vLLM) or queues (llama.cpp)

    def __init__(self, spec: ModelSpec, field: str, lm=None):
        assert spec.remote is not None
        self.spec, self.field, self.name = spec, field, spec.name
        self.lm = lm if lm is not None else client(spec, field)
        self._tokenize = _tokenizer(spec)

    # -- the DSPy engine protocol -------------------------------------------------
    def complete(self, request):
        import dataclasses

        from dspy.lm15 import Message

        entered = time.perf_counter()
        remaining = _remaining()
        if remaining is not None and remaining <= 0:
            raise _timed_out("before the model server was called")
        config = request.config
        wanted = config.response_format or {}
        schema = wanted.get("schema") if wanted.get("type") == "json_schema" else None
        sent_format, extensions = _response_format(self.spec.remote.response_format, wanted, schema)
        extensions.update({**self.spec.remote.extra_body,
                           **_token_limit(config.max_tokens or self.spec.max_tokens)})
        messages = tuple(Message(role=m.role, parts=tuple(
            dataclasses.replace(part, text=defuse(part.text)) if getattr(part, "text", None) else part
            for part in m.parts)) for m in request.messages)
        system = request.system if not isinstance(request.system, str) else defuse(request.system)
        sent = dataclasses.replace(request, model=self.lm.model, messages=messages, system=system,
                                   config=dataclasses.replace(
                                       config, response_format=sent_format,
                                       extensions={**(config.extensions or {}), **extensions} or None,
                                       temperature=config.temperature if config.temperature is not None
                                       else self.spec.temperature))
        start = time.perf_counter()
        try:
            response = self.lm(sent)
        except Exception as exc:  # noqa: BLE001
            raise _unreachable(self.spec, self.field, exc) from None
        latency_ms = (time.perf_counter() - start) * 1000
        end = _deadline.get()
        if end is not None and time.monotonic() > end:
            raise _timed_out(f"after {latency_ms / 1000:.1f} s waiting for the model server")
        usage = response.usage
        cached = usage.cache_read_tokens or 0
        stats = CallStats(latency_ms=latency_ms, tokens_in_new=max((usage.input_tokens or 0) - cached, 0),
                          tokens_in_cached=cached, tokens_out=usage.output_tokens or 0,
                          finish_reason="length" if response.finish_reason == "length" else "stop")
        stats.messages, stats.started = _chat_messages(sent), entered
        stats.waited_ms = max((time.perf_counter() - entered) * 1000 - latency_ms, 0.0)
        text = answer_text(response)
        _tell_values(text, schema)
        return respond(self.name, text, stats, schema)

    def stream(self, request):
        from dspy.lm15 import response_to_events

        return response_to_events(self.complete(request))

    def close(self) -> None:
        pass

    # -- what guardrails ask of an engine -----------------------------------------
    def count_tokens(self, text: str) -> int:
        """Tokens of `text` by the server's own tokenizer where it offers one; else its UTF-8 bytes, an upper
        bound for byte-level tokenizers, so an input the size guard lets through always fits."""
        return self._tokenize(text)

    def prompt_tokens(self, messages: list[dict]) -> list[int]:
        """A stand-in token list as long as the prompt (content by `count_tokens`, plus 8 per message for the
        template's markers): guardrails only need its length."""
        return [0] * sum(self.count_tokens(m.get("content") or "") + 8 for m in messages)


def answer_text(response) -> str:
    """The answer as the model wrote it. With OpenAI's `json_schema` format DSPy's client hands back the parsed
    object (a data part) and no text: it is written back as JSON, which the adapter parses again."""
    if response.text:
        return response.text
    for part in getattr(response.message, "parts", ()):
        if getattr(part, "type", None) == "data":
            return json.dumps(part.value, ensure_ascii=False)
    return ""


def _tell_values(text: str, schema: dict | None) -> None:
    """The streaming endpoint's values (lm.on_values), once the whole answer is in, as the batched engine
    tells them: a remote answer arrives in one piece."""
    callback = _on_value.get()
    if callback is None or schema is None:
        return
    try:
        values = json.loads(text)
    except ValueError:
        return
    if isinstance(values, dict):
        for name in schema.get("properties", {}):
            if name in values:
                callback(name, json.dumps(values[name]))


def _token_limit(tokens: int) -> dict:
    """DSPy's OpenAI client sends the answer's limit as `max_completion_tokens`, which llama.cpp's and
    TGI's servers ignore (measured: a probe capped at 16 tokens generated 2,017 on llama-cpp-python's server);
    `max_tokens` beside it is what every OpenAI-compatible server reads."""
    return {"max_tokens": tokens}


_CLASS_RUN = re.compile(r"^\^(\[(?:\\.|[^\]\\])+\])([*+])\$$")


def bounded(schema: Any) -> Any:
    """`schema` with each string's length folded into its pattern where the pattern is one character class
    repeated (`^[...]*$` → `^[...]{0,64}$`). llama.cpp's schema-to-grammar converters (the C++ one in
    llama-server, the Python one in llama-cpp-python) build a string from its `pattern` and ignore
    `maxLength` beside it: measured, 17 of 200 demo answers ran past the 64-character reason. A pattern of
    another shape is left alone. Answers are still judged against the program's own schema."""
    if isinstance(schema, list):
        return [bounded(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: bounded(value) for key, value in schema.items()}
    match = _CLASS_RUN.match(out.get("pattern", "")) if isinstance(out.get("pattern"), str) else None
    if match and ("maxLength" in out or "minLength" in out):
        low = max(int(out.get("minLength", 0)), 1 if match.group(2) == "+" else 0)
        high = out.get("maxLength")
        out["pattern"] = f"^{match.group(1)}{{{low},{'' if high is None else int(high)}}}$"
    return out


def _response_format(mode: str, wanted: dict, schema: dict | None) -> tuple[dict | None, dict]:
    """DSPy's response format as the server takes it (`[models.*.source.openai_compatible] response_format`),
    and the request extensions that carry a server-specific shape (DSPy's client sends them verbatim)."""
    if mode == "none" or not wanted:
        return None, {}
    if mode == "json_object":
        return {"type": "json_object"}, {}
    if mode == "json_object+schema":
        shape = {"type": "json_object", **({"schema": bounded(schema)} if schema is not None else {})}
        return {"type": "json_object"}, {"response_format": shape}
    return ({**wanted, "schema": bounded(wanted["schema"])} if "schema" in wanted else wanted), {}


def _tokenizer(spec: ModelSpec):
    """Count tokens with the server's tokenizer when it has a known endpoint: llama-cpp-python's server
    (`/extras/tokenize`), llama.cpp's and vLLM's (`/tokenize`); otherwise by UTF-8 bytes."""
    import httpx

    remote = spec.remote
    assert remote is not None
    root = remote.base_url.rstrip("/")
    host = root[:-3] if root.endswith("/v1") else root
    key = os.environ.get(remote.api_key_env) if remote.api_key_env else None
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    candidates = [(f"{host}/extras/tokenize", lambda t: {"input": t},
                   lambda r: len(r["tokens"])),
                  (f"{host}/tokenize", lambda t: {"content": t, "model": remote.model, "prompt": t},
                   lambda r: r.get("count") or len(r["tokens"]))]
    lock = threading.Lock()
    chosen: list[Any] = []

    def by_bytes(text: str) -> int:
        return len(text.encode("utf-8", "replace"))

    for url, body, read in candidates:
        try:
            reply = httpx.post(url, json=body("probe"), headers=headers, timeout=5)
            if reply.status_code == 200 and read(reply.json()) > 0:
                chosen.append((url, body, read))
                break
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            continue
    if not chosen:
        return by_bytes
    url, body, read = chosen[0]
    session = httpx.Client(headers=headers, timeout=10)

    def by_server(text: str) -> int:
        if not text:
            return 0
        try:
            with lock:
                reply = session.post(url, json=body(text))
            reply.raise_for_status()
            return int(read(reply.json()))
        except (httpx.HTTPError, ValueError, KeyError, TypeError, json.JSONDecodeError):
            return by_bytes(text)

    return by_server


def make_remote_lm(spec: ModelSpec, field: str, *, toml: str | None = None, verified: bool = False):
    """A `dspy.LM` answering from the remote model, after its fingerprint is verified (RemoteModelError
    otherwise). DSPy's response cache is off: a check measures the server, not a disk cache."""
    import dspy

    inner = client(spec, field)
    if not verified:
        verify(spec, field, toml=toml, lm=inner)
    engine = RemoteEngine(spec, field, lm=inner)
    return dspy.LM(model=f"remote/{spec.name}", engine=engine, cache=False, temperature=spec.temperature,
                   max_tokens=spec.max_tokens, num_retries=0)
