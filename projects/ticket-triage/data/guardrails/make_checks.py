"""Validate the guardrail label sets and print their counts.

    python3 projects/ticket-triage/data/guardrails/make_checks.py

Plain Python 3.11+, no dependencies. Exits 1 and lists every problem when a file is wrong.

injection.{dev,eval}.jsonl: fields, ids, kinds, label/kind agreement, text length, no
duplicate text, no near-duplicate between dev and eval (character 5-gram Jaccard), every
kind in both splits, the required totals.

pii.{dev,eval}.jsonl: every labelled span is an exact substring of the text and is valid
for its kind (Luhn for cards, mod-97 and country length for IBANs, the number's own
check for national ids); and every number in any text that passes a checksum (card,
IBAN, SSN ranges, DNI/NIE letter, BSN 11-test, NIR key), every NINO-shaped string and
every email address is covered by a label. Strings of those shapes that fail their
check are counted as look-alikes.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPLITS = ("dev", "eval")

INJ_KINDS = ("direct", "role_play", "system_spoof", "indirect", "encoded", "multilingual", "in_ticket")
BENIGN_KINDS = ("code_or_logs", "ordinary_ignore", "non_english", "about_ai", "plain")
PII_KINDS = ("email", "phone", "card", "iban", "national_id")

MIN_LEN, MAX_LEN = 10, 1500
MIN_PER_LABEL = 160  # injection attempts and benign rows, dev + eval together
MIN_PII_ROWS = 120
NEAR_DUP = 0.5

errors: list[str] = []


def err(where: str, msg: str) -> None:
    errors.append(f"{where}: {msg}")


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    if not path.exists():
        err(path.name, "missing")
        return rows
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            err(f"{path.name}:{n}", "blank line")
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            err(f"{path.name}:{n}", f"not JSON ({e})")
    return rows


# ---------------------------------------------------------------- checksums

def luhn_ok(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        n = int(c)
        if i % 2 == 1:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0


IBAN_LENGTHS = {"DE": 22, "FR": 27, "GB": 22, "ES": 24, "NL": 18, "IT": 27, "BE": 16,
                "AT": 20, "CH": 21, "IE": 22, "PT": 25, "PL": 28, "LU": 20, "DK": 18, "SE": 24}


def iban_mod97_ok(compact: str) -> bool:
    moved = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def iban_ok(s: str) -> bool:
    c = s.replace(" ", "")
    return (re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]+", c) is not None
            and IBAN_LENGTHS.get(c[:2]) == len(c) and iban_mod97_ok(c))


def ssn_ok(s: str) -> bool:
    m = re.fullmatch(r"(\d{3})-(\d{2})-(\d{4})", s)
    if not m:
        return False
    area, group, serial = (int(x) for x in m.groups())
    return 1 <= area <= 899 and area != 666 and group >= 1 and serial >= 1


DNI_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"


def dni_ok(s: str) -> bool:
    m = re.fullmatch(r"(\d{8})[- ]?([A-Z])", s)
    return bool(m) and DNI_LETTERS[int(m[1]) % 23] == m[2]


def nie_ok(s: str) -> bool:
    m = re.fullmatch(r"([XYZ])[- ]?(\d{7})[- ]?([A-Z])", s)
    return bool(m) and DNI_LETTERS[int(str("XYZ".index(m[1])) + m[2]) % 23] == m[3]


def bsn_ok(s: str) -> bool:
    d = s.replace(".", "").replace(" ", "")
    if not re.fullmatch(r"\d{9}", d) or d[0] == "0":
        return False
    weights = (9, 8, 7, 6, 5, 4, 3, 2, -1)
    return sum(int(a) * w for a, w in zip(d, weights)) % 11 == 0


NIR_RE = r"[12] ?\d{2} ?(?:0[1-9]|1[0-2]|[2-9]\d) ?(?:\d{2}|2A|2B) ?\d{3} ?\d{3} ?\d{2}"


def nir_ok(s: str) -> bool:
    if not re.fullmatch(NIR_RE, s):
        return False
    c = s.replace(" ", "")
    body = c[:13].replace("2A", "19").replace("2B", "18")
    return 97 - int(body) % 97 == int(c[13:])


NINO_RE = r"[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]"


def nino_ok(s: str) -> bool:
    return re.fullmatch(NINO_RE, s) is not None and s[:2] not in {"BG", "GB", "KN", "NK", "NT", "TN", "ZZ"}


NATIONAL_IDS = (("ssn", ssn_ok), ("dni", dni_ok), ("nie", nie_ok), ("bsn", bsn_ok), ("nir", nir_ok), ("nino", nino_ok))


def national_id_type(s: str) -> str | None:
    for name, ok in NATIONAL_IDS:
        if ok(s):
            return name
    return None


EMAIL_RE = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"


def phone_ok(s: str) -> bool:
    digits = re.sub(r"\D", "", s)
    return (re.fullmatch(r"\+?[\d(][\d ()./-]*\d", s) is not None) and 7 <= len(digits) <= 15


def card_ok(s: str) -> bool:
    if not re.fullmatch(r"\d(?:[ -]?\d)+", s):
        return False
    d = re.sub(r"\D", "", s)
    return 13 <= len(d) <= 19 and luhn_ok(d)


VALIDATORS = {
    "email": lambda s: re.fullmatch(EMAIL_RE, s) is not None,
    "phone": phone_ok,
    "card": card_ok,
    "iban": iban_ok,
    "national_id": lambda s: national_id_type(s) is not None,
}

# (name, pattern, is_valid) for strings that must be labelled when valid; invalid ones are look-alikes.
SCANS = (
    ("card", r"(?<![\d\w])\d(?:[ -]?\d){12,18}(?![\d\w])", lambda s: luhn_ok(re.sub(r"\D", "", s))),
    ("iban", r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}", None),  # handled in scan_iban
    ("ssn", r"(?<![\d-])\d{3}-\d{2}-\d{4}(?![\d-])", ssn_ok),
    ("dni", r"\b\d{8}[- ]?[A-Z]\b", dni_ok),
    ("nie", r"\b[XYZ][- ]?\d{7}[- ]?[A-Z]\b", nie_ok),
    ("bsn", r"(?<![\d.,-])(?<!\d[.,-])\d{9}(?!\d|[.,-]\d)", bsn_ok),
    ("nir", r"(?<![\d\w])" + NIR_RE + r"(?![\d\w])", nir_ok),
    ("nino", r"\b" + NINO_RE + r"\b", nino_ok),
    ("email", EMAIL_RE, lambda s: True),
)


def spans_of(text: str, labels: list[dict]) -> list[tuple[int, int]]:
    spans = []
    for lab in labels:
        t = lab.get("text", "")
        start = text.find(t) if t else -1
        while start != -1:
            spans.append((start, start + len(t)))
            start = text.find(t, start + 1)
    return spans


def covered(s: int, e: int, spans: list[tuple[int, int]]) -> bool:
    return any(s < b and a < e for a, b in spans)


def scan(text: str, spans: list[tuple[int, int]], where: str, lookalikes: Counter) -> None:
    for name, pattern, valid in SCANS:
        for m in re.finditer(pattern, text):
            s, e, found = m.start(), m.end(), m.group()
            if name == "iban":
                compact = found.replace(" ", "")
                length = IBAN_LENGTHS.get(compact[:2])
                if not length or len(compact) < length:
                    continue
                ok = iban_mod97_ok(compact[:length])
            else:
                ok = valid(found)
            if ok and not covered(s, e, spans):
                err(where, f"unlabelled valid {name}: {found!r}")
            if not ok and not covered(s, e, spans):
                lookalikes[name] += 1


# ---------------------------------------------------------------- injection

def shingles(text: str, n: int = 5) -> set[str]:
    t = re.sub(r"\s+", " ", text.lower())
    return {t[i:i + n] for i in range(max(1, len(t) - n + 1))}


def check_injection() -> dict[str, list[dict]]:
    data = {}
    for split in SPLITS:
        name = f"injection.{split}.jsonl"
        rows = read_jsonl(HERE / name)
        data[split] = rows
        seen = set()
        for i, r in enumerate(rows, 1):
            where = f"{name}:{i}"
            if set(r) != {"id", "text", "injection", "kind"}:
                err(where, f"fields {sorted(r)} (want id, text, injection, kind)")
                continue
            if r["id"] != f"inj-{split}-{i:03d}":
                err(where, f"id {r['id']!r}, want 'inj-{split}-{i:03d}'")
            if not isinstance(r["injection"], bool):
                err(where, "injection is not true/false")
            kinds = INJ_KINDS if r["injection"] else BENIGN_KINDS
            if r["kind"] not in kinds:
                err(where, f"kind {r['kind']!r} with injection={r['injection']}")
            if not (MIN_LEN <= len(r["text"]) <= MAX_LEN):
                err(where, f"text length {len(r['text'])} outside {MIN_LEN}..{MAX_LEN}")
            if r["text"] in seen:
                err(where, "duplicate text")
            seen.add(r["text"])
    for kinds in (INJ_KINDS, BENIGN_KINDS):
        for k in kinds:
            for split in SPLITS:
                if not any(r.get("kind") == k for r in data[split]):
                    err(f"injection.{split}.jsonl", f"no row of kind {k!r}")
    for label in (True, False):
        total = sum(1 for s in SPLITS for r in data[s] if r.get("injection") is label)
        if total < MIN_PER_LABEL:
            err("injection", f"{total} rows with injection={label}, want >= {MIN_PER_LABEL}")
        dev = sum(1 for r in data["dev"] if r.get("injection") is label)
        if total and not 0.4 <= dev / total <= 0.6:
            err("injection", f"injection={label}: {dev} of {total} in dev, want about half")
    dev_sh = [(r["id"], shingles(r["text"])) for r in data["dev"] if "text" in r]
    for r in data["eval"]:
        if "text" not in r:
            continue
        sh = shingles(r["text"])
        for dev_id, dsh in dev_sh:
            jac = len(sh & dsh) / len(sh | dsh)
            if jac >= NEAR_DUP:
                err("injection", f"{r['id']} is close to {dev_id} (Jaccard {jac:.2f})")
    return data


# ---------------------------------------------------------------- pii

def check_pii() -> tuple[dict[str, list[dict]], dict[str, Counter], dict[str, Counter]]:
    data, subtypes, lookalikes = {}, {}, {}
    for split in SPLITS:
        name = f"pii.{split}.jsonl"
        rows = read_jsonl(HERE / name)
        data[split] = rows
        subtypes[split], lookalikes[split] = Counter(), Counter()
        seen = set()
        for i, r in enumerate(rows, 1):
            where = f"{name}:{i}"
            if set(r) != {"id", "text", "pii"} or not isinstance(r.get("pii"), list):
                err(where, f"fields {sorted(r)} (want id, text, pii list)")
                continue
            if r["id"] != f"pii-{split}-{i:03d}":
                err(where, f"id {r['id']!r}, want 'pii-{split}-{i:03d}'")
            text = r["text"]
            if text in seen:
                err(where, "duplicate text")
            seen.add(text)
            for lab in r["pii"]:
                if set(lab) != {"kind", "text"} or lab["kind"] not in PII_KINDS:
                    err(where, f"bad label {lab}")
                    continue
                if lab["text"] not in text:
                    err(where, f"{lab['kind']} {lab['text']!r} is not a substring of the text")
                if lab["text"] != lab["text"].strip():
                    err(where, f"{lab['kind']} {lab['text']!r} has surrounding whitespace")
                if not VALIDATORS[lab["kind"]](lab["text"]):
                    err(where, f"{lab['kind']} {lab['text']!r} fails its format or checksum")
                if lab["kind"] == "national_id":
                    subtypes[split][national_id_type(lab["text"]) or "?"] += 1
                if lab["kind"] == "iban":
                    subtypes[split]["iban_" + lab["text"][:2]] += 1
            scan(text, spans_of(text, r["pii"]), where, lookalikes[split])
    total = sum(len(data[s]) for s in SPLITS)
    if total < MIN_PII_ROWS:
        err("pii", f"{total} rows, want >= {MIN_PII_ROWS}")
    with_pii = sum(1 for s in SPLITS for r in data[s] if r.get("pii"))
    if total and not 0.5 <= with_pii / total <= 0.7:
        err("pii", f"{with_pii} of {total} rows have PII, want about 60%")
    return data, subtypes, lookalikes


# ---------------------------------------------------------------- report

def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> int:
    inj = check_injection()
    pii, subtypes, lookalikes = check_pii()

    rows = []
    for label, kinds in ((True, INJ_KINDS), (False, BENIGN_KINDS)):
        for k in kinds:
            c = [sum(1 for r in inj[s] if r.get("kind") == k) for s in SPLITS]
            rows.append([str(label).lower(), k, *c, sum(c)])
        c = [sum(1 for r in inj[s] if r.get("injection") is label) for s in SPLITS]
        rows.append([str(label).lower(), "**all**", *c, sum(c)])
    print("injection\n")
    print(table(["injection", "kind", "dev", "eval", "total"], rows))

    rows = []
    counts = {s: Counter(lab["kind"] for r in pii[s] for lab in r.get("pii", [])) for s in SPLITS}
    rows.append(["rows", *[len(pii[s]) for s in SPLITS], sum(len(pii[s]) for s in SPLITS)])
    c = [sum(1 for r in pii[s] if r.get("pii")) for s in SPLITS]
    rows.append(["rows with PII", *c, sum(c)])
    c = [sum(1 for r in pii[s] if not r.get("pii")) for s in SPLITS]
    rows.append(["rows without PII", *c, sum(c)])
    for k in PII_KINDS:
        c = [counts[s][k] for s in SPLITS]
        rows.append([f"{k} spans", *c, sum(c)])
        if k not in ("iban", "national_id"):
            continue
        for sub in sorted(set(subtypes["dev"]) | set(subtypes["eval"])):
            if (k == "iban") == sub.startswith("iban_"):
                c = [subtypes[s][sub] for s in SPLITS]
                rows.append([f"{k} {sub.removeprefix('iban_')}", *c, sum(c)])
    for k in sorted(set(lookalikes["dev"]) | set(lookalikes["eval"])):
        c = [lookalikes[s][k] for s in SPLITS]
        rows.append([f"look-alike {k} (fails check)", *c, sum(c)])
    print("\npii\n")
    print(table(["", "dev", "eval", "total"], rows))

    if errors:
        print(f"\n{len(errors)} problem(s):", file=sys.stderr)
        for e in errors:
            print("  " + e, file=sys.stderr)
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
