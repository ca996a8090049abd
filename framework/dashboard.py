"""`slipway dashboard`: a marimo app over a project's served traffic, read-only over its store.

What a person on call looks at: latency percentiles, error rate and cost per request over time
per version, feedback per version, drift, and the contract's SLO clauses judged live over a
window. The store is opened read-only and only for the moment a refresh reads it (DuckDB allows
one writer per file, and ingest, `approve` or `deploy` must never wait on a dashboard left open).
The figures follow `Store.slo_figures`' rules, so a chart and the contract table agree.

Run it with `slipway dashboard <project>` (framework/dashboard_launch.py ingests first, then
starts `marimo run` on this file). By hand: `marimo run framework/dashboard.py -- --project DIR`,
or set SLIPWAY_DASHBOARD_PROJECT (and SLIPWAY_DASHBOARD_STORE to read another store file).
The functions below are plain Python: `from framework.dashboard import live_verdict`.
"""

import marimo

__generated_with = "0.25.2"
app = marimo.App(width="full", app_title="Slipway dashboard", css_file="dashboard.css")

with app.setup:
    import html
    import math
    import os
    import sys
    from datetime import timedelta
    from pathlib import Path

    # `marimo run` puts this file's folder (framework/) first on sys.path, where store.py, diff.py,
    # dataset.py … would shadow any top-level module of the same name; framework is a package.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != _here]

    import altair as alt
    import marimo as mo

    from framework.evaluate import store_path
    from framework.spec import load_project
    from framework.store import Store
    from framework.traces import utc_now

    # window → (span, bucket width): about 30 to 100 points per line.
    WINDOWS = {"1h": (timedelta(hours=1), timedelta(minutes=2)),
               "24h": (timedelta(days=1), timedelta(minutes=15)),
               "7d": (timedelta(days=7), timedelta(hours=2))}
    PROJECT_ENV, STORE_ENV = "SLIPWAY_DASHBOARD_PROJECT", "SLIPWAY_DASHBOARD_STORE"


@app.function
def dashboard_target(args=None, environ=None):
    """(project, store file) from `-- --project DIR [--store FILE]` or the SLIPWAY_DASHBOARD_* variables.
    Raises ValueError saying what to pass when neither names a project."""
    args = dict(args or {})
    environ = os.environ if environ is None else environ
    where = args.get("project") or environ.get(PROJECT_ENV)
    if not where:
        raise ValueError(f"no project: run `slipway dashboard <project>`, or pass `-- --project DIR` "
                         f"to `marimo run`, or set {PROJECT_ENV}")
    project = load_project(str(where))
    store_file = args.get("store") or environ.get(STORE_ENV)
    return project, Path(store_file) if store_file else store_path(project)


@app.function
def live_verdict(project, store_file, span):
    """(verdict rows, what they are over): the contract's live clauses from `framework.slo`, the same
    judgement `slipway slo` prints, on the store as it is (launch() ingested; a refresh never writes).
    One row per clause: clause, target, measured, verdict (PASS / FAIL), burn, note."""
    from framework.slo import slo

    with Store(store_file, read_only=True) as store:
        report = slo(project, span, store=store)
    return [clause_row(c) for c in report.clauses], f"framework.slo, over {report.n:,} requests"


@app.function
def clause_row(item) -> dict:
    """A verdict-table row from a contract.Clause, or from anything carrying one as `.clause` (slo's
    LiveClause, with its `burn_rate` and `note`)."""
    clause = getattr(item, "clause", item)
    measured = getattr(clause, "measured", math.nan)
    no_data = isinstance(measured, float) and math.isnan(measured)
    text = clause.measured_text() if hasattr(clause, "measured_text") else str(measured)
    burn = getattr(item, "burn_rate", None)
    notes = [n for n in (getattr(clause, "note", ""), getattr(item, "note", "") if item is not clause else "") if n]
    return {"clause": clause.name, "target": str(clause.target), "measured": "no traffic" if no_data else text,
            "verdict": "NO DATA" if no_data else ("PASS" if clause.passed else "FAIL"),
            "burn": "" if burn is None else f"x{burn:,.2f}", "note": "; ".join(notes)}


