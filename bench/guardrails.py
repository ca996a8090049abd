"""What the guardrails cost, and how well the detectors do (issue 14's BENCHMARKS.md figures).

1. Cost per request of all the demo's non-LLM checks together (input size in the model's tokens,
   empty, injection, PII redaction, the business rules, the blocklist), measured by timing
   `Guard.check_input` + `Guard.check_output` on every dev and eval ticket and every labelled
   guardrail text, plus the worst case: 8,000-character tickets (the service's largest). p50/p99.
2. The same requests end to end, in process, on the tiny model (the service's path: guard, program,
   guard), with the demo's guardrails and with `[guardrails] enabled = false`, alternating per
   ticket in one run: the paired difference per request (median and p99) with bootstrap intervals,
   and the ratio of medians. The model's own run-to-run noise is far larger than the checks, so
   this says "lost in the noise" with its interval; figure 1 is the precise one.
3. Detector precision and recall (Wilson 95% intervals) on the bundled labelled sets, dev and eval.

Writes bench/results/guardrails.json.

    .venv/bin/python bench/guardrails.py [--requests 60] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "projects" / "ticket-triage" / "data"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def bootstrap(values: list[float], stat, samples: int = 2000) -> tuple[float, float]:
    rng = random.Random(0)
    draws = sorted(stat([rng.choice(values) for _ in values]) for _ in range(samples))
    return draws[int(0.025 * samples)], draws[int(0.975 * samples)]


def texts() -> list[str]:
    found = [json.loads(line)["inputs"]["ticket"] for split in ("dev", "eval")
             for line in (DATA / f"{split}.jsonl").read_text().splitlines() if line.strip()]
    for path in sorted((DATA / "guardrails").glob("*.jsonl")):
        found += [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    return found


def longest(base: list[str], chars: int = 8000) -> list[str]:
    """Tickets at the service's character limit: real tickets concatenated and cut at 8,000 characters."""
    rng = random.Random(1)
    out = []
    for _ in range(50):
        text = ""
        while len(text) < chars:
            text += rng.choice(base) + "\n"
        out.append(text[:chars])
    return out


def guard_cost(project, repeat: int) -> dict:
    from framework.evaluate import language_model, project_guard
    from framework.notebook import load_program

    language_model(project)   # the demo model's tokenizer: what the size check counts with when served
    program = load_program(project)
    guard = project_guard(project, program)
    answer = {"category": "abuse", "priority": "high", "needs_human": False, "reason": "phishing report"}

    def timed(batch: list[str]) -> list[float]:
        out = []
        for _ in range(repeat):
            for text in batch:
                t0 = time.perf_counter()
                checked = guard.check_input({"ticket": text})
                if checked.blocked is None:
                    guard.check_output(answer, checked.decisions)
                out.append((time.perf_counter() - t0) * 1000)
        return out

    base = texts()
    timed(base[:50])   # warm: regexes compiled, caches filled
    typical, worst = timed(base), timed(longest(base))
    checks = sorted({d.check for d in guard.check_input({"ticket": "x y"}).decisions} |
                    {d.check for d in guard.check_output(answer).decisions})
    return {"checks": checks, "texts": len(base), "repeat": repeat,
            "typical_ms_p50": statistics.median(typical), "typical_ms_p99": percentile(typical, 99),
            "typical_ms_max": max(typical), "chars8000_ms_p50": statistics.median(worst),
            "chars8000_ms_p99": percentile(worst, 99), "chars8000_ms_max": max(worst), "goal_ms_p99": 5.0}


def end_to_end(project, requests: int) -> dict:
    import dspy

    from framework.evaluate import adapter, language_model, project_guard
    from framework.guardrails import Guard
    from framework.notebook import load_program
    from framework.spec import GuardrailsSpec

    lm = language_model(project, "tiny")
    program = load_program(project)
    on = project_guard(project, program, "tiny")
    off = Guard(GuardrailsSpec(enabled=False), text_fields=on.text_fields, output_types=on.output_types)
    tickets = [json.loads(line)["inputs"]["ticket"] for line in
               (DATA / "dev.jsonl").read_text().splitlines()[:requests]]
    fields = tuple(on.output_types)

    def answer(guard, ticket: str) -> float:
        t0 = time.perf_counter()
        checked = guard.check_input({"ticket": ticket})
        if checked.blocked is None:
            prediction = program(**checked.values)
            guard.check_output({k: prediction.get(k) for k in fields}, checked.decisions)
        return (time.perf_counter() - t0) * 1000

    with_ms, without_ms = [], []
    with dspy.context(lm=lm, adapter=adapter(project)):
        program(ticket="warm-up: hello")
        for i, ticket in enumerate(tickets):
            for guarded in ((True, False) if i % 2 == 0 else (False, True)):
                (with_ms if guarded else without_ms).append(answer(on if guarded else off, ticket))
    diffs = [a - b for a, b in zip(with_ms, without_ms, strict=True)]
    return {"requests_each_way": len(diffs), "median_ms_with": statistics.median(with_ms),
            "median_ms_without": statistics.median(without_ms),
            "ratio_of_medians": statistics.median(with_ms) / statistics.median(without_ms),
            "paired_diff_ms_median": statistics.median(diffs),
            "paired_diff_ms_median_95": list(bootstrap(diffs, statistics.median)),
            "p99_ms_with": percentile(with_ms, 99), "p99_ms_without": percentile(without_ms, 99),
            "p99_diff_ms": percentile(with_ms, 99) - percentile(without_ms, 99)}


def detectors(project) -> dict:
    from framework.guardrails import score_injection, score_pii

    out = {}
    for split in ("dev", "eval"):
        scores = [score_injection(DATA / "guardrails" / f"injection.{split}.jsonl"),
                  score_pii(DATA / "guardrails" / f"pii.{split}.jsonl", project.spec.guardrails.pii.kinds)]
        for score in scores:
            out[f"{score.detector}.{split}"] = {
                "n": score.n, "tp": score.tp, "fp": score.fp, "fn": score.fn,
                **{name: {"value": value, "wilson95": list(interval)}
                   for name, (value, interval) in score.figures().items()}}
    return out


def copy_project(root: Path):
    import shutil

    from framework.spec import load_project

    shutil.copytree(REPO / "projects" / "ticket-triage", root / "projects" / "ticket-triage",
                    ignore=shutil.ignore_patterns(".slipway"))
    shutil.copytree(REPO / "notebooks", root / "notebooks", ignore=shutil.ignore_patterns("__marimo__"))
    return load_project(str(root / "projects" / "ticket-triage"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "guardrails.json")
    args = parser.parse_args()
    figures = {"measured_at": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.node(),
               "cpus": os.cpu_count(), "command": "bench/guardrails.py " + " ".join(
                   f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out")}
    with tempfile.TemporaryDirectory() as tmp:
        project = copy_project(Path(tmp))
        figures["detectors"] = detectors(project)
        print(json.dumps(figures["detectors"], indent=1))
        figures["guard_cost"] = guard_cost(project, args.repeat)
        print(json.dumps(figures["guard_cost"], indent=1))
        figures["end_to_end"] = end_to_end(project, args.requests)
        print(json.dumps(figures["end_to_end"], indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
