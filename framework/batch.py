"""Several sequences decoded together in one llama.cpp context: the batched engine.

On a CPU, one decode step of a 1.5B model is memory-bound: reading the weights
costs the same whether one sequence or eight advance by a token, so sequences
decoded together cost little more than one. llama.cpp's own server gets its
throughput from this (parallel slots, continuous batching, a prompt cache);
`Batcher` does the same in process, through llama-cpp-python's low-level API:

- one context with `parallel` sequence slots over a unified KV cache;
- sequence 0 holds the shared instruction prefix (everything before the last
  message's content), evaluated once and *shared* into each new sequence with
  `llama_memory_seq_cp` (in a unified cache the cells are tagged, not copied);
  it can be saved to and loaded from a file (`save_prefix`/`load_prefix`), so a
  served bento is ready after load, without a warm-up generation;
- a scheduler thread builds one `llama_batch` per step from every admitted
  sequence: one token for each decoding sequence, prompt chunks for the rest up
  to `batch_size`; new requests join as others finish (continuous batching);
- admission is FIFO and bounded: a request waits until a slot and KV room are
  free, never overtaken by a later one, and fails with a timeout at its
  deadline whether queued or mid-generation;
- each sequence has its own grammar state; a grammar dead end fails that
  sequence only;
- closed-set values (enums, booleans) are picked from a token trie of the
  allowed answers: only branch points need the model's logits, the rest of an
  answer is forced and evaluated with the next skeleton text in one chunk.
  At temperature 0 this is the same argmax the sequential engine's grammar
  takes, over the canonical tokenisations of the allowed values.

Greedy answers can still differ from the sequential engine's: a token's logits
computed in a batch of another size are summed in another order, and near-ties
flip. bench/engine.py counts the flips on the demo eval set (BENCHMARKS.md).
"""

from __future__ import annotations

import ctypes
import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from framework.confidence import Branch, confidence, value_of
from framework.errors import ModelError, ModelTimeout

logger = logging.getLogger("slipway.batch")

PREFIX_SEQ = 0  # the sequence that holds the shared prefix; slots are 1..parallel


@dataclass
class Choice:
    """A closed set of allowed value texts (an enum's JSON strings, `true`/`false`)."""

    options: list[str]
    score: bool = True  # record the model's probability of the picked value (framework/confidence.py)


@dataclass
class Free:
    """A generated value: sampled token by token under `grammar` (GBNF text; None = unconstrained)."""

    grammar: str | None


@dataclass
class Part:
    """Text the engine forces (a JSON skeleton piece), then one value the model chooses or writes."""

    forced: str
    value: Choice | Free
    kind: str = "string"  # enum | boolean | integer | string | text (see structured.Step)


@dataclass
class PartResult:
    text: str
    finish: str  # stop | length
    confidence: float | None = None  # a closed-set value's probability among the allowed values


@dataclass
class Outcome:
    """What one request produced and what it cost (the batched `structured.Decoded`)."""

    parts: list[PartResult]
    finish: str          # stop | length
    generated: int       # value tokens the model chose (sampled or picked from a closed set)
    prompt_new: int      # prompt and forced tokens this request evaluated
    prompt_cached: int   # prompt tokens shared from the prefix sequence
    latency_ms: float    # from admission to the last token
    waited_ms: float     # queued before admission


class _Node:
    __slots__ = ("children", "option", "values")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.option: str | None = None
        self.values: frozenset[str] = frozenset()  # the JSON values reachable from here (confidence.value_of)


def _trie(options: list[str], tokenize) -> _Node:
    root = _Node()
    for option in options:
        node = root
        root.values |= {value_of(option)}
        for token in tokenize(option):
            node = node.children.setdefault(token, _Node())
            node.values |= {value_of(option)}
        node.option = option
    return root


@dataclass
class _Job:
    prompt: list[int]
    shared: int                 # prompt tokens that may come from the prefix sequence
    parts: list[Part]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: list[str] | None
    stop_at: float | None
    submitted: float = field(default_factory=time.perf_counter)
    done: threading.Event = field(default_factory=threading.Event)
    outcome: Outcome | None = None
    error: BaseException | None = None
    # scheduler state
    slot: int = -1
    admitted: float = 0.0
    pending: list[int] = field(default_factory=list)
    pos: int = 0
    wants_logits: bool = False
    part: int = -1
    node: _Node | None = None
    grammar: object | None = None
    ids: list[int] = field(default_factory=list)
    results: list[PartResult] = field(default_factory=list)
    generated: int = 0
    new: int = 0
    cached: int = 0
    reserve: int = 0
    rng: np.random.Generator | None = None
    branches: list = field(default_factory=list)   # confidence.Branch at each pick of the current Choice
    evaluated: list[int] = field(default_factory=list)  # every token this sequence put into llama.cpp


