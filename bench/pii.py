"""What PII detection costs per 8,000-character ticket (issue 14's guardrail budget: < 5 ms p99 for all
non-LLM checks; PII aims for < 1 ms), and what it adds to a trace.

Texts, 8,000 characters each:
- `tickets`: the ticket-triage tickets (train, dev and eval inputs) run together, as they come: a few
  prices, dates and invoice numbers, almost no personal data;
- `tickets_with_pii`: the same with 24 pieces of personal data spliced in (emails, phones, cards, IBANs,
  national ids of every country), one every ~330 characters;
- `digit_heavy`: a pasted log: timestamps, order and tracking numbers, amounts, one card;
- adversarial texts (one character class repeated, the shapes that make naive regexes backtrack).
Each is timed with `find_pii` (all kinds) `--repeats` times in one process after a warm-up call;
p50, p99 and max per call, wall clock and the thread's CPU time (which leaves out time spent waiting
for a core on a loaded host). Also the trace redaction (`Redactor` with the default kinds) on one typical
ticket, against main's redactor (emails, phones, cards only) when `--old` names its source file.

Writes bench/results/pii.json.

    .venv/bin/python bench/pii.py [--repeats 300] [--old /tmp/redact_main.py]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZE = 8000
PII = ["anna.schmidt@example.de", "+44 20 7946 0958", "(415) 555-0132", "4111 1111 1111 1111", "5555-5555-5555-4444",
       "378282246310005", "DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432", "FR14 2004 1010 0505 0001 3M02 606",
       "536-90-4399", "12345678Z", "X1234567L", "1 84 12 76 451 089 46", "AB 12 34 56 C", "BSN 111222333",
       "josé.garcía@correo.es", "06 12 34 56 78", "6011 1111 1111 1117", "ES91 2100 0418 4502 0005 1332",
       "NL91ABNA0417164300", "+34 612 345 678", "2 69 05 49 588 157 80", "ssn 219-09-9998", "jo@x.io"]


def tickets() -> str:
    lines = []
    for split in ("train", "dev", "eval"):
        for line in (REPO / "projects" / "ticket-triage" / "data" / f"{split}.jsonl").read_text().splitlines():
            lines.append(json.loads(line)["inputs"]["ticket"])
    return "\n\n".join(lines)


def texts() -> dict[str, str]:
    plain = tickets()
    base = plain[:SIZE]
    spliced, step = [], SIZE // len(PII)
    for i, item in enumerate(PII):
        spliced += [base[i * step:(i + 1) * step - len(item) - 2], f" {item} "]
    log = "".join(f"2026-11-{1 + i % 28:02d}T10:{i % 60:02d}:07.123Z order {40000000 + i * 7919} tracking "
                  f"1Z999AA1{i:010d} amount {i * 3.07:.2f} EUR status=ok\n" for i in range(200))
    log = log[:SIZE // 2] + " card 4111 1111 1111 1111 " + log[SIZE // 2:]
    return {
        "tickets": base,
        "tickets_with_pii": "".join(spliced).ljust(SIZE, ".")[:SIZE],
        "digit_heavy": log[:SIZE],
        "all_digits": "4" * SIZE,
        "digit_pairs_spaced": "12 " * (SIZE // 3),
        "letters_then_at": "a" * (SIZE - 1) + "@",
        "iban_starts": "DE89 " * (SIZE // 5),
        "phone_shapes": "+1 (" * (SIZE // 4),
    }


def timed(function, text: str, repeats: int) -> dict:
    """Wall time and this thread's CPU time per call (ms). On a shared host the wall p99 includes the
    time the process waited for a core; the CPU figures are what the call itself costs."""
    function(text)
    wall, cpu = [], []
    for _ in range(repeats):
        started, started_cpu = time.perf_counter_ns(), time.thread_time_ns()
        function(text)
        cpu.append((time.thread_time_ns() - started_cpu) / 1e6)
        wall.append((time.perf_counter_ns() - started) / 1e6)
    out = {"repeats": repeats}
    for name, samples in (("wall", wall), ("cpu", cpu)):
        samples.sort()
        out |= {f"{name}_p50_ms": round(statistics.median(samples), 4),
                f"{name}_p99_ms": round(samples[int(0.99 * (len(samples) - 1))], 4),
                f"{name}_max_ms": round(samples[-1], 4)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--old", type=Path, help="main's framework/redact.py, to compare the trace redactor")
    args = parser.parse_args()

    from framework.redact import Redactor, find_pii
    from framework.spec import TracingSpec

    results = {name: timed(find_pii, text, args.repeats) | {"chars": len(text), "findings": len(find_pii(text))}
               for name, text in texts().items()}
    ticket = tickets().split("\n\n")[3]
    typical = f"{ticket} Reach me at anna.schmidt@example.de or +44 20 7946 0958."
    redactor = Redactor(TracingSpec())
    trace = {"typical_ticket_chars": len(typical),
             "new_default_kinds": timed(lambda t: redactor._redact(t), typical, args.repeats * 10)}
    if args.old:
        spec = importlib.util.spec_from_file_location("redact_main", args.old)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        before = old.Redactor(TracingSpec(redact=["email", "phone", "card"]))
        trace["main_email_phone_card"] = timed(lambda t: before._redact(t), typical, args.repeats * 10)
    figures = {"measured_at": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.node(),
               "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "load_average_1m": os.getloadavg()[0], "find_pii_8000_chars": results, "trace_redaction": trace}
    out = REPO / "bench" / "results" / "pii.json"
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
