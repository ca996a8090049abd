"""The batched engine (framework/batch.py) on the real tiny GGUF: what a user of `parallel > 1` relies on.

Each engine is loaded once for the module. Greedy answers of the batched engine can differ from the
sequential engine's, and from its own answers under another batch composition: which sequences share
a decode step and where their cells sit in the unified KV cache change the order float sums run in,
and near-ties flip (the tiny model has many). Tests therefore compare closed-set labels with a
measured bound, and compare free text only where the continuation is not a near-tie.
"""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from framework.batch import Batcher, Free, Part, _trie
from framework.errors import ModelError, ModelTimeout
from framework.lm import LlamaCppEngine, deadline
from tests.conftest import REPO, TINY

FOREVER = 'root ::= "x" root'  # never accepting: no end-of-generation allowed, the answer ends at max_tokens
# Prompts whose greedy answers (64 tokens) have no near-tie: measured identical alone, three and four at
# a time, beside a timed-out and beside a failed request, in every run (9 of 9). "List the days of the
# week." is a counter-example: it flips at "in order" / "in a numbered format" from one layout to another.
STEADY = ["Count from 1 to 100.", "Write the word 'apple' twenty times.", "What is 2+2?"]


def _tiny_path():
    from framework import load_project
    from framework.weights import model_path

    path = model_path(load_project("ticket-triage", root=REPO).model(TINY))
    if not path.exists():
        pytest.fail(f"tiny model missing at {path}: run `make test` (it pulls it)")
    return path


@pytest.fixture(scope="module")
def batched():
    engine = LlamaCppEngine(_tiny_path(), context_size=4096, threads=2, parallel=4)
    yield engine
    engine.batcher.close()


@pytest.fixture(scope="module")
def sequential():
    return LlamaCppEngine(_tiny_path(), context_size=4096, threads=2, parallel=1)


def _prompt(engine, text: str) -> tuple[list[int], int]:
    return engine.prompt_split([{"role": "user", "content": text}])


def _submit(engine, text: str, parts: list[Part], **kwargs):
    tokens, shared = _prompt(engine, text)
    return engine.batcher.submit(tokens, parts, shared=shared, **kwargs)


def _free(engine, text: str, max_tokens: int = 64, **kwargs) -> str:
    outcome = _submit(engine, text, [Part("", Free(None))], max_tokens=max_tokens, **kwargs)
    return outcome.parts[0].text


def _spawn(calls) -> tuple[list[threading.Thread], list]:
    """Start the callables at once, one thread each; the threads, and a list that receives each result
    or the exception it raised, in order, as they finish."""
    results: list = [None] * len(calls)

    def run(i):
        try:
            results[i] = calls[i]()
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    return threads, results


def _in_threads(calls) -> list:
    threads, results = _spawn(calls)
    for thread in threads:
        thread.join()
    return results


