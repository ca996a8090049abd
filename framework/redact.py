"""Personal data found and replaced: one detector shared by guardrails and traces.

Guardrails (framework/guardrails.py) call `find_pii` / `redact_pii` on a request before the model sees
it; traces call them through `Redactor` before anything is written (segment files, the store, OTLP
exports), so a ticket is judged the same way in both places. Five kinds are detected (`PII_KINDS`):
emails, phone numbers, payment cards (Luhn), IBANs (ISO 13616: country length and format, mod-97) and
national ids (US SSN, Spanish DNI/NIE, French NIR, UK NINO, Dutch BSN next to its name). Checksums are
python-stdnum's. Every scan is linear: bounded quantifiers, patterns that start with a character class
so that `re` skips to candidates, one pass over each digit run for cards; about 0.3 ms for an
8,000-character ticket, 6 ms for 8,000 digits in a row (docs/guardrails.md, bench/pii.py). Each
finding is replaced by its kind (`[EMAIL]`), so a reader sees that something was there; counts per
kind go into the trace, never the matched text. Names, postal addresses, dates of birth and free-form
account numbers are not detected.
"""

from __future__ import annotations

import functools
import importlib
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from stdnum import iban as _iban
from stdnum import luhn as _luhn
from stdnum import numdb
from stdnum.es import dni as _dni
from stdnum.es import nie as _nie
from stdnum.fr import nir as _nir
from stdnum.nl import bsn as _bsn
from stdnum.us import ssn as _ssn

from framework.errors import SpecError
from framework.spec import TracingSpec

PII_KINDS = ("email", "phone", "card", "iban", "national_id")
LABELS = {kind: f"[{kind.upper()}]" for kind in PII_KINDS}
# When findings of different kinds overlap they become one, named after the most specific: an address with
# an @ is unambiguous; then the strongest check (mod-97 and a per-country length; a national id's checksum
# or format; Luhn, one number in ten passes); a phone number is only a shape.
PRECEDENCE = {"email": 0, "iban": 1, "national_id": 2, "card": 3, "phone": 4}


@dataclass(frozen=True, slots=True)
class Finding:
    """One piece of personal data: `text[start:end]` (Python string offsets, end exclusive)."""

    kind: str
    start: int
    end: int


# --- email -------------------------------------------------------------------------------------------
# Found from each @: the local part is read leftwards (at most 64 characters, RFC 5321's limit), the
# domain matched rightwards, so the cost is the text's @s, not its letters. \w takes non-ASCII addresses
# (josé@exämple.de) too.
EMAIL_DOMAIN = re.compile(r"[\w-]{1,63}(?:\.[\w-]{1,63}){0,8}\.[^\W\d_]{2,24}")
_LOCAL_PUNCTUATION = frozenset("._%+'-_")


def _emails(text: str) -> Iterator[tuple[int, int]]:
    at = text.find("@")
    while at != -1:
        start = at
        while start > at - 64 and start > 0 and (text[start - 1].isalnum() or text[start - 1] in _LOCAL_PUNCTUATION):
            start -= 1
        domain = EMAIL_DOMAIN.match(text, at + 1) if start < at else None
        if domain is not None:
            yield start, domain.end()
        at = text.find("@", at + 1)


# --- phone -------------------------------------------------------------------------------------------
# An optional +country code, then 9-15 digits grouped by spaces, dots, dashes or a bracketed area code;
# not glued to a letter, digit or + before it. Written as `[+(0-9]` first, then the rest for each first
# character, so that `re` skips ahead to candidates (a leading lookbehind would try every position).
PHONE = re.compile(r"[+(0-9](?<![\w+][+(0-9])"
                   r"(?:(?<=\+)\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}"     # +44 20 …, +1 (415) …
                   r"|(?<=\()\d{1,4}\)[ .-]?\d{2,4}"                             # (415) 555 …
                   r"|(?<=[0-9])\d{1,3})"                                         # 06 12 …
                   r"(?:[ .-]?\d{2,4}){2,4}(?!\w)")


def _phones(text: str) -> Iterator[tuple[int, int]]:
    for m in PHONE.finditer(text):
        if 9 <= sum(ch.isdigit() for ch in m.group()) <= 15:
            yield m.span()


