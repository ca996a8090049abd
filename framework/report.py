"""Renderings: rich tables and lines for the terminal, JSON for machines, HTML pages for reviewers.

`cli.py` parses, calls the API and picks the exit code; everything a person reads comes from here.
Terminal text that comes from users, models or the store (ticket text, outputs, reasons, example ids,
audit details, diffs) is printed as `rich.text.Text`, never parsed as rich markup, so `[bold]` or
`[/]` in it shows literally. The HTML pages are rendered from Jinja2 templates in
`framework/templates/` with autoescaping on; they are self-contained (inline CSS, no scripts, no
network) so they can be attached to a pull request or opened from a CI artefact as is.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from framework.build import BuildResult
    from framework.contract import Verdict
    from framework.evaluate import EvalRun
    from framework.metrics import Measurements
    from framework.optimize import OptimizeOutcome
    from framework.spec import Project


# -- terminal -------------------------------------------------------------------------------------------------

def text(value: Any, style: str = "") -> Text:
    """A plain-text cell or line: rich never reads markup in it."""
    from rich.text import Text

    return Text("" if value is None else str(value), style=style)


def line(*parts: str | tuple[str, str]) -> Text:
    """One line from plain strings and (string, style) pairs, e.g. line(("ok", "green"), " ", path)."""
    from rich.text import Text

    return Text.assemble(*parts)


def _table(columns: tuple[str, ...], title: str | None = None, right: tuple[str, ...] = ()) -> Table:
    from rich.table import Table

    table = Table(title=text(title, "table.title") if title else None, title_justify="left")
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left")
    return table


def _row(table: Table, *cells: Any) -> None:
    table.add_row(*(cell if hasattr(cell, "__rich_console__") else text(cell) for cell in cells))


def verdict_table(verdict: Verdict, title: str = "Contract verdict") -> Table:
    table = _table(("clause", "target", "measured", "verdict", "note"), title, right=("measured",))
    for row in verdict.table_rows():
        style = "green" if row["verdict"] == "PASS" else "bold red"
        _row(table, row["clause"], row["target"], row["measured"], text(row["verdict"], style), row["note"])
    return table


def print_check(console: Console, err: Console, result, project_name: str) -> None:
    """The verdict of `slipway check` as a table, then PASS or FAIL and where the HTML report is."""
    verdict = result.verdict
    if result.run.reused:
        err.print(text(f"reused run {result.run.run_id} (identical program, notebook, model, eval set)"))
    variant = verdict.meta.get("variant")
    title = (f"Contract verdict: {project_name}{f' (variant {variant})' if variant else ''} on {result.run.n} eval "
             f"examples, model {result.run.model_key}")
    console.print(verdict_table(verdict, title))
    if getattr(result.run.measurements, "routing", None):
        console.print(tiers_table(result.run.measurements))
    if result.run.measurements.slices:
        console.print(slices_table(result.run.measurements))
    engine = verdict.meta.get("engine")
    if engine:
        err.print(text(f"{engine['engine']} engine: latency {engine['latency']}"
                       + (f"; model {engine['remote_model']!r} pinned by fingerprint {engine['fingerprint'][:12]}…"
                          if engine.get("fingerprint") else "")))
    local = verdict.meta.get("compared_with_local")
    if local:
        err.print(text(local_line(local)))
    if verdict.meta.get("cache"):
        console.print(cache_line(verdict.meta["cache"]))
    status = line(("PASS", "bold green")) if verdict.passed else line(("FAIL", "bold red"),
                                                                      f": {', '.join(verdict.failed)}")
    console.print(status + text(f"\nreport: {result.report_html}"))


def cache_line(cache: dict) -> Text:
    """The answer cache on its paraphrase set, one line: hit rate and wrong-hit rate with intervals and counts."""
    hit, wrong = cache["cache_hit_rate"], cache["cache_wrong_hit_rate"]
    style = "bold red" if cache["wrong_hits"] else "green"
    return line(f"answer cache on {cache['path']} ({cache['model'] or 'exact only'}, threshold "
                f"{cache['threshold']:g}): hits {_rate(hit)} ({cache['hits']} of {cache['n_same']} same-meaning "
                "pairs), ", (f"wrong hits {_rate(wrong)} ({cache['wrong_hits']} of {cache['n_different']} "
                             "different-meaning pairs)", style))


def _rate(figure: dict) -> str:
    lo, hi = figure["interval"]
    return f"{figure['value']:.3f} [{lo:.3f}, {hi:.3f}]"


def _slice_metric_names(slices: dict) -> list[str]:
    """The metrics measured per slice, in declaration order (detector scores come from their own labelled
    files, not from the eval rows, so they have no slices)."""
    names: list[str] = []
    for found in slices.values():
        names += [name for name in found["metrics"] if name not in names]
    return names


def slices_table(m: Measurements, title: str = "Per slice (tag): value and 95% interval") -> Table:
    """One row per tag, one column per metric; a value whose interval lies wholly under the overall
    figure is red: there the pipeline is worse beyond noise."""
    names = _slice_metric_names(m.slices)
    table = _table(("slice", "n", *names), title, right=("n", *names))
    for tag, found in m.slices.items():
        cells = []
        for name in names:
            value = found["metrics"].get(name, math.nan)
            lo, hi = found["intervals"].get(name, (math.nan, math.nan))
            cells.append(text(f"{value:.2f} {lo:.2f}–{hi:.2f}", "red" if hi < m.metrics[name] else ""))
        _row(table, tag, str(found["n"]), *cells)
    return table


def tier_rows(measurements: dict) -> dict[str, Any]:
    """A routed run's per-tier figures (metrics.Measurements.routing, framework/routing.py `summary`) beside the
    routed pipeline overall, as rows for the terminal table and the HTML report. Tier rows: the tier's own
    attempts (latency, tokens, cost per attempt) and quality on the requests it answered; the overall row: the
    routed requests end to end, what the contract judges."""
    routing = measurements.get("routing") or {}
    names = [name for name in measurements["metrics"] if name != "escalated_share"
             and not name.endswith(("_precision", "_recall"))]
    rows = []
    for tier in routing.get("tiers", []):
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(tier["reasons"].items())) or "–"
        rows.append({"tier": f"{tier['index'] + 1}. {tier['tier']}", "ran": tier["attempts"],
                     "answered": tier["answered"], "answered_share": tier["answered_share"], "escalated": reasons,
                     "metrics": [tier["metrics"].get(name, math.nan) for name in names],
                     "p50": tier["latency_p50_ms"], "p95": tier["latency_p95_ms"],
                     "tokens": tier["tokens_per_attempt"], "cost": tier["cost_per_attempt"]})
    n = routing.get("n", 0)
    rows.append({"tier": "overall (routed)", "ran": n, "answered": n - routing.get("exhausted", 0),
                 "answered_share": (n - routing.get("exhausted", 0)) / n if n else math.nan,
                 "escalated": f"{routing.get('escalated', 0)} of {n}",
                 "metrics": [measurements["metrics"].get(name, math.nan) for name in names],
                 "p50": measurements["latency_p50_ms"], "p95": measurements["latency_p95_ms"],
                 "tokens": measurements["tokens_per_request"], "cost": measurements["cost_per_request"]})
    low, high = routing.get("escalated_interval") or (math.nan, math.nan)
    share = routing.get("escalated_share", math.nan)
    exhausted = routing.get("exhausted_share", math.nan)
    note = (f"escalated {share:.1%} [{low:.1%}, {high:.1%}] (Wilson 95%); exhausted {exhausted:.1%} "
            "(no tier answered: errors here, the served [fallback] answers them)")
    return {"names": names, "rows": rows, "note": note}


def tiers_table(m: Measurements) -> Table:
    """Per tier and overall: who answered, why tiers escalated, quality, latency, tokens and cost."""
    data = tier_rows(m.to_dict())
    table = _table(("tier", "ran", "answered", "escalated", *data["names"], "p50 / p95 ms", "tokens", "cost"),
                   f"Tiers: {data['note']}", right=("ran", "answered", *data["names"], "p50 / p95 ms", "tokens",
                                                    "cost"))
    for row in data["rows"]:
        _row(table, row["tier"], str(row["ran"]), f"{row['answered']} ({row['answered_share']:.0%})",
             row["escalated"], *(f"{v:.3f}" for v in row["metrics"]), f"{row['p50']:,.0f} / {row['p95']:,.0f}",
             f"{row['tokens']:,.0f}", f"{row['cost']:.7f}")
    return table


def print_calibration(console: Console, cal) -> None:
    """`slipway calibrate`: one row per candidate bar, then the recommendation and the rule behind it."""
    table = _table(("min_confidence", "escalated", "kept", f"{cal.metric} kept", f"{cal.metric} routed (est.)",
                    "cost / request (est.)"),
                   f"dev split, {cal.n} examples: tier 1 {cal.first} kept or escalated to {cal.top} "
                   f"({cal.metric} {cal.top_value:.3f} alone)",
                   right=("min_confidence", "escalated", "kept", f"{cal.metric} kept", f"{cal.metric} routed (est.)",
                          "cost / request (est.)"))
    for row in cal.rows:
        style = "green" if row["bar"] == cal.recommended else ""
        _row(table, text(f"{row['bar']:g}", style), f"{row['escalated_share']:.0%}", str(row["kept"]),
             f"{row['kept_value']:.3f}", f"{row['routed_value']:.3f}", f"{row['routed_cost']:.7f}")
    console.print(table)
    if cal.recommended is None:
        console.print(line(("no bar", "yellow"), f" meets the rule ({cal.rule}): tier 1 is not good enough on its "
                           "kept answers at any bar; keep the top tier alone, or try more dev examples"),
                      soft_wrap=True)
    else:
        console.print(line(("recommended", "green"), f": [routing] min_confidence = {cal.recommended:g}  ({cal.rule}; "
                           "the routed estimate sends each escalation straight to the top tier)"), soft_wrap=True)


def metrics_table(run: EvalRun) -> Table:
    m = run.measurements
    table = _table(("metric", "value", "95% interval"),
                   f"{run.split} split, {run.n} examples, model {run.model_key} (run {run.run_id})",
                   right=("value", "95% interval"))
    for name, value in m.metrics.items():
        lo, hi = m.intervals.get(name, (float("nan"), float("nan")))
        _row(table, name, f"{value:.3f}", f"[{lo:.3f}, {hi:.3f}]")
    _row(table, "latency p50 / p95 / p99",
         f"{m.latency_p50_ms:,.0f} / {m.latency_p95_ms:,.0f} / {m.latency_p99_ms:,.0f} ms", "")
    _row(table, "error rate", f"{m.error_rate:.1%}", "")
    _row(table, "tokens / request (mean)", f"{m.tokens_per_request:,.0f}", "")
    _row(table, "cost / request (mean)", f"{m.cost_per_request:.6f}", "")
    return table


def print_run(console: Console, run: EvalRun) -> None:
    """`slipway runs show`: the measurements, then each example that errored or missed a field."""
    console.print(metrics_table(run))
    if getattr(run.measurements, "routing", None):
        console.print(tiers_table(run.measurements))
    if run.measurements.slices:
        console.print(slices_table(run.measurements))
    for r in run.records:
        if r["error"] or any(v < 1 for v in r["scores"].values()):
            console.print(line((str(r["example_id"]), "dim"), f" expected {r['expected']} got "
                               f"{r['output'] or r['error']}"))


def runs_table(rows: list[dict]) -> Table:
    table = _table(("run_id", "split", "model_key", "status", "done", "started_at"))
    for r in rows:
        _row(table, r["run_id"], r["split"], r["model_key"], r["status"], f"{r['done']}/{r['n_examples']}",
             str(r["started_at"])[:19])
    return table


def local_line(local: dict) -> str:
    """A remote run against the same program's latest run in process (check.local_comparison)."""
    p50 = local["latency_p50_ms"]
    latency = (f"; p50 {p50['remote']:,.0f} ms remote vs {p50['local']:,.0f} ms in process"
               if p50["local"] is not None and p50["remote"] is not None else "")
    return (f"against {local['local_model']} in process ({local['local_run_id']}): {local['identical_answers']} of "
            f"{local['paired']} answers identical{latency}")


