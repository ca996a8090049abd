"""Skeleton-forced decoding vs llama.cpp's full JSON-schema grammar, same model, same prompts.

Runs the notebook's program on N dev tickets twice, in one process: once with
the engine's skeleton path (framework/structured.py) and once with the plain
full-schema grammar (skeleton=False). Prints per-mode latency percentiles,
generated tokens and how often the two modes agree on the labelled fields.

    .venv/bin/python bench/structured_decoding.py --model qwen15 -n 30
"""

from __future__ import annotations

import argparse
import statistics
import time

import dspy

from framework import adapter, language_model, load_program, load_project, load_split
from framework.lm import metering
from framework.metrics import percentile


def run(program, tickets, lm, project):
    outputs, latencies, tokens = [], [], []
    with dspy.context(lm=lm, adapter=adapter(project)):
        for ticket in tickets:
            with metering() as calls:
                start = time.perf_counter()
                pred = program(ticket=ticket)
                latencies.append((time.perf_counter() - start) * 1000)
            tokens.append(sum(c.tokens_out for c in calls))
            outputs.append((pred.category, pred.priority, pred.needs_human))
    return outputs, latencies, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", default="ticket-triage")
    parser.add_argument("--model", default=None)
    parser.add_argument("-n", type=int, default=30)
    args = parser.parse_args()
    project = load_project(args.project)
    program = load_program(project)
    tickets = [ex.inputs["ticket"] for ex in load_split(project, "dev")[: args.n]]
    lm = language_model(project, args.model)
    engine = lm.engine
    with dspy.context(lm=lm, adapter=adapter(project)):
        program(ticket="warm-up: load the shared prompt prefix into the KV cache")
    results = {}
    for mode, skeleton in (("full-schema grammar", False), ("skeleton-forced", True)):
        engine.skeleton = skeleton
        results[mode] = run(program, tickets, lm, project)
    engine.skeleton = True
    print(f"model {lm.model}, {len(tickets)} dev tickets, threads={engine.settings['threads']}")
    print(f"{'mode':22} {'p50 ms':>8} {'p95 ms':>8} {'mean ms':>8} {'tokens out':>10}")
    for mode, (_, lat, tok) in results.items():
        print(f"{mode:22} {percentile(lat, 50):8.0f} {percentile(lat, 95):8.0f} {statistics.mean(lat):8.0f} "
              f"{statistics.mean(tok):10.1f}")
    base, fast = (results[m] for m in results)
    agree = sum(a == b for a, b in zip(base[0], fast[0], strict=True)) / len(tickets)
    ratio = statistics.mean(fast[1]) / statistics.mean(base[1])
    print(f"skeleton/full mean latency ratio: {ratio:.2f} (goal <= 0.8); label agreement {agree:.0%}")


if __name__ == "__main__":
    main()
