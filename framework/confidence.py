"""How sure the model was of a closed-set value: its own token probabilities, over the allowed values only.

An enum or boolean value is decoded as tokens from a closed set of texts (`structured.Step.options`:
each JSON value with and without a leading space). Wherever the allowed continuations branch, the
model's logits over the *allowed* next tokens (not the whole vocabulary) give a softmax; a value's
probability is the product, along the path the model took, of the share of that softmax held by the
candidates from which the chosen value can still be reached. A branch between surface forms of the
same values (`" \\"bug\\""` vs `"\\"bug\\""`) holds the chosen value on both sides and contributes 1, so
the figure is the probability of the chosen value given the whitespace the model wrote before it.

Both engines feed the same pure functions here: the batched engine walks its token trie
(framework/batch.py) and records a `Branch` at each pick; the sequential engine copies the logits
row at each sampled value token (framework/structured.py) and `sequence_branches` rebuilds the
candidates from the options' canonical tokenisations. Nothing here changes which token is chosen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass


def value_of(option: str) -> str:
    """The JSON value text an option stands for (`' "bug"'` and `'"bug"'` are both `'"bug"'`)."""
    return option.strip()


def softmax(logits: Sequence[float]) -> list[float]:
    """Probabilities from finite logits (max-shifted; -inf gives 0). Empty or all -inf gives []."""
    values = [float(x) for x in logits]
    if not values or max(values) == -math.inf:
        return []
    top = max(values)
    weights = [math.exp(x - top) for x in values]
    total = sum(weights)
    return [w / total for w in weights]


@dataclass(frozen=True)
class Branch:
    """One point where the allowed continuations of a closed-set value diverged: the probability of each
    candidate token (softmax over the candidates' logits) and the values each can still lead to."""

    probs: tuple[float, ...]
    reaches: tuple[frozenset[str], ...]

    @classmethod
    def of(cls, logits: Sequence[float], reaches: Sequence[frozenset[str]]) -> Branch:
        return cls(tuple(softmax(logits)), tuple(reaches))

    def share(self, value: str) -> float:
        """The probability that the model stayed on a path to `value` here."""
        return sum(p for p, reach in zip(self.probs, self.reaches, strict=True) if value in reach)


def confidence(branches: Sequence[Branch], value: str) -> float:
    """The probability of `value` along the recorded branches, in [0, 1]; 1.0 when nothing branched
    (a one-option enum). Clamped: float sums may overshoot 1 by an ulp."""
    result = 1.0
    for branch in branches:
        if len(branch.probs) > 1:
            result *= branch.share(value)
    return min(max(result, 0.0), 1.0)


def answer_confidence(values: Mapping[str, float] | None) -> float | None:
    """An answer's confidence: the lowest over its closed-set fields (None: it has none measured)."""
    return min(values.values()) if values else None


def sequence_branches(options: Sequence[str], canonical: Mapping[str, Sequence[int]], ids: Sequence[int],
                      rows: Sequence[Sequence[float]], *, text: Callable[[Sequence[int]], str],
                      tokenize: Callable[[str], list[int]], eog: int) -> list[Branch]:
    """The branches of a value the sequential engine decoded as `ids` under its grammar.

    `rows[i]` is the logits row the model sampled `ids[i]` from (one more row, for the end-of-generation
    token, may follow). At each position the candidates are the next tokens of the canonical tokenisation
    (`canonical[option]`) of every option consistent with the text so far, as the batched engine's trie
    has them; off that path (the grammar let the model take another split of the same text) the rest of
    each option is tokenised afresh. The token the model took is always a candidate; end-of-generation is
    one where an option is complete. Returns only points with two or more candidates.
    """
    branches = []
    for position, row in enumerate(rows):
        so_far = text(ids[:position])
        candidates: dict[int, set[str]] = {}
        for option in options:
            if not option.startswith(so_far):
                continue
            if option == so_far:
                candidates.setdefault(eog, set()).add(value_of(option))
                continue
            path = list(canonical[option])
            nxt = path[position] if path[:position] == list(ids[:position]) and len(path) > position else \
                (tokenize(option[len(so_far):]) or [eog])[0]
            candidates.setdefault(nxt, set()).add(value_of(option))
        if position < len(ids):
            taken, after = ids[position], text(ids[: position + 1])
            candidates.setdefault(taken, set()).update(value_of(o) for o in options if o.startswith(after))
        if len(candidates) > 1:
            tokens = list(candidates)
            branches.append(Branch.of([float(row[t]) for t in tokens], [frozenset(candidates[t]) for t in tokens]))
    return branches