def models_table(rows: list[dict]) -> Table:
    table = _table(("key", "name", "license", "sha256 / fingerprint", "present"))
    for r in rows:
        present = "remote: " + r["path"] if r["present"] is None else "yes" if r["present"] else "no"
        _row(table, r["key"], r["name"], r["license"], (r["sha256"][:12] + "…") if r["sha256"] else "not pinned",
             present)
    return table


def print_optimize(console: Console, outcome: OptimizeOutcome) -> None:
    """Dev before → after per metric with the paired 95% interval of the change, the budget used, and
    whether the program was saved, in words: a person must not mistake "not saved" for success."""
    spent = f"{outcome.calls}/{outcome.max_calls}" if outcome.max_calls else str(outcome.calls)
    budget = f"{spent} model calls in {outcome.elapsed_s:.0f} s" + (
        f" (limit {outcome.max_minutes:g} min)" if outcome.max_minutes else "")
    console.print(text(f"{outcome.optimizer} on {outcome.train_n} train examples: {budget}"
                       + (f"; {outcome.plan}" if outcome.plan else "")
                       + ("; stopped by the budget" if outcome.budget_spent else "")), soft_wrap=True)
    if outcome.before:
        table = _table(("metric", "before", "after", "change", "95% interval", "p"),
                       f"dev split ({outcome.dev_n} examples): before → after ({outcome.demos} demos, "
                       f"{outcome.instructions_changed} instructions changed)",
                       right=("before", "after", "change", "95% interval", "p"))
        rows = [{"metric": f"objective {outcome.objective}", **outcome.objective_delta}] if outcome.objective_delta \
            else []
        for d in rows + outcome.deltas:
            low, high = d["interval"]
            style = "green" if d["significant"] and d["delta"] > 0 else "red" if d["significant"] else ""
            _row(table, d["metric"], f"{d['old']:.3f}", f"{d['new']:.3f}", text(f"{d['delta']:+.3f}", style),
                 f"{low:+.3f} .. {high:+.3f}", f"{d['p_value']:.3g}")
        console.print(table)
    if outcome.saved:
        console.print(line(("saved" + (" (FORCED)" if outcome.forced else ""), "bold red" if outcome.forced
                            else "green"), f" {outcome.path} (DSPy JSON); eval, check and build now use it"),
                      soft_wrap=True)
        console.print(text(f"{outcome.why}\nhow it was made: {outcome.provenance} (audit row #{outcome.audit_seq})"),
                      soft_wrap=True)
    else:
        console.print(line(("not saved", "yellow"), ": ", outcome.why), soft_wrap=True)


