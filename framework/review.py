"""Review: may this build go live? Everything a reviewer decides on, gathered from two bentos and the store.

A build is compared with a baseline: `--against <version>`, the version a
channel serves (`--against-channel prod`), or by default what prod serves,
else the build before it. The bento itself holds what changed (program state,
notebook, project.toml, eval set, contract); the store holds each check run's
per-example results, so metric deltas are *paired* over the examples both runs
scored identically, and every example that lost a metric shows up by name.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Any

from framework import bentos, diff, release
from framework.errors import SlipwayError, SpecError
from framework.evaluate import store_path
from framework.metrics import UNTAGGED, macro_f1, metric_name, paired_delta
from framework.spec import Project
from framework.store import Store

SLO_FIELDS = (("latency_p50_ms", "ms"), ("latency_p95_ms", "ms"), ("latency_p99_ms", "ms"), ("error_rate", "%"),
              ("tokens_per_request", "tokens"), ("cost_per_request", "$"))


def _bento(project: Project, version: str | None):
    if version is None and not bentos.builds(project):
        raise SpecError(f"{project.name} has no build to review", path=str(project.toml_path),
                        hint=f"run `slipway build {project.name}`")
    return bentos.get(project, version)


def _baseline(project: Project, target, against: str | None, against_channel: str | None):
    """(bento or None, why it is the baseline)."""
    if against:
        return _bento(project, against), f"--against {against}"
    if against_channel:
        return _bento(project, release.channel_version(project, against_channel)), f"{against_channel} channel"
    channels = release.status(project)
    prod = channels.get("prod")
    if prod and prod["version"] != target.tag.version:
        return _bento(project, prod["version"]), "prod channel"
    earlier = [b for b in bentos.builds(project) if b.info.creation_time < target.info.creation_time]
    return (earlier[-1], "previous build") if earlier else (None, "first build: nothing to compare with")


def _contents(project: Project, bento) -> dict[str, Any]:
    """What a bento pinned, read back from its `slipway/` folder."""
    folder = Path(bento.path) / "src" / "slipway"
    config = json.loads((folder / "bento.json").read_text())
    toml = tomllib.loads((folder / "project.toml").read_text())
    labels = dict(bento.info.labels)
    report = folder / "check_report.json"
    made = folder / "optimize.json"
    return {
        "optimize": json.loads(made.read_text()) if made.exists() else None,
        "version": bento.tag.version, "tag": str(bento.tag), "labels": labels,
        "created": bento.info.creation_time.isoformat(timespec="seconds"),
        "program_state": json.loads((folder / "program_state.json").read_text()),
        "notebook": (folder / "notebook.py").read_text(),
        "model_key": config["model_key"],
        "model": {"key": config["model_key"], **toml.get("models", {}).get(config["model_key"], {})},
        "contract": json.loads((folder / "contract.json").read_text()),
        "eval_rows": [json.loads(line) for line in (folder / "eval.jsonl").read_text().splitlines() if line.strip()],
        "report": json.loads(report.read_text()) if report.exists() else None,
        "author": _author(project, bento),
    }


def _author(project: Project, bento) -> str:
    """Who signed the build: their name in the project's signers.toml, else their key's fingerprint."""
    from framework import signing

    try:
        signed = signing.Signed.from_dict(bentos.build_statement(Path(bento.path)))
    except SlipwayError:
        return "unsigned build"
    signer = signing.load_signers(project.dir).by_key(signed.key)
    return signer.name if signer else f"unlisted key {signed.fingerprint}"


def _records(store: Store | None, run_id: str | None) -> dict[str, dict[str, Any]]:
    if store is None or not run_id:
        return {}
    return {r["example_id"]: r for r in store.results(run_id)}


def _same_example(a: dict, b: dict) -> bool:
    return a["inputs"] == b["inputs"] and a["expected"] == b["expected"]


def metric_deltas(old: dict[str, dict], new: dict[str, dict], metric_items: list[str], *,
                  samples: int = 1000) -> tuple[list[str], list[dict[str, Any]]]:
    """Paired comparison per metric over the examples both runs scored with the same input and label."""
    shared = [k for k in new if k in old and _same_example(old[k], new[k])]
    out = []
    for item in metric_items:
        name = metric_name(item)
        kind, _, field = item.partition(":")
        if kind != "macro_f1" and shared and not all(name in side[k]["scores"] for side in (old, new) for k in shared):
            continue   # a metric declared after one of the checks ran: no pair to compare
        if kind == "macro_f1":
            def rows(records, _f=field):
                return [(records[k]["expected"].get(_f), (records[k]["output"] or {}).get(_f)) for k in shared]

            def statistic(pairs):
                return macro_f1([t for t, _ in pairs], [p for _, p in pairs])
            result = paired_delta(rows(old), rows(new), statistic, samples=samples)
        else:
            result = paired_delta([old[k]["scores"].get(name, 0.0) for k in shared],
                                  [new[k]["scores"].get(name, 0.0) for k in shared], samples=samples)
        out.append({"metric": name, **result.to_dict()})
    return shared, out


def slice_deltas(old: dict[str, dict], new: dict[str, dict], shared: list[str], metric_items: list[str],
                 tags: dict[str, list[str]], *, samples: int = 1000) -> list[dict[str, Any]]:
    """Paired deltas per slice (tag): an optimiser that lifts English tickets and drops the non-English
    ones can leave the overall figure flat, and only this shows it."""
    groups: dict[str, list[str]] = {}
    for key in shared:
        for tag in tags.get(key) or (UNTAGGED,):
            groups.setdefault(tag, []).append(key)
    if set(groups) <= {UNTAGGED}:
        return []
    out = []
    for tag in sorted(groups):
        keys = groups[tag]
        _, rows = metric_deltas({k: old[k] for k in keys}, {k: new[k] for k in keys}, metric_items, samples=samples)
        out.append({"slice": tag, "n": len(keys), "metrics": rows})
    return out


def regressions(old: dict[str, dict], new: dict[str, dict], shared: list[str]) -> tuple[list[dict], int]:
    """Examples where a metric that scored before scores lower now (or that newly errors), worst first;
    and how many improved."""
    regressed, improved = [], 0
    for key in shared:
        a, b = old[key], new[key]
        dropped = sorted(m for m, score in a["scores"].items() if b["scores"].get(m, 0.0) < score)
        gained = [m for m, score in b["scores"].items() if m in a["scores"] and score > a["scores"][m]]
        if b["error"] and not a["error"]:
            dropped = dropped or ["error"]
        if dropped:
            regressed.append({"example_id": key, "inputs": b["inputs"], "expected": b["expected"],
                              "old_output": a["output"], "new_output": b["output"], "old_error": a["error"],
                              "new_error": b["error"], "dropped": dropped})
        elif gained:
            improved += 1
    regressed.sort(key=lambda r: (-len(r["dropped"]), r["example_id"]))
    return regressed, improved


def _slo_deltas(old: dict | None, new: dict | None) -> list[dict[str, Any]]:
    if not old or not new:
        return []
    out = []
    for name, unit in SLO_FIELDS:
        a, b = old.get(name), new.get(name)
        if a is None or b is None:
            continue
        pct = (b - a) / a * 100 if a else (0.0 if b == a else math.inf)
        out.append({"name": name, "unit": unit, "old": a, "new": b, "delta": b - a, "pct": pct})
    return out


def _overrides(store: Store | None, project: Project, version: str, labels: dict,
               author: str) -> list[dict[str, Any]]:
    found = []
    if labels.get("slipway.override"):
        found.append({"where": "build", "actor": author,
                      "reason": labels["slipway.override"], "at": labels.get("slipway.build_time")})
    if store is not None:
        for row in store.deployments(project.name):
            if row["version"] == version and row["override_reason"]:
                found.append({"where": f"deploy to {row['channel']}", "actor": row["actor"],
                              "reason": row["override_reason"], "at": str(row["created_at"])[:19]})
    return found


def _made_by(made: dict | None) -> dict[str, Any] | None:
    """How `slipway optimize` made the bento's program (its provenance file), in a few fields."""
    if not made:
        return None
    delta = made.get("objective_delta") or {}
    return {"optimizer": made.get("optimizer"), "demos": made.get("demos"), "objective": made.get("objective"),
            "before": made.get("objective_before"), "after": made.get("objective_after"),
            "delta": delta.get("delta"), "interval": delta.get("interval"), "p_value": delta.get("p_value"),
            "forced": bool(made.get("forced")), "why": made.get("why"), "at": made.get("at"),
            "calls": (made.get("budget") or {}).get("calls"), "dev_n": made.get("dev_n")}


