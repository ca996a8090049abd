"""Token and cost accounting of the demo check: what the model evaluated and generated per request.

Reads the newest complete eval run of the project's current content from its store (run `make demo`
or `slipway check <project>` first; nothing is re-run here), and splits each request's tokens into
prompt tokens evaluated anew, prompt tokens reused from llama.cpp's KV cache (the shared instruction
prefix), and generated tokens (the forced JSON skeleton is evaluated as prompt, not generated).
Cost is `metrics.request_cost` over those. Writes the figures to bench/results/demo_accounting.json.

    .venv/bin/python bench/demo_accounting.py [--project ticket-triage]
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import UTC, datetime
from pathlib import Path


def main() -> None:
    from framework.content import content_hashes
    from framework.evaluate import load_run, store_path
    from framework.metrics import percentile
    from framework.notebook import load_program
    from framework.spec import load_project
    from framework.store import Store

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", default="ticket-triage")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "demo_accounting.json")
    args = parser.parse_args()
    project = load_project(args.project)
    model_key = project.spec.pipeline.model
    wanted = content_hashes(project, load_program(project), "eval", model_key, None)["content_hash"]
    with Store(store_path(project), read_only=True) as store:
        run_id = store.find_complete_run(wanted)
    if run_id is None:
        raise SystemExit(f"no complete eval run of the current content: run `slipway check {project.name}` first")
    run = load_run(project, run_id)
    records = [r for r in run.records if r["tokens_cached"] is not None]
    new = [r["tokens_in"] - r["tokens_cached"] for r in records]
    cached = [r["tokens_cached"] for r in records]
    generated = [r["tokens_out"] for r in records]
    model = project.model(model_key)
    n = len(records)
    figures = {
        "project": project.name, "model": model.name, "run_id": run_id, "examples": n,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.node(),
        "prompt_tokens_new_mean": sum(new) / n, "prompt_tokens_cached_mean": sum(cached) / n,
        "generated_tokens_mean": sum(generated) / n,
        "tokens_per_request_mean": (sum(new) + sum(generated)) / n,
        "tokens_per_request_p95": percentile([a + b for a, b in zip(new, generated, strict=True)], 95),
        "cached_share_of_prompt": sum(cached) / max(sum(new) + sum(cached), 1),
        "cost_per_request_mean": sum(r["cost"] for r in records) / n,
        "prices_per_1k": {"input": model.price_per_1k_input, "cached_input": model.price_per_1k_cached_input,
                          "output": model.price_per_1k_output},
        "format_validity": run.metrics.get("format_validity"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    for key, value in figures.items():
        print(f"{key:28} {value:.6g}" if isinstance(value, float) else f"{key:28} {value}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