def print_build(console: Console, result: BuildResult) -> None:
    verb = "built" if result.created else "unchanged, already built"
    model = result.model_tag or "remote, pinned by fingerprint"
    console.print(line((verb, "green"), f" {result.tag}  (model {model})"))
    if result.labels.get("slipway.override"):
        console.print(line((" OVERRIDE ", "bold white on red"), " ",
                           (f"built past failing clauses: {result.labels['slipway.override']}", "red")))
    for v in result.variants or []:   # flag variants: packed when their own check passed (docs/flags.md)
        console.print(text(f"flag variant {v['flag']}={v['variant']}: " + (
            f"packed (check {v['check_id']})" if v["packed"] else f"not packed: {v['why']}")), soft_wrap=True)
    console.print(text(f"serve it: slipway serve {result.tag}   or   BENTOML_HOME=$PWD/bentos bentoml serve "
                       f"{result.tag}"), soft_wrap=True)


def status_table(channels: dict[str, dict | None]) -> Table:
    table = _table(("channel", "version", "action", "by", "at", "override", "signature"))
    for name, row in channels.items():
        if row is None:
            _row(table, name, "-", "", "", "", "", "")
        else:
            _row(table, name, row["version"], row["action"], row["actor"], str(row["created_at"])[:19],
                 row["override_reason"] or "", text("verified", "green") if row.get("verified") else
                 text("DOES NOT VERIFY (not followed)", "bold red"))
    return table


def print_rollout(console: Console, rollout) -> None:
    """`slipway status`: a channel's newest canary, each decision with the evidence it was taken on."""
    state = {"running": "yellow", "complete": "green", "rolled-back": "red"}.get(rollout.state, "")
    steps = " → ".join(f"[b]{s}%[/b]" if i == rollout.step and rollout.state == "running" else f"{s}%"
                       for i, s in enumerate(rollout.steps))
    console.print(line(("canary", "bold"), f" {rollout.rollout_id} on {rollout.channel}: {rollout.version} over "
                       f"{rollout.stable}, ", (rollout.state, state), f", {rollout.weight}% of requests now"))
    console.print(f"  steps {steps}", highlight=False)
    table = _table(("#", "decision", "weight after", "by", "at", "evidence"))
    for event in rollout.events:
        details = event["details"] or {}
        evidence = details.get("reason") or ""
        analysis = details.get("analysis") or {}
        if analysis:
            c, st = analysis.get("canary") or {}, analysis.get("stable") or {}
            evidence += (f" (canary n={c.get('requests')} p95={_ms(c.get('latency_p95_ms'))} "
                         f"failures={c.get('failures')}; stable n={st.get('requests')} "
                         f"p95={_ms(st.get('latency_p95_ms'))} failures={st.get('failures')})")
        if event["action"] == "canary-rollback" and details.get("detect_s") is not None:
            evidence += f"; detected in {details['detect_s']:.1f} s, recovered {details['recover_s']:.1f} s later"
        _row(table, event["seq"], event["action"].removeprefix("canary-"), f"{event['weight']}%", event["actor"],
             str(event["created_at"])[:19], evidence)
    console.print(table)


