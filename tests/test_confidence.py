"""Closed-set confidence (issue 16): framework/confidence.py, and both engines reporting it.

Property tests build random option sets over a character "tokenizer" (one token per character, so the
trie and the text agree) with random logits at every branch point, and check that the probabilities are
a distribution over the options. The real-path tests run the tiny GGUF on each engine.
"""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from framework.confidence import Branch, confidence, sequence_branches, softmax, value_of

logits = st.floats(min_value=-50, max_value=50, allow_nan=False)


@given(st.lists(logits, min_size=1, max_size=12))
def test_softmax_is_a_distribution(values):
    probs = softmax(values)
    assert len(probs) == len(values)
    assert all(0.0 <= p <= 1.0 for p in probs)
    assert math.isclose(sum(probs), 1.0, rel_tol=1e-9)
    pairs = list(zip(values, probs, strict=True))
    assert all(p >= q for a, p in pairs for b, q in pairs if a > b)   # keeps the order


def test_softmax_of_nothing_allowed_is_empty_and_minus_infinity_gets_zero():
    assert softmax([]) == [] and softmax([-math.inf, -math.inf]) == []
    assert softmax([0.0, -math.inf]) == [1.0, 0.0]


# Options: distinct words over a 3-letter alphabet, each closed by a quote as an enum's JSON text is, so no
# option is a prefix of another.
words = st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1, max_size=6, unique=True)


def _logit_table(seed: int):
    rng = random.Random(seed)
    table: dict[tuple[str, str], float] = {}

    def logit(prefix: str, token: str) -> float:   # the same (prefix, token) always has the same logit
        if (prefix, token) not in table:
            table[(prefix, token)] = rng.uniform(-8, 8)
        return table[(prefix, token)]

    return logit


def _trie_branches(options: list[str], chosen: str, logit) -> list[Branch]:
    """Walk `chosen` through the trie of `options` (one token per character), as the batched engine does."""
    branches = []
    for i in range(len(chosen)):
        prefix = chosen[:i]
        children = sorted({o[i] for o in options if o.startswith(prefix) and len(o) > i})
        if len(children) > 1:
            reaches = [frozenset(value_of(o) for o in options if o.startswith(prefix + c)) for c in children]
            branches.append(Branch.of([logit(prefix, c) for c in children], reaches))
    return branches


@given(words, st.integers(0, 2**32))
def test_over_distinct_values_the_option_probabilities_sum_to_one(values, seed):
    options = [f'"{v}"' for v in values]
    logit = _logit_table(seed)
    probs = [confidence(_trie_branches(options, o, logit), value_of(o)) for o in options]
    assert all(0.0 <= p <= 1.0 for p in probs)
    assert math.isclose(sum(probs), 1.0, rel_tol=1e-9, abs_tol=1e-12)


@given(words, st.integers(0, 2**32))
def test_with_and_without_a_leading_space_each_spelling_is_a_distribution_over_values(values, seed):
    """The space before a value is formatting: that branch holds every value on both sides and counts 1, so
    the probabilities given either spelling sum to 1 over the values."""
    options = [f' "{v}"' for v in values] + [f'"{v}"' for v in values]
    logit = _logit_table(seed)
    for spaced in (True, False):
        mine = [o for o in options if o.startswith(" ") == spaced]
        probs = [confidence(_trie_branches(options, o, logit), value_of(o)) for o in mine]
        assert math.isclose(sum(probs), 1.0, rel_tol=1e-9, abs_tol=1e-12)


@settings(max_examples=60)
@given(words, st.integers(0, 2**32), st.data())
def test_the_sequential_walk_matches_the_trie_on_canonical_tokens(values, seed, data):
    """What the sequential engine computes from its logits rows equals the batched engine's trie walk."""
    options = [f' "{v}"' for v in values] + [f'"{v}"' for v in values]
    chosen = data.draw(st.sampled_from(options))
    logit = _logit_table(seed)
    eog = 0
    text = "".join

    def row(prefix: str) -> dict:
        return _Row(lambda token: logit(prefix, token))

    ids = list(chosen)   # a token is a character here
    rows = [row(chosen[:i]) for i in range(len(ids))] + [row(chosen)]
    branches = sequence_branches(options, {o: list(o) for o in options}, ids, rows, text=text, tokenize=list,
                                 eog=eog)
    expected = confidence(_trie_branches(options, chosen, logit), value_of(chosen))
    assert math.isclose(confidence(branches, value_of(chosen)), expected, rel_tol=1e-9, abs_tol=1e-12)


class _Row:
    """A logits row indexed by token (here a character)."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, token):
        return self.fn(token)


def test_a_non_canonical_split_still_counts_the_taken_token_as_a_candidate():
    """The grammar let the model write `"bi` + `lling"` where the canonical split differs: the taken token is
    a candidate at its branch, leading only to the values its text allows."""
    options = ['"billing"', '"bug"']
    canonical = {'"billing"': ['"', "billing", '"'], '"bug"': ['"', "bug", '"']}
    ids = ['"', "bi", 'lling"']
    rows = [{'"': 0.0}, {"billing": 0.0, "bug": 0.0, "bi": math.log(3)}, {'lling"': 0.0}, {}]

    def text(part):
        return "".join(part)

    def tokenize(s):
        return [s]

    branches = sequence_branches(options, canonical, ids, rows, text=text, tokenize=tokenize, eog="EOG")
    assert len(branches) == 1   # only after the quote do values diverge
    assert math.isclose(confidence(branches, '"billing"'), (1 + 3) / 5)   # "billing" and "bi" both reach it


def test_one_allowed_value_is_certain():
    assert confidence([], '"only"') == 1.0


# -- the real engines --------------------------------------------------------------------------------------

@pytest.mark.model
def test_both_engines_report_confidence_in_0_1_for_every_closed_field_without_changing_answers(tiny_model_present):
    """The same tickets with and without confidence computed: identical answers at temperature 0 on each
    engine, and every enum/boolean field's probability in [0, 1] (category, priority, needs_human)."""
    import dspy

    from framework import load_project
    from framework.lm import json_adapter, make_lm, metering
    from framework.notebook import load_program
    from framework.weights import model_path
    from tests.conftest import REPO, TINY

    project = load_project("ticket-triage", root=REPO)
    program = load_program(project)
    tickets = ["I was charged twice this month, please refund one", "Dark mode please"]
    for parallel in (1, 2):
        spec = project.model(TINY).model_copy(update={"parallel": parallel})
        lm = make_lm(spec, model_path(spec))
        engine = lm.engine
        answers = {}
        try:
            for score in (False, True):
                engine.score = score
                answers[score] = []
                for ticket in tickets:
                    with dspy.context(lm=lm, adapter=json_adapter()), metering() as calls:
                        prediction = program(ticket=ticket)
                    answers[score].append({k: prediction.get(k) for k in ("category", "priority", "needs_human",
                                                                          "reason")})
                    (call,) = calls
                    if score:
                        assert set(call.confidence) == {"category", "priority", "needs_human"}, parallel
                        assert all(0.0 <= p <= 1.0 for p in call.confidence.values())
                        assert call.answer_confidence == min(call.confidence.values())
                    else:
                        assert call.confidence is None
        finally:
            engine.score = True
        assert answers[True] == answers[False], parallel
