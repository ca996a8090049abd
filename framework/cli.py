"""`slipway`: thin typer commands over the public API.

Parse arguments, call the API, render, exit. Exit codes are part of the
interface: 0 ok, 1 contract failed, 2 bad input or config, 3 internal error.
A `SlipwayError` prints one clean message; `--debug` shows the traceback.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer
from rich.console import Console

from framework.errors import SlipwayError

app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode="rich",
                  help="Slipway: notebook → contract check → production service.")
models_app = typer.Typer(no_args_is_help=True, help="Fetch and verify the GGUF models a project declares.")
runs_app = typer.Typer(no_args_is_help=True, help="Browse eval runs recorded in the project's DuckDB store.")
app.add_typer(models_app, name="models")
app.add_typer(runs_app, name="runs")
audit_app = typer.Typer(no_args_is_help=True, help="Verify, anchor, prune and export the signed audit log.")
app.add_typer(audit_app, name="audit")
keys_app = typer.Typer(no_args_is_help=True, help="Signing keys: yours, and who may act on a project.")
app.add_typer(keys_app, name="keys")

# Piped or in CI, rich would wrap tables at 80 columns and truncate clause names: use 120.
console = Console(stderr=False, highlight=False, width=None if sys.stdout.isatty() else 120)
# soft_wrap: error lines carry file:line:field paths that must stay whole to be copied or clicked.
err = Console(stderr=True, highlight=False, soft_wrap=True)
_state = {"debug": False}

ProjectArg = Annotated[str, typer.Argument(help="project name (projects/<name>) or path to its project.toml")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON instead of tables")]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m",
                                               help="model key from [models.*] (default: pipeline.model)")]
KeyOpt = Annotated[str | None, typer.Option("--key", help="SSH key to sign with (default: SLIPWAY_SIGNING_KEY, git's "
                                                          "user.signingkey, ~/.ssh/id_ed25519)")]
LimitOpt = Annotated[int | None, typer.Option("--limit", "-n", min=1, help="score only the first N examples")]


def _fail(error: BaseException) -> None:
    from framework.errors import exit_code

    if _state["debug"] or not isinstance(error, SlipwayError):
        err.print_exception()
    else:
        err.print(f"[bold red]error[/] [dim]({error.code})[/]: ", end="")
        err.print(error.render(), markup=False, highlight=False)
    raise typer.Exit(exit_code(error))


def _progress_cb(label: str):
    """A rich bar on a terminal; a plain line every 10% when piped or in CI."""
    plain = not console.is_terminal or os.environ.get("CI")
    if plain:
        state = {"last": -1}

        def report(done: int, total: int) -> None:
            step = max(1, total // 10)
            if done == total or done // step != state["last"]:
                state["last"] = done // step
                err.print(f"{label}: {done}/{total}")
        return report, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=False)
    task = bar.add_task(label, total=None)

    def report(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)
    return report, bar


def _with_progress(label: str, fn):
    report, bar = _progress_cb(label)
    if bar is None:
        return fn(report)
    with bar:
        return fn(report)


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False) -> None:
    _state["debug"] = debug


@app.command()
def validate(project: ProjectArg, as_json: JsonOpt = False) -> None:
    """Validate project.toml: every problem with file, line and field.

    Example: slipway validate ticket-triage
    """
    from framework.spec import load_project

    try:
        loaded = load_project(project)
    except SlipwayError as exc:
        _fail(exc)
    if as_json:
        console.print_json(json.dumps({"ok": True, "project": loaded.name, "path": str(loaded.toml_path)}))
    else:
        console.print(f"[green]ok[/] {loaded.toml_path}: project {loaded.name!r}, "
                      f"{len(loaded.spec.models)} model(s), pipeline {loaded.spec.pipeline.program}")


@models_app.command("pull")
def models_pull(project: ProjectArg,
                model: ModelOpt = None,
                all_models: Annotated[bool, typer.Option("--all", help="every declared model")] = False) -> None:
    """Download, assemble and sha256-verify models into the cache (no-op when present).

    Example: slipway models pull ticket-triage --model tiny
    """
    from framework import weights
    from framework.spec import load_project

    try:
        loaded = load_project(project)
        keys = sorted(loaded.spec.models) if all_models else [model or loaded.spec.pipeline.model]
        for key in keys:
            spec = loaded.model(key)
            weights.pull(spec, loaded.dir, toml=str(loaded.toml_path), field=f"models.{key}",
                         progress=lambda msg: err.print(msg))
    except SlipwayError as exc:
        _fail(exc)


@models_app.command("list")
def models_list(project: ProjectArg, as_json: JsonOpt = False) -> None:
    """Declared models, where their file is, and whether it is present.

    Example: slipway models list ticket-triage
    """
    from rich.table import Table

    from framework import weights
    from framework.spec import load_project

    try:
        loaded = load_project(project)
    except SlipwayError as exc:
        _fail(exc)
    rows = [{"key": key, "name": m.name, "license": m.license, "sha256": m.sha256,
             "path": str(weights.model_path(m, loaded.dir)), "present": weights.model_path(m, loaded.dir).exists()}
            for key, m in sorted(loaded.spec.models.items())]
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table()
    for col in ("key", "name", "license", "sha256", "present"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["key"], r["name"], r["license"], r["sha256"][:12] + "…", "yes" if r["present"] else "no")
    console.print(table)


def _print_metrics(run) -> None:
    from rich.table import Table

    m = run.measurements
    table = Table(title=f"{run.split} split, {run.n} examples, model {run.model_key} (run {run.run_id})",
                  title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("95% interval", justify="right")
    for name, value in m.metrics.items():
        lo, hi = m.intervals.get(name, (float("nan"), float("nan")))
        table.add_row(name, f"{value:.3f}", f"[{lo:.3f}, {hi:.3f}]")
    table.add_row("latency p50 / p95 / p99",
                  f"{m.latency_p50_ms:,.0f} / {m.latency_p95_ms:,.0f} / {m.latency_p99_ms:,.0f} ms", "")
    table.add_row("error rate", f"{m.error_rate:.1%}", "")
    table.add_row("tokens / request (mean)", f"{m.tokens_per_request:,.0f}", "")
    table.add_row("cost / request (mean)", f"{m.cost_per_request:.6f}", "")
    console.print(table)


@app.command("eval")
def eval_cmd(project: ProjectArg,
             split: Annotated[str, typer.Option(help="eval | dev | train")] = "eval",
             model: ModelOpt = None, limit: LimitOpt = None, as_json: JsonOpt = False) -> None:
    """Run every example of a split through the real model and record it in the store.

    Example: slipway eval ticket-triage --split dev --limit 20
    """
    from framework.evaluate import run_eval
    from framework.spec import load_project

    try:
        loaded = load_project(project)
        run = _with_progress(f"eval {split}", lambda report: run_eval(
            loaded, split=split, limit=limit, model_key=model, progress=report))
    except SlipwayError as exc:
        _fail(exc)
    if as_json:
        console.print_json(json.dumps({"run_id": run.run_id, "n": run.n, **run.measurements.to_dict()}))
    else:
        _print_metrics(run)


@app.command()
def check(project: ProjectArg, model: ModelOpt = None, limit: LimitOpt = None,
          fresh: Annotated[bool, typer.Option("--fresh", help="always run, never reuse an identical run")] = False,
          key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Run the eval set (or reuse an identical run) and judge every contract clause.

    Exit 0 when every clause passes, 1 when any fails, 2 on bad config.
    Example: slipway check ticket-triage --json
    """
    from framework.check import check as run_check
    from framework.report import verdict_table
    from framework.spec import load_project

    try:
        loaded = load_project(project)
        result = _with_progress("check", lambda report: run_check(
            loaded, model_key=model, limit=limit, fresh=fresh, progress=report, key=_key(key)))
    except SlipwayError as exc:
        _fail(exc)
    verdict = result.verdict
    if as_json:
        console.print_json(json.dumps({"check_id": result.check_id, "report_html": result.report_html,
                                       "report_json": result.report_json, **verdict.to_dict()}, default=str))
    else:
        if result.run.reused:
            err.print(f"reused run {result.run.run_id} (identical program, notebook, model, eval set)")
        title = (f"Contract verdict: {loaded.name} on {result.run.n} eval examples, "
                 f"model {result.run.model_key}")
        console.print(verdict_table(verdict, title))
        status = "[bold green]PASS[/]" if verdict.passed else f"[bold red]FAIL[/]: {', '.join(verdict.failed)}"
        console.print(f"{status}\nreport: {result.report_html}")
    raise typer.Exit(0 if verdict.passed else 1)