@app.function
def html_table(rows, *, table_id, columns) -> str:
    """A plain, escaped HTML table (verdict cells get class pass / fail / nodata, as in the check report)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            value = html.escape(str(row.get(c, "")))
            kind = {"PASS": "pass", "FAIL": "fail", "NO DATA": "nodata", "STABLE": "pass",
                    "DRIFT": "fail"}.get(value) if c == "verdict" else None
            cells.append(f'<td class="{kind}">{value}</td>' if kind else f"<td>{value}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (f'<table id="{table_id}" class="slipway-table"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


@app.function
def panel(panel_id, title, body) -> mo.Html:
    """A titled section with a stable id (`#latency`, `#contract-verdict`, …) that a browser test finds.
    `body` is HTML text (escaped by the caller) or anything marimo can show."""
    inner = body if isinstance(body, str) else mo.as_html(body).text
    return mo.Html(f'<section id="{panel_id}" class="slipway-panel"><h3>{html.escape(title)}</h3>'
                   f"{inner}</section>")


@app.function
def read_figures(store_file, span, bucket) -> dict:
    """Everything the charts show, read in one brief read-only opening of the store."""
    since = utc_now() - span
    with Store(store_file, read_only=True) as store:
        series = store.served_over_time(since=since, bucket=bucket)
        feedback = store.feedback_by_version(since=since)
    for row in series:   # vega reads an ISO time without a zone as browser-local time: say it is UTC
        row["bucket"] = row["bucket"].isoformat() + "Z"
    return {"series": series, "feedback": feedback, "since": since}


@app.function
def line_chart(rows, *, y, title, fmt, limit=None, dash=None):
    """Lines per version over time; `limit` draws the contract's bound as a dashed red rule."""
    encode = {"x": alt.X("bucket:T", title="time"), "y": alt.Y(f"{y}:Q", title=title, axis=alt.Axis(format=fmt)),
              "color": alt.Color("version:N"),
              "tooltip": ["bucket:T", "version:N", alt.Tooltip(f"{y}:Q", format=fmt)]}
    if dash:
        encode["strokeDash"] = alt.StrokeDash(f"{dash}:N", title="")
        encode["tooltip"].append(f"{dash}:N")
    chart = alt.Chart(alt.Data(values=rows)).mark_line(point=True).encode(**encode)
    if limit is not None:
        rule = alt.Chart(alt.Data(values=[{"limit": limit}])).mark_rule(color="#c62828", strokeDash=[6, 4]).encode(
            y="limit:Q")
        chart = chart + rule
    return chart.properties(width="container", height=220)


@app.cell
def _():
    window = mo.ui.dropdown(options=list(WINDOWS), value="24h", label="window")
    refresh = mo.ui.refresh(options=["10s", "30s", "1m", "5m"], label="refresh")
    mo.hstack([mo.md("# Slipway dashboard"), window, refresh], justify="start", align="center", gap=2)
    return refresh, window


@app.cell
def _():
    try:
        project, store_file = dashboard_target(mo.cli_args())
    except Exception as _exc:  # noqa: BLE001 - a bad project shows as the page's one message
        mo.stop(True, mo.callout(mo.md(f"**Cannot open the dashboard:** {html.escape(str(_exc))}"), kind="danger"))
    return project, store_file


@app.cell
def _(project, refresh, store_file, window):
    refresh.value  # noqa: B018 - read so that every refresh tick re-runs this cell
    span, bucket = WINDOWS[window.value]
    try:
        data = read_figures(store_file, span, bucket)
        verdict_rows, verdict_source = live_verdict(project, store_file, span)
    except Exception as _exc:  # noqa: BLE001 - e.g. no store yet: say so and stop, the page stays up
        mo.stop(True, mo.callout(mo.md(f"**Cannot read {html.escape(str(store_file))}:** "
                                       f"{html.escape(str(_exc))}"), kind="danger"))
    _shown = store_file.relative_to(project.root) if store_file.is_relative_to(project.root) else store_file
    mo.md(f"**{html.escape(project.spec.project.name)}**, last {window.value} (since "
          f"{data['since']:%Y-%m-%d %H:%M} UTC, {bucket.total_seconds() / 60:g}-minute buckets), "
          f"read from `{html.escape(str(_shown))}` at {utc_now():%H:%M:%S} UTC")
    return data, verdict_rows, verdict_source


