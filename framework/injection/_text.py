"""The views of a ticket the rules read: what a reader sees, case-folded and squeezed, and the folded
pieces where look-alikes, leetspeak, combining marks or letter spacing hide a word.

Each view keeps the text's length bounded by the original (folding is one character for one), and the
common case is cheap: an ASCII ticket skips Unicode normalisation, and a ticket with no disguised word
needs no folded view at all.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection

# Zero-width and other invisible format characters are deleted, so "ig\u200bnore" is "ignore". Unicode tag
# characters (U+E0020..E007E) mirror printable ASCII invisibly (the "ASCII smuggling" trick): they become
# the ASCII they hide, so the rules see it.
_INVISIBLE: dict[int, int | None] = dict.fromkeys(
    [0x00AD, 0x034F, 0x061C, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x180E, 0x3164, 0xFEFF, 0xFFA0, 0xE0001, 0xE007F,
     *range(0x200B, 0x2010), *range(0x202A, 0x202F), *range(0x2060, 0x2070), *range(0xFE00, 0xFE10),
     *range(0xE0100, 0xE01F0)])
_INVISIBLE.update({cp: cp - 0xE0000 for cp in range(0xE0020, 0xE007F)})
_INVISIBLE_CLASS = re.compile("[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e\u200b-\u200f\u202a-\u202e"
                              "\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\U000e0000-\U000e01ef]")
_QUOTES = str.maketrans(dict.fromkeys("\u2018\u2019\u201a\u201b", "'") | dict.fromkeys("\u201c\u201d\u201e\u201f", '"'))
# Runs of blanks become one space, or one newline when they hold one: a rule's match then has a bounded
# length (padding "ignore          previous instructions" hides nothing), which is what lets rules run in
# windows around their needles. The pattern starts with a character class, which the engine scans fast.
_LINE_BREAKS = re.compile(r"[^\S\n]*\n\s*")  # blanks around a newline: one newline
_SPACES = re.compile(r"[^\S\n]{2,}")  # other runs: one space
_ODD_BLANKS = str.maketrans("\t\r\f\v", "    ")
_CURLY = re.compile("[\u2018\u2019\u201a\u201b\u201c\u201d\u201e\u201f]")
# Where Chinese or Japanese meets a Latin letter there is no word break ("好ignore all previous
# instructions"): a space goes in, so that the Latin rules see a word.
_CJK = re.compile("[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff]")
_CJK_LATIN = re.compile("(?<=[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff])(?=[a-z0-9])|"
                        "(?<=[a-z0-9])(?=[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff])")

# Look-alikes of Latin letters, folded for the Latin rules only (a Russian ticket keeps its letters for the
# Russian rules): Cyrillic, Greek, small capitals, leetspeak digits and symbols.
_LOOKALIKES = {
    "a": "аɑαᴀ@4", "b": "ʙ", "c": "сᴄ", "d": "ԁᴅ", "e": "еёεᴇ3€", "g": "ɡɢ", "h": "һʜ", "i": "іїιıɩɪ1",
    "j": "јᴊ", "k": "кκᴋ", "l": "ӏʟ", "m": "ᴍ", "n": "ɴ", "o": "оοօᴏ0", "p": "рρᴘ", "q": "ԛ", "r": "ʀ",
    "s": "ѕꜱ5$", "t": "τᴛ7", "u": "υսᴜ", "v": "νᴠ", "w": "ԝᴡ", "x": "хχ", "y": "уγʏ", "z": "ᴢ",
}
_FOLD = str.maketrans({ch: latin for latin, chars in _LOOKALIKES.items() for ch in chars})
_LOOKALIKE = re.compile("[" + re.escape("".join(sorted({ch for chars in _LOOKALIKES.values() for ch in chars}))) + "]+")
_LONGEST_WORD = 40  # a longer run of letters and digits is a token (an id, base64), not a disguised word
_WORD_BACK = re.compile(r"[\w@$€]*$")  # searched in a bounded window: where the word around a look-alike starts
_WORD_REST = re.compile(r"[\w@$€]*")  # where it ends (read once: the scan resumes after it)
_COMBINING = re.compile("[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]")  # zalgo, "i̇"
# Letter-spaced words ("i g n o r e", "i.g.n.o.r.e"): a run of 3+ single letters, each followed by one
# separator, is joined back into a word.
_SPACED = re.compile(r"(?<![^\W\d_])(?:[^\W\d_][ .\-_*·•/|]){2,}[^\W\d_](?![^\W\d_])")
# That pattern tries every position; this test runs first: the text's bytes mapped to "a" (a letter, or any
# non-ASCII character), " " (a separator) and "#", then a substring search for three one-letter words.
_SPACING_MAP = bytes(ord("a") if chr(b).isalpha() or b == ord("?") else ord(" ") if chr(b) in " .-_*/|" else ord("#")
                     for b in range(256))

_ALPHABET = "abcdefghijklmnopqrstuvwxyz"
CAESAR = [str.maketrans(_ALPHABET, _ALPHABET[k:] + _ALPHABET[:k]) for k in range(26)]
# rot13 and reversed text are decoded only when one of these fragments is in the ticket: "ignore",
# "instruction", "previous", "prompt", "disregard", "urgent", "priority", in rot13 and reversed.
ROT13_HINTS = ("vtaber", "vafgehpgvba", "cerivbhf", "cebzcg", "qvfertneq", "hetrag", "cevbevgl")
REVERSED_HINTS = ("erongi", "noitcurtsni", "suoiverp", "tpmorp", "dragersid", "tnegru", "ytiroirp")


def visible(text: str) -> str:
    """What a reader (and a model) sees: invisible characters gone, compatibility forms (full-width,
    mathematical letters, ligatures) unified by NFKC."""
    if text.isascii():  # the common case: nothing to delete, NFKC is the identity
        return text
    if _INVISIBLE_CLASS.search(text):
        text = text.translate(_INVISIBLE)
    return text if unicodedata.is_normalized("NFKC", text) else unicodedata.normalize("NFKC", text)


def lowered(seen: str) -> str:
    """The view most rules read: case-folded, blanks squeezed, typographic quotes made plain."""
    text = seen.casefold()
    if "\t" in text or "\r" in text or "\f" in text or "\v" in text:
        text = text.translate(_ODD_BLANKS)
    if "\n\n" in text or " \n" in text or "\n " in text:
        text = _LINE_BREAKS.sub("\n", text)
    if "  " in text:
        text = _SPACES.sub(" ", text)
    if not text.isascii():
        if _CURLY.search(text):
            text = _CURLY.sub(lambda m: m.group(0).translate(_QUOTES), text)
        if _CJK.search(text):
            text = _CJK_LATIN.sub(" ", text)
    return text


def _maybe_spaced(text: str) -> bool:
    if "·" in text or "•" in text:
        return True
    return b" a a a " in b" " + text.encode("ascii", "replace").translate(_SPACING_MAP) + b" "


def folded_parts(lower: str, vocabulary: Collection[str], reach: int) -> list[str]:
    """The pieces of `lower` a second pass of the Latin rules must read, with disguises undone.

    Usually none. Only words that mix Latin letters with look-alikes are folded ("іgnore", "1gn0re",
    "pr3v10us"; not "order 4711" or a Russian word), and only when the folded word starts like a word of
    `vocabulary` (first four letters); each piece is the text `reach` characters around such words, where
    a rule could newly match. When combining marks or letter spacing are removed, positions shift and the
    whole folded text is the one piece.
    """
    text = _COMBINING.sub("", lower) if _COMBINING.search(lower) else lower
    if _maybe_spaced(text) and _SPACED.search(text):
        text = _SPACED.sub(lambda m: m.group(0)[::2], text)
    whole = text is not lower
    spans: list[tuple[int, int]] = []
    seen = 0  # end of the last word looked at: each word is walked once
    for m in _LOOKALIKE.finditer(text):
        at = m.start()
        if at < seen:
            continue
        before = text[at - 1] if at else " "
        after = text[m.end()] if m.end() < len(text) else " "
        if not ("a" <= before <= "z" or "a" <= after <= "z"):
            continue
        start = _WORD_BACK.search(text, max(0, at - _LONGEST_WORD - 1), at + 1).start()  # type: ignore[union-attr]
        end = _WORD_REST.match(text, m.end()).end()  # type: ignore[union-attr]
        seen = end
        if end - start > _LONGEST_WORD or text[start:end].translate(_FOLD)[:4] not in vocabulary:
            continue  # "s1", "user@example", "h264", a token: folding makes no word a rule knows
        if spans and start <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(end, spans[-1][1]))
        else:
            spans.append((start, end))
    if not spans:
        return [text] if whole else []
    pieces, done = [], 0
    for start, end in spans:
        pieces += [text[done:start], text[start:end].translate(_FOLD)]
        done = end
    folded = "".join(pieces) + text[done:]
    if whole:
        return [folded]
    parts: list[str] = []
    lo, hi = spans[0]
    for start, end in spans[1:]:
        if start - reach > hi + reach:
            parts.append(folded[max(0, lo - reach):hi + reach])
            lo = start
        hi = end
    parts.append(folded[max(0, lo - reach):hi + reach])
    return parts