class Batcher:
    """One llama.cpp context decoding up to `parallel` sequences together (see the module doc).

    `llama` is a loaded `llama_cpp.Llama`: its model, vocabulary and tokenizer are shared; the
    Batcher makes its own context. `submit()` is thread-safe and blocks until the answer is done.
    """

    def __init__(self, llama, *, parallel: int, context_size: int, batch_size: int = 512,
                 threads: int | None = None):
        import llama_cpp

        self.lib = llama_cpp
        self.llama = llama
        self.parallel = parallel
        self.context_size = context_size
        self.batch_size = batch_size
        params = llama_cpp.llama_context_default_params()
        # Room for the shared prefix once and every slot's own tokens; admission (`reserve`) keeps the
        # sum inside it, so a long request waits for room instead of failing mid-decode.
        params.n_ctx = context_size * min(parallel, 4)
        params.n_batch = params.n_ubatch = batch_size
        params.n_seq_max = parallel + 1
        params.kv_unified = True
        # as llama_cpp.Llama (the sequential engine) has it: flash attention sums in another order
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        if threads:
            params.n_threads = params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(llama._model.model, params)
        if not self.ctx:
            raise ModelError(f"llama.cpp could not make a {parallel}-sequence context of {params.n_ctx} tokens",
                             field="models.*.parallel", hint="lower parallel or context_size")
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.vocab = llama._model.vocab
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.batch = llama_cpp.llama_batch_init(batch_size, 0, 1)
        self._candidates = (llama_cpp.llama_token_data * self.n_vocab)()
        self._candidate_view = np.ctypeslib.as_array(
            ctypes.cast(self._candidates, ctypes.POINTER(ctypes.c_uint8)),
            shape=(self.n_vocab * ctypes.sizeof(llama_cpp.llama_token_data),)).view(
            np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)]))
        self._candidate_view["id"] = np.arange(self.n_vocab, dtype=np.int32)
        self._one = (llama_cpp.llama_token_data * 1)()
        self.prefix: list[int] = []          # tokens held by PREFIX_SEQ
        self.last_sequence: list[int] = []   # the tokens of the last finished sequence, as llama.cpp saw them
        self._queue: deque[_Job] = deque()
        self._active: list[_Job] = []
        self._free = list(range(1, parallel + 1))
        self._cv = threading.Condition()
        self._busy = threading.Lock()
        self._tries: dict[tuple[str, ...], _Node] = {}
        self._forced: dict[str, list[int]] = {}
        self._closed = False
        self.steps = 0                        # llama_decode calls made (for benchmarks)
        self.step_log: deque[tuple[int, int, float]] = deque(maxlen=100_000)  # (tokens, logits read, seconds)
        # (submitted, admitted) time.perf_counter() of each request, in admission order: queue waits for
        # benchmarks, and what a test checks FIFO admission against
        self.admissions: deque[tuple[float, float]] = deque(maxlen=100_000)
        self._thread = threading.Thread(target=self._loop, name="slipway-batcher", daemon=True)
        self._thread.start()

    # -- public ------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.llama.tokenize(text.encode(), add_bos=False, special=False)

    def submit(self, prompt: list[int], parts: list[Part], *, shared: int = 0, max_tokens: int,
               temperature: float = 0.0, top_p: float | None = None, seed: int = 0,
               stop: list[str] | None = None, stop_at: float | None = None) -> Outcome:
        """Decode one request among the others; raises ModelTimeout past `stop_at` (time.monotonic())."""
        job = _Job(prompt=list(prompt), shared=max(0, min(shared, len(prompt) - 1)), parts=parts,
                   max_tokens=max(1, max_tokens), temperature=temperature,
                   top_p=0.95 if top_p is None else top_p, seed=seed, stop=stop, stop_at=stop_at)
        forced = sum(len(self._forced_tokens(p.forced)) for p in parts)  # cached: the same skeleton each time
        longest = sum(max((len(self.tokenize(o)) for o in p.value.options), default=0)
                      for p in parts if isinstance(p.value, Choice))
        if len(prompt) + forced >= self.context_size:
            raise ValueError(f"prompt of {len(prompt) + forced} tokens does not fit the context window of "
                             f"{self.context_size}")
        # the KV cells this request may add beyond the shared prefix (held once, in PREFIX_SEQ)
        job.reserve = min(len(prompt) + forced + longest + job.max_tokens, self.context_size) - job.shared
        with self._cv:
            if self._closed:
                raise ModelError("the model engine is closed")
            self._queue.append(job)
            self._cv.notify_all()
        while not job.done.wait(1.0):
            if not self._thread.is_alive():
                raise ModelError("the batching thread stopped", hint="see the log for its error")
        if job.error is not None:
            raise job.error
        assert job.outcome is not None
        return job.outcome

    def save_prefix(self, path: Path) -> int:
        """Write the prefix sequence's KV state and tokens to `path`; returns the bytes written."""
        with self._busy:
            tokens = (self.lib.llama_token * len(self.prefix))(*self.prefix)
            written = self.lib.llama_state_seq_save_file(self.ctx, str(path).encode(), PREFIX_SEQ, tokens,
                                                         len(self.prefix))
        if not written:
            raise ModelError(f"could not save the prefix state to {path}")
        return int(written)

    def load_prefix(self, path: Path) -> int:
        """Load a saved prefix state into the prefix sequence; returns its token count."""
        with self._busy:
            capacity = self.context_size
            tokens = (self.lib.llama_token * capacity)()
            count = ctypes.c_size_t(0)
            self.lib.llama_memory_seq_rm(self.mem, PREFIX_SEQ, -1, -1)
            read = self.lib.llama_state_seq_load_file(self.ctx, str(path).encode(), PREFIX_SEQ, tokens, capacity,
                                                      ctypes.byref(count))
            if not read:
                self.prefix = []
                raise ModelError(f"llama.cpp could not read the saved prefix state {path}",
                                 hint="rebuild the bento (`slipway build`)")
            self.prefix = list(tokens[: count.value])
            return len(self.prefix)

    def warm_prefix(self, prompt: list[int], shared: int) -> None:
        """Evaluate the shared prefix now (what a first request would otherwise pay)."""
        with self._busy:
            self._hold_prefix(prompt[:shared])

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)

    # -- the scheduler -------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._queue and not self._active:
                    self._cv.wait()
                if self._closed:
                    for job in list(self._queue) + self._active:
                        self._fail(job, ModelError("the model engine closed"))
                    return
                self._expire_queued()
                admitted = self._admissible()
                if not admitted and not self._active:
                    self._cv.wait(0.05)  # the head waits for room: poll its deadline
                    continue
            # submitters only touch the queue (under the condition); llama.cpp calls run under _busy
            with self._busy:
                try:
                    for job in admitted:
                        self._start(job)
                    self._expire_active()
                    self._step()
                except Exception as exc:  # noqa: BLE001 - fail the batch, keep the engine serving
                    logger.exception("batched decode step failed")
                    for job in list(self._active):
                        self._fail(job, ModelError(f"llama.cpp decode failed: {exc}"))

    def _expire_queued(self) -> None:
        now = time.monotonic()
        for job in [j for j in self._queue if j.stop_at is not None and now > j.stop_at]:
            self._queue.remove(job)
            self._finish_error(job, ModelTimeout("model call timed out waiting for the model (other requests "
                                                 "held it)", field="serve.timeout_s",
                                                 hint="raise serve.timeout_s, add workers, or send fewer "
                                                      "concurrent requests"))

    def _used(self) -> int:
        return len(self.prefix) + sum(job.reserve for job in self._active)

    def _admissible(self) -> list[_Job]:
        """Pop queued jobs that fit, in order: the head waits for room and nobody behind it goes first."""
        taken: list[_Job] = []
        used = self._used()
        while self._queue and len(self._free) > len(taken):
            job = self._queue[0]
            if (self._active or taken) and used + job.reserve > self.n_ctx:
                break
            taken.append(self._queue.popleft())
            used += job.reserve
        return taken

    def _start(self, job: _Job) -> None:
        job.slot = self._free.pop(0)
        job.admitted = time.perf_counter()
        self.admissions.append((job.submitted, job.admitted))
        job.rng = np.random.default_rng(job.seed)
        self._active.append(job)
        evaluated = self._hold_prefix(job.prompt[: job.shared])
        common = 0
        for a, b in zip(self.prefix, job.prompt[: len(job.prompt) - 1], strict=False):
            if a != b:
                break
            common += 1
        self.lib.llama_memory_seq_rm(self.mem, job.slot, -1, -1)
        if common:
            self.lib.llama_memory_seq_cp(self.mem, PREFIX_SEQ, job.slot, 0, common)
        job.pos = common
        job.evaluated = self.prefix[:common]
        job.pending = job.prompt[common:]
        # prefix tokens evaluated for this request are its own new tokens, as in the sequential engine
        shared_new = min(evaluated, common)
        job.cached = common - shared_new
        job.new = len(job.pending) + shared_new
        try:
            self._next_part(job)
        except ModelError as exc:
            self._finish_error(job, exc)

    def _expire_active(self) -> None:
        now = time.monotonic()
        for job in [j for j in self._active if j.stop_at is not None and now > j.stop_at]:
            self._finish_error(job, ModelTimeout(
                f"model call timed out after {time.perf_counter() - job.admitted:.1f} s of generation",
                field="serve.timeout_s", hint="raise serve.timeout_s, add workers, or send fewer concurrent requests"))
        for job in [j for j in self._active if j.wants_logits and not j.pending]:
            self._finish_error(job, ModelError("internal: a sequence asked for logits with nothing to evaluate"))

    def _hold_prefix(self, tokens: list[int]) -> int:
        """Make the prefix sequence hold `tokens` (a no-op when it already starts with them); returns
        how many tokens it had to evaluate."""
        if not tokens or self.prefix[: len(tokens)] == tokens:
            return 0
        common = 0
        for a, b in zip(self.prefix, tokens, strict=False):
            if a != b:
                break
            common += 1
        self.lib.llama_memory_seq_rm(self.mem, PREFIX_SEQ, common, -1)
        self.prefix = self.prefix[:common]
        for start in range(common, len(tokens), self.batch_size):
            chunk = tokens[start: start + self.batch_size]
            self._fill_batch([(PREFIX_SEQ, start + i, token, False) for i, token in enumerate(chunk)])
            if self.lib.llama_decode(self.ctx, self.batch) != 0:
                self.lib.llama_memory_seq_rm(self.mem, PREFIX_SEQ, -1, -1)
                self.prefix = []
                raise ModelError("llama.cpp could not evaluate the shared prompt prefix")
            self.steps += 1
            self.prefix = tokens[: start + len(chunk)]
        return len(tokens) - common

    def _fill_batch(self, rows: list[tuple[int, int, int, bool]]) -> None:
        batch = self.batch
        for i, (seq, pos, token, logits) in enumerate(rows):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        batch.n_tokens = len(rows)

    def _step(self) -> None:
        rows: list[tuple[int, int, int, bool]] = []
        readers: list[tuple[_Job, int]] = []
        budget = self.batch_size
        # decoding sequences first (one token each), then prompt chunks, in admission order
        for job in sorted(self._active, key=lambda j: len(j.pending) > 1):
            if budget <= 0 or not job.pending:
                continue
            take = job.pending[:budget]
            last = len(take) == len(job.pending)
            for i, token in enumerate(take):
                logits = last and i == len(take) - 1 and job.wants_logits
                if logits:
                    readers.append((job, len(rows)))
                rows.append((job.slot, job.pos + i, token, logits))
            job.pos += len(take)
            job.evaluated += take
            job.pending = job.pending[len(take):]
            budget -= len(take)
        if not rows:
            return
        self._fill_batch(rows)
        began = time.perf_counter()
        status = self.lib.llama_decode(self.ctx, self.batch)
        self.steps += 1
        self.step_log.append((len(rows), len(readers), time.perf_counter() - began))
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status} for a batch of {len(rows)} tokens")
        for job, index in readers:
            try:
                self._advance(job, index)
            except ModelError as exc:
                self._finish_error(job, exc)

    # -- one sequence's progress ------------------------------------------------------
    def _next_part(self, job: _Job) -> None:
        """Start the next part: queue its forced text, then walk as far as no choice is needed."""
        job.part += 1
        if job.part >= len(job.parts):
            self._finish(job, "stop")
            return
        part = job.parts[job.part]
        forced = self._forced_tokens(part.forced)
        job.pending += forced
        job.new += len(forced)
        job.ids = []
        job.branches = []
        if isinstance(part.value, Choice):
            key = tuple(part.value.options)
            if key not in self._tries:
                self._tries[key] = _trie(part.value.options, self.tokenize)
            job.node = self._tries[key]
            self._walk(job)
        else:
            job.grammar = None
            if part.value.grammar is not None:
                sampler = self.lib.llama_sampler_init_grammar(self.vocab, part.value.grammar.encode(), b"root")
                if not sampler:
                    raise ModelError(f"llama.cpp could not parse the grammar for this answer: "
                                     f"{part.value.grammar[:120]!r}")
                job.grammar = sampler
            job.wants_logits = True

    def _walk(self, job: _Job) -> None:
        """Force a closed-set value's tokens while only one continuation is allowed."""
        node = job.node
        assert node is not None
        while len(node.children) == 1 and node.option is None:
            (token, node), = node.children.items()
            job.pending.append(token)
            job.ids.append(token)
            job.new += 1  # forced, like the skeleton: evaluated as input, never sampled
        job.node = node
        if not node.children:  # a complete option
            self._chosen(job, node.option or "")
        else:
            job.wants_logits = True

    def _advance(self, job: _Job, index: int) -> None:
        job.wants_logits = False
        logits = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, index), shape=(self.n_vocab,))
        part = job.parts[job.part]
        if isinstance(part.value, Choice):
            node = job.node
            assert node is not None
            allowed = list(node.children)
            eog = self.lib.llama_vocab_eos(self.vocab)
            if node.option is not None:  # an option that is also the start of a longer one
                allowed.append(eog)
            token = self._pick(job, logits, np.array(allowed))
            if part.value.score:   # after the pick, from the same logits: it cannot change the choice
                reaches = [node.children[t].values if t in node.children else frozenset({value_of(node.option or "")})
                           for t in allowed]
                job.branches.append(Branch.of(logits[np.array(allowed)].astype(np.float64).tolist(), reaches))
            if token == eog and node.option is not None and token not in node.children:
                self._chosen(job, node.option)
                return
            job.node = node.children[token]
            job.pending.append(token)
            job.ids.append(token)
            job.generated += 1
            self._walk(job)
            return
        token = self._sample_free(job, logits)
        if self.lib.llama_vocab_is_eog(self.vocab, token):
            self._end_free(job, "stop")
            return
        job.ids.append(token)
        job.generated += 1
        if job.grammar is not None:
            self.lib.llama_sampler_accept(job.grammar, token)
        if job.stop and any(s in self._text(job.ids) for s in job.stop):
            self._end_free(job, "stop")
            return
        if job.generated >= job.max_tokens:
            self._end_free(job, "length")
            return
        job.pending.append(token)
        job.wants_logits = True

    def _chosen(self, job: _Job, option: str) -> None:
        """A closed-set value is complete: keep it with its probability and start the next part."""
        part = job.parts[job.part]
        score = None
        if isinstance(part.value, Choice) and part.value.score:
            score = confidence(job.branches, value_of(option))
        job.results.append(PartResult(option, "stop", score))
        self._next_part(job)

    def _end_free(self, job: _Job, finish: str) -> None:
        text = self._text(job.ids)
        if job.stop:
            cuts = [text.index(s) for s in job.stop if s in text]
            text = text[: min(cuts)] if cuts else text
        self._free_grammar(job)
        job.results.append(PartResult(text, finish))
        if finish == "length":
            self._finish(job, "length")
        else:
            self._next_part(job)

    def _forced_tokens(self, text: str) -> list[int]:
        if text not in self._forced:
            self._forced[text] = self.tokenize(text) if text else []
        return self._forced[text]

    def _text(self, ids: list[int]) -> str:
        return self.llama.detokenize(ids).decode("utf-8", errors="ignore")

    def _pick(self, job: _Job, logits: np.ndarray, allowed: np.ndarray) -> int:
        values = logits[allowed].astype(np.float64)
        if job.temperature <= 0:
            return int(allowed[int(np.argmax(values))])
        return int(allowed[self._sample_index(job, values)])

    def _sample_index(self, job: _Job, values: np.ndarray) -> int:
        scaled = (values - values.max()) / job.temperature
        probs = np.exp(scaled)
        probs /= probs.sum()
        order = np.argsort(-probs)
        keep = order[: int(np.searchsorted(np.cumsum(probs[order]), job.top_p) + 1)]
        kept = probs[keep] / probs[keep].sum()
        assert job.rng is not None
        return int(keep[job.rng.choice(len(keep), p=kept)])

    def _sample_free(self, job: _Job, logits: np.ndarray) -> int:
        if job.grammar is None:
            if job.temperature <= 0:
                return int(np.argmax(logits))
            return self._sample_index(job, logits.astype(np.float64))
        if job.temperature <= 0:  # llama.cpp's fast path: the unconstrained best, if the grammar allows it
            best = int(np.argmax(logits))
            self._one[0].id, self._one[0].logit, self._one[0].p = best, float(logits[best]), 0.0
            one = self.lib.llama_token_data_array(data=self._one, size=1, selected=-1, sorted=False)
            self.lib.llama_sampler_apply(job.grammar, ctypes.byref(one))
            if np.isfinite(self._one[0].logit):
                return best
        view = self._candidate_view
        view["logit"] = logits
        view["p"] = 0.0
        array = self.lib.llama_token_data_array(data=self._candidates, size=self.n_vocab, selected=-1, sorted=False)
        self.lib.llama_sampler_apply(job.grammar, ctypes.byref(array))
        masked = view["logit"].copy()
        view["id"] = np.arange(self.n_vocab, dtype=np.int32)  # apply may reorder; restore for the next call
        finite = np.flatnonzero(np.isfinite(masked))
        if finite.size == 0:
            raise ModelError("the answer's grammar allows no next token (a grammar dead end)",
                             hint="check the response schema; this request alone failed")
        return self._pick(job, masked, finite)

    def _finish(self, job: _Job, finish: str) -> None:
        now = time.perf_counter()
        self.last_sequence = job.evaluated
        job.outcome = Outcome(parts=job.results, finish=finish, generated=job.generated, prompt_new=job.new,
                              prompt_cached=job.cached, latency_ms=(now - job.admitted) * 1000,
                              waited_ms=(job.admitted - job.submitted) * 1000)
        self._release(job)

    def _finish_error(self, job: _Job, error: BaseException) -> None:
        job.error = error
        self._release(job)

    def _fail(self, job: _Job, error: BaseException) -> None:
        if job in self._queue:
            self._queue.remove(job)
        self._finish_error(job, error)

    def _free_grammar(self, job: _Job) -> None:
        if job.grammar is not None:
            self.lib.llama_sampler_free(job.grammar)
            job.grammar = None

    def _release(self, job: _Job) -> None:
        self._free_grammar(job)
        if job in self._active:
            self._active.remove(job)
            self.lib.llama_memory_seq_rm(self.mem, job.slot, -1, -1)
            self._free.append(job.slot)
            self._free.sort()
        job.pending = []
        job.done.set()