# --- card --------------------------------------------------------------------------------------------
# A run of digit groups joined by up to 3 spaces or dashes: a card may sit inside it, beside an expiry,
# a CVV or an order number, or glued to other digits. Every window of 13-19 consecutive digits of the run
# that starts like a payment card (2-6: Mastercard, Amex/JCB/Diners, Visa, Discover/UnionPay/Maestro) and
# passes Luhn is covered, whatever its group boundaries, so a card never survives whatever surrounds it.
# The price: a long number (a tracking or order number, digits of a date run into an id) that happens to
# hold such a window is redacted too; with 13-15 digits that is 1 in 10 to 1 in 3 of them.
CARD_RUN = re.compile(r"[0-9]+(?:[ \t\u00a0\u202f-]{1,3}[0-9]+)*")
CARD_FIRST_DIGITS = frozenset("23456")
_NOT_DIGIT = re.compile(r"[^0-9]")
_VALUES = bytes.maketrans(b"0123456789", bytes(range(10)))
_DOUBLED = bytes.maketrans(b"0123456789", bytes([0, 2, 4, 6, 8, 1, 3, 5, 7, 9]))   # digit sum of 2*d


def luhn_ok(digits: str) -> bool:
    """Whether a string of digits passes the Luhn check (python-stdnum's)."""
    return _luhn.is_valid(digits)


def luhn_windows(digits: str) -> list[tuple[int, int]]:
    """The union of every Luhn-valid window of 13-19 digits starting with 2-6, as disjoint [start, end)
    digit index ranges, sorted. Linear: prefix sums of the digits with every other one Luhn-doubled make
    each window's checksum a subtraction (tests compare it with stdnum.luhn window by window)."""
    n = len(digits)
    raw = digits.encode("ascii")
    plain, doubled = raw.translate(_VALUES), raw.translate(_DOUBLED)
    odd_doubled = bytearray(plain)
    odd_doubled[1::2] = doubled[1::2]
    even_doubled = bytearray(doubled)
    even_doubled[1::2] = plain[1::2]
    # Window [i, j) leaves its last digit (j - 1) alone and doubles every other one leftwards: odd
    # indexes when j - 1 is even, even ones otherwise. It passes when its sum is 0 mod 10.
    by_odd_end = [s % 10 for s in accumulate(odd_doubled, initial=0)]     # used when j is odd
    by_even_end = [s % 10 for s in accumulate(even_doubled, initial=0)]
    # One byte per prefix sum, and a copy of each with the other parity masked (255), so that for a start i
    # `rfind` returns the longest passing window in C: odd ends compare by_odd_end, even ends by_even_end.
    odd_ends, even_ends = bytearray(by_odd_end), bytearray(by_even_end)
    odd_ends[0::2] = b"\xff" * len(odd_ends[0::2])
    even_ends[1::2] = b"\xff" * len(even_ends[1::2])
    spans: list[tuple[int, int]] = []
    covered = 0
    for i in range(n - 12):
        last = min(n, i + 19)
        if last <= covered or digits[i] not in CARD_FIRST_DIGITS:   # nothing new can start here
            continue
        j = max(odd_ends.rfind(by_odd_end[i], i + 13, last + 1), even_ends.rfind(by_even_end[i], i + 13, last + 1))
        if j > 0:
            if i < covered:
                spans[-1] = (spans[-1][0], max(covered, j))
            else:
                spans.append((i, j))
            covered = spans[-1][1]
    return spans


def _cards(text: str) -> Iterator[tuple[int, int]]:
    for m in CARD_RUN.finditer(text):
        run = m.group()
        if len(run) < 13:
            continue
        digits = _NOT_DIGIT.sub("", run)
        if len(digits) < 13:
            continue
        spans = luhn_windows(digits)
        if not spans:
            continue
        offsets = range(len(run)) if len(digits) == len(run) else [k for k, ch in enumerate(run) if "0" <= ch <= "9"]
        for i, j in spans:
            yield m.start() + offsets[i], m.start() + offsets[j - 1] + 1


