"""The routed demo (issue 16): qwen05 → qwen15 against qwen15 alone, on the eval split, in one run.

On a copy of the demo project (the real project, its store and bentos are never touched) with
`[pipeline] tiers = ["qwen05", "qwen15"]` (both sequential, `parallel = 1`):

1. calibration: `framework.routing.calibrate` on the first `--dev-limit` DEV tickets (never eval): tier 1
   and the top tier unrouted, each candidate confidence bar scored; the recommended bar is used below
   unless `--bar` is given. Stored with its table.
2. single: `run_eval(..., model_key="qwen15", routed=False)` on the first `--limit` eval tickets: the
   pipeline as the demo serves it today.
3. routed: `run_eval(...)` on the same tickets, routed at the bar.

Reported, paired per eval ticket (`framework.metrics.paired_delta`: the interval resamples tickets with
their pair, the p-value swaps within pairs): category accuracy routed - single; cost per request routed /
single (means) and p50 latency routed / single, each with a paired bootstrap interval of the ratio;
the share escalated, per-tier answers, and every quality metric of both runs with its interval.
Run it alone (2 cores: a second busy process slows llama.cpp many times over); each section records the
other processes' CPU as `machine_load`.

    PYTHONPATH=$PWD .venv/bin/python bench/routing.py --limit 8 --dev-limit 8        # a quick try
    PYTHONPATH=$PWD .venv/bin/python bench/routing.py                                 # the figures
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

from bench.engine import REPO, Results, copy_project, machine_info


def tiered_copy(root: Path) -> Path:
    toml = copy_project(root)
    text = toml.read_text()
    text = re.sub(r'(?m)^model = "qwen15"', 'model = "qwen15"\ntiers = ["qwen05", "qwen15"]', text, count=1)
    # both sequential, as the demo's qwen15 is: latency per request, one at a time
    toml.write_text(text.replace("[models.qwen05]\n", "[models.qwen05]\nparallel = 1\n", 1))
    return toml


def set_bar(toml: Path, bar: float) -> None:
    text = re.sub(r"(?m)^\[routing\]\n(min_confidence = .*\n)?", "", toml.read_text())
    toml.write_text(text + f"\n[routing]\nmin_confidence = {bar}\n")


def calibration(project, dev_limit: int) -> dict:
    from framework.routing import calibrate

    found = calibrate(project, limit=dev_limit, progress=lambda i, n: print(f"calibrate {i}/{n}", flush=True))
    return {"metric": found.metric, "n": found.n, "top_value": found.top_value, "rule": found.rule,
            "recommended": found.recommended, "rows": found.rows}


def ratio_interval(num: list[float], den: list[float], stat, samples: int = 2000) -> list[float]:
    """Paired bootstrap (tickets resampled with their pair) of stat(num) / stat(den)."""
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = np.array(num), np.array(den)
    picks = rng.integers(0, a.size, size=(samples, a.size))
    ratios = [stat(a[p]) / stat(b[p]) for p in picks]
    return [float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))]


def compare(project, limit: int | None) -> dict:
    import numpy as np

    from framework.evaluate import run_eval
    from framework.metrics import paired_delta

    def progress(name):
        return lambda i, n: print(f"{name} {i}/{n}", flush=True)

    single = run_eval(project, split="eval", limit=limit, model_key="qwen15", record=False, routed=False,
                      progress=progress("single"))
    routed = run_eval(project, split="eval", limit=limit, record=False, progress=progress("routed"))
    by_id = {r["example_id"]: r for r in routed.records}
    pairs = [(s, by_id[s["example_id"]]) for s in single.records if s["example_id"] in by_id]
    out: dict = {"n": len(pairs)}
    for metric in ("category_accuracy", "needs_human_accuracy", "priority_band_match", "format_validity"):
        old = [s["scores"].get(metric, 0.0) for s, _ in pairs]
        new = [r["scores"].get(metric, 0.0) for _, r in pairs]
        delta = paired_delta(old, new)
        out[f"{metric}_delta"] = {"single": float(np.mean(old)), "routed": float(np.mean(new)),
                                  "delta": delta.delta, "interval_95": list(delta.interval), "p": delta.p_value}
    cost_s, cost_r = [s["cost"] for s, _ in pairs], [r["cost"] for _, r in pairs]
    lat_s, lat_r = [s["latency_ms"] for s, _ in pairs], [r["latency_ms"] for _, r in pairs]
    out["cost_per_request"] = {"single": float(np.mean(cost_s)), "routed": float(np.mean(cost_r)),
                               "ratio": float(np.mean(cost_r) / np.mean(cost_s)),
                               "ratio_interval_95": ratio_interval(cost_r, cost_s, np.mean)}
    out["latency_p50_ms"] = {"single": float(np.median(lat_s)), "routed": float(np.median(lat_r)),
                             "ratio": float(np.median(lat_r) / np.median(lat_s)),
                             "ratio_interval_95": ratio_interval(lat_r, lat_s, np.median)}
    out["latency_p95_ms"] = {"single": float(np.percentile(lat_s, 95)), "routed": float(np.percentile(lat_r, 95))}
    escalated = [r for _, r in pairs if r.get("routing") and r["routing"]["escalations"]]
    out["escalated"] = {"count": len(escalated), "share": len(escalated) / max(len(pairs), 1),
                        "reasons": sorted({e["reason"] for r in escalated for e in r["routing"]["escalations"]})}
    out["answered_by"] = {tier: sum(1 for _, r in pairs if (r.get("routing") or {}).get("tier") == tier)
                          for tier in ("qwen05", "qwen15")}
    out["errors"] = {"single": sum(1 for s, _ in pairs if s["error"]), "routed": sum(1 for _, r in pairs if r["error"])}
    out["single_metrics"] = single.metrics
    out["routed_metrics"] = routed.metrics
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="eval tickets (default: all 200)")
    parser.add_argument("--dev-limit", type=int, default=60, help="dev tickets for calibration")
    parser.add_argument("--bar", type=float, default=None, help="skip calibration; use this confidence bar")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "routing.json")
    args = parser.parse_args()

    from framework.spec import load_project

    results = Results(args.out, {"machine": machine_info(), "settings": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}})
    with tempfile.TemporaryDirectory(prefix="slipway-bench-routing-") as tmp:
        toml = tiered_copy(Path(tmp))
        bar = args.bar
        if bar is None:
            found = results.section("calibration", calibration, load_project(str(toml.parent)), args.dev_limit)
            bar = found.get("recommended")
            if bar is None:
                raise SystemExit("calibration recommended no bar (tier 1 never matches the top tier on dev): "
                                 "the cheap tier cannot hold quality; see the calibration table")
        set_bar(toml, bar)
        results.figures["bar"] = bar
        results.section("compare", compare, load_project(str(toml.parent)), args.limit)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