def _ms(value) -> str:
    return "n/a" if value is None else f"{value:,.0f} ms"


def incidents_table(channel: str, rows: list[dict]) -> Table:
    """`slipway status --history`: every canary rollback, what caused it, how long recovery took."""
    table = _table(("rollout", "version", "at", "by", "at weight", "cause", "detect s", "recover s",
                    "breach→recovered s"), title=f"{channel}: canary rollbacks")
    for r in rows:
        _row(table, r["rollout_id"], r["version"], r["at"][:19], r["by"], f"{r['weight']}%" if r["weight"] else "",
             r["reason"] or "", _secs(r["detect_s"]), _secs(r["recover_s"]), _secs(r["breach_to_recovered_s"]))
    return table


def _secs(value) -> str:
    return "" if value is None else f"{value:.1f}"


def signers_table(rows: list[dict]) -> Table:
    """`slipway signers list`: who may act on a project."""
    table = _table(("name", "key", "roles", "revoked"))
    for r in rows:
        _row(table, r["name"], r["fingerprint"], ", ".join(r["roles"]), r["revoked"] or "")
    return table


def api_keys_table(rows: list[dict]) -> Table:
    """`slipway keys list`: API keys by id (never the key), and rows of the keys file that do not count."""
    table = _table(("id", "tenant", "endpoints", "channels", "created", "created by", "status"))
    for r in rows:
        status = r["status"]
        if r.get("revoked"):
            status = f"revoked {str(r['revoked_at'])[:19]} by {r['revoked_by']}" + (
                f": {r['revoke_reason']}" if r.get("revoke_reason") else "")
        scope = "the tenant's" if r["tenant"] else ""   # None: whatever the tenant may call
        _row(table, r["key_id"] or "?", r["tenant"] or "", ", ".join(r["endpoints"] or []) or scope,
             ", ".join(r["channels"] or []) or scope,
             str(r["created_at"] or "")[:19], r["created_by"] or "",
             text(status, "bold red") if status.startswith("ignored") else status)
    return table


def flags_table(found: dict) -> Table:
    """`slipway flags list`: the signed changes in order, whether each counted, and what is on now."""
    table = _table(("line", "action", "flag", "tenant", "percent", "by", "at", "status"))
    active = {(a["flag"], a["tenant"]): a for a in found["active"]}
    for r in found["history"]:
        status = r["status"]
        on = active.get((r["flag"], r["tenant"]))
        if r["action"] == "flag-on" and status == "counted" and on is not None and on["at"] == r["at"]:
            status = f"ON now (approved by {', '.join(on['approvers']) or 'nobody: none required'})"
        _row(table, str(r["line"]), r["action"], f"{r['flag']}={r['variant']}", r["tenant"], f"{r['percent']}%",
             r["by"], str(r["at"])[:19], text(status, "bold red") if status.startswith("ignored") else status)
    for skipped in found["ignored"]:
        if not any(r["line"] == skipped["line"] for r in found["history"]):
            _row(table, str(skipped["line"]), "?", "", "", "", "", "",
                 text(f"ignored: {skipped['reason']}", "bold red"))
    return table


# -- audit list -----------------------------------------------------------------------------------------------

def _short(value: Any) -> str:
    value_text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
    if len(value_text) >= 32 and all(c in "0123456789abcdef" for c in value_text):
        return value_text[:12]  # a hash: its prefix identifies it
    return value_text


def _details(row: dict) -> dict[str, Any]:
    details = json.loads(row["details"] or "{}")
    return {k: v for k, v in details.items() if v not in (None, "", [], {})}


def _is_override(row: dict) -> bool:
    """A deploy or build signed past the gate (its statement carries the reason)."""
    return row["action"] == "override" or bool(_details(row).get("override"))


def print_audit(console: Console, rows: list[dict], *, long: bool = False) -> None:
    """The audit log, oldest first.

    Default: one line per row, its details as `key=value` pairs cut to the width left (hashes as their
    12-character prefix). `long`: each row's details below it as `key: value` lines, wrapped at word
    boundaries and never cut (a hash whole). Override rows in red either way.
    """
    from rich.padding import Padding
    from rich.table import Table

    if not long:
        table = _table(("seq", "at", "actor", "action", "target"))
        for column in table.columns:
            column.no_wrap = True
        table.add_column("details", min_width=24)  # the one column that gives way; its cells are cut, not folded
        for r in rows:
            short = text(", ".join(f"{k}={_short(v)}" for k, v in _details(r).items() if not k.endswith("_hash")))
            short.no_wrap, short.overflow = True, "ellipsis"
            _row(table, str(r["seq"]), str(r["logged_at"])[:19], r["actor"],
                 text(r["action"], "bold red" if _is_override(r) else ""), r["target"] or "", short)
        console.print(table)
        if rows:
            console.print(text("details are cut to fit: --long shows them whole, --json as data"), style="dim")
        return
    for r in rows:
        style = "bold red" if _is_override(r) else ""
        console.print(line((f"#{r['seq']}", "bold"), f"  {str(r['logged_at'])[:19]}  ", (r["actor"], "bold"),
                           "  ", (r["action"], style or "bold"), f"  {r['target'] or ''}"))
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True, style="dim")
        grid.add_column(overflow="fold")
        for key, value in _details(r).items():
            shown = ", ".join(map(str, value)) if isinstance(value, list) else value
            grid.add_row(text(f"{key}:"), text(shown if isinstance(shown, str) else json.dumps(shown, default=str),
                                               "red" if style and key == "reason" else ""))
        console.print(Padding(grid, (0, 0, 0, 6), expand=False))


