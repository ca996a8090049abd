"""Renderings of a verdict: rich table for the terminal, JSON for machines, HTML for reviewers.

The HTML page is self-contained (inline CSS, no scripts, no network) so it can
be attached to a pull request or opened from a CI artefact as is.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from framework.contract import Verdict

if TYPE_CHECKING:
    from framework.evaluate import EvalRun
    from framework.spec import Project


def verdict_table(verdict: Verdict, title: str = "Contract verdict"):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in ("clause", "target", "measured", "verdict", "note"):
        table.add_column(column, justify="right" if column == "measured" else "left")
    for row in verdict.table_rows():
        style = "green" if row["verdict"] == "PASS" else "bold red"
        table.add_row(row["clause"], row["target"], row["measured"], f"[{style}]{row['verdict']}[/]", row["note"])
    return table


def report_data(run: EvalRun, verdict: Verdict) -> dict:
    errors = [r for r in run.records if r["error"]]
    misses = [r for r in run.records if not r["error"] and any(v < 1 for v in r["scores"].values())]
    return {
        "verdict": verdict.to_dict(),
        "run": {"run_id": run.run_id, "split": run.split, "model": run.model_key, "n": run.n,
                "reused": run.reused, "hashes": run.hashes},
        "measurements": run.measurements.to_dict(),
        "errors": [{"example_id": r["example_id"], "error": r["error"]} for r in errors],
        "misses": [{"example_id": r["example_id"], "inputs": r["inputs"], "expected": r["expected"],
                    "output": r["output"], "scores": r["scores"]} for r in misses],
    }


def write_reports(project: Project, check_id: str, run: EvalRun, verdict: Verdict) -> tuple[Path, Path]:
    folder = project.state_dir / "reports"
    folder.mkdir(parents=True, exist_ok=True)
    data = report_data(run, verdict)
    json_path = folder / f"{check_id}.json"
    html_path = folder / f"{check_id}.html"
    json_path.write_text(json.dumps({"check_id": check_id, **data}, indent=2, default=str))
    html_path.write_text(render_html(project.name, check_id, data))
    return json_path, html_path


_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#1b1f24;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem} .meta{color:#57606a;font-size:.9rem}
table{border-collapse:collapse;width:100%;margin:1rem 0} th,td{border-bottom:1px solid #d0d7de;padding:.35rem .5rem;
text-align:left;vertical-align:top} th{background:#f6f8fa} td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#1a7f37;font-weight:600} .fail{color:#cf222e;font-weight:700}
.badge{display:inline-block;padding:.2rem .7rem;border-radius:1rem;color:#fff;font-weight:700}
.badge.pass{background:#1a7f37;color:#fff} .badge.fail{background:#cf222e;color:#fff}
code,pre{font:12px ui-monospace,monospace} pre{white-space:pre-wrap;margin:0;max-width:520px}
"""