def prefix_meta(model_sha256: str, settings: dict, tokens: int) -> dict:
    """What a saved prefix state is valid for: written beside it, checked before it is loaded."""
    return {"model_sha256": model_sha256, "settings": settings, "tokens": tokens, "format": 1}


def check_prefix_meta(path: Path, model_sha256: str, settings: dict) -> dict:
    """The saved prefix's metadata, or a ModelError naming the file and what differs."""
    meta_path = path.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{meta_path}: cannot read the saved prefix's metadata ({exc})",
                         hint="rebuild the bento (`slipway build`)") from None
    if meta.get("model_sha256") != model_sha256:
        raise ModelError(f"{path}: the saved prefix state was computed with model sha256 "
                         f"{str(meta.get('model_sha256'))[:12]}…, not this model ({model_sha256[:12]}…); refused",
                         hint="rebuild the bento so its prefix state matches its model")
    if "sha256" in meta:  # llama.cpp's state format has no checksum: flipped bytes would load silently
        import hashlib

        try:
            actual = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:
            raise ModelError(f"{path}: cannot read the saved prefix state ({exc})",
                             hint="rebuild the bento (`slipway build`)") from None
        if actual != meta["sha256"]:
            raise ModelError(f"{path}: the saved prefix state is not the file that was saved (sha256 {actual[:12]}… "
                             f"vs {str(meta['sha256'])[:12]}… in {meta_path.name}); refused",
                             hint="rebuild the bento (`slipway build`)")
    differ = {k: (meta.get("settings", {}).get(k), v) for k, v in settings.items()
              if meta.get("settings", {}).get(k) != v}
    if differ:
        raise ModelError(f"{path}: the saved prefix state was computed with other settings "
                         f"({', '.join(f'{k}: {a!r} vs {b!r}' for k, (a, b) in differ.items())}); refused",
                         hint="rebuild the bento")
    return meta