# -- review printout ------------------------------------------------------------------------------------------

def _what_moved(row: dict) -> str:
    """'priority medium → high (expected medium); needs_human …' for the labelled fields that changed."""
    if row["new_error"]:
        return f"now fails: {row['new_error'][:120]}"
    before, after = row["old_output"] or {}, row["new_output"] or {}
    moved = [f"{k} {before.get(k)} → {after.get(k)} (expected {v})" for k, v in row["expected"].items()
             if before.get(k) != after.get(k)]
    return "; ".join(moved) or f"lost {', '.join(row['dropped'])}"


def slice_deltas_table(sliced: list[dict]) -> Table:
    """Per slice, each metric's paired Δ with its interval; green or red only where significant."""
    names = [d["metric"] for d in sliced[0]["metrics"]]
    table = _table(("slice", "n", *names), "Metric deltas per slice (paired Δ; * significant, p < 0.05; "
                   "intervals on the review page)", right=("n", *names))
    for row in sliced:
        cells = [text(f"{d['delta']:+.2f}{'*' if d['significant'] else ' '}",
                      "bold red" if d["significant"] and d["delta"] < 0 else "green" if d["significant"] else "")
                 for d in row["metrics"]]
        _row(table, row["slice"], str(row["n"]), *cells)
    return table


def print_review(console: Console, data: dict) -> None:
    """`slipway review` on a terminal: the same sections as the review page, shorter."""
    t, b = data["target"], data["baseline"]
    console.print(line((f"Review {t['tag']}", "bold"), f" built {t['created']} by {t['author']}"))
    console.print(text(f"  against {b['tag']} ({data['baseline_reason']})" if b else f"  {data['baseline_reason']}"))
    made = t.get("optimized")
    if made:
        console.print(text(f"  program made by `slipway optimize`: {made['optimizer']}, {made['demos']} demos, "
                           f"{made['objective']} on {made['dev_n']} dev examples {made['before']:.3f} → "
                           f"{made['after']:.3f} (Δ {made['delta']:+.3f}, 95% CI [{made['interval'][0]:+.3f}, "
                           f"{made['interval'][1]:+.3f}], p {made['p_value']:.3f})"
                           + (" FORCED: saved without a significant gain" if made["forced"] else ""),
                           "red" if made["forced"] else ""), soft_wrap=True)
    for o in data["overrides"]:
        console.print(line((" OVERRIDE ", "bold white on red"), " ",
                           (f"{o['where']} by {o['actor']}: {o['reason']}", "red")))
    if data["contract"]:
        table = _table(("clause", "target", "measured", "verdict"), "Contract")
        for c in data["contract"]["clauses"]:
            _row(table, c["name"], c["target"], clause_measured_text(c),
                 text("PASS", "green") if c["passed"] else text("FAIL", "bold red"))
        console.print(table)
    changes = data["changes"]
    if changes is not None:
        console.print(text("What changed", "bold"))
        for name, entry in changes["program"].items():
            demos = entry["demos"]
            console.print(text(f"  program {name}: instructions {'changed' if entry['instructions'] else 'same'}, "
                               f"{len(entry['fields'])} field change(s), demos +{len(demos['added'])} "
                               f"-{len(demos['removed'])}"))
            for tag, diff_line in entry["instructions"]:
                if tag != " ":
                    console.print(text(f"    {tag} {diff_line}", "red" if tag == "-" else "green"), soft_wrap=True)
        if not changes["program"]:
            console.print(text("  program: unchanged"))
        for key in ("model", "contract"):
            rows = changes[key]
            console.print(text(f"  {key}: " + (", ".join(f"{c['key']} {c['old']!r} → {c['new']!r}" for c in rows)
                                               if rows else "unchanged")))
        rows = changes["eval_set"]
        console.print(text("  eval set: " + (", ".join(f"{len(v)} {k}" for k, v in rows.items())
                                             if any(rows.values()) else "unchanged")))
    if data["metrics"]:
        table = _table(("metric", "before", "after", "Δ", "95% CI of Δ", "p"),
                       f"Metric deltas (paired, {data['comparison']['shared']} shared examples)",
                       right=("before", "after", "Δ", "95% CI of Δ", "p"))
        for d in data["metrics"]:
            style = "bold red" if d["significant"] and d["delta"] < 0 else "green" if d["significant"] else ""
            _row(table, d["metric"], f"{d['old']:.3f}", f"{d['new']:.3f}", text(f"{d['delta']:+.3f}", style),
                 f"[{d['interval'][0]:+.3f}, {d['interval'][1]:+.3f}]", f"{d['p_value']:.3f}")
        console.print(table)
    if data.get("slices"):
        console.print(slice_deltas_table(data["slices"]))
    if data["slo"]:
        console.print(text("  latency and cost: " + ", ".join(f"{s['name']} {change_text(s)}" for s in data["slo"])),
                      soft_wrap=True)
    if data["comparison"]["note"]:
        console.print(text(f"  {data['comparison']['note']}", "yellow"))
    if data["baseline"]:
        console.print(line((f"Regressed examples: {len(data['regressed'])}", "bold"),
                           f" ({data['improved']} improved)"))
        for r in data["regressed"][:10]:
            console.print(text(f"  {r['example_id']}: {_what_moved(r)}"), soft_wrap=True)
        if len(data["regressed"]) > 10:
            console.print(text(f"  … {len(data['regressed']) - 10} more on the review page"))
    ready = data["readiness"]
    if ready:
        who = ", ".join(a["approver"] for a in data["approvals"]) or "nobody yet"
        console.print(text(f"approvals: {len(ready['counted'])} of {ready['required']} required (approved by {who})"))
        console.print(text("ready to deploy", "green") if not ready["missing"] else
                      text(f"not deployable yet: {'; '.join(ready['missing'])}", "yellow"))