def render_html(project_name: str, check_id: str, data: dict) -> str:
    e = html.escape
    verdict = data["verdict"]
    passed = verdict["passed"]
    rows = "".join(
        f"<tr><td>{e(c['name'])}</td><td>{e(c['target'])}</td><td class=num>{e(clause_measured_text(c))}</td>"
        f"<td class={'pass' if c['passed'] else 'fail'}>{'PASS' if c['passed'] else 'FAIL'}</td>"
        f"<td>{e(c['note'])}</td></tr>" for c in verdict["clauses"])
    metrics = "".join(f"<tr><td>{e(k)}</td><td class=num>{v:.3f}</td><td class=num>[{lo:.3f}, {hi:.3f}]</td></tr>"
                      for k, v in data["measurements"]["metrics"].items()
                      for lo, hi in [data["measurements"]["intervals"].get(k, (float("nan"),) * 2)])
    misses = "".join(
        f"<tr><td>{e(m['example_id'])}</td><td><pre>{e(str(next(iter(m['inputs'].values())))[:400])}</pre></td>"
        f"<td><code>{e(json.dumps(m['expected']))}</code></td><td><code>{e(json.dumps(m['output']))}</code></td></tr>"
        for m in data["misses"][:100])
    errors = "".join(f"<tr><td>{e(x['example_id'])}</td><td><code>{e(x['error'])}</code></td></tr>"
                     for x in data["errors"][:100])
    meta = verdict.get("meta", {})
    return f"""<!doctype html><html lang=en><head><meta charset=utf-8>
<title>{e(project_name)} — contract {'PASS' if passed else 'FAIL'}</title><style>{_CSS}</style></head><body>
<h1>{e(project_name)} <span class="badge {'pass' if passed else 'fail'}">{'PASS' if passed else 'FAIL'}</span></h1>
<p class=meta>check <code>{e(check_id)}</code> · run <code>{e(data['run']['run_id'])}</code>
 · model <code>{e(str(meta.get('model_name', data['run']['model'])))}</code> · {data['run']['n']} examples
 ({e(data['run']['split'])} split){' · reused an earlier run of identical content' if data['run']['reused'] else ''}
 · content <code>{e(str(data['run']['hashes'].get('content_hash', ''))[:12])}</code></p>
<h2>Contract</h2><table id=contract><tr><th>clause</th><th>target</th><th>measured [95% CI]</th><th>verdict</th>
<th>note</th></tr>{rows}</table>
<h2>Quality metrics</h2><table id=metrics><tr><th>metric</th><th>score</th><th>95% bootstrap interval</th></tr>
{metrics}</table>
<h2>Errors ({len(data['errors'])})</h2><table id=errors><tr><th>example</th><th>error</th></tr>{errors}</table>
<h2>Examples with a wrong field ({len(data['misses'])})</h2><table id=misses><tr><th>example</th><th>input</th>
<th>expected</th><th>output</th></tr>{misses}</table>
</body></html>"""


def clause_measured_text(clause: dict) -> str:
    from framework.contract import Clause

    fields = {k: clause[k] for k in ("name", "target", "measured", "passed", "unit", "note")}
    interval = tuple(clause["interval"]) if clause.get("interval") else None
    return Clause(**fields, interval=interval).measured_text()


# -- review page ----------------------------------------------------------------------------------------------

_REVIEW_CSS = _CSS + """
.diff{border:1px solid #d0d7de;border-radius:6px;padding:.4rem .6rem;background:#fff;overflow-x:auto}
.diff div{font:12px/1.5 ui-monospace,monospace;white-space:pre-wrap} .diff .del{background:#ffebe9}
.diff .ins{background:#dafbe1} .diff .gap{color:#57606a} .diff del{background:#ff818266;text-decoration:none}
.diff ins{background:#4ac26b66;text-decoration:none}
.override{border:2px solid #cf222e;background:#ffebe9;color:#82071e;padding:.6rem 1rem;border-radius:6px;
font-weight:600} .drop{color:#cf222e;font-weight:700} .gain{color:#1a7f37;font-weight:600}
.missing{color:#9a6700;font-weight:600} .none{color:#57606a}
"""


def _diff_lines(ops: list, context: int = 2) -> str:
    """Line diff with changed words marked; long unchanged stretches folded to a '…' line."""
    from framework.diff import changed_words

    e = html.escape
    out: list[str] = []
    i = 0
    while i < len(ops):
        tag, line = ops[i]
        if tag == " ":
            j = i
            while j < len(ops) and ops[j][0] == " ":
                j += 1
            run = ops[i:j]
            head = run[:context] if i > 0 else []
            tail = run[-context:] if j < len(ops) else []
            if len(run) > len(head) + len(tail):
                run = [*head, ("gap", f"… {len(run) - len(head) - len(tail)} unchanged lines"), *tail]
            out.extend(f"<div class={'gap' if t == 'gap' else 'ctx'}>{e(text) or '&nbsp;'}</div>" for t, text in run)
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
            marked_old = ["".join(f"<del>{e(t)}</del> " if c else f"{e(t)} " for c, t in p[0]) for p in pairs]
            marked_new = ["".join(f"<ins>{e(t)}</ins> " if c else f"{e(t)} " for c, t in p[1]) for p in pairs]
        else:
            marked_old, marked_new = [e(x) for x in removed], [e(x) for x in added]
        out.extend(f"<div class=del>- {x}</div>" for x in marked_old)
        out.extend(f"<div class=ins>+ {x}</div>" for x in marked_new)
        i = max(k, i + 1)
    return f"<div class=diff>{''.join(out)}</div>"