@app.command()
def optimize(project: ProjectArg, model: ModelOpt = None,
             dev_limit: Annotated[int | None, typer.Option(min=1, help="score only N dev examples")] = None,
             force: Annotated[bool, typer.Option("--force", help="save even when dev gets worse")] = False,
             as_json: JsonOpt = False) -> None:
    """Compile the program with the optimiser in [optimize] on the train split; save it.

    Prints dev-split scores before and after. Example: slipway optimize ticket-triage
    """
    from framework.optimize import optimize as run_optimize
    from framework.spec import load_project

    try:
        loaded = load_project(project)
        outcome = run_optimize(loaded, model_key=model, dev_limit=dev_limit, force=force)
    except SlipwayError as exc:
        _fail(exc)
    data = {"optimizer": outcome.optimizer, "dev_before": outcome.before, "dev_after": outcome.after,
            "objective": outcome.objective, "objective_before": outcome.objective_before,
            "objective_after": outcome.objective_after, "demos": outcome.demos, "saved": outcome.saved,
            "path": str(outcome.path)}
    if as_json:
        console.print_json(json.dumps(data))
        return
    from rich.table import Table

    table = Table(title=f"{outcome.optimizer}: dev split before → after ({outcome.demos} demos)",
                  title_justify="left")
    for column in ("metric", "before", "after", "change"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name, before in outcome.before.items():
        after = outcome.after.get(name, float("nan"))
        table.add_row(name, f"{before:.3f}", f"{after:.3f}", f"{after - before:+.3f}")
    console.print(table)
    console.print(f"objective {outcome.objective} on dev: {outcome.objective_before:.3f} → "
                  f"{outcome.objective_after:.3f}")
    if outcome.saved:
        console.print(f"saved {outcome.path} (DSPy JSON); eval, check and build now use it")
    else:
        console.print("[yellow]not saved[/]: the compiled program is worse on dev; the baseline stays "
                      "(use --force to save it anyway)")


@app.command()
def build(project: ProjectArg,
          run_check: Annotated[bool, typer.Option("--check", help="run the check first when none matches")] = False,
          override: Annotated[str | None, typer.Option(help="override role only: build past failing clauses, with "
                                                             "a reason (signed, shown in red on the review)")]
          = None, key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Build a versioned BentoML bento, refused unless the current content passed its check.

    Exit 0 built (or already built: same version), 1 refused, 2 bad config.
    Example: slipway build ticket-triage --check
    """
    from framework.build import build as run_build
    from framework.spec import load_project

    try:
        loaded = load_project(project)
        result = run_build(loaded, run_check=run_check, override=override, key=_key(key))
    except SlipwayError as exc:
        _fail(exc)
    if as_json:
        console.print_json(json.dumps({"tag": result.tag, "created": result.created, "model": result.model_tag,
                                       "labels": result.labels, "path": result.path}))
        return
    verb = "built" if result.created else "unchanged, already built"
    console.print(f"[green]{verb}[/] {result.tag}  (model {result.model_tag})")
    if result.labels.get("slipway.override"):
        console.print(f"[bold white on red] OVERRIDE [/] [red]built past failing clauses: "
                      f"{result.labels['slipway.override']}[/]")
    console.print(f"serve it: slipway serve {result.tag}   or   BENTOML_HOME=bentos bentoml serve {result.tag}",
                  soft_wrap=True)


@app.command()
def serve(target: Annotated[str, typer.Argument(help="<project> or <project>:<version> (default: newest build)")],
          channel: Annotated[str | None, typer.Option(help="serve what this channel points to, following changes")]
          = None,
          port: Annotated[int, typer.Option(help="port on 127.0.0.1")] = 3000,
          host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
          workers: Annotated[int | None, typer.Option(min=1, help="worker processes (default: [serve].workers)")]
          = None) -> None:
    """Serve a built bento over HTTP with BentoML (each worker loads the model once).

    With --channel, serve what the channel points to and follow deploys and rollbacks: the new version
    starts beside the live one and takes over when ready, so no request is refused or dropped.
    Example: slipway serve ticket-triage --port 3000 --workers 2
    """
    from framework.serve import serve as run_serve

    try:
        if channel:
            from framework.serve import serve_channel

            code = serve_channel(target.partition(":")[0], channel, host=host, port=port, workers=workers,
                                 echo=lambda m: err.print(m))
        else:
            code = run_serve(target, host=host, port=port, workers=workers, echo=lambda m: err.print(m))
    except SlipwayError as exc:
        _fail(exc)
    raise typer.Exit(code)


@runs_app.command("list")
def runs_list(project: ProjectArg, limit: Annotated[int, typer.Option(min=1)] = 20, as_json: JsonOpt = False) -> None:
    """Recent runs, newest first. Example: slipway runs list ticket-triage"""
    from rich.table import Table

    from framework.evaluate import store_path
    from framework.spec import load_project
    from framework.store import Store

    try:
        loaded = load_project(project)
        with Store(store_path(loaded), read_only=True) as store:
            rows = store.list_runs(limit)
    except SlipwayError as exc:
        _fail(exc)
    if as_json:
        console.print_json(json.dumps(rows, default=str))
        return
    table = Table()
    for col in ("run_id", "split", "model_key", "status", "done", "started_at"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["run_id"], r["split"], r["model_key"], r["status"], f"{r['done']}/{r['n_examples']}",
                      str(r["started_at"])[:19])
    console.print(table)


@runs_app.command("show")
def runs_show(project: ProjectArg, run_id: str, as_json: JsonOpt = False) -> None:
    """One run's measurements and its failing examples. Example: slipway runs show ticket-triage run-…"""
    from framework.evaluate import load_run
    from framework.spec import load_project

    try:
        loaded = load_project(project)
        run = load_run(loaded, run_id)
    except SlipwayError as exc:
        _fail(exc)
    if as_json:
        console.print_json(json.dumps({"run_id": run_id, **run.measurements.to_dict(),
                                       "records": run.records}, default=str))
        return
    _print_metrics(run)
    for r in run.records:
        if r["error"] or any(v < 1 for v in r["scores"].values()):
            console.print(f"[dim]{r['example_id']}[/] expected {r['expected']} got {r['output'] or r['error']}",
                          markup=True, highlight=False)


ChannelOpt = Annotated[str, typer.Option("--channel", "-c", help="staging or prod")]


def _target(target: str):
    from framework.spec import load_project

    name, _, version = target.partition(":")
    if not version:
        raise typer.BadParameter(f"expected <project>:<version>, got {target!r}")
    return load_project(name), version


def _print_row(row: dict, as_json: bool, text: str) -> None:
    if as_json:
        console.print_json(json.dumps(row, default=str))
    else:
        console.print(text)


@app.command()
def review(target: Annotated[str, typer.Argument(help="<project> (newest build) or <project>:<version>")],
           against: Annotated[str | None, typer.Option(help="baseline version (default: prod's, else the "
                                                            "previous build)")] = None,
           against_channel: Annotated[str | None, typer.Option(help="compare with what this channel serves")]
           = None,
           as_json: JsonOpt = False) -> None:
    """What a reviewer decides on: contract, what changed, paired metric deltas, regressed examples, approvals.

    Writes one self-contained HTML page (and JSON) beside the check reports.
    Example: slipway review ticket-triage --against-channel prod
    """
    from framework.review import review as run_review
    from framework.review import write_review
    from framework.spec import load_project

    try:
        name, _, version = target.partition(":")
        loaded = load_project(name)
        data = run_review(loaded, version or None, against=against, against_channel=against_channel)
        json_path, html_path = write_review(loaded, data)
    except SlipwayError as exc:
        _fail(exc)
    if as_json:
        console.print_json(json.dumps({**data, "report_json": str(json_path), "report_html": str(html_path)},
                                      default=str))
        return
    _print_review(data)
    console.print(f"review page: {html_path}", soft_wrap=True)


def _what_moved(row: dict) -> str:
    """'priority medium → high (expected medium); needs_human …' for the labelled fields that changed."""
    if row["new_error"]:
        return f"now fails: {row['new_error'][:120]}"
    before, after = row["old_output"] or {}, row["new_output"] or {}
    moved = [f"{k} {before.get(k)} → {after.get(k)} (expected {v})" for k, v in row["expected"].items()
             if before.get(k) != after.get(k)]
    return "; ".join(moved) or f"lost {', '.join(row['dropped'])}"


def _print_review(data: dict) -> None:
    from rich.table import Table

    from framework.report import clause_measured_text

    t, b = data["target"], data["baseline"]
    console.print(f"[bold]Review {t['tag']}[/] built {t['created']} by {t['author']}")
    console.print(f"  against {b['tag']} ({data['baseline_reason']})" if b else f"  {data['baseline_reason']}")
    for o in data["overrides"]:
        console.print(f"[bold white on red] OVERRIDE [/] [red]{o['where']} by {o['actor']}: {o['reason']}[/]")
    if data["contract"]:
        table = Table(title="Contract", title_justify="left")
        for column in ("clause", "target", "measured", "verdict"):
            table.add_column(column)
        for c in data["contract"]["clauses"]:
            table.add_row(c["name"], c["target"], clause_measured_text(c),
                          "[green]PASS[/]" if c["passed"] else "[bold red]FAIL[/]")
        console.print(table)
    changes = data["changes"]
    if changes is not None:
        console.print("[bold]What changed[/]")
        for name, entry in changes["program"].items():
            demos = entry["demos"]
            console.print(f"  program {name}: instructions {'changed' if entry['instructions'] else 'same'}, "
                          f"{len(entry['fields'])} field change(s), demos +{len(demos['added'])} "
                          f"-{len(demos['removed'])}")
            for tag, line in entry["instructions"]:
                if tag != " ":
                    console.print(f"    [{'red' if tag == '-' else 'green'}]{tag} {line}[/]", markup=True,
                                  highlight=False, soft_wrap=True)
        if not changes["program"]:
            console.print("  program: unchanged")
        for key in ("model", "contract"):
            rows = changes[key]
            console.print(f"  {key}: " + (", ".join(f"{c['key']} {c['old']!r} → {c['new']!r}" for c in rows)
                                          if rows else "unchanged"), markup=False)
        rows = changes["eval_set"]
        console.print("  eval set: " + (", ".join(f"{len(v)} {k}" for k, v in rows.items())
                                        if any(rows.values()) else "unchanged"))
    if data["metrics"]:
        table = Table(title=f"Metric deltas (paired, {data['comparison']['shared']} shared examples)",
                      title_justify="left")
        for column in ("metric", "before", "after", "Δ", "95% CI of Δ", "p"):
            table.add_column(column, justify="left" if column == "metric" else "right")
        for d in data["metrics"]:
            style = "bold red" if d["significant"] and d["delta"] < 0 else "green" if d["significant"] else ""
            delta = f"[{style}]{d['delta']:+.3f}[/]" if style else f"{d['delta']:+.3f}"
            table.add_row(d["metric"], f"{d['old']:.3f}", f"{d['new']:.3f}", delta,
                          f"[{d['interval'][0]:+.3f}, {d['interval'][1]:+.3f}]", f"{d['p_value']:.3f}")
        console.print(table)
    if data["slo"]:
        from framework.report import change_text

        console.print("  latency and cost: " + ", ".join(f"{s['name']} {change_text(s)}" for s in data["slo"]),
                      soft_wrap=True)
    if data["comparison"]["note"]:
        console.print(f"  [yellow]{data['comparison']['note']}[/]")
    if data["baseline"]:
        console.print(f"[bold]Regressed examples: {len(data['regressed'])}[/] ({data['improved']} improved)")
        for r in data["regressed"][:10]:
            console.print(f"  {r['example_id']}: {_what_moved(r)}", markup=False, highlight=False, soft_wrap=True)
        if len(data["regressed"]) > 10:
            console.print(f"  … {len(data['regressed']) - 10} more on the review page")
    ready = data["readiness"]
    if ready:
        who = ", ".join(a["approver"] for a in data["approvals"]) or "nobody yet"
        console.print(f"approvals: {len(ready['counted'])} of {ready['required']} required (approved by {who})")
        console.print("[green]ready to deploy[/]" if not ready["missing"] else
                      f"[yellow]not deployable yet: {'; '.join(ready['missing'])}[/]")


@app.command()
def approve(target: Annotated[str, typer.Argument(help="<project>:<version>")],
            note: Annotated[str, typer.Option(help="what you reviewed")] = "",
            key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Sign an approval of the exact content and files of a built version (your key needs the approve role).

    Example: slipway approve ticket-triage:1a2b3c --note "diff reviewed"
    """
    from framework import release

    try:
        loaded, version = _target(target)
        row = release.approve(loaded, version, key=_key(key), note=note)
    except SlipwayError as exc:
        _fail(exc)
    _print_row({k: v for k, v in row.items() if k != "statement"}, as_json,
               f"[green]approved[/] {target} as {row['approver']} (signed over content {row['content_hash'][:12]})")


@app.command()
def deploy(target: Annotated[str, typer.Argument(help="<project>:<version>")], channel: ChannelOpt,
           override: Annotated[str | None, typer.Option(help="override role only: deploy past the gate, with a "
                                                              "reason")] = None,
           key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Point a channel at a version that passed its contract and holds its signed approvals.

    Exit 1 refused, naming the rule that failed. Example: slipway deploy ticket-triage:1a2b3c --channel prod
    """
    from framework import release

    try:
        loaded, version = _target(target)
        row = release.deploy(loaded, version, channel, key=_key(key), override=override)
    except SlipwayError as exc:
        _fail(exc)
    note = f" [yellow](override: {row['override_reason']})[/]" if row["override_reason"] else ""
    _print_row({k: v for k, v in row.items() if k != "statement"}, as_json,
               f"[green]deployed[/] {target} to {channel} as {row['actor']}{note}")


@app.command()
def rollback(project: ProjectArg, channel: ChannelOpt, key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Point a channel back at its previous version (signed; needs rollback:<channel>).

    Example: slipway rollback ticket-triage --channel prod
    """
    from framework import release
    from framework.spec import load_project

    try:
        row = release.rollback(load_project(project), channel, key=_key(key))
    except SlipwayError as exc:
        _fail(exc)
    _print_row({k: v for k, v in row.items() if k != "statement"}, as_json,
               f"[green]rolled back[/] {channel} to {row['project']}:{row['version']} as {row['actor']}")


@app.command()
def status(project: ProjectArg, as_json: JsonOpt = False) -> None:
    """Each channel's version, when and by whom. Example: slipway status ticket-triage"""
    from rich.table import Table

    from framework import release
    from framework.spec import load_project

    try:
        channels = release.status(load_project(project))
    except SlipwayError as exc:
        _fail(exc)
    if as_json:
        console.print_json(json.dumps(channels, default=str))
        return
    table = Table()
    for col in ("channel", "version", "action", "by", "at", "override", "signature"):
        table.add_column(col)
    for name, row in channels.items():
        if row is None:
            table.add_row(name, "-", "", "", "", "", "")
        else:
            table.add_row(name, row["version"], row["action"], row["actor"], str(row["created_at"])[:19],
                          row["override_reason"] or "", "[green]verified[/]" if row["verified"] else
                          "[bold red]DOES NOT VERIFY[/]")
    console.print(table)


def _short(value) -> str:
    text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
    if len(text) >= 32 and all(c in "0123456789abcdef" for c in text):
        return text[:12]  # a hash: its prefix identifies it
    return text if len(text) <= 48 else text[:47] + "…"


@audit_app.command("list")
def audit_list(project: ProjectArg, limit: Annotated[int, typer.Option(min=1, help="newest N rows")] = 50,
               as_json: JsonOpt = False) -> None:
    """The audit log, oldest first: who did what to which version. Example: slipway audit list ticket-triage"""
    from rich.table import Table

    from framework.evaluate import store_path
    from framework.spec import load_project
    from framework.store import Store

    try:
        with Store(store_path(load_project(project)), read_only=True) as store:
            rows = store.audit_rows()[-limit:]
    except SlipwayError as exc:
        _fail(exc)
    if as_json:
        console.print_json(json.dumps(rows, default=str))
        return
    table = Table()
    for column in ("seq", "at", "actor", "action", "target"):
        table.add_column(column, no_wrap=True)
    table.add_column("details", overflow="fold")  # shortened here; all of it: --json or audit export
    for r in rows:
        details = json.loads(r["details"] or "{}")
        short = ", ".join(f"{k}={_short(v)}" for k, v in details.items()
                          if v not in (None, "", [], {}) and not k.endswith("_hash"))
        style = "bold red" if r["action"] == "override" else ""
        table.add_row(str(r["seq"]), str(r["logged_at"])[:19], r["actor"],
                      f"[{style}]{r['action']}[/]" if style else r["action"], r["target"] or "", short)
    console.print(table)


@audit_app.command("verify")
def audit_verify(project: ProjectArg,
                 file: Annotated[str | None, typer.Option("--file", help="verify an exported JSONL file instead of "
                                                                         "the store")] = None,
                 as_json: JsonOpt = False) -> None:
    """Check the audit log: hash chain, every row's signature, the anchor in git; exit 1 naming the first
    broken row. Reads only (pruning is `slipway audit prune`).

    Example: slipway audit verify ticket-triage   or   slipway audit verify ticket-triage --file audit.jsonl
    """
    from pathlib import Path

    from framework import audit, signing
    from framework.errors import AuditBroken
    from framework.evaluate import store_path
    from framework.spec import load_project
    from framework.store import Store

    try:
        loaded = load_project(project)
        signers = signing.load_signers(loaded.dir)
        if file:
            count, problem = audit.verify_file(Path(file), signers)
            where = file
        else:
            with Store(store_path(loaded), read_only=True) as store:
                problem = audit.verify(store, anchor=audit.read_anchor(loaded.dir), signers=signers)
                count = len(store.audit_rows())
            where = str(store_path(loaded))
        if problem:
            raise AuditBroken(problem.message, path=where, field=f"audit.seq={problem.seq}",
                              hint="restore the store from a backup; the log from this row on cannot be trusted")
    except SlipwayError as exc:
        _fail(exc)
    anchored = audit.read_anchor(loaded.dir)
    _print_row({"ok": True, "rows": count, "anchored_seq": anchored.statement["details"]["seq"] if anchored else None},
               as_json, f"[green]ok[/] audit log verifies: {count} row(s), every signature holds"
               + (f", anchored at row {anchored.statement['details']['seq']}" if anchored and not file else ""))


@audit_app.command("anchor")
def audit_anchor(project: ProjectArg, key: KeyOpt = None) -> None:
    """Sign the log's head into projects/<name>/audit-anchor.json (commit it): a chain rewritten inside
    the store no longer matches it. Needs the audit role. Example: slipway audit anchor ticket-triage"""
    from framework import audit, signing
    from framework.evaluate import store_path
    from framework.spec import load_project
    from framework.store import Store

    try:
        loaded = load_project(project)
        with Store(store_path(loaded), read_only=True) as store:
            problem = audit.verify(store)
            if problem:
                from framework.errors import AuditBroken

                raise AuditBroken(f"will not anchor a broken log: {problem.message}", path=str(store.path))
            signed = audit.anchor(store, loaded.dir, loaded.name, key=_key(key),
                                  signers=signing.load_signers(loaded.dir))
    except SlipwayError as exc:
        _fail(exc)
    details = signed.statement["details"]
    console.print(f"[green]anchored[/] row {details['seq']} ({details['hash'][:12]}) in "
                  f"{loaded.dir / audit.ANCHOR_FILE}; commit that file", soft_wrap=True)


@audit_app.command("prune")
def audit_prune(project: ProjectArg, key: KeyOpt = None) -> None:
    """Delete rows older than [audit] retention_days behind a signed, chained prune row (needs the audit role).

    Example: slipway audit prune ticket-triage
    """
    from framework import audit, signing
    from framework.evaluate import store_path
    from framework.spec import load_project
    from framework.store import Store

    try:
        loaded = load_project(project)
        with Store(store_path(loaded)) as store:
            pruned = audit.prune(store, loaded.name, loaded.spec.audit.retention_days, key=_key(key),
                                 signers=signing.load_signers(loaded.dir))
    except SlipwayError as exc:
        _fail(exc)
    console.print(f"pruned {pruned} row(s)" if pruned else "nothing to prune")


@audit_app.command("export")
def audit_export(project: ProjectArg, out: Annotated[str, typer.Option("--out", "-o", help="output file")],
                 since: Annotated[str | None, typer.Option(help="ISO date or time, e.g. 2026-11-01")] = None,
                 fmt: Annotated[str, typer.Option("--format", help="jsonl or parquet")] = "jsonl",
                 key: KeyOpt = None) -> None:
    """Write audit rows to a file with a signed head, so the file verifies on its own
    (`slipway audit verify --file`). Example: slipway audit export ticket-triage --since 2026-11-01 -o a.jsonl"""
    from datetime import datetime
    from pathlib import Path

    from framework import audit, signing
    from framework.errors import SpecError
    from framework.evaluate import store_path
    from framework.spec import load_project
    from framework.store import Store

    try:
        loaded = load_project(project)
        try:
            start = datetime.fromisoformat(since) if since else None
        except ValueError:
            raise SpecError(f"--since {since!r} is not an ISO date", hint="e.g. --since 2026-11-01") from None
        with Store(store_path(loaded), read_only=True) as store:
            rows = store.audit_rows(start)
        head = audit.export_head(rows, loaded.name, signing.find_key(_key(key), create=True))
        count = audit.export(rows, Path(out), fmt, head=head)
    except SlipwayError as exc:
        _fail(exc)
    err.print(f"wrote {count} row(s) and a signed head to {out}")


@keys_app.command("init")
def keys_init() -> None:
    """Create your signing key (Ed25519) unless you have one; prints its public line.

    Uses an existing ~/.ssh/id_ed25519 (or --key / SLIPWAY_SIGNING_KEY) when there is one.
    Example: slipway keys init
    """
    from framework import signing

    try:
        try:
            path = signing.find_key()
        except SlipwayError:
            path = signing.init_key()
        line = signing.public_key(path)
    except SlipwayError as exc:
        _fail(exc)
    console.print(f"{path}: {signing.fingerprint(line)}", markup=False)
    console.print(line, markup=False, soft_wrap=True)


@keys_app.command("show")
def keys_show(key: KeyOpt = None) -> None:
    """Print the public key line you sign with (what a project's signers.toml lists).

    Example: slipway keys show
    """
    from framework import signing

    try:
        line = signing.public_key(signing.find_key(_key(key)))
    except SlipwayError as exc:
        _fail(exc)
    console.print(line, markup=False, soft_wrap=True)


@keys_app.command("add")
def keys_add(project: ProjectArg, name: Annotated[str, typer.Argument(help="the person's name")],
             public: Annotated[str, typer.Option("--public-key", help="their .pub file or the key line itself")],
             roles: Annotated[str, typer.Option(help="comma-separated: approve, deploy:prod, rollback:prod, "
                                                     "override, audit")] = "") -> None:
    """Add a person to projects/<name>/signers.toml (commit it: who may act is a reviewed change).

    Example: slipway keys add ticket-triage bob --public-key ~/bob.pub --roles approve
    """
    from pathlib import Path

    from framework import signing
    from framework.spec import load_project

    try:
        loaded = load_project(project)
        line = Path(public).expanduser().read_text() if Path(public).expanduser().is_file() else public
        path = signing.add_signer(loaded.dir, name, line, [r.strip() for r in roles.split(",") if r.strip()])
    except SlipwayError as exc:
        _fail(exc)
    console.print(f"added {name} to {path}; commit it", markup=False)


@keys_app.command("list")
def keys_list(project: ProjectArg, as_json: JsonOpt = False) -> None:
    """Who may act on the project, by key and role. Example: slipway keys list ticket-triage"""
    from rich.table import Table

    from framework import signing
    from framework.spec import load_project

    try:
        spec = signing.load_signers(load_project(project).dir)
    except SlipwayError as exc:
        _fail(exc)
    rows = [{"name": s.name, "fingerprint": signing.fingerprint(s.key), "roles": s.roles, "revoked": False}
            for s in spec.signers] + [{"name": "", "fingerprint": signing.fingerprint(r.key), "roles": [],
                                       "revoked": r.reason or True} for r in spec.revoked]
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table()
    for column in ("name", "key", "roles", "revoked"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["name"], r["fingerprint"], ", ".join(r["roles"]), str(r["revoked"] or ""))
    console.print(table)


def _key(value: str | None):
    from pathlib import Path

    return Path(value).expanduser() if value else None


def main() -> None:
    try:
        app()
    except SlipwayError as exc:  # raised outside a command's own handler
        err.print(f"error ({exc.code}): {exc.render()}")
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
