"""Renderings of a verdict: rich table for the terminal, JSON for machines, HTML for reviewers.

The HTML page is self-contained (inline CSS, no scripts, no network) so it can
be attached to a pull request or opened from a CI artefact as is.
"""

from __future__ import annotations

import html
import json
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
        f"<tr><td>{e(c['name'])}</td><td>{e(c['target'])}</td><td class=num>{e(_measured(c))}</td>"
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


def _measured(clause: dict) -> str:
    from framework.contract import Clause

    fields = {k: clause[k] for k in ("name", "target", "measured", "passed", "unit", "note")}
    interval = tuple(clause["interval"]) if clause.get("interval") else None
    return Clause(**fields, interval=interval).measured_text()