# --- iban --------------------------------------------------------------------------------------------
# Two letters and two check digits start one; then the country's BBAN, written compact or in groups.
# The country fixes the length, so whatever follows (a word, more digits) is cut off before the check.
IBAN_START = re.compile(r"[0-9](?<=[A-Za-z]{2}[0-9])[0-9]")   # the check digits; the letters are 2 back
_IBAN_SEPARATORS = re.compile(r"[ \u00a0-]")
_IBAN_LETTERS = {ord(letter): str(10 + i) for i, letter in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZ")}   # A=10 … Z=35


@functools.cache
def iban_shape(country: str) -> re.Pattern | None:
    """An IBAN of `country` (upper case) as written: as many characters as python-stdnum's registry gives
    its BBAN, each after an optional single space or dash. None when the country issues none."""
    bban = numdb.get("iban").info(country)[0][1].get("bban")
    if not bban:
        return None
    length = sum(int(n) for n in re.findall(r"(\d+)!", bban))
    return re.compile(r"[A-Za-z]{2}[0-9]{2}(?:[ \u00a0-]?[A-Za-z0-9]){" + str(length) + "}")


def _ibans(text: str) -> Iterator[tuple[int, int]]:
    done = 0
    for m in IBAN_START.finditer(text):
        start = m.start() - 2
        shape = iban_shape(text[start:start + 2].upper()) if start >= done else None
        if shape is None or (written := shape.match(text, start)) is None:
            continue
        end = written.end()
        number = _IBAN_SEPARATORS.sub("", text[start:end]).upper()
        # A quick mod-97 first (96 candidates in 97 stop here; stdnum's full check costs ~10x more), then
        # stdnum: mod-97, length and the BBAN's format (check_country=False: not each bank's own digits).
        if (int((number[4:] + number[:4]).translate(_IBAN_LETTERS)) % 97 == 1
                and _iban.is_valid(number, check_country=False)):
            done = end
            yield start, end


# --- national_id -------------------------------------------------------------------------------------
# Each pattern finds a country's written form; python-stdnum validates it, except the UK NINO (no check
# digit: the pattern is its allocation rules). Nine bare digits are a Dutch BSN or a US SSN only when
# named just before ("BSN: …", "SSN …"): one 9-digit number in 11 passes the BSN test, and an SSN has no
# check at all. Written with dashes or spaces (123-45-6789), an SSN needs no name. A NIR starts with 1 or
# 2 (the sex): the temporary numbers starting 3, 4, 7 or 8 are rare, and 15 digits starting 3 are Amex.
# Finding them costs two scans of the text, each for a character class (a digit), so that `re` skips
# ahead in C: digits that start a word and have 4 more behind them, and digits right after a letter
# (NIE, NINO); each country's pattern is then tried there only.


def _first(chars: str) -> str:
    """`chars` as the first character of a match that is not glued to a letter, digit or dot before it
    (the lookbehind comes after the character: a leading one would stop `re` from skipping ahead)."""
    return f"{chars}(?<![\\w.]{chars})"


SSN = re.compile(_first("[0-9]") + r"[0-9]{2}(?P<sep>[- ])[0-9]{2}(?P=sep)[0-9]{4}(?![\w-])")
DNI = re.compile(_first("[0-9]") + r"[0-9]\.?[0-9]{3}\.?[0-9]{3}(?:[A-Za-z]|[ -][A-Z])(?!\w)")
NIR = re.compile(_first("[12]") + r"[ .]?[0-9]{2}[ .]?(?:0[1-9]|1[0-2]|[2-9][0-9])[ .]?(?:[0-9]{2}|2[ABab])"
                 r"[ .]?[0-9]{3}[ .]?[0-9]{3}[ .]?[0-9]{2}(?!\w)")
NINE_DIGITS = re.compile(_first("[0-9]") + r"[0-9]{8}(?!\w)")
NIE = re.compile(_first("[XYZxyz]") + r"[ -]?[0-9]{7}(?:[A-Za-z]|[ -][A-Z])(?!\w)")
NINO = re.compile(_first("[A-CEGHJ-PR-TW-Za-ceghj-pr-tw-z]") + r"[A-CEGHJ-NPR-TW-Za-ceghj-npr-tw-z]"
                  r" ?[0-9]{2} ?[0-9]{2} ?[0-9]{2} ?[A-Da-d](?!\w)")
NINO_UNALLOCATED = frozenset({"BG", "GB", "KN", "NK", "NT", "TN", "ZZ"})
NUMBER_START = re.compile(_first("[0-9]") + r"(?=(?:[ .-]?[0-9]){4})")   # 4: a NIR may have 2A at 5-6
AFTER_LETTERS = re.compile(r"[0-9](?:(?<=[A-Za-z][0-9])|(?<=[A-Za-z][ -][0-9]))(?=(?: ?[0-9]){5})")
NAMED_BSN = re.compile(r"\b(?:bsn|burgerservicenummer|sofi-?nummer|citizen service number)\b")
NAMED_SSN = re.compile(r"\b(?:ssn|social security)\b")
CONTEXT = 40   # how far before a bare 9-digit number its name may be (characters)


def _named(text: str, start: int, name: re.Pattern) -> bool:
    return name.search(text[max(0, start - CONTEXT):start].lower()) is not None


NUMBERS: tuple[tuple[re.Pattern, Callable[[str, re.Match], bool]], ...] = (
    (SSN, lambda text, m: _ssn.is_valid(m.group().replace(" ", "-"))),
    (DNI, lambda text, m: _dni.is_valid(m.group().replace(".", ""))),
    (NIR, lambda text, m: _nir.is_valid(m.group())),
    (NINE_DIGITS, lambda text, m: (_named(text, m.start(), NAMED_BSN) and _bsn.is_valid(m.group()))
     or (_named(text, m.start(), NAMED_SSN) and _ssn.is_valid(m.group()))),
)
# Most candidates (dates, prices, order numbers) fit none of them: one match of all four at once says so.
ANY_NUMBER = re.compile("|".join(f"(?:{pattern.pattern})" for pattern, _ in NUMBERS))
LETTERED: tuple[tuple[re.Pattern, tuple[int, ...], Callable[[str], bool]], ...] = (
    (NIE, (1, 2), _nie.is_valid),                                         # X1234567L, X-1234567-L
    (NINO, (2, 3), lambda nino: nino[:2].upper() not in NINO_UNALLOCATED),   # AB123456C, AB 12 34 56 C
)


def _national_ids(text: str) -> Iterator[tuple[int, int]]:
    for candidate in NUMBER_START.finditer(text):
        if ANY_NUMBER.match(text, candidate.start()) is None:
            continue
        for pattern, valid in NUMBERS:
            if (m := pattern.match(text, candidate.start())) and valid(text, m):
                yield m.span()
    for candidate in AFTER_LETTERS.finditer(text):
        for pattern, back, ok in LETTERED:
            for start in (candidate.start() - k for k in back if k <= candidate.start()):
                if (m := pattern.match(text, start)) and ok(m.group()):
                    yield m.span()


DETECTORS: dict[str, Callable[[str], Iterator[tuple[int, int]]]] = {
    "email": _emails, "phone": _phones, "card": _cards, "iban": _ibans, "national_id": _national_ids}
_NON_ASCII_DIGIT = re.compile(r"[^\D0-9]")


def find_pii(text: str, kinds: Iterable[str] = PII_KINDS) -> list[Finding]:
    """Every piece of personal data of the given kinds in `text`, sorted by start, never overlapping.

    Findings of different kinds that overlap merge into one covering both, named after the more
    specific kind (PRECEDENCE: email, iban, national_id, card, phone), so no part of either is left
    out. Digits of any script count (a card typed in full-width digits is a card). Raises ValueError
    for a kind not in PII_KINDS."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if unknown := [k for k in kinds if k not in DETECTORS]:
        raise ValueError(f"unknown PII kind {unknown[0]!r}; the kinds are {', '.join(PII_KINDS)}")
    if not text.isascii():   # one character for one: offsets stay those of `text`
        text = _NON_ASCII_DIGIT.sub(lambda m: str(unicodedata.decimal(m.group())), text)
    spans = sorted((start, end, kind) for kind in dict.fromkeys(kinds) for start, end in DETECTORS[kind](text))
    findings: list[Finding] = []
    for start, end, kind in spans:
        if findings and start < findings[-1].end:
            last = findings[-1]
            best = kind if PRECEDENCE[kind] < PRECEDENCE[last.kind] else last.kind
            findings[-1] = Finding(best, last.start, max(last.end, end))
        else:
            findings.append(Finding(kind, start, end))
    return findings


def redact_pii(text: str, kinds: Iterable[str] = PII_KINDS) -> tuple[str, dict[str, int]]:
    """`text` with each finding replaced by its label (`[EMAIL]`, `[PHONE]`, `[CARD]`, `[IBAN]`,
    `[NATIONAL_ID]`), and how many of each kind were replaced (kinds with none are left out)."""
    findings = find_pii(text, kinds)
    if not findings:
        return text, {}
    out: list[str] = []
    counts: dict[str, int] = {}
    last = 0
    for f in findings:
        out += [text[last:f.start], LABELS[f.kind]]
        counts[f.kind] = counts.get(f.kind, 0) + 1
        last = f.end
    out.append(text[last:])
    return "".join(out), counts


# --- traces ------------------------------------------------------------------------------------------
def _builtin(kinds: tuple[str, ...]) -> Callable[[str, dict[str, int]], str]:
    def apply(text: str, counts: dict[str, int]) -> str:
        out, found = redact_pii(text, kinds)
        for name, n in found.items():
            counts[name] = counts.get(name, 0) + n
        return out

    return apply


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
    what they replaced (the counts go into the trace, never the matched text). The built-in kinds go
    through `redact_pii`, as guardrails do; then the project's patterns, then its hook."""

    def __init__(self, spec: TracingSpec):
        rules: list[Callable[[str, dict[str, int]], str]] = []
        if spec.redact:
            rules.append(_builtin(tuple(spec.redact)))
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