def _value(value) -> str:
    return html.escape(json.dumps(value, default=str) if not isinstance(value, str) else value)


def _changes_html(changes: dict | None) -> str:
    e = html.escape
    if changes is None:
        return "<p class=none>No baseline: this is the project's first build.</p>"
    parts = []
    for name, entry in changes["program"].items():
        parts.append(f"<h3>Program: <code>{e(name)}</code>"
                     f"{' (only in the ' + entry['only_in'] + ' build)' if entry['only_in'] else ''}</h3>")
        if entry["instructions"]:
            parts.append(f"<h4>Instructions</h4>{_diff_lines(entry['instructions'])}")
        if entry["fields"]:
            parts.append("<h4>Signature fields</h4><table><tr><th>field</th><th>before</th><th>after</th></tr>"
                         + "".join(f"<tr><td>{e(c['key'])}</td><td><code>{_value(c['old'])}</code></td>"
                                   f"<td><code>{_value(c['new'])}</code></td></tr>" for c in entry["fields"])
                         + "</table>")
        for side in ("removed", "added"):
            demos = entry["demos"][side]
            if demos:
                parts.append(f"<h4>Few-shot demos {side} ({len(demos)})</h4><ul class=demos-{side}>"
                             + "".join(f"<li><code>{_value(d)}</code></li>" for d in demos) + "</ul>")
    if not changes["program"]:
        parts.append("<p class=none>Program state (instructions, signature, demos): unchanged.</p>")
    for key, title in (("model", "Model and its settings"), ("contract", "Contract")):
        rows = changes[key]
        if rows:
            parts.append(f"<h3>{title}</h3><table id=changes-{key}><tr><th>key</th><th>before</th><th>after</th>"
                         "</tr>" + "".join(f"<tr><td>{e(c['key'])}</td><td><code>{_value(c['old'])}</code></td>"
                                           f"<td><code>{_value(c['new'])}</code></td></tr>" for c in rows)
                         + "</table>")
        else:
            parts.append(f"<p class=none>{title}: unchanged.</p>")
    rows = changes["eval_set"]
    if any(rows.values()):
        parts.append("<h3>Eval set</h3><table id=changes-eval><tr><th>rows</th><th>count</th><th>ids</th></tr>"
                     + "".join(f"<tr><td>{k}</td><td class=num>{len(v)}</td><td>{e(', '.join(v[:50]))}"
                               f"{' …' if len(v) > 50 else ''}</td></tr>" for k, v in rows.items()) + "</table>")
    else:
        parts.append("<p class=none>Eval set: unchanged.</p>")
    if changes["notebook"]:
        parts.append(f"<details><summary>Notebook source diff</summary>{_diff_lines(changes['notebook'])}</details>")
    return "".join(parts)


def _num(value, unit: str = "") -> str:
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


