"""Hidden payloads: text encoded inside a ticket (base64, base32, hex, URL escapes, Morse), decoded so the
rules can read it. Bounded: at most 16 payloads per text, each cut to 4,096 characters, and a payload is
kept only when its bytes read as text (hashes, ids, images and keys do not).
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse

MAX_BLOBS = 16
MAX_BLOB_CHARS = 4096

# A base64-alphabet token of 16+ characters; hex runs and base32 are base64-alphabet tokens too, so one
# scan finds all three and each token is decoded as what it looks like first.
_TOKEN = re.compile(r"(?<![A-Za-z0-9+/=_-])[A-Za-z0-9+/_-]{16,}={0,2}")
# The first byte of a hidden text is printable ASCII (0x20..0x7e): the hex patterns start with the class
# [2-7], so the engine skips to the next such digit instead of trying every position.
_HEX_BYTE = r"(?:[2-7][0-9a-f]|[89a-f][0-9a-f]|0[9ad])"
_HEX_RUN = re.compile(rf"[2-7][0-9a-f]{_HEX_BYTE}{{7,}}[0-9a-f]?")
_HEX_ESCAPED = re.compile(rf"\\x[2-7][0-9a-f](?:\\x{_HEX_BYTE}){{7,}}")  # \x69\x67\x6e...
_HEX_SPACED = re.compile(rf"[2-7][0-9a-f](?:[ :,-]{_HEX_BYTE}){{7,}}")  # 69 67 6e ... or 69:67:6e...
_BASE32 = re.compile(r"[A-Z2-7]{24,}={0,6}")
_URL_ESCAPE = re.compile(r"%[0-9a-f]{2}")
_MORSE = re.compile(r"[.\-][.\-]{0,6}(?:(?: | ?/ ?)[.\-]{1,7}){7,}")
_MORSE_CODE = dict(zip(
    ".- -... -.-. -.. . ..-. --. .... .. .--- -.- .-.. -- -. --- .--. --.- .-. ... - ..- ...- .-- -..- -.-- --.. "
    "----- .---- ..--- ...-- ....- ..... -.... --... ---.. ----.".split(), "abcdefghijklmnopqrstuvwxyz0123456789",
    strict=True))


def _readable(raw: bytes) -> str | None:
    """The bytes as text, when they read as text: UTF-8, printable, and at least half letters."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    letters = sum(ch.isalpha() for ch in text)
    if len(text) < 8 or letters < 0.5 * len(text.replace(" ", "")):
        return None
    return text if sum(ch.isprintable() or ch in "\n\t\r" for ch in text) >= 0.95 * len(text) else None


def _from_base64(token: str) -> str | None:
    token = token.rstrip("=")[:MAX_BLOB_CHARS]
    if len(token) % 4 == 1:
        token = token[:-1]
    urlsafe = "-" in token or "_" in token
    if urlsafe and ("+" in token or "/" in token):
        return None
    try:
        raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_" if urlsafe else None, validate=True)
    except (binascii.Error, ValueError):
        return None
    return _readable(raw)


def _from_base32(token: str) -> str | None:
    token = token.rstrip("=")[:MAX_BLOB_CHARS]
    if len(token) % 8 in (1, 3, 6):  # lengths no base32 text has: drop the tail
        token = token[: len(token) // 8 * 8]
    try:
        return _readable(base64.b32decode(token + "=" * (-len(token) % 8)))
    except (binascii.Error, ValueError):
        return None


def _from_hex(token: str) -> str | None:
    digits = re.sub(r"\\x|0x|[ :,-]", "", token.lower())[:MAX_BLOB_CHARS]
    try:
        return _readable(bytes.fromhex(digits[: len(digits) // 2 * 2]))
    except ValueError:
        return None


def _from_token(token: str) -> tuple[str, str | None]:
    bare = token[2:] if token[:2] in ("0x", "0X") else token
    if _HEX_RUN.fullmatch(bare.lower()):
        return "hex", _from_hex(bare)
    if _BASE32.fullmatch(bare):
        decoded = _from_base32(bare)
        if decoded is not None:
            return "base32", decoded
    return "base64", _from_base64(token)


def _from_morse(token: str) -> str | None:
    text = " ".join("".join(_MORSE_CODE.get(ch, "") for ch in word.split()) for word in re.split(r" ?/ ?", token))
    return text if text.strip() else None


def payloads(seen: str, lower: str) -> list[tuple[str, str]]:
    """(encoding, decoded text) for each payload hidden in the text; `seen` keeps its case (base64 and
    base32 need it), `lower` is the squeezed, case-folded view."""
    found: list[tuple[str, str]] = []

    def keep(kind: str, decoded: str | None) -> bool:
        if decoded is not None and (kind, decoded) not in found:
            found.append((kind, decoded))
        return len(found) < MAX_BLOBS

    if len(_URL_ESCAPE.findall(lower, 0, MAX_BLOB_CHARS * 4)) >= 3:
        keep("url", urllib.parse.unquote(lower[:MAX_BLOB_CHARS * 4]))
    for m in _TOKEN.finditer(seen):
        if not keep(*_from_token(m.group(0))):
            return found
    scans = []
    if "\\x" in lower:
        scans.append(("hex", _HEX_ESCAPED, _from_hex))
    if " " in lower or ":" in lower:
        scans.append(("hex", _HEX_SPACED, _from_hex))
    if lower.count(" .") + lower.count(" -") >= 6:  # Morse is dots and dashes after blanks
        scans.append(("morse", _MORSE, _from_morse))
    for kind, pattern, decode in scans:
        for m in pattern.finditer(lower):
            if not keep(kind, decode(m.group(0))):
                return found
    return found