# -- progress -------------------------------------------------------------------------------------------------

def with_progress(err: Console, label: str, fn: Callable, *, plain: bool):
    """Call `fn(report)`; `report(done, total)` drives a rich bar on `err`, or when `plain` (piped, CI)
    prints a line every 10%."""
    if plain:
        state = {"last": -1}

        def report(done: int, total: int) -> None:
            step = max(1, total // 10)
            if done == total or done // step != state["last"]:
                state["last"] = done // step
                err.print(text(f"{label}: {done}/{total}"))
        return fn(report)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn("{task.description}", style="progress.description", markup=False), BarColumn(),
                   MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=False)
    task = bar.add_task(label, total=None)

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)
    with bar:
        return fn(update)


def with_optimize_progress(err: Console, fn: Callable, *, plain: bool):
    """Call `fn(report)`; each `optimize.Step` moves its phase's bar on `err`: model calls against the
    budget while compiling (elapsed against max_minutes beside it), examples while scoring dev. When
    `plain` (piped, CI) it prints a line every 10% of a phase, or every 10 calls with no call budget."""
    def label(step) -> str:
        if step.phase != "compile":
            return step.phase
        limit = f"/{step.max_s:.0f}" if step.max_s else ""
        return f"compile ({step.elapsed_s:.0f}{limit} s)"

    if plain:
        last: dict[str, int] = {}

        def report(step) -> None:
            every = max(1, (step.total or 100) // 10)
            if step.done == step.total or step.done // every != last.get(step.phase, -1):
                last[step.phase] = step.done // every
                unit = " calls" if step.phase == "compile" else ""
                err.print(text(f"{label(step)}: {step.done}/{step.total or '-'}{unit}"))
        return fn(report)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}", style="progress.description", markup=False), BarColumn(),
                   MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=False)
    tasks: dict[str, Any] = {}

    def update(step) -> None:
        if step.phase not in tasks:
            tasks[step.phase] = bar.add_task(label(step), total=step.total)
        bar.update(tasks[step.phase], completed=step.done, total=step.total, description=label(step))
    with bar:
        return fn(update)


# -- check report: JSON and HTML ------------------------------------------------------------------------------

def report_data(run: EvalRun, verdict: Verdict) -> dict:
    errors = [r for r in run.records if r["error"]]
    misses = [r for r in run.records if not r["error"] and any(v < 1 for v in r["scores"].values())]
    return {
        "verdict": verdict.to_dict(),
        "run": {"run_id": run.run_id, "split": run.split, "model": run.model_key, "n": run.n,
                "reused": run.reused, "hashes": run.hashes},
        "measurements": run.measurements.to_dict(),
        "errors": [{"example_id": r["example_id"], "error": r["error"]} for r in errors],
        "routing": [{"example_id": r["example_id"], **r["routing"]} for r in run.records if r.get("routing")],
        "misses": [{"example_id": r["example_id"], "inputs": r["inputs"], "expected": r["expected"],
                    "output": r["output"], "scores": r["scores"], "tags": r.get("tags") or []} for r in misses],
        "guardrails": guardrail_summary(run, verdict),
        "cache": verdict.meta.get("cache"),
    }


def guardrail_summary(run: EvalRun, verdict: Verdict) -> dict:
    """How often each guardrail fired on the eval split, which examples were refused, and the detectors'
    counts on their labelled sets: what a reviewer needs to judge the guarded pipeline."""
    fired: dict[str, dict[str, int]] = {}
    for record in run.records:
        for decision in record.get("guardrails") or ():
            if decision.get("action", "pass") != "pass":
                actions = fired.setdefault(decision["check"], {})
                actions[decision["action"]] = actions.get(decision["action"], 0) + 1
    return {"fired": fired, "blocked": [{"example_id": r["example_id"], "check": r["blocked"]}
                                        for r in run.records if r.get("blocked")],
            "p99_ms": run.measurements.guardrail_p99_ms, "detectors": verdict.meta.get("detectors", [])}


def write_reports(project: Project, check_id: str, run: EvalRun, verdict: Verdict) -> tuple[Path, Path]:
    folder = project.state_dir / "reports"
    folder.mkdir(parents=True, exist_ok=True)
    data = report_data(run, verdict)
    json_path = folder / f"{check_id}.json"
    html_path = folder / f"{check_id}.html"
    json_path.write_text(json.dumps({"check_id": check_id, **data}, indent=2, default=str))
    html_path.write_text(render_html(project.name, check_id, data))
    return json_path, html_path


def clause_measured_text(clause: dict) -> str:
    from framework.contract import Clause

    fields = {k: clause[k] for k in ("name", "target", "measured", "passed", "unit", "note")}
    interval = tuple(clause["interval"]) if clause.get("interval") else None
    return Clause(**fields, interval=interval).measured_text()


def _first_input(inputs: dict) -> str:
    """The first input field (the ticket), cut to 400 characters for a table cell."""
    return str(next(iter(inputs.values()), ""))[:400]


