"""Error analysis of one run: where the pipeline fails, in the order a person fixes things.

The contract says pass or fail; improving a pipeline needs the next question answered: which slice is
worst, which labels get confused with which, and what the model said on the examples it got wrong.
Pure: an `EvalRun`'s records and measurements in, plain rows out (the notebook and reports render them).
"""

from __future__ import annotations

import math
from typing import Any

from framework.metrics import Measurements, slice_tags


def worst_slices(m: Measurements, metric: str, *, limit: int = 10) -> list[dict[str, Any]]:
    """Slices by `metric`, worst first; `below` when the slice's whole interval is under the overall figure
    (worse beyond noise, not just a small unlucky slice)."""
    overall = m.metrics.get(metric, math.nan)
    rows = []
    for tag, found in m.slices.items():
        value = found["metrics"].get(metric, math.nan)
        lo, hi = found["intervals"].get(metric, (math.nan, math.nan))
        rows.append({"slice": tag, "n": found["n"], metric: value, "interval": f"[{lo:.2f}, {hi:.2f}]",
                     "gap": value - overall, "below": bool(hi < overall)})
    rows.sort(key=lambda r: (not r["below"], r[metric]))
    return rows[:limit]


def confusion_table(m: Measurements, field: str) -> list[dict[str, Any]]:
    """One row per expected label: how often each answer was given, and the label's recall."""
    matrix = m.confusion.get(field) or {}
    answers = sorted({a for row in matrix.values() for a in row} | set(matrix))
    rows = []
    for label, given in matrix.items():
        total = sum(given.values())
        rows.append({"expected": label, **{a: given.get(a, 0) for a in answers},
                     "recall": round(given.get(label, 0) / total, 3) if total else math.nan})
    return rows


def misclassified(records: list[dict], fields: list[str], *, limit: int = 50) -> list[dict[str, Any]]:
    """Examples with a wrong field: the ticket, what was expected and answered on the wrong fields, and
    the model's own reason (the cheapest clue to why it went wrong). Errors first, then most fields wrong."""
    found = []
    for r in records:
        output = r.get("output") or {}
        wrong = [f for f in fields if str(output.get(f)).lower() != str(r["expected"].get(f)).lower()]
        if not wrong and not r.get("error"):
            continue
        row = {"example": r["example_id"], "slices": ", ".join(slice_tags(r)),
               "input": str(next(iter(r["inputs"].values()), ""))[:300],
               "expected": ", ".join(f"{f} {r['expected'].get(f)}" for f in wrong),
               "answered": r["error"] if r.get("error") else ", ".join(f"{f} {output.get(f)}" for f in wrong),
               "reason": str(output.get("reason", ""))}
        found.append(((not r.get("error"), -len(wrong)), row))
    found.sort(key=lambda pair: pair[0])
    return [row for _, row in found[:limit]]


def error_analysis(run, metric: str | None = None, *, limit: int = 50) -> dict[str, Any]:
    """Everything above for one `EvalRun`: worst slices by `metric` (default: the run's first metric),
    a confusion table per closed-set field, and the misclassified examples."""
    m = run.measurements
    metric = metric or next(iter(m.metrics), "")
    fields = list(m.confusion)
    return {"metric": metric, "overall": m.metrics.get(metric, math.nan),
            "slices": worst_slices(m, metric), "confusion": {f: confusion_table(m, f) for f in fields},
            "misclassified": misclassified(run.records, fields, limit=limit)}