def render_review_html(data: dict) -> str:
    e = html.escape
    target, baseline = data["target"], data["baseline"]
    verdict = data["contract"]
    passed = bool(verdict and verdict["passed"])
    contract_rows = "".join(
        f"<tr><td>{e(c['name'])}</td><td>{e(c['target'])}</td><td class=num>{e(clause_measured_text(c))}</td>"
        f"<td class={'pass' if c['passed'] else 'fail'}>{'PASS' if c['passed'] else 'FAIL'}</td>"
        f"<td>{e(c['note'])}</td></tr>" for c in (verdict or {}).get("clauses", []))
    overrides = "".join(
        f"<p class=override>OVERRIDE at {e(o['where'])} by {e(str(o['actor']))} ({e(str(o['at']))}): "
        f"{e(o['reason'])}</p>" for o in data["overrides"])
    deltas = "".join(
        f"<tr><td>{e(d['metric'])}</td><td class=num>{_num(d['old'])}</td><td class=num>{_num(d['new'])}</td>"
        f"<td class='num {'drop' if d['significant'] and d['delta'] < 0 else 'gain' if d['significant'] else ''}'>"
        f"{d['delta']:+.3f}</td><td class=num>[{d['interval'][0]:+.3f}, {d['interval'][1]:+.3f}]</td>"
        f"<td class=num>{d['p_value']:.3f}</td><td>{'yes' if d['significant'] else 'no'}</td></tr>"
        for d in data["metrics"])
    slo = "".join(
        f"<tr><td>{e(s['name'])}</td><td class=num>{_num(s['old'], s['unit'])}</td>"
        f"<td class=num>{_num(s['new'], s['unit'])}</td><td class=num>{change_text(s)}</td></tr>"
        for s in data["slo"])
    regressed = "".join(
        f"<tr><td>{e(r['example_id'])}</td><td><pre>{e(str(next(iter(r['inputs'].values()), ''))[:400])}</pre></td>"
        f"<td><code>{_value(r['expected'])}</code></td>"
        f"<td><code>{_value(r['old_output'] if r['old_error'] is None else r['old_error'])}</code></td>"
        f"<td><code>{_value(r['new_output'] if r['new_error'] is None else r['new_error'])}</code></td>"
        f"<td class=drop>{e(', '.join(r['dropped']))}</td></tr>" for r in data["regressed"][:200])
    readiness = data["readiness"] or {"required": 0, "missing": [], "counted": []}
    approvals = "".join(f"<tr><td>{e(a['approver'])}</td><td>{e(a['at'])}</td><td>{e(a['note'] or '')}</td></tr>"
                        for a in data["approvals"])
    ready_line = ("<p class=pass>Ready to deploy: contract passed and approvals complete.</p>"
                  if not readiness["missing"] else
                  f"<p class=missing>Not deployable yet: {e('; '.join(readiness['missing']))}</p>")
    cmp = data["comparison"]
    base_text = (f"against <code>{e(baseline['tag'])}</code> ({e(data['baseline_reason'])}, built "
                 f"{e(baseline['created'])} by {e(str(baseline['author']))})" if baseline
                 else e(data["baseline_reason"]))
    return f"""<!doctype html><html lang=en><head><meta charset=utf-8>
<title>review {e(target['tag'])}</title><style>{_REVIEW_CSS}</style></head><body>
<h1>Review {e(target['tag'])} <span class="badge {'pass' if passed else 'fail'}">contract {'PASS' if passed else 'FAIL'}
</span></h1>
<p class=meta>built {e(target['created'])} by {e(str(target['author']))}
 · check <code>{e(str(target['check_id']))}</code>
 · model <code>{e(str(target['model']))}</code> <code>{e(str(target['model_sha256'])[:12])}</code>
 · content <code>{e(str(target['content_hash'])[:12])}</code><br>{base_text}</p>
{overrides}{ready_line}
<h2>Contract</h2><table id=contract><tr><th>clause</th><th>target</th><th>measured [95% CI]</th><th>verdict</th>
<th>note</th></tr>{contract_rows}</table>
<h2>What changed</h2><section id=changes>{_changes_html(data['changes'])}</section>
<h2>Metric deltas</h2><p class=meta>paired over {cmp['shared']} examples both checks scored with the same input and
label ({cmp['samples']} bootstrap resamples for the interval, as many permutations for p); significant = p &lt; 0.05.
{e(cmp['note'])}</p>
<table id=deltas><tr><th>metric</th><th>before</th><th>after</th><th>Δ</th><th>95% CI of Δ</th><th>p</th>
<th>significant</th></tr>{deltas}</table>
<h2>Latency and cost</h2><table id=slo><tr><th>measure</th><th>before</th><th>after</th><th>change</th></tr>{slo}
</table>
<h2>Regressed examples ({len(data['regressed'])}; {data['improved']} improved)</h2>
<p class=meta>An example regressed when a metric it scored before scores lower now, or it newly errors.</p>
<table id=regressed><tr><th>example</th><th>input</th><th>expected</th><th>before</th><th>after</th><th>lost</th></tr>
{regressed}</table>
<h2>Approvals ({len(readiness['counted'])} of {readiness['required']} required)</h2>
<table id=approvals><tr><th>approver</th><th>at</th><th>note</th></tr>{approvals}</table>
</body></html>"""
