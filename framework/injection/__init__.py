"""Prompt-injection signals: does an untrusted ticket try to instruct the triage assistant?

A guardrail check that runs before the model on every served ticket, so it is cheap: regular expressions
compiled once at import, no model, no network, typically a fraction of a millisecond per ticket and a few
milliseconds for 8,000 characters. `injection_signals(text)` returns the names of the rules that fired (an
empty list: the text looks benign); the caller decides what a signal does (flag it, force `needs_human`,
refuse). The rules follow the attack families of OWASP LLM01 and the public jailbreak collections
(`_rules`, `_languages`); each matches over views of the ticket (`_text`): what a reader sees (NFKC,
invisible characters removed, Unicode tag characters revealed), case-folded, and where a word is disguised
by look-alikes, leetspeak, zalgo or letter spacing, the same words undone, which adds `obfuscated`.
Payloads hidden as base64, base32, hex, URL escapes, Morse, rot13, reversed text or (when the ticket says
"caesar" or "cipher") a Caesar shift are decoded, bounded, and scanned too (`_payloads`), their signals
prefixed with the encoding (`base64:override`). Every repetition in a pattern is bounded and rules run in
windows around their needles (`_engine`), so a scan is linear in the text. Known blind spots:
docs/guardrails.md.
"""

from __future__ import annotations

import re

from framework.injection import _languages, _rules, _text
from framework.injection._engine import WINDOW, Rule, run
from framework.injection._payloads import MAX_BLOB_CHARS, payloads

__all__ = ["RULE_NAMES", "injection_signals"]

_RULES: tuple[Rule, ...] = _rules.RULES + _languages.RULES
_LATIN = tuple(each for each in _RULES if each.latin)
RULE_NAMES: tuple[str, ...] = (*dict.fromkeys(each.name for each in _RULES), "obfuscated")
"""Every name `injection_signals` can return, before the encoding prefixes (`base64:` ...)."""

# The words the Latin rules are written with (first four letters): a disguised word that folds to none of
# them cannot complete a match, so it needs no second look.
_VOCABULARY = frozenset(word[:4] for each in _LATIN for word in re.findall(r"[a-z]{3,}", each.pattern.pattern))
_MAX_DEPTH = 2  # base64 inside base64 is decoded; a third layer is not


def _scan(text: str, depth: int) -> dict[str, None]:
    seen = _text.visible(text)
    lower = _text.lowered(seen)
    fired: dict[str, None] = {}
    run(_RULES, lower, fired, cased=seen)
    before = len(fired)
    for part in _text.folded_parts(lower, _VOCABULARY, WINDOW + 64):
        run(_LATIN, part, fired)
    if len(fired) > before:
        fired["obfuscated"] = None
    if depth < _MAX_DEPTH:
        for kind, decoded in payloads(seen, lower):
            for name in _scan(decoded, depth + 1):
                fired[f"{kind}:{name}"] = None
    if depth == 0:
        ciphers: list[tuple[str, str]] = []
        if any(hint in lower for hint in _text.ROT13_HINTS):
            ciphers.append(("rot13", lower.translate(_text.CAESAR[13])))
        if any(hint in lower for hint in _text.REVERSED_HINTS):
            ciphers.append(("reversed", lower[::-1]))
        if "caesar" in lower or "cipher" in lower:
            head = lower[:MAX_BLOB_CHARS]
            ciphers += [("caesar", head.translate(_text.CAESAR[shift])) for shift in range(1, 26) if shift != 13]
        for kind, decoded in ciphers:
            inner: dict[str, None] = {}
            run(_LATIN, decoded, inner)
            fired.update((f"{kind}:{name}", None) for name in inner)
    return fired


def injection_signals(text: str) -> list[str]:
    """Names of the injection rules that fire on `text`; an empty list means it looks benign.

    Names come from `RULE_NAMES`, in that order; a rule that fires only inside a decoded payload comes
    after them, prefixed with the encoding (`base64:override`, `hex:...`, `url:...`, `rot13:...`), and
    `obfuscated` means a rule fired only once look-alikes, leetspeak or letter spacing were undone. Never
    raises on a str; linear in its length.
    """
    fired = _scan(text, 0)
    order = {name: i for i, name in enumerate(RULE_NAMES)}
    return sorted(fired, key=lambda name: (":" in name, order.get(name, len(order)), name))