def _summary(side: dict[str, Any]) -> dict[str, Any]:
    labels = side["labels"]
    return {"optimized": _made_by(side.get("optimize")), "version": side["version"], "tag": side["tag"],
            "created": side["created"],
            "author": side["author"], "check_id": labels.get("slipway.check_id"),
            "run_id": labels.get("slipway.check_run_id"), "content_hash": labels.get("slipway.content_hash"),
            "model": side["model"].get("name"), "model_sha256": labels.get("slipway.model_sha256"),
            "git_commit": labels.get("slipway.git_commit")}


def review(project: Project, version: str | None = None, *, against: str | None = None,
           against_channel: str | None = None, samples: int = 1000) -> dict[str, Any]:
    """The review of `<project>:<version>` (default: newest build) against its baseline, as plain data."""
    target_bento = _bento(project, version)
    baseline_bento, why = _baseline(project, target_bento, against, against_channel)
    new = _contents(project, target_bento)
    old = _contents(project, baseline_bento) if baseline_bento is not None else None
    store = Store(store_path(project), read_only=True) if store_path(project).exists() else None
    try:
        new_records = _records(store, new["labels"].get("slipway.check_run_id"))
        old_records = _records(store, old["labels"].get("slipway.check_run_id")) if old else {}
        ready = release.readiness(project, store, new["version"], target_bento)
        approvals = store.approvals(project.name, new["version"]) if store else []
        overrides = _overrides(store, project, new["version"], new["labels"], new["author"])
    finally:
        if store is not None:
            store.close()
    shared, deltas, sliced = [], [], []
    if old_records and new_records:
        shared, deltas = metric_deltas(old_records, new_records, project.spec.eval.metrics, samples=samples)
        # tags as the new build's eval set has them (older stores kept no tags on their results)
        tags = {row.get("id"): row.get("tags") or [] for row in new["eval_rows"]}
        tags.update({k: r["tags"] for k, r in new_records.items() if r.get("tags")})
        sliced = slice_deltas(old_records, new_records, shared, project.spec.eval.metrics, tags, samples=samples)
    regressed, improved = regressions(old_records, new_records, shared)
    new_m = (new["report"] or {}).get("measurements")
    old_m = ((old or {}).get("report") or {}).get("measurements")
    changes = None
    if old:
        changes = {
            "program": diff.program_diff(old["program_state"], new["program_state"]),
            "notebook": diff.text_diff(old["notebook"], new["notebook"]),
            "model": diff.mapping_diff(old["model"], new["model"]),
            "eval_set": diff.rows_diff(old["eval_rows"], new["eval_rows"]),
            "contract": diff.mapping_diff(old["contract"], new["contract"]),
        }
    verdict = (new["report"] or {}).get("verdict")
    drops = [d["metric"] for d in deltas if d["significant"] and d["delta"] < 0]
    return {
        "project": project.name,
        "target": _summary(new),
        "baseline": _summary(old) if old else None,
        "baseline_reason": why,
        "contract": verdict,
        "changes": changes,
        "comparison": {"shared": len(shared), "old_n": len(old_records), "new_n": len(new_records),
                       "samples": samples, "note": "" if not old or (old_records and new_records) else
                       "per-example results of a check run are missing from this store: no paired deltas"},
        "metrics": deltas,
        "slices": sliced,
        "slo": _slo_deltas(old_m, new_m),
        "regressed": regressed,
        "improved": improved,
        "approvals": [{"approver": a["approver"], "note": a["note"], "at": str(a["created_at"])[:19]}
                      for a in approvals],
        "readiness": {"required": ready.required, "counted": ready.approvers, "missing": ready.missing,
                      "rejected": ready.rejected}
        if ready else None,
        "overrides": overrides,
        "summary": {"contract_passed": bool(verdict and verdict["passed"]), "regressed": len(regressed),
                    "improved": improved, "significant_drops": drops},
    }


def write_review(project: Project, data: dict[str, Any]) -> tuple[Path, Path]:
    """The review as JSON and as one self-contained HTML page under `.slipway/reports/`."""
    from framework.report import render_review_html

    folder = project.state_dir / "reports"
    folder.mkdir(parents=True, exist_ok=True)
    against = data["baseline"]["version"] if data["baseline"] else "none"
    stem = f"review-{data['target']['version']}-vs-{against}"
    json_path, html_path = folder / f"{stem}.json", folder / f"{stem}.html"
    json_path.write_text(json.dumps(data, indent=2, default=str))
    html_path.write_text(render_review_html(data))
    return json_path, html_path
