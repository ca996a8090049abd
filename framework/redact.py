"""Redaction: personal data out of trace text before it is written anywhere.

Traces keep prompts, inputs and outputs so a reviewer can see what the model saw; support tickets
carry emails, phone numbers and card numbers, which must not land in segment files, the store or an
OTLP export. `[tracing] redact` picks built-in rules (all three by default), `redact_patterns` adds a
project's own, `redact_hook` runs a function last. Replacements name the rule (`[EMAIL]`), so a reader
sees that something was there. Card numbers are matched only when they pass the Luhn check, so
order numbers and timestamps survive; phone numbers need 9+ digits with separators typical of phones.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable
from typing import Any

from framework.errors import SpecError
from framework.spec import TracingSpec

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# A run of digit groups separated by spaces or dashes, 13 digits or more in all: a card number may sit
# inside it, next to an expiry, a CVV or an order number ("4111 1111 1111 1111 123", "order 2024 4111…").
DIGIT_RUN = re.compile(r"\d+(?:[ \t-]+\d+)*")
# An optional +country code, then 9-15 digits grouped by spaces, dots, dashes or a bracketed area code.
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){2,4}(?![\w])")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _cards(text: str, counts: dict[str, int]) -> str:
    """Replace every Luhn-valid 13-19 digit window of a digit run that starts and ends on a group
    boundary (so "4111 1111 1111 1111 123" loses the card and keeps the 123), longest first."""
    def sub(match: re.Match) -> str:
        run = match.group()
        groups = [(m.start(), m.end()) for m in re.finditer(r"\d+", run)]
        if sum(end - start for start, end in groups) < 13:
            return run
        spans: list[tuple[int, int]] = []
        i = 0
        while i < len(groups):
            found, digits, j = None, "", i
            while j < len(groups) and len(digits) + groups[j][1] - groups[j][0] <= 19:   # at most 19 digits:
                digits += run[groups[j][0]:groups[j][1]]                                 # linear in the run
                if len(digits) >= 13 and luhn_ok(digits):
                    found = j   # keep the longest window that passes
                j += 1
            if found is None:
                i += 1
                continue
            spans.append((groups[i][0], groups[found][1]))
            i = found + 1
        if not spans:
            return run
        counts["card"] = counts.get("card", 0) + len(spans)
        out, last = [], 0
        for start, end in spans:
            out += [run[last:start], "[CARD]"]
            last = end
        return "".join(out) + run[last:]

    return DIGIT_RUN.sub(sub, text)


def _phones(text: str, counts: dict[str, int]) -> str:
    def sub(match: re.Match) -> str:
        digits = re.sub(r"\D", "", match.group())
        if not 9 <= len(digits) <= 15:
            return match.group()
        counts["phone"] = counts.get("phone", 0) + 1
        return "[PHONE]"

    return PHONE.sub(sub, text)


def _pattern(name: str, regex: re.Pattern) -> Callable[[str, dict[str, int]], str]:
    def apply(text: str, counts: dict[str, int]) -> str:
        out, n = regex.subn(f"[{name.upper()}]", text)
        if n:
            counts[name] = counts.get(name, 0) + n
        return out

    return apply


def _hook(dotted: str) -> Callable[[str], str]:
    module, _, name = dotted.partition(":")
    try:
        function = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise SpecError(f"redact_hook {dotted!r} cannot be imported: {exc}", field="tracing.redact_hook",
                        hint="give `module:function` the served bento can import, str in, str out") from None
    if not callable(function):
        raise SpecError(f"redact_hook {dotted!r} is not a function", field="tracing.redact_hook")
    return function


class Redactor:
    """Built once per worker from `[tracing]`; `text()` and `value()` return redacted copies and count
    what they replaced (the counts go into the trace, never the matched text)."""

    def __init__(self, spec: TracingSpec):
        # Cards before phones: a card number also looks like a long phone number.
        rules: list[Callable[[str, dict[str, int]], str]] = []
        if "email" in spec.redact:
            rules.append(_pattern("email", EMAIL))
        if "card" in spec.redact:
            rules.append(_cards)
        if "phone" in spec.redact:
            rules.append(_phones)
        rules += [_pattern(p.name, re.compile(p.regex)) for p in spec.redact_patterns]
        self.rules = rules
        self.hook = _hook(spec.redact_hook) if spec.redact_hook else None
        # Every request's prompt repeats the program's instructions (kilobytes); redacting them once per
        # worker instead of once per call is most of the <0.5 ms a trace may cost (BENCHMARKS.md).
        self._cached = functools.lru_cache(maxsize=256)(self._redact)

    def _redact(self, text: str) -> tuple[str, tuple[tuple[str, int], ...]]:
        counts: dict[str, int] = {}
        for rule in self.rules:
            text = rule(text, counts)
        if self.hook is not None:
            text = self.hook(text)
            if not isinstance(text, str):
                raise TypeError(f"redact_hook returned {type(text).__name__}, not str")
        return text, tuple(counts.items())

    def text(self, text: str, counts: dict[str, int]) -> str:
        out, found = self._cached(text) if len(text) >= 512 else self._redact(text)
        for name, n in found:
            counts[name] = counts.get(name, 0) + n
        return out

    def value(self, value: Any, counts: dict[str, int]) -> Any:
        """Redact every string inside a JSON-like value (dicts, lists, message lists)."""
        if isinstance(value, str):
            return self.text(value, counts)
        if isinstance(value, dict):
            return {k: self.value(v, counts) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(v, counts) for v in value]
        return value