def _value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _num(value: Any, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if unit == "ms":
        return f"{value:,.0f} ms"
    if unit == "$":
        return f"${value:.7f}"
    if unit == "tokens":
        return f"{value:,.0f}"
    if unit == "%":
        return f"{value * 100:.1f}%"
    return f"{value:.3f}"


def change_text(row: dict) -> str:
    """Relative change; a rate (error rate) moves in percentage points, and from 0 nothing is relative."""
    if row["unit"] == "%":
        return f"{row['delta'] * 100:+.1f} pp"
    return "new" if math.isinf(row["pct"]) else f"{row['pct']:+.1f}%"


_TEMPLATES = None


def _template(name: str):
    """A template from framework/templates/, autoescaped whatever its file name (every page is HTML)."""
    global _TEMPLATES
    if _TEMPLATES is None:
        from jinja2 import Environment, PackageLoader, StrictUndefined

        env = Environment(loader=PackageLoader("framework", "templates"), autoescape=True,
                          undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        env.filters.update(measured=clause_measured_text, value=_value, num=_num, change=change_text,
                           first_input=_first_input, json=lambda v: json.dumps(v, default=str),
                           fmt=format, short=lambda v: str(v)[:12])
        _TEMPLATES = env
    return _TEMPLATES.get_template(name)


def render_html(project_name: str, check_id: str, data: dict) -> str:
    verdict, run = data["verdict"], data["run"]
    measurements = data["measurements"]
    metrics = [{"name": k, "value": v, "low": lo, "high": hi} for k, v in measurements["metrics"].items()
               for lo, hi in [measurements["intervals"].get(k, (float("nan"),) * 2)]]
    misses = [{**m, "input": _first_input(m["inputs"]), "tags": m.get("tags") or []} for m in data["misses"][:100]]
    slice_metrics, slice_rows = slice_table_rows(measurements)
    return _template("check_report.html.j2").render(
        project=project_name, check_id=check_id, status="PASS" if verdict["passed"] else "FAIL",
        run=run, model_name=str(verdict.get("meta", {}).get("model_name", run["model"])),
        engine=verdict.get("meta", {}).get("engine"),
        local=local_line(verdict["meta"]["compared_with_local"]) if verdict.get("meta", {}).get(
            "compared_with_local") else None,
        content_hash=str(run["hashes"].get("content_hash", ""))[:12], clauses=verdict["clauses"],
        metrics=metrics, errors=data["errors"][:100], n_errors=len(data["errors"]), misses=misses,
        n_misses=len(data["misses"]), guardrails=data.get("guardrails") or {}, cache=data.get("cache"),
        slice_metrics=slice_metrics,
        tiers=tier_rows(measurements) if measurements.get("routing") else None,
        slices=slice_rows, confusion={f: confusion_rows(m) for f, m in (measurements.get("confusion") or {}).items()})


def slice_table_rows(measurements: dict) -> tuple[list[str], list[dict]]:
    """(metric names, one row per slice) for the report; a cell is `low` when the slice's interval lies
    wholly under the overall figure: where the pipeline is worse, beyond noise."""
    names = _slice_metric_names(measurements.get("slices") or {})
    rows = []
    for tag, found in (measurements.get("slices") or {}).items():
        cells = []
        for name in names:
            value = found["metrics"].get(name, math.nan)
            lo, hi = found["intervals"].get(name, (math.nan, math.nan))
            cells.append({"value": value, "lo": lo, "hi": hi, "low": hi < measurements["metrics"][name]})
        rows.append({"tag": tag, "n": found["n"], "cells": cells})
    return names, rows


def confusion_rows(matrix: dict[str, dict[str, int]]) -> dict:
    """A confusion matrix as rows of cells over one label order (expected labels first, then any other
    answer), with each label's recall."""
    labels = list(matrix) + sorted({p for row in matrix.values() for p in row} - set(matrix))
    rows = []
    for label, answered in matrix.items():
        total = sum(answered.values())
        rows.append({"label": label, "recall": answered.get(label, 0) / total if total else math.nan,
                     "cells": [{"n": answered.get(other, 0), "hit": other == label} for other in labels]})
    return {"labels": labels, "rows": rows}


# -- review page ----------------------------------------------------------------------------------------------

def diff_rows(ops: list, context: int = 2) -> list[dict[str, Any]]:
    """A line diff as rows for the `diff` template macro: `cls` is ctx, gap, del or ins; a removed line and
    the added line that replaced it carry `words`, (changed, word) pairs; long unchanged stretches fold to
    one '… N unchanged lines' gap row."""
    from framework.diff import changed_words

    out: list[dict[str, Any]] = []
    i = 0
    while i < len(ops):
        tag, _ = ops[i]
        if tag == " ":
            j = i
            while j < len(ops) and ops[j][0] == " ":
                j += 1
            run = [("ctx", t) for _, t in ops[i:j]]
            head = run[:context] if i > 0 else []
            tail = run[-context:] if j < len(ops) else []
            if len(run) > len(head) + len(tail):
                run = [*head, ("gap", f"… {len(run) - len(head) - len(tail)} unchanged lines"), *tail]
            out.extend({"cls": cls, "text": t, "words": None} for cls, t in run)
            i = j
            continue
        j = i
        while j < len(ops) and ops[j][0] == "-":
            j += 1
        k = j
        while k < len(ops) and ops[k][0] == "+":
            k += 1
        removed, added = [x[1] for x in ops[i:j]], [x[1] for x in ops[j:k]]
        if removed and len(removed) == len(added):
            pairs = [changed_words(a, b) for a, b in zip(removed, added, strict=True)]
            out.extend({"cls": "del", "text": None, "words": p[0]} for p in pairs)
            out.extend({"cls": "ins", "text": None, "words": p[1]} for p in pairs)
        else:
            out.extend({"cls": "del", "text": x, "words": None} for x in removed)
            out.extend({"cls": "ins", "text": x, "words": None} for x in added)
        i = max(k, i + 1)
    return out


def render_review_html(data: dict) -> str:
    verdict, changes = data["contract"], data["changes"]
    programs, eval_rows, notebook_rows = [], [], []
    if changes is not None:
        programs = [(name, {**entry, "instruction_rows": diff_rows(entry["instructions"])})
                    for name, entry in changes["program"].items()]
        eval_rows = list(changes["eval_set"].items())
        notebook_rows = diff_rows(changes["notebook"]) if changes["notebook"] else []
    return _template("review.html.j2").render(
        target=data["target"], baseline=data["baseline"], baseline_reason=data["baseline_reason"],
        passed=bool(verdict and verdict["passed"]), clauses=(verdict or {}).get("clauses", []),
        overrides=data["overrides"], readiness=data["readiness"] or {"required": 0, "missing": [], "counted": []},
        changes=changes, programs=programs, eval_rows=eval_rows,
        eval_changed=changes is not None and any(changes["eval_set"].values()), notebook_rows=notebook_rows,
        comparison=data["comparison"], metrics=data["metrics"], slices=data.get("slices") or [], slo=data["slo"],
        regressed=data["regressed"], improved=data["improved"], approvals=data["approvals"])


# -- traces and the live contract ---------------------------------------------------------------------------

def traces_table(rows: list[dict]) -> Table:
    """`slipway traces`: newest first, one request per line."""
    table = _table(("time (UTC)", "request_id", "version", "status", "ms", "tokens", "cost", "error"),
                   right=("ms", "tokens", "cost"))
    for r in rows:
        status = text(str(r["status"]), "green" if r["status"] < 400 else "bold red")
        tokens = (r.get("tokens_in_new") or 0) + (r.get("tokens_out") or 0)
        _row(table, str(r["started_at"])[:23], r["request_id"], r.get("version") or "", status,
             f"{r['duration_ms']:,.0f}", f"{tokens:,}", f"${(r.get('cost') or 0):.7f}", r.get("error_code") or "")
    return table


def print_trace(console: Console, trace: dict) -> None:
    """`slipway trace <request_id>`: one trace, its versions, stages as a timeline, and its model calls."""
    console.print(line(("request ", "bold"), trace["request_id"], ("  trace ", "dim"), trace["trace_id"]))
    for key in ("started_at", "bento", "channel", "model_sha256", "program_hash", "caller", "tenant", "status",
                "error_code", "error", "redactions"):
        if trace.get(key) not in (None, "", {}):
            console.print(line((f"  {key}: ", "dim"), str(trace[key])))
    console.print(line(("  tokens: ", "dim"), f"{trace.get('tokens_in_new') or 0} new prompt + "
                       f"{trace.get('tokens_out') or 0} generated ({trace.get('tokens_in_cached') or 0} cached)  "
                       f"cost ${(trace.get('cost') or 0):.7f}  total {trace['duration_ms']:,.1f} ms"))
    total = max(float(trace["duration_ms"]), 1e-9)
    table = _table(("stage", "start ms", "ms", ""), right=("start ms", "ms"))
    for stage in trace.get("stages") or []:
        width = 40
        begin = int(width * stage["start_ms"] / total)
        size = max(1, int(width * stage["duration_ms"] / total))
        bar = " " * begin + "█" * min(size, width - begin)
        waited = f" (waited {stage['waited_ms']:,.1f})" if stage.get("waited_ms") else ""
        _row(table, stage["name"] + waited, f"{stage['start_ms']:,.1f}", f"{stage['duration_ms']:,.1f}", bar)
    console.print(table)
    if trace.get("inputs") is not None:
        console.print(line(("  inputs: ", "dim"), json.dumps(trace["inputs"], ensure_ascii=False)[:2000]))
    if trace.get("outputs") is not None:
        console.print(line(("  outputs: ", "dim"), json.dumps(trace["outputs"], ensure_ascii=False)[:2000]))
    for call in trace.get("calls") or []:
        console.print(line((f"  model call {call['index']}: ", "bold"),
                           f"{call['tokens_in_new']} new + {call['tokens_in_cached']} cached prompt tokens, "
                           f"{call['tokens_out']} generated, {call['latency_ms']:,.1f} ms, {call['finish_reason']}"))
        for message in call.get("messages") or []:
            console.print(line((f"    [{message['role']}] ", "dim"), _clip(message["content"], 600)))
        if call.get("output"):
            console.print(line(("    [output] ", "dim"), _clip(call["output"], 600)))


def _clip(value: str, limit: int) -> str:
    value = " ".join(str(value).split())
    return value if len(value) <= limit else value[:limit] + f"… ({len(value)} chars)"


def slo_table(result) -> Table:
    """`slipway slo`: each live clause, its burn rate, and what it is based on."""
    table = _table(("clause", "target", "measured", "verdict", "burn", "note"),
                   f"Live contract: {result.project}, last {result.window} ({result.n} requests)",
                   right=("measured", "burn"))
    for live in result.clauses:
        clause = live.clause
        style = "green" if clause.passed else "bold red"
        burn = "" if live.burn_rate is None else f"{live.burn_rate:.2f}x"
        _row(table, clause.name, clause.target, clause.measured_text(), text("PASS" if clause.passed else "FAIL",
                                                                               style),
             text(burn, "bold red" if (live.burn_rate or 0) > 1 else ""), "; ".join(
                 x for x in (clause.note, live.note) if x))
    return table


def queue_table(rows: list[dict]) -> Table:
    """`slipway queue list`: requests handed to a person, oldest first; a resolution whose row no longer says
    what its resolver signed is shown in red as NOT VERIFIED."""
    table = _table(("handed over (UTC)", "request_id", "tenant", "failure", "input", "state", "answer"))
    for column in table.columns:   # the request id is what a person copies into `queue resolve`: kept whole
        column.no_wrap = column.header in ("handed over (UTC)", "request_id", "state")
    for r in rows:
        if r.get("resolved_at") is None:
            state = text("open", "bold yellow")
        elif r.get("verified"):
            state = text(f"resolved: {r.get('resolved_by')}", "green")
        else:
            state = text("NOT VERIFIED", "bold red")
        labels = ", ".join(f"{k}={_value(v)}" for k, v in (r.get("labels") or {}).items())
        _row(table, str(r["created_at"])[:23], r["request_id"], r.get("tenant") or "",
             r.get("failure") or r.get("error_code") or "", _clip(_first_input(r.get("inputs") or {}), 60), state,
             labels)
    return table