@app.cell
def _(verdict_rows, verdict_source):
    _status = ("FAIL" if any(r["verdict"] == "FAIL" for r in verdict_rows) else
               "PASS" if verdict_rows and all(r["verdict"] == "PASS" for r in verdict_rows) else "NO DATA")
    _kind = {"PASS": "pass", "FAIL": "fail"}.get(_status, "nodata")
    panel("contract-verdict", "Live contract verdict",
          f'<p class="source"><span class="badge {_kind}">{_status}</span>{html.escape(verdict_source)}</p>'
          + (html_table(verdict_rows, table_id="contract",
                        columns=("clause", "target", "measured", "verdict", "burn", "note"))
             if verdict_rows else "<p>No requests in this window: nothing to judge.</p>"))
    return


@app.cell
def _(data, project):
    _contract = project.spec.contract
    _rows = [{"bucket": r["bucket"], "version": r["version"], "percentile": name, "ms": r[name]}
             for r in data["series"] for name in ("p50", "p95", "p99") if r[name] is not None]
    panel("latency", "Latency p50 / p95 / p99 (ms, answered requests)",
          line_chart(_rows, y="ms", title="ms", fmt=",.0f", limit=_contract.latency_p95_ms, dash="percentile")
          if _rows else mo.md("No answered requests in this window."))
    return


@app.cell
def _(data, project):
    panel("errors", "Error rate (5xx over requests, 4xx left out)",
          line_chart(data["series"], y="error_rate", title="error rate", fmt=".1%",
                     limit=project.spec.contract.error_rate_max)
          if data["series"] else mo.md("No requests in this window."))
    return


@app.cell
def _(data, project):
    panel("cost", "Cost per request (mean)",
          line_chart(data["series"], y="cost", title="cost", fmt="$.6f",
                     limit=project.spec.contract.cost_per_request_max)
          if data["series"] else mo.md("No requests in this window."))
    return


@app.cell
def _(data):
    _rows = [{"version": r["version"], "feedback": kind, "count": r[kind]}
             for r in data["feedback"] for kind in ("positive", "negative")]
    _chart = alt.Chart(alt.Data(values=_rows)).mark_bar().encode(
        x=alt.X("version:N"), xOffset="feedback:N", y=alt.Y("count:Q"),
        color=alt.Color("feedback:N", scale=alt.Scale(domain=["positive", "negative"],
                                                      range=["#2e7d32", "#c62828"])),
        tooltip=["version:N", "feedback:N", "count:Q"]).properties(width=420, height=200)
    panel("feedback", "Feedback per version",
          mo.hstack([_chart, mo.Html(html_table(data["feedback"], table_id="feedback-table",
                                                columns=("version", "positive", "negative", "n")))],
                    justify="start", align="start", gap=3)
          if _rows else mo.md("No feedback in this window."))
    return


@app.cell
def _(project, refresh, window):
    refresh.value  # noqa: B018 - re-run on every refresh tick
    from framework.drift import drift as drift_report

    try:
        _result = drift_report(project, WINDOWS[window.value][0], ingest=False)
        _rows = [{"test": t.name, "method": t.method, "served": t.n_served, "eval": t.n_eval,
                  "p-value": "" if t.p_value is None else f"{t.p_value:.2g}",
                  "verdict": {True: "DRIFT", False: "STABLE", None: "NO DATA"}[t.drifted],
                  "why": t.explanation} for t in _result.tests]
        _body = mo.vstack([mo.md(f"**{html.escape(_result.summary)}**"),
                           mo.Html(html_table(_rows, table_id="drift-table", columns=list(_rows[0])))
                           if _rows else mo.md("")])
    except Exception as _exc:  # noqa: BLE001 - drift is one panel; the rest of the page stays
        _body = mo.md(f"Drift: not available ({html.escape(type(_exc).__name__)}: {html.escape(str(_exc))}).")
    panel("drift", "Drift", _body)
    return


if __name__ == "__main__":
    app.run()