def _wait_for(condition, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out waiting for the batcher"
        time.sleep(0.005)


# -- a: batched and sequential answers agree --------------------------------------------------------


def _triage(engine, tickets: list[str], *, concurrently: bool) -> list[dict]:
    import dspy

    from framework import adapter, load_project
    from framework.notebook import load_program

    project = load_project("ticket-triage", root=REPO)
    program = load_program(project, saved=False)
    lm = dspy.LM(model="llamacpp/tiny", engine=engine, cache=False, temperature=0.0, max_tokens=96, num_retries=0)
    json_adapter = adapter(project)

    def answer(ticket):
        with dspy.context(lm=lm, adapter=json_adapter):
            pred = program(ticket=ticket)
        return {"category": pred.category, "priority": pred.priority, "needs_human": pred.needs_human,
                "reason": pred.reason}

    calls = [lambda t=t: answer(t) for t in tickets]
    results = _in_threads(calls) if concurrently else [call() for call in calls]
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def _labels(answer: dict) -> tuple:
    return answer["category"], answer["priority"], answer["needs_human"]


@pytest.fixture(scope="module")
def dev_tickets() -> list[str]:
    rows = [json.loads(line) for line in (REPO / "projects/ticket-triage/data/dev.jsonl").read_text().splitlines()]
    return [row["inputs"]["ticket"] for row in rows[::9][:12]]  # every 9th: all six categories, twice


@pytest.mark.model
def test_concurrent_batched_answers_agree_with_sequential_ones(batched, sequential, dev_tickets, tiny_model_present):
    """The demo program on 12 dev tickets: all at once on the batched engine, one at a time on the
    sequential one.

    Measured on 2 cores over 5 runs: 11-12/12 label triples (category, priority, needs_human) agree and
    7-9/12 whole answers (the free-text reason drifts after a near-tie). With batch.py mutated, a
    sequence that does not get the shared prefix's cells (no `llama_memory_seq_cp`) agreed on 4-5/12
    labels and 1/12 answers, a logits row read for another sequence on 5-6/12 and 0/12; a wrong position
    or a missing prefix cell makes llama_decode refuse the batch outright."""
    alone = _triage(sequential, dev_tickets, concurrently=False)
    together = _triage(batched, dev_tickets, concurrently=True)
    pairs = list(zip(alone, together, strict=True))
    # Thresholds sit between what a correct engine gives and what the mutants below give, not at the
    # best run: CI on 2 cores once saw 9/12 labels run to run (test_batch.py, stop 24).
    assert sum(_labels(a) == _labels(b) for a, b in pairs) >= 8, pairs
    assert sum(a == b for a, b in pairs) >= 4, pairs
    # Not deterministic from run to run: which requests share a step, and where their cells sit in the
    # unified KV cache, depends on thread timing, and with them the order float sums run in (logits
    # measured identical while a sequence's cell layout is the same, up to 0.5 apart once other
    # sequences' cells interleave with its own). Measured 9-12/12 labels and 9-10/12 answers alike.
    again = _triage(batched, dev_tickets, concurrently=True)
    assert sum(_labels(a) == _labels(b) for a, b in zip(together, again, strict=True)) >= 8
    from framework.notebook import import_notebook

    limit = import_notebook(REPO / "notebooks" / "ticket_triage.py").REASON_CHARS   # the grammar's cap on reason
    for answer in together + again:
        assert answer["category"] in ("billing", "bug", "account", "feature_request", "outage", "abuse")
        assert answer["priority"] in ("low", "medium", "high", "urgent")
        assert isinstance(answer["needs_human"], bool) and len(answer["reason"]) <= limit


# -- b: a deadline holds inside a batch -----------------------------------------------------------


@pytest.mark.model
def test_a_deadline_cuts_off_its_own_sequence_and_no_other(batched, tiny_model_present):
    """A request with a short deadline, decoding beside longer ones, fails with ModelTimeout at its
    deadline; the others run on to the answers they give alone."""
    alone = [_free(batched, text) for text in STEADY]
    limit = 0.5

    def doomed():
        start = time.monotonic()
        try:
            with deadline(limit):
                batched.chat([{"role": "user", "content": "Write x forever."}], grammar=FOREVER, max_tokens=2000)
        except ModelTimeout as exc:
            return exc, time.monotonic() - start, time.monotonic()

    (doomed_thread,), doomed_results = _spawn([doomed])
    _wait_for(lambda: len(batched.batcher._active) == 1)  # admitted: it will be cut off mid-generation
    threads, results = _spawn([lambda t=t: (_free(batched, t), time.monotonic()) for t in STEADY])
    for thread in [doomed_thread, *threads]:
        thread.join()
    error, after, failed_at = doomed_results[0]
    assert isinstance(error, ModelTimeout) and "generation" in str(error)
    # 2000 tokens would take over 20 s; the scheduler checks deadlines before every decode step
    assert limit <= after < limit + 10.0
    assert max(done for _, done in results) > failed_at  # the others were still decoding
    assert [text for text, _ in results] == alone
    assert _free(batched, STEADY[0]) == alone[0]  # the slot and its cells came back clean


# -- c: a grammar failure stays in its sequence -------------------------------------------------------


@pytest.mark.model
def test_a_grammar_failure_fails_its_request_and_no_other(batched, tiny_model_present):
    """A grammar llama.cpp cannot parse (fails at admission) and one that reaches a dead end after two
    tokens (fails inside a decode step) each fail their own request with ModelError, while three others
    are mid-generation; those finish with the answers they give alone."""
    alone = [_free(batched, text) for text in STEADY]
    threads, results = _spawn([lambda t=t: _free(batched, t) for t in STEADY])
    _wait_for(lambda: len(batched.batcher._active) == len(STEADY))
    invalid = Part("", Free("root ::= [[["))
    dead_end = Part("", Free(r'root ::= "ab" [^\x00-\U0010FFFF]'))  # parses; nothing may follow "ab"
    for part, message in ((invalid, "could not parse the grammar"), (dead_end, "dead end")):
        with pytest.raises(ModelError, match=message):
            _submit(batched, "Say ab.", [part], max_tokens=8)
    assert any(result is None for result in results)  # the failures happened while others were in flight
    for thread in threads:
        thread.join()
    assert results == alone
    assert _free(batched, STEADY[0]) == alone[0]


# -- d: FIFO admission ---------------------------------------------------------------------------


def _submit_to(batcher, engine, text: str, max_tokens: int, stop_at: float | None = None, grammar: str = FOREVER):
    tokens, shared = _prompt(engine, text)
    return batcher.submit(tokens, [Part("", Free(grammar))], shared=shared, max_tokens=max_tokens, stop_at=stop_at)


@pytest.mark.model
def test_admission_is_first_in_first_out_and_a_queued_timeout_blocks_nobody(batched, tiny_model_present):
    """Two long requests hold both slots; six more queue, one after another: they are admitted in the order
    they came, and the third, whose deadline passes while it waits, fails with a timeout at its
    deadline without holding up the three behind it."""
    batcher = Batcher(batched._llama, parallel=2, context_size=512, threads=2)  # the same weights, 2 slots
    try:
        blockers, _ = _spawn([lambda i=i: _submit_to(batcher, batched, f"Blocker {i}.", 100) for i in range(2)])
        _wait_for(lambda: not batcher._free)
        limit = 0.3

        def queued(i):
            stop_at = time.monotonic() + limit if i == 2 else None
            try:
                return _submit_to(batcher, batched, f"Request {i}.", 4, stop_at)
            except ModelTimeout as exc:
                return exc, time.monotonic() - (stop_at - limit), time.perf_counter()

        def seen() -> int:  # of the six: queued, admitted or timed out
            doomed_failed = len(spawned) > 2 and spawned[2][1][0] is not None
            return len(batcher._queue) + len(batcher.admissions) - 2 + doomed_failed

        submitted, spawned = [], []
        for i in range(6):
            submitted.append(time.perf_counter())
            spawned.append(_spawn([lambda i=i: queued(i)]))
            _wait_for(lambda i=i: seen() == i + 1)  # in the queue before the next one is sent
            time.sleep(0.02)
        for thread in [thread for threads, _ in spawned for thread in threads] + blockers:
            thread.join()
    finally:
        batcher.close()
    results = [result for _, (result,) in spawned]
    timeout, after, failed_at = results[2]
    assert isinstance(timeout, ModelTimeout) and "waiting" in str(timeout)
    assert all(result.finish == "length" for i, result in enumerate(results) if i != 2)
    # which of the six each admission was: the last one whose submit() began before it
    ours = [(max(i for i, t in enumerate(submitted) if t <= sub), at) for sub, at in batcher.admissions
            if sub >= submitted[0]]
    assert [i for i, _ in ours] == [0, 1, 3, 4, 5]
    # it failed at its deadline, while the blockers still held both slots, not when a slot came free
    assert limit <= after < limit + 10.0 and failed_at < ours[0][1]


@pytest.mark.model
def test_a_request_waiting_for_kv_room_is_not_overtaken(batched, tiny_model_present):
    """A free slot is not enough: the head of the queue waits for KV room, and a smaller request behind
    it, which would fit, waits behind it (long requests are not starved by short ones)."""
    batcher = Batcher(batched._llama, parallel=5, context_size=256, threads=2)  # 1024 cells, 5 slots
    try:
        # four blockers reserve ~200 cells each for max_tokens=200, and end after 20 x's
        twenty = 'root ::= "x"{20}'
        blockers, done = _spawn([lambda i=i: _submit_to(batcher, batched, f"Blocker {i}.", 200, grammar=twenty)
                                 for i in range(4)])
        _wait_for(lambda: len(batcher._active) == 4)
        with batcher._busy:  # the scheduler pauses between steps while both are queued, in this order
            assert batcher._free and batcher._used() + 200 > batcher.n_ctx  # a free slot, no room for 200 more
            (big_thread,), big = _spawn([lambda: _submit_to(batcher, batched, "Big.", 200)])
            _wait_for(lambda: len(batcher._queue) == 1)
            (small_thread,), small = _spawn([lambda: _submit_to(batcher, batched, "Small.", 2)])
            _wait_for(lambda: len(batcher._queue) == 2)
        for thread in [big_thread, small_thread, *blockers]:
            thread.join()
    finally:
        batcher.close()
    (big,), (small,) = big, small
    assert big.finish == small.finish == "length" and all(b.finish == "stop" for b in done)
    *blockers_admitted, first, second = batcher.admissions
    assert first[0] < second[0] and first[1] <= second[1]  # admitted in the order they came: big, then small
    # the small one, which fitted all along, went in only after blockers had ended and made room
    assert second[1] >= min(at for _, at in blockers_admitted) + min(b.latency_ms for b in done) / 1000


# -- e: the saved prefix ---------------------------------------------------------------------------


@pytest.mark.model
def test_a_saved_prefix_loads_into_a_fresh_engine_and_is_refused_for_another_model(batched, tmp_path,
                                                                                  tiny_model_present):
    """What a served bento does at load: the shared prefix's KV state, saved after one answer, loads into
    a fresh engine, which then answers as before without evaluating the prefix; a state saved for another
    model file or other settings is refused, and an unreadable one is an error, not a crash."""
    from framework import load_project
    from framework.structured import plan

    sha = load_project("ticket-triage", root=REPO).model(TINY).sha256
    messages = [{"role": "system", "content": "You sort support tickets into billing or bug. " * 3},
                {"role": "user", "content": "I was charged twice this month."}]
    schema = {"type": "object", "properties": {"category": {"type": "string", "enum": ["billing", "bug"]},
                                               "reason": {"type": "string", "maxLength": 30}},
              "required": ["category", "reason"]}
    answer, _, _, _ = batched.fill(messages, plan(schema), temperature=0.0, max_tokens=40)
    path = tmp_path / "prefix.kv"
    meta = batched.save_prefix(path, sha)
    _, shared = batched.prompt_split(messages)
    assert path.stat().st_size == meta["bytes"] > 0 and meta["tokens"] == shared
    assert json.loads((tmp_path / "prefix.json").read_text())["model_sha256"] == sha

    fresh = LlamaCppEngine(_tiny_path(), context_size=1024, threads=2, parallel=2)
    try:
        assert fresh.load_prefix(path, sha) == shared
        again, _, _, stats = fresh.fill(messages, plan(schema), temperature=0.0, max_tokens=40)
        assert stats.tokens_in_cached == shared  # the instructions were not evaluated again
        assert again == answer

        with pytest.raises(ModelError, match=rf"{re.escape(str(path))}.*refused"):
            fresh.load_prefix(path, "0" * 64)
        meta_path = tmp_path / "prefix.json"
        edited = json.loads(meta_path.read_text())
        edited["settings"]["gpu_layers"] = 99
        meta_path.write_text(json.dumps(edited))
        with pytest.raises(ModelError, match=rf"{re.escape(str(path))}.*other settings.*gpu_layers.*refused"):
            fresh.load_prefix(path, sha)
        meta_path.write_text(json.dumps(meta))

        data = path.read_bytes()
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0xFF  # inside the KV data: llama.cpp would load it without noticing
        path.write_bytes(bytes(flipped))
        with pytest.raises(ModelError, match=rf"{re.escape(str(path))}.*not the file that was saved.*refused"):
            fresh.load_prefix(path, sha)
        unchecked = {k: v for k, v in meta.items() if k != "sha256"}  # an older prefix.json: llama.cpp's own checks
        meta_path.write_text(json.dumps(unchecked))
        for corrupt in (data[: len(data) // 2], data[:64] + b"\xff" * (len(data) - 64), b"not a state file"):
            path.write_bytes(corrupt)
            with pytest.raises(ModelError, match=f"could not read the saved prefix state {re.escape(str(path))}"):
                fresh.load_prefix(path, sha)
        # a refused or unreadable state leaves the engine serving, evaluating the prefix itself
        after, _, _, stats = fresh.fill(messages, plan(schema), temperature=0.0, max_tokens=40)
        assert after == answer and stats.tokens_in_cached == 0
    finally:
        fresh.batcher.close()


# -- f: the closed-set trie ----------------------------------------------------------------------------


def _tokenizer(vocab: list[str]):
    """Greedy longest match over `vocab` plus every single character: like BPE, a text's tokens need not
    start with the tokens of a text it starts with ("ab" -> [ab], "abc" -> [a, bc] when bc is a token)."""
    pieces = sorted(set(vocab) | set("".join(vocab)) | set("abc \"'"), key=len, reverse=True)
    ids = {piece: i for i, piece in enumerate(sorted(pieces))}

    def tokenize(text: str) -> list[int]:
        out, i = [], 0
        while i < len(text):
            piece = next((p for p in pieces if text.startswith(p, i)), text[i])
            ids.setdefault(piece, len(ids))
            out.append(ids[piece])
            i += len(piece)
        return out

    return tokenize


@settings(max_examples=300, deadline=None)
@given(options=st.lists(st.text(alphabet="abc \"'", min_size=1, max_size=6), min_size=1, max_size=8, unique=True),
       vocab=st.lists(st.text(alphabet="abc \"'", min_size=2, max_size=3), max_size=6))
def test_the_trie_reaches_every_option_and_ends_only_on_options(options, vocab):
    tokenize = _tokenizer(vocab)
    root = _trie(options, tokenize)
    for option in options:  # every option is reachable along its own tokens
        node = root
        for token in tokenize(option):
            node = node.children[token]
        assert node.option == option
    terminal, leaves, stack = [], [], [root]
    while stack:
        node = stack.pop()
        if node.option is not None:
            terminal.append(node.option)
        if not node.children:
            leaves.append(node)
        stack.extend(node.children.values())
    assert sorted(terminal) == sorted(options)  # exactly the options end somewhere, each once
    assert all(leaf.option is not None for leaf in leaves)  # no branch leads nowhere

