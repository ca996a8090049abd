"""`slipway`: thin typer commands over the public API.

Parse arguments, call the API, hand the result to `framework.report` to render, exit. Exit codes are
part of the interface: 0 ok, 1 contract failed or refused, 2 bad input or config, 3 internal error.
Commands let errors propagate: `ExitCodeGroup`, the root command group, turns a `SlipwayError` into
one clean message and its exit code, and anything else into a one-line internal error (exit 3);
`--debug` adds the traceback.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer
from rich.console import Console
from typer.core import TyperGroup

from framework import report
from framework.errors import SlipwayError
from framework.report import line, text

# Piped or in CI, rich would wrap tables at 80 columns and truncate clause names: use 120.
console = Console(stderr=False, highlight=False, width=None if sys.stdout.isatty() else 120)
# soft_wrap: error lines carry file:line:field paths that must stay whole to be copied or clicked.
err = Console(stderr=True, highlight=False, soft_wrap=True)


def report_error(error: Exception, *, debug: bool = False) -> int:
    """Print `error` for a person and return its exit code: a `SlipwayError` as its own message (it says
    what, where and how to fix), anything else as `error (internal): Type: message` and exit 3. With
    `debug`, the traceback first (call this inside the `except` block that caught `error`)."""
    from framework.errors import exit_code

    if debug:
        err.print_exception()
    if isinstance(error, SlipwayError):
        if not debug:
            err.print(line(("error", "bold red"), " ", (f"({error.code})", "dim"), ": ", error.render()))
    else:
        message = " ".join(str(error).split())  # one line, whatever the exception put in it
        err.print(line(("error", "bold red"), f" (internal): {type(error).__name__}: {message}"
                       + ("" if debug else " (run with --debug for the traceback)")))
    return exit_code(error)


class ExitCodeGroup(TyperGroup):
    """The root command group: every exception a command raises becomes a message and an exit code.

    A new command needs nothing: register it on `app` (or a sub-app added to it), call the API and let
    `SlipwayError`s propagate; exit early with `raise typer.Exit(code)`. Typer's own signals (Exit,
    Abort, usage errors) and Ctrl-C pass through untouched.
    """

    def __init__(self, **attrs):
        super().__init__(**attrs)
        _whole_short_help(self)

    def invoke(self, ctx):
        from typer.exceptions import Abort, Exit, TyperException

        try:
            return super().invoke(ctx)
        except (Exit, Abort, TyperException, EOFError):
            raise
        except Exception as exc:
            raise Exit(report_error(exc, debug=bool(ctx.params.get("debug")))) from None


def _whole_short_help(group) -> None:
    """List each command with its docstring's whole first sentence (click would cut it at ~45 characters)."""
    import inspect
    import re

    for command in getattr(group, "commands", {}).values():
        if not command.short_help and command.help:
            paragraph = " ".join(inspect.cleandoc(command.help).split("\n\n")[0].split())
            command.short_help = re.split(r"(?<=\.) ", paragraph, maxsplit=1)[0]
        _whole_short_help(command)


# rich_markup_mode=None: help text is printed as written, so `[optimize]` or `[serve].workers` stay visible.
app = typer.Typer(cls=ExitCodeGroup, no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                  pretty_exceptions_enable=False, help="Slipway: notebook → contract check → production service.")
models_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                         help="Fetch and verify the GGUF models a project declares.")
runs_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                       help="Browse eval runs recorded in the project's DuckDB store.")
app.add_typer(models_app, name="models")
app.add_typer(runs_app, name="runs")
audit_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                        help="Verify, anchor, prune and export the signed audit log.")
app.add_typer(audit_app, name="audit")
signers_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                          help="Signing keys: yours, and who may act on a project (signers.toml).")
app.add_typer(signers_app, name="signers")
keys_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                       help="API keys: what callers of the served bento present, each for one tenant "
                            "([tenants.*] in project.toml).")
app.add_typer(keys_app, name="keys")
flags_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                        help="Feature flags: switch a checked pipeline variant ([flags.*] in project.toml) on for a "
                             "tenant and a share of its traffic, after approval (docs/flags.md).")
app.add_typer(flags_app, name="flags")


class DefaultCommandGroup(TyperGroup):
    """A group whose first argument may be a project instead of a subcommand: `slipway traces <project>`
    runs `slipway traces list <project>`, while `slipway traces export …` runs `export`."""

    default = "list"

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = [self.default, *args]
        return super().parse_args(ctx, args)


class HarvestGroup(DefaultCommandGroup):
    default = "run"


traces_app = typer.Typer(cls=DefaultCommandGroup, no_args_is_help=True, rich_markup_mode=None,
                         help="Traces of served requests: `slipway traces <project>` lists them; `export` writes "
                              "OTLP or Parquet.")
app.add_typer(traces_app, name="traces")
harvest_app = typer.Typer(cls=HarvestGroup, no_args_is_help=True, rich_markup_mode=None,
                          help="Served requests with negative feedback or corrected labels → candidate eval rows: "
                               "`slipway harvest <project>` writes the review file, `accept` adds reviewed rows.")
app.add_typer(harvest_app, name="harvest")
queue_app = typer.Typer(cls=DefaultCommandGroup, no_args_is_help=True, rich_markup_mode=None,
                        help="Requests the service handed to a person ([fallback] action = \"human\"): `slipway queue "
                             "<project>` lists the open ones; `resolve` records a person's signed answer.")
app.add_typer(queue_app, name="queue")

ProjectArg = Annotated[str, typer.Argument(help="project name (projects/<name>) or path to its project.toml")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON instead of tables")]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m",
                                               help="model key from [models.*] (default: pipeline.model)")]
KeyOpt = Annotated[str | None, typer.Option("--key", help="SSH key to sign with (default: SLIPWAY_SIGNING_KEY, git's "
                                                          "user.signingkey, ~/.ssh/id_ed25519)")]
LimitOpt = Annotated[int | None, typer.Option("--limit", "-n", min=1, help="score only the first N examples")]


def _echo(message: str) -> None:
    """Progress and status lines from the API (model pulls, the server): plain text on stderr."""
    err.print(text(message))


def _with_progress(label: str, fn):
    return report.with_progress(err, label, fn, plain=not console.is_terminal or bool(os.environ.get("CI")))


def _print_json(data) -> None:
    console.print_json(json.dumps(data, default=str))


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False) -> None:
    del debug  # ExitCodeGroup reads it from the context when a command fails


@app.command()
def validate(project: ProjectArg, as_json: JsonOpt = False) -> None:
    """Validate project.toml: every problem with file, line and field.

    Example: slipway validate ticket-triage
    """
    from framework.spec import load_project

    loaded = load_project(project)
    if as_json:
        _print_json({"ok": True, "project": loaded.name, "path": str(loaded.toml_path)})
    else:
        console.print(line(("ok", "green"), f" {loaded.toml_path}: project {loaded.name!r}, "
                           f"{len(loaded.spec.models)} model(s), pipeline {loaded.spec.pipeline.program}"))


@models_app.command("pull")
def models_pull(project: ProjectArg,
                model: ModelOpt = None,
                all_models: Annotated[bool, typer.Option("--all", help="every declared model")] = False) -> None:
    """Download, assemble and sha256-verify models into the cache (no-op when present). Without --model:
    the pipeline's model and [cache].embedding_model.

    Example: slipway models pull ticket-triage --model tiny
    """
    from framework import weights
    from framework.spec import load_project

    loaded = load_project(project)
    keys = sorted(loaded.spec.models) if all_models else [model or loaded.spec.pipeline.model]
    embedder = loaded.spec.cache.embedding_model
    if model is None and embedder is not None and embedder not in keys:
        keys.append(embedder)   # the check measures the answer cache with it (docs/cache.md)
    for key in keys:
        spec = loaded.model(key)
        weights.pull(spec, loaded.dir, toml=str(loaded.toml_path), field=f"models.{key}", progress=_echo)


@models_app.command("list")
def models_list(project: ProjectArg, as_json: JsonOpt = False) -> None:
    """Declared models, where their file is, and whether it is present.

    Example: slipway models list ticket-triage
    """
    from framework import weights
    from framework.spec import load_project

    loaded = load_project(project)
    rows = [{"key": key, "name": m.name, "license": m.license, "sha256": m.identity,
             "path": m.remote.base_url if m.remote else str(weights.model_path(m, loaded.dir)),
             "present": None if m.remote else weights.model_path(m, loaded.dir).exists()}
            for key, m in sorted(loaded.spec.models.items())]
    if as_json:
        _print_json(rows)
    else:
        console.print(report.models_table(rows))


@app.command("eval")
def eval_cmd(project: ProjectArg,
             split: Annotated[str, typer.Option(help="eval | dev | train")] = "eval",
             model: ModelOpt = None, limit: LimitOpt = None, as_json: JsonOpt = False) -> None:
    """Run every example of a split through the real model and record it in the store.

    Example: slipway eval ticket-triage --split dev --limit 20
    """
    from framework.evaluate import run_eval
    from framework.spec import load_project

    loaded = load_project(project)
    run = _with_progress(f"eval {split}", lambda progress: run_eval(
        loaded, split=split, limit=limit, model_key=model, progress=progress))
    if as_json:
        _print_json({"run_id": run.run_id, "n": run.n, **run.measurements.to_dict()})
    else:
        console.print(report.metrics_table(run))


@app.command()
def calibrate(project: ProjectArg, limit: LimitOpt = None,
              metric: Annotated[str | None, typer.Option(
                  help="per-example metric the bar must hold (default: the first exact_match metric, e.g. "
                       "category_accuracy)")] = None,
              as_json: JsonOpt = False) -> None:
    """Score confidence bars for a tiered pipeline on the dev split, and recommend one.

    Runs tier 1 and the top tier, each alone, on the dev split (never eval) and, for each candidate
    `[routing] min_confidence`, reports the share escalated and tier 1's quality on the answers it keeps;
    recommends the lowest bar whose kept answers score at least the top tier's. Records and writes nothing:
    copy the bar into project.toml yourself.
    Example: slipway calibrate ticket-triage --limit 40
    """
    from framework.routing import calibrate as run_calibrate
    from framework.spec import load_project

    loaded = load_project(project)
    result = _with_progress("calibrate (dev: tier 1, then the top tier)",
                            lambda progress: run_calibrate(loaded, limit=limit, metric=metric, progress=progress))
    if as_json:
        _print_json(result.to_dict())
    else:
        report.print_calibration(console, result)


@app.command()
def check(project: ProjectArg, model: ModelOpt = None, limit: LimitOpt = None,
          fresh: Annotated[bool, typer.Option("--fresh", help="always run, never reuse an identical run")] = False,
          variant: Annotated[str | None, typer.Option(help="check a flag's variant of the pipeline: FLAG=VARIANT "
                                                           "(docs/flags.md)")] = None,
          key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Run the eval set (or reuse an identical run) and judge every contract clause.

    Exit 0 when every clause passes, 1 when any fails, 2 on bad config.
    Example: slipway check ticket-triage --json; slipway check ticket-triage --variant reasoning=on
    """
    from framework.check import check as run_check
    from framework.spec import load_project

    loaded = load_project(project)
    if variant:
        from framework import flags
        from framework.notebook import load_program

        flag, name = flags.parse_variant(variant)
        varied = flags.variant_project(loaded, flag, name)
        flags.check_io(loaded, load_program(loaded), load_program(varied), flag, name)
        loaded = varied
    result = _with_progress("check", lambda progress: run_check(
        loaded, model_key=model, limit=limit, fresh=fresh, progress=progress, key=_key(key)))
    if as_json:
        measured = result.run.measurements.to_dict()
        _print_json({"check_id": result.check_id, "report_html": result.report_html,
                     "report_json": result.report_json, **result.verdict.to_dict(),
                     "slices": measured["slices"], "confusion": measured["confusion"]})
    else:
        report.print_check(console, err, result, loaded.name)
    raise typer.Exit(0 if result.verdict.passed else 1)


@app.command()
def optimize(project: ProjectArg, model: ModelOpt = None,
             optimizer: Annotated[str | None, typer.Option(
                 help="LabeledFewShot, BootstrapFewShot, BootstrapFewShotWithRandomSearch, MIPROv2 or GEPA "
                      "(default: [optimize].optimizer)")] = None,
             max_calls: Annotated[int | None, typer.Option(min=1, help="model calls the optimiser may make "
                                                                      "(default: [optimize].max_calls)")] = None,
             max_minutes: Annotated[float | None, typer.Option(min=0.01, help="minutes the optimiser may run "
                                                                            "(default: [optimize].max_minutes)")]
             = None,
             train_limit: Annotated[int | None, typer.Option(min=1, help="a fixed sample of N train examples "
                                                                        "(default: [optimize].train_limit)")] = None,
             dev_limit: Annotated[int | None, typer.Option(min=1, help="score only the first N dev examples "
                                                                      "(default: [optimize].dev_limit)")] = None,
             force: Annotated[bool, typer.Option("--force", help="save even without a significant improvement on "
                                                                 "dev (recorded as forced)")] = False,
             key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Compile the program with the optimiser in [optimize] on the train split; save it.

    The optimiser runs within the budget (max_calls, max_minutes); dev scores before and after are
    compared pairwise, and the program is saved only when the optimiser's objective improved
    significantly (p < 0.05), or with --force. Every save writes <saved_program>.meta.json and a signed
    audit row. Exit 0 whether saved or not (the output says which), 2 on bad config.
    Example: slipway optimize ticket-triage --optimizer GEPA --max-calls 300 --train-limit 30
    """
    from framework.optimize import optimize as run_optimize
    from framework.spec import load_project

    loaded = load_project(project)
    outcome = report.with_optimize_progress(err, lambda progress: run_optimize(
        loaded, model_key=model, optimizer=optimizer, max_calls=max_calls, max_minutes=max_minutes,
        train_limit=train_limit, dev_limit=dev_limit, force=force, progress=progress, key=_key(key)),
        plain=not console.is_terminal or bool(os.environ.get("CI")))
    if as_json:
        _print_json(outcome.to_dict())
    else:
        report.print_optimize(console, outcome)


@app.command()
def build(project: ProjectArg,
          run_check: Annotated[bool, typer.Option("--check", help="run the check first when none matches")] = False,
          override: Annotated[str | None, typer.Option(help="override role only: build past failing clauses, with "
                                                             "a reason (signed, shown in red on the review)")]
          = None,
          containerize: Annotated[bool, typer.Option("--containerize", help="also build its container image "
                                                                         "through BentoML (or, with no engine "
                                                                         "here, write the build context)")] = False,
          gpu: Annotated[bool, typer.Option("--gpu", help="with --containerize: a CUDA llama.cpp image")] = False,
          context: Annotated[str | None, typer.Option("--context", help="with --containerize: write the build "
                                                                        "context to this folder, build nothing")]
          = None,
          key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Build a versioned BentoML bento, refused unless the current content passed its check.

    With --containerize, also its container image through BentoML's containerize path (docker, podman,
    buildah, nerdctl or buildctl); where none can build, the build context is written and the command for a
    machine that has one is printed (docs/kubernetes.md). Exit 0 built (or already built: same version),
    1 refused, 2 bad config.
    Example: slipway build ticket-triage --check --containerize
    """
    from pathlib import Path

    from framework.build import build as run_build
    from framework.spec import load_project

    loaded = load_project(project)
    result = run_build(loaded, run_check=run_check, override=override, key=_key(key))
    image = None
    if containerize or context:
        from framework import container
        from framework.errors import ContainerEngineMissing

        version = result.tag.partition(":")[2]
        if context is None:
            try:
                image = {"image": container.containerize(loaded, version, gpu=gpu)}
            except ContainerEngineMissing as exc:
                context = str(container.default_context_dir(loaded, version, gpu=gpu))
                _echo(f"{exc.args[0]}; writing the build context instead")
        if context is not None:
            written = container.build_context(loaded, version, Path(context), gpu=gpu)
            tag = container.image_tag(loaded, version, gpu=gpu)
            image = {"image": None, "context": str(written), "command": container.build_command(written, tag)}
    if as_json:
        _print_json({"tag": result.tag, "created": result.created, "model": result.model_tag,
                     "labels": result.labels, "path": result.path, "variants": result.variants or [],
                     **({"container": image} if image else {})})
    else:
        report.print_build(console, result)
        if image and image.get("image"):
            _echo(f"image {image['image']} built")
        elif image:
            _echo(f"build context in {image['context']}; on a machine with a container engine: {image['command']}")


@app.command()
def serve(target: Annotated[str, typer.Argument(help="<project> or <project>:<version> (default: what prod serves "
                                                      "when approvals are required, else the newest build)")],
          channel: Annotated[str | None, typer.Option(help="serve what this channel points to, following changes")]
          = None,
          port: Annotated[int, typer.Option(help="port on 127.0.0.1")] = 3000,
          host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
          workers: Annotated[int | None, typer.Option(min=1, help="worker processes (default: [serve].workers)")]
          = None,
          key: Annotated[str | None, typer.Option("--key", help="with --channel: the SSH key the front signs canary "
                                                              "decisions with (needs deploy:<channel> and "
                                                              "rollback:<channel>; default as for other commands)")]
          = None) -> None:
    """Serve a built bento over HTTP with BentoML (each worker loads the model once).

    With --channel, serve what the channel points to and follow deploys and rollbacks: the new version
    starts beside the live one and takes over when ready, so no request is refused or dropped. A canary
    (`slipway deploy --canary`) runs beside it, judged step by step on live traffic, and is promoted or
    rolled back by this front, signed with --key.
    Example: slipway serve ticket-triage --port 3000 --workers 2
    """
    from framework.serve import serve as run_serve

    if channel:
        from framework.serve import serve_channel

        code = serve_channel(target.partition(":")[0], channel, host=host, port=port, workers=workers,
                             key=_key(key), echo=_echo)
    else:
        code = run_serve(target, host=host, port=port, workers=workers, echo=_echo)
    raise typer.Exit(code)


@runs_app.command("list")
def runs_list(project: ProjectArg, limit: Annotated[int, typer.Option(min=1)] = 20, as_json: JsonOpt = False) -> None:
    """Recent runs, newest first. Example: slipway runs list ticket-triage"""
    from framework.evaluate import store_path
    from framework.spec import load_project
    from framework.store import Store

    with Store(store_path(load_project(project)), read_only=True) as store:
        rows = store.list_runs(limit)
    if as_json:
        _print_json(rows)
    else:
        console.print(report.runs_table(rows))


@runs_app.command("show")
def runs_show(project: ProjectArg, run_id: str, as_json: JsonOpt = False) -> None:
    """One run's measurements and its failing examples. Example: slipway runs show ticket-triage run-…"""
    from framework.evaluate import load_run
    from framework.spec import load_project

    run = load_run(load_project(project), run_id)
    if as_json:
        _print_json({"run_id": run_id, **run.measurements.to_dict(), "records": run.records})
    else:
        report.print_run(console, run)


ChannelOpt = Annotated[str, typer.Option("--channel", "-c", help="staging or prod")]


def _target(target: str):
    from framework.spec import load_project

    name, _, version = target.partition(":")
    if not version:
        raise typer.BadParameter(f"expected <project>:<version>, got {target!r}")
    return load_project(name), version


def _print_row(row: dict, as_json: bool, done: object) -> None:
    if as_json:
        _print_json(row)
    else:
        console.print(done)


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

    name, _, version = target.partition(":")
    loaded = load_project(name)
    data = run_review(loaded, version or None, against=against, against_channel=against_channel)
    json_path, html_path = write_review(loaded, data)
    if as_json:
        _print_json({**data, "report_json": str(json_path), "report_html": str(html_path)})
        return
    report.print_review(console, data)
    console.print(text(f"review page: {html_path}"), soft_wrap=True)


@app.command()
def approve(target: Annotated[str, typer.Argument(help="<project>:<version>")],
            note: Annotated[str, typer.Option(help="what you reviewed")] = "",
            key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Sign an approval of the exact content and files of a built version (your key needs the approve role).

    Example: slipway approve ticket-triage:1a2b3c --note "diff reviewed"
    """
    from framework import release

    loaded, version = _target(target)
    row = release.approve(loaded, version, key=_key(key), note=note)
    _print_row(_public(row), as_json, line(("approved", "green"), f" {target} as {row['approver']} "
                                           f"(signed over content {row['content_hash'][:12]})"))


@app.command()
def deploy(target: Annotated[str, typer.Argument(help="<project>:<version>")], channel: ChannelOpt,
           override: Annotated[str | None, typer.Option(help="override role only: deploy past the gate, with a "
                                                              "reason")] = None,
           canary: Annotated[int | None, typer.Option(min=1, max=99, help="start a canary with this percent of "
                                                                         "requests, then [release] steps above it")]
           = None,
           steps: Annotated[bool, typer.Option("--steps", help="start a canary at the first of [release] steps")]
           = False,
           kind: Annotated[str | None, typer.Option("--target", help="k8s: write Kubernetes manifests for the "
                                                                     "version instead (docs/kubernetes.md)")] = None,
           out: Annotated[str | None, typer.Option("--out", help="with --target k8s: the folder to write")] = None,
           image: Annotated[str | None, typer.Option(help="with --target k8s: the container image (default "
                                                          "<project>:<version>)")] = None,
           key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Point a channel at a version that passed its contract and holds its signed approvals.

    With --canary N (or --steps), the channel keeps its version and the new one gets N% of the requests
    served by `slipway serve --channel`, then each [release] step; every step is judged on live traffic
    against the contract and the stable version, then promoted or rolled back automatically (see
    `slipway status`). Exit 1 refused, naming the rule that failed.
    Example: slipway deploy ticket-triage:1a2b3c --channel prod --canary 10
    """
    from framework import release

    loaded, version = _target(target)
    if kind is not None:
        _write_k8s(loaded, version, channel, kind, out, image, as_json)
        return
    if canary is not None or steps:
        from framework import rollout

        if override:
            from framework.errors import SpecError

            raise SpecError("--override does not apply to a canary", field="--override",
                            hint="a canary passes the same gate as a deploy; deploy without --canary to override")
        row = rollout.start(loaded, version, channel, first=canary, key=_key(key))
        steps_text = " → ".join(f"{s}%" for s in row["details"]["steps"])
        _print_row(_public(row), as_json, line(("canary started", "green"),
                                               f" {target} on {channel} ({steps_text}) as {row['actor']}; "
                                               f"`slipway serve {loaded.name} --channel {channel}` runs it"))
        return
    row = release.deploy(loaded, version, channel, key=_key(key), override=override)
    note = (" ", (f"(override: {row['override_reason']})", "yellow")) if row["override_reason"] else ()
    _print_row(_public(row), as_json, line(("deployed", "green"), f" {target} to {channel} as {row['actor']}", *note))


@app.command()
def manifests(target: Annotated[str, typer.Argument(help="<project>:<version>")],
              out: Annotated[str, typer.Option("--out", "-o", help="YAML file to write")],
              kind: Annotated[str, typer.Option(help="argo: an Argo Rollouts Rollout + AnalysisTemplate")] = "argo",
              image: Annotated[str | None, typer.Option(help="container image (default: <project>:<version>, "
                                                             "the tag `bentoml containerize` gives)")] = None,
              replicas: Annotated[int, typer.Option(min=1, help="pods of the Rollout")] = 2,
              prometheus: Annotated[str, typer.Option(help="Prometheus the analysis queries")]
              = "http://prometheus.monitoring:9090") -> None:
    """Kubernetes manifests for a version: the [release] canary as an Argo Rollouts Rollout, judged by an
    AnalysisTemplate over the contract's alert expressions (docs/kubernetes.md).

    Example: slipway manifests ticket-triage:1a2b3c --kind argo --out k8s/ticket-triage.yaml
    """
    from pathlib import Path

    from framework import argo

    if kind != "argo":
        raise typer.BadParameter(f"unknown kind {kind!r}: only argo is written so far", param_hint="--kind")
    loaded, version = _target(target)
    path = argo.write_manifests(loaded, version, Path(out), image=image, replicas=replicas, prometheus=prometheus)
    _echo(f"wrote {path}: AnalysisTemplate + Rollout for {target} (steps {loaded.spec.release.steps})")


def _write_k8s(loaded, version: str, channel: str, kind: str, out: str | None, image: str | None,
               as_json: bool) -> None:
    """`deploy --target k8s`: the manifests of a version the deploy gate opens for; applying them is the deploy."""
    from pathlib import Path

    from framework import kube, release
    from framework.errors import ReleaseRefused
    from framework.evaluate import store_path
    from framework.store import Store

    if kind != "k8s":
        raise typer.BadParameter(f"unknown target {kind!r}: k8s is the one there is", param_hint="--target")
    if not out:
        raise typer.BadParameter("--target k8s needs --out DIR", param_hint="--out")
    with Store(store_path(loaded)) as store:
        ready = release.readiness(loaded, store, version)
    if ready.missing:
        raise ReleaseRefused(f"refusing to write manifests for {loaded.name}:{version}: {'; '.join(ready.missing)}",
                             path=str(loaded.toml_path), hint="the manifests deploy it: the same gate as a deploy")
    paths = kube.write_manifests(loaded, version, Path(out), channel=channel, image=image)
    if as_json:
        _print_json({"written": [str(p) for p in paths]})
    else:
        _echo(f"wrote {len(paths)} manifests for {loaded.name}:{version} ({channel}) into {out}: "
              f"`kubectl apply -f {out}` deploys it")


@app.command()
def capacity(project: ProjectArg,
             peak_factor: Annotated[float | None, typer.Option(help="busiest hour ÷ the daily mean (default 3)")]
             = None,
             as_json: JsonOpt = False) -> None:
    """Replicas the contract's expected_requests_per_day needs, from the latest measured throughput (served
    traffic, else the bench results), and memory per replica (docs/kubernetes.md, "Capacity").

    Example: slipway capacity ticket-triage --peak-factor 4
    """
    from framework.capacity import capacity as plan_capacity
    from framework.capacity import describe
    from framework.spec import load_project

    plan = plan_capacity(load_project(project), peak_factor=peak_factor)
    if as_json:
        _print_json(plan)
    else:
        for text_line in describe(plan):
            console.print(text_line, highlight=False)


@app.command("export")
def export_warehouse(project: ProjectArg,
                     out: Annotated[str, typer.Option("--out", "-o", help="folder of the partitioned Parquet")],
                     since: Annotated[str | None, typer.Option(help="only days from this long ago, e.g. 1d, 12h")]
                     = None,
                     tables: Annotated[str | None, typer.Option(help="comma-separated tables (default: all)")]
                     = None,
                     as_json: JsonOpt = False) -> None:
    """Eval runs, traces, feedback and the audit log as Parquet partitioned by project and day
    (`<out>/<table>/project=<p>/day=<YYYY-MM-DD>/`), for DuckDB, ClickHouse, BigQuery or Spark
    (docs/warehouse.md). Re-exporting a day merges, never duplicates.

    Example: slipway export ticket-triage --out warehouse/ --since 7d
    """
    from pathlib import Path

    from framework import warehouse
    from framework.spec import load_project
    from framework.traces import utc_now

    since_at = utc_now() - _duration(since, "--since") if since else None
    written = warehouse.export(load_project(project), Path(out), tables=tables.split(",") if tables else None,
                               since=since_at)
    if as_json:
        _print_json(written)
    elif not any(written.values()):
        _echo("nothing to export: the store holds no rows in that window")
    else:
        _echo(f"exported to {out}: " + ", ".join(f"{table} {n}" for table, n in written.items() if n))


@app.command()
def rollback(project: ProjectArg, channel: ChannelOpt, key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Point a channel back at its previous version (signed; needs rollback:<channel>). While a canary runs on
    the channel, stop the canary instead: the channel keeps its stable version.

    Example: slipway rollback ticket-triage --channel prod
    """
    from framework import release, rollout
    from framework.spec import load_project

    loaded = load_project(project)
    stopped = rollout.stop(loaded, channel, key=_key(key))
    if stopped is not None:
        _print_row(_public(stopped), as_json, line(("canary stopped", "green"),
                                                   f" {project}:{stopped['version']} on {channel} as "
                                                   f"{stopped['actor']}; {channel} stays on "
                                                   f"{stopped['stable_version']}"))
        return
    row = release.rollback(loaded, channel, key=_key(key))
    _print_row(_public(row), as_json, line(("rolled back", "green"),
                                           f" {channel} to {row['project']}:{row['version']} as {row['actor']}"))


@app.command()
def status(project: ProjectArg,
           history: Annotated[bool, typer.Option("--history", help="also every canary rollback: what caused it, "
                                                                   "time to detect and to recover")] = False,
           as_json: JsonOpt = False) -> None:
    """Each channel's version, when and by whom, and its newest canary: step, weight and the evidence of
    each decision. Example: slipway status ticket-triage --history"""
    from framework import release, rollout
    from framework.release import CHANNELS
    from framework.spec import load_project

    loaded = load_project(project)
    channels = release.status(loaded)
    canaries = {c: rollout.latest(loaded, c) for c in CHANNELS}
    incidents = {c: rollout.incidents(loaded, c) for c in CHANNELS} if history else {}
    if as_json:
        # channels stay top-level keys, as before canaries existed
        _print_json({**channels, "canaries": {c: r.to_dict() if r else None for c, r in canaries.items()},
                     **({"incidents": incidents} if history else {})})
        return
    console.print(report.status_table(channels))
    for found in canaries.values():
        if found is not None:
            report.print_rollout(console, found)
    for channel, rows in incidents.items():
        console.print(report.incidents_table(channel, rows) if rows else f"{channel}: no canary rollbacks")


@audit_app.command("list")
def audit_list(project: ProjectArg, limit: Annotated[int, typer.Option(min=1, help="newest N rows")] = 50,
               long: Annotated[bool, typer.Option("--long", "-l", help="each row's details in full, as "
                                                                       "key: value lines")] = False,
               as_json: JsonOpt = False) -> None:
    """The audit log, oldest first: who did what to which version.

    One line per row, details cut to fit; --long shows every detail. Example: slipway audit list ticket-triage
    """
    from framework.evaluate import store_path
    from framework.spec import load_project
    from framework.store import Store

    with Store(store_path(load_project(project)), read_only=True) as store:
        rows = store.audit_rows()[-limit:]
    if as_json:
        _print_json(rows)
    else:
        report.print_audit(console, rows, long=long)


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

    loaded = load_project(project)
    signers = signing.load_signers(loaded.dir)
    anchor = audit.read_anchor(loaded.dir)
    if file:
        count, problem = audit.verify_file(Path(file), signers)
    else:
        with Store(store_path(loaded), read_only=True) as store:
            problem = audit.verify(store, anchor=anchor, signers=signers)
            count = len(store.audit_rows())
    if problem:
        raise AuditBroken(problem.message, path=file or str(store_path(loaded)), field=f"audit.seq={problem.seq}",
                          hint="restore the store from a backup; the log from this row on cannot be trusted")
    anchored = anchor.statement["details"]["seq"] if anchor and not file else None
    _print_row({"ok": True, "rows": count, "anchored_seq": anchored}, as_json,
               line(("ok", "green"), f" audit log verifies: {count} row(s), every signature holds"
                    + (f", anchored at row {anchored}" if anchored else "")))


@audit_app.command("anchor")
def audit_anchor(project: ProjectArg, key: KeyOpt = None) -> None:
    """Sign the log's head into projects/<name>/audit-anchor.json (commit it); needs the audit role.

    A chain rewritten inside the store no longer holds the anchored row. Example: slipway audit anchor ticket-triage
    """
    from framework import audit, signing
    from framework.errors import AuditBroken
    from framework.evaluate import store_path
    from framework.spec import load_project
    from framework.store import Store

    loaded = load_project(project)
    signers = signing.load_signers(loaded.dir)
    with Store(store_path(loaded), read_only=True) as store:
        if problem := audit.verify(store, anchor=audit.read_anchor(loaded.dir), signers=signers):
            raise AuditBroken(f"will not anchor a broken log: {problem.message}", path=str(store.path),
                              field=f"audit.seq={problem.seq}")
        signed = audit.anchor(store, loaded.dir, loaded.name, key=_key(key), signers=signers)
    details = signed.statement["details"]
    console.print(line(("anchored", "green"), f" row {details['seq']} ({details['hash'][:12]}) in "
                       f"{loaded.dir / audit.ANCHOR_FILE}; commit that file"), soft_wrap=True)


@audit_app.command("prune")
def audit_prune(project: ProjectArg, key: KeyOpt = None) -> None:
    """Delete rows older than [audit] retention_days behind a signed, chained prune row (audit role).

    Example: slipway audit prune ticket-triage
    """
    from framework import audit, signing
    from framework.evaluate import store_path
    from framework.spec import load_project
    from framework.store import Store

    loaded = load_project(project)
    with Store(store_path(loaded)) as store:
        pruned = audit.prune(store, loaded.name, loaded.spec.audit.retention_days, key=_key(key),
                             signers=signing.load_signers(loaded.dir))
    console.print(text(f"pruned {pruned} row(s)" if pruned else "nothing to prune"))


@audit_app.command("export")
def audit_export(project: ProjectArg, out: Annotated[str, typer.Option("--out", "-o", help="output file")],
                 since: Annotated[str | None, typer.Option(help="ISO date or time, e.g. 2026-11-01")] = None,
                 fmt: Annotated[str, typer.Option("--format", help="jsonl or parquet")] = "jsonl",
                 key: KeyOpt = None) -> None:
    """Write audit rows to a file ending with a signed head, so it verifies on its own.

    Check it with `slipway audit verify --file`.
    Example: slipway audit export ticket-triage --since 2026-11-01 -o a.jsonl
    """
    from datetime import datetime
    from pathlib import Path

    from framework import audit, signing
    from framework.errors import SpecError
    from framework.evaluate import store_path
    from framework.spec import load_project
    from framework.store import Store

    loaded = load_project(project)
    try:
        start = datetime.fromisoformat(since) if since else None
    except ValueError:
        raise SpecError(f"--since {since!r} is not an ISO date", hint="e.g. --since 2026-11-01") from None
    with Store(store_path(loaded), read_only=True) as store:
        rows = store.audit_rows(start)
    head = audit.export_head(rows, loaded.name, signing.find_key(_key(key), create=True))
    count = audit.export(rows, Path(out), fmt, head=head)
    err.print(text(f"wrote {count} row(s) and a signed head to {out}"))


@signers_app.command("init")
def signers_init() -> None:
    """Your signing key: the one you already have (--key, SLIPWAY_SIGNING_KEY, ~/.ssh/id_ed25519), else a new
    Ed25519 key. Prints its public line. Example: slipway signers init
    """
    from framework import signing

    path = signing.find_key(create=True)
    public = signing.public_key(path)
    console.print(text(f"{path}: {signing.fingerprint(public)}"))
    console.print(text(public), soft_wrap=True)


@signers_app.command("show")
def signers_show(key: KeyOpt = None) -> None:
    """Print the public key line you sign with (what a project's signers.toml lists).

    Example: slipway signers show
    """
    from framework import signing

    console.print(text(signing.public_key(signing.find_key(_key(key)))), soft_wrap=True)


@signers_app.command("add")
def signers_add(project: ProjectArg, name: Annotated[str, typer.Argument(help="the person's name")],
                public: Annotated[str, typer.Option("--public-key", help="their .pub file, or the key line itself")],
                roles: Annotated[str, typer.Option(help="comma-separated: approve, deploy:prod, rollback:prod, "
                                                        "override, audit, curate, keys, flags, queue")] = "") -> None:
    """Add a person to projects/<name>/signers.toml; commit it (who may act is a reviewed change).

    Example: slipway signers add ticket-triage bob --public-key ~/bob.pub --roles approve
    """
    from pathlib import Path

    from framework import signing
    from framework.spec import load_project

    loaded = load_project(project)
    given = Path(public).expanduser()
    key_line = given.read_text() if given.is_file() else public
    path = signing.add_signer(loaded.dir, name, key_line, [r.strip() for r in roles.split(",") if r.strip()])
    console.print(text(f"added {name} to {path}; commit it"))


@signers_app.command("list")
def signers_list(project: ProjectArg, as_json: JsonOpt = False) -> None:
    """Who may act on the project, by key and role. Example: slipway signers list ticket-triage"""
    from framework import signing
    from framework.spec import load_project

    spec = signing.load_signers(load_project(project).dir)
    rows = [{"name": s.name, "fingerprint": signing.fingerprint(s.key), "roles": s.roles, "revoked": None}
            for s in spec.signers] + [{"name": "", "fingerprint": signing.fingerprint(r.key), "roles": [],
                                       "revoked": r.reason or "revoked"} for r in spec.revoked]
    if as_json:
        _print_json(rows)
    else:
        console.print(report.signers_table(rows))


def _moved(command, old: str, new: str):
    """`slipway keys init|show|add`, the signing-key commands' old names: still work, with a note."""
    import functools

    @functools.wraps(command)
    def alias(*args, **kwargs):
        err.print(text(f"note: `slipway keys {old}` is now `slipway {new}`; the old name will go"))
        return command(*args, **kwargs)

    return alias


for _old in ("init", "show", "add"):
    keys_app.command(_old, hidden=True)(_moved(globals()[f"signers_{_old}"], _old, f"signers {_old}"))

EndpointOpt = Annotated[list[str] | None, typer.Option(
    "--endpoint", help="only this route (repeatable; default: every route the tenant may call)")]
# Not `ChannelOpt`: with postponed annotations typer resolves names at run time, and one module-level
# name for two options would give `deploy --channel` this list type.
KeyChannelsOpt = Annotated[list[str] | None, typer.Option(
    "--channel", help="only this channel (repeatable; default: every channel the tenant may call)")]


@keys_app.command("create")
def keys_create(project: ProjectArg,
                tenant: Annotated[str, typer.Option("--tenant", help="a [tenants.<name>] table of project.toml")],
                endpoints: EndpointOpt = None, channels: KeyChannelsOpt = None, key: KeyOpt = None,
                as_json: JsonOpt = False) -> None:
    """Make an API key for a tenant and print it, once: only its sha256 is kept. Signed with your SSH key,
    which needs the `keys` role in signers.toml.

    Callers send it as `Authorization: Bearer <key>`.
    Example: slipway keys create ticket-triage --tenant acme
    """
    from framework.apikeys import create_key
    from framework.spec import load_project

    secret, entry = create_key(load_project(project), tenant, endpoints=endpoints, channels=channels, key=_key(key))
    if as_json:
        _print_json({"key": secret, "tenant": entry.tenant, "key_id": entry.key_id})
        return
    console.print(text(secret), soft_wrap=True)
    tenants = "the tenant's"   # a key without its own scope reaches what its tenant may call
    scope = ", ".join(f"{name}: {', '.join(values) if values else tenants}"
                      for name, values in (("endpoints", entry.endpoints), ("channels", entry.channels)))
    err.print(text(f"created {entry.key_id} for tenant {entry.tenant!r} ({scope}), signed by {entry.created_by}. "
                   "This is the only time the key is shown: store it now (a secret manager, not git)."))


@keys_app.command("list")
def keys_list(project: ProjectArg, as_json: JsonOpt = False) -> None:
    """API keys by id: tenant, scopes, who created them and when, revoked or not; never the key itself. Rows of
    the keys file that do not count (bad signature, signer without the `keys` role) are listed with why.

    Example: slipway keys list ticket-triage
    """
    from framework.apikeys import list_keys
    from framework.spec import load_project

    rows = list_keys(load_project(project))
    if as_json:
        _print_json(rows)
    else:
        console.print(report.api_keys_table(rows))


@keys_app.command("revoke")
def keys_revoke(project: ProjectArg, key_id: Annotated[str, typer.Argument(help="the key's id (`keys list`)")],
                reason: Annotated[str, typer.Option("--reason", help="why, for the record")] = "",
                key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Revoke an API key (signed; needs the `keys` role). A served bento refuses it from its next request.

    Example: slipway keys revoke ticket-triage key-3f2a9c0d1e4b --reason "leaked in a CI log"
    """
    from framework.apikeys import revoke_key
    from framework.spec import load_project

    entry, changed = revoke_key(load_project(project), key_id, reason=reason, key=_key(key))
    if as_json:
        _print_json({**entry.to_dict(), "changed": changed})
    elif changed:
        console.print(text(f"revoked {entry.key_id} (tenant {entry.tenant!r}) as {entry.revoked_by}"))
    else:
        console.print(text(f"{entry.key_id} was already revoked on {entry.revoked_at} by {entry.revoked_by}"))


VariantArg = Annotated[str, typer.Argument(help="FLAG=VARIANT, as declared under [flags.*]")]
FlagTenantOpt = Annotated[str, typer.Option("--tenant", help="a tenant of project.toml, or '*' for every caller")]
PercentOpt = Annotated[int, typer.Option("--percent", min=1, max=100,
                                         help="share of the tenant's requests (by X-Slipway-Subject, else request id)")]
ReasonOpt = Annotated[str, typer.Option("--reason", help="why, for the record")]


@flags_app.command("approve")
def flags_approve(project: ProjectArg, variant: VariantArg, tenant: FlagTenantOpt, percent: PercentOpt = 100,
                  reason: ReasonOpt = "", key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Approve switching a variant on (signed; `approve` role), for the variant's current checked content.

    Example: slipway flags approve ticket-triage reasoning=on --tenant acme --percent 10
    """
    from framework import flags
    from framework.spec import load_project

    flag, name = flags.parse_variant(variant)
    row = flags.approve(load_project(project), flag, name, tenant, percent, reason=reason, key=_key(key))
    _print_json(row) if as_json else console.print(text(f"approved {flag}={name} for {tenant} at {percent}% "
                                                        f"as {row['by']}"))


@flags_app.command("on")
def flags_on(project: ProjectArg, variant: VariantArg, tenant: FlagTenantOpt, percent: PercentOpt = 100,
             reason: ReasonOpt = "", key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Switch a variant on (signed; `flags` role), refused without the approvals a deploy needs. Served bentos
    that pack this variant apply it from their next request.

    Example: slipway flags on ticket-triage reasoning=on --tenant acme --percent 10
    """
    from framework import flags
    from framework.spec import load_project

    flag, name = flags.parse_variant(variant)
    row = flags.switch_on(load_project(project), flag, name, tenant, percent, reason=reason, key=_key(key))
    _print_json(row) if as_json else console.print(text(f"{flag}={name} is on for {tenant} at {percent}% "
                                                        f"(by {row['by']})"))


@flags_app.command("off")
def flags_off(project: ProjectArg, flag: Annotated[str, typer.Argument(help="the flag's name")],
              tenant: FlagTenantOpt, reason: ReasonOpt = "", key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Switch a flag off for a tenant (signed; `flags` role; no approval needed).

    Example: slipway flags off ticket-triage reasoning --tenant acme --reason "slower than promised"
    """
    from framework import flags
    from framework.spec import load_project

    row = flags.switch_off(load_project(project), flag, tenant, reason=reason, key=_key(key))
    _print_json(row) if as_json else console.print(text(f"{flag} is off for {tenant} (by {row['by']})"))


@flags_app.command("list")
def flags_list(project: ProjectArg, as_json: JsonOpt = False) -> None:
    """What is on (with who approved it), every signed change in order, and lines that count for nothing.

    Example: slipway flags list ticket-triage
    """
    from framework import flags
    from framework.spec import load_project

    found = flags.list_flags(load_project(project))
    _print_json(found) if as_json else console.print(report.flags_table(found))


SinceOpt = Annotated[str | None, typer.Option("--since", help="only the last N s/m/h/d/w, e.g. 1h, 7d")]
WindowOpt = Annotated[str, typer.Option("--window", help="judge the last N s/m/h/d/w of traffic, e.g. 1h, 24h")]


def _duration(value: str, option: str):
    from framework.traces import parse_since

    try:
        return parse_since(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


@traces_app.command("list")
def traces_list(project: ProjectArg, since: SinceOpt = None,
                version: Annotated[str | None, typer.Option("--version", help="only this bento version")] = None,
                where: Annotated[str | None, typer.Option("--where", help="SQL condition over the traces columns, "
                                                                          "e.g. \"status >= 500\"")] = None,
                limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="newest N traces")] = 50,
                as_json: JsonOpt = False) -> None:
    """Served requests, newest first (ingests new trace segments into the store first).

    Example: slipway traces ticket-triage --since 1h --where "duration_ms > 5000"
    """
    from framework import traces
    from framework.evaluate import store_path
    from framework.spec import load_project
    from framework.store import Store

    loaded = load_project(project)
    ingested = traces.ingest(loaded)
    for problem in ingested.skipped:
        _echo(f"warning: skipped {problem}")
    since_at = traces.utc_now() - _duration(since, "--since") if since else None
    with Store(store_path(loaded), read_only=True, sandbox=True) as store:   # --where can only read the store
        rows = store.traces(since=since_at, version=version, where=where, limit=limit)
    if as_json:
        _print_json(rows)
    else:
        console.print(report.traces_table(rows))


@traces_app.command("export")
def traces_export(project: ProjectArg,
                  out: Annotated[str, typer.Option("--out", "-o", help="file to write")],
                  fmt: Annotated[str, typer.Option("--format", help="otlp (OTLP/JSON lines, as the OpenTelemetry "
                                                                    "Collector's file exporter writes) or parquet")]
                  = "otlp",
                  since: SinceOpt = None,
                  version: Annotated[str | None, typer.Option("--version", help="only this bento version")] = None
                  ) -> None:
    """Write traces for other tools: OTLP spans (Jaeger, Phoenix, Langfuse) or a Parquet table.

    Example: slipway traces export ticket-triage --format otlp -o traces.jsonl
    """
    from pathlib import Path

    from framework import traces
    from framework.evaluate import store_path
    from framework.spec import load_project
    from framework.store import Store

    if fmt not in ("otlp", "parquet"):
        raise typer.BadParameter(f"{fmt!r}: use otlp or parquet", param_hint="--format")
    loaded = load_project(project)
    traces.ingest(loaded)
    since_at = traces.utc_now() - _duration(since, "--since") if since else None
    with Store(store_path(loaded), read_only=True) as store:
        if fmt == "parquet":
            count = store.export_traces_parquet(Path(out), since=since_at, version=version)
            what = "traces"
        else:
            from framework.otlp import export_otlp

            names = {model.identity: model.name for model in loaded.spec.models.values()}
            count = export_otlp(store.traces(since=since_at, version=version, limit=None), Path(out),
                                model_names=names)
            what = "spans"
    console.print(line(("wrote", "green"), f" {count} {what} to {out}"))


@app.command()
def trace(request_id: Annotated[str, typer.Argument(help="the X-Request-ID (or trace id) of a served request")],
          project: Annotated[str | None, typer.Option("--project", "-p", help="project to look in (default: "
                                                                              "every project)")] = None,
          as_json: JsonOpt = False) -> None:
    """One served request: versions, stages as a timeline, prompts and outputs (as redacted when stored).

    Example: slipway trace 3f2a9c…   (the X-Request-ID header of the answer)
    """
    from framework import traces
    from framework.errors import StoreError
    from framework.evaluate import store_path
    from framework.spec import PROJECTS_DIR, find_root, load_project
    from framework.store import Store

    names = [project] if project else sorted(
        p.parent.name for p in (find_root() / PROJECTS_DIR).glob("*/project.toml"))
    found = []
    for name in names:
        loaded = load_project(name)
        traces.ingest(loaded)
        with Store(store_path(loaded), read_only=True) as store:
            found += store.trace(request_id)
    if not found:
        raise StoreError(f"no trace of request {request_id!r} in {', '.join(names)}",
                         hint="list recent ones with `slipway traces <project>`")
    if as_json:
        _print_json(found if len(found) > 1 else found[0])
        return
    for item in found:
        report.print_trace(console, item)


@app.command()
def slo(project: ProjectArg, window: WindowOpt = "1h",
        channel: Annotated[str | None, typer.Option("--channel", help="only traffic served on this channel")] = None,
        version: Annotated[str | None, typer.Option("--version", help="only this bento version")] = None,
        as_json: JsonOpt = False) -> None:
    """The contract judged on served traffic: latency percentiles, error rate, tokens and cost per request,
    with error-budget burn. Exit 1 when a clause is breached over the window (for cron or CI).

    Example: slipway slo ticket-triage --channel prod --window 1h
    """
    from framework.slo import slo as judge_live
    from framework.spec import load_project

    result = judge_live(load_project(project), _duration(window, "--window"), channel=channel, version=version)
    if as_json:
        _print_json(result.to_dict())
    elif result.n == 0:
        console.print(f"no served traffic for {result.project} in the last {result.window}"
                      + (f" on {channel}" if channel else "") + ": nothing to judge")
    else:
        console.print(report.slo_table(result))
        if result.offline_only:
            console.print(line(("offline only: ", "dim"), ", ".join(result.offline_only),
                               (" (quality needs labels: `slipway check`, feedback via `slipway harvest`)", "dim")))
    if not result.passed:
        raise typer.Exit(1)


@harvest_app.command("run")
def harvest_run(project: ProjectArg, as_json: JsonOpt = False) -> None:
    """Turn served requests with negative feedback or corrected labels into candidate eval rows in
    projects/<name>/harvest/candidates.jsonl, for a person to review (edit labels, set accept: true).

    Example: slipway harvest ticket-triage
    """
    from framework.harvest import harvest
    from framework.spec import load_project

    result = harvest(load_project(project))
    if as_json:
        _print_json(result.to_dict())
    else:
        for message in result.lines():
            console.print(text(message))


@harvest_app.command("accept")
def harvest_accept(project: ProjectArg,
                   ids: Annotated[list[str] | None, typer.Option("--id", help="accept this candidate (repeatable; "
                                                                             "default: those marked accept: true)")]
                   = None,
                   key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Add reviewed candidates to the eval set with their provenance, signed (needs the `curate` role).
    Exit 1 when a chosen candidate was refused (incomplete labels, text already in a split).

    Example: slipway harvest accept ticket-triage --id served-demo-1
    """
    from framework.harvest import accept
    from framework.spec import load_project

    result = accept(load_project(project), ids=ids or None, key=_key(key))
    if as_json:
        _print_json(result.to_dict())
    else:
        for message in result.lines():
            console.print(text(message))
    if not result.ok:
        raise typer.Exit(1)


@queue_app.command("list")
def queue_list(project: ProjectArg,
               everything: Annotated[bool, typer.Option("--all", help="resolved entries too, each marked verified "
                                                                       "or not")] = False,
               as_json: JsonOpt = False) -> None:
    """Requests handed to a person, oldest first (ingests new handoff segments into the store first).

    Example: slipway queue ticket-triage --all
    """
    from framework.handoff import queue
    from framework.spec import load_project

    loaded = load_project(project)
    listing = queue(loaded, everything=everything)
    for problem in listing.skipped:
        _echo(f"warning: skipped {problem}")
    if as_json:
        _print_json(listing.to_dict()["entries"])
    elif not listing.entries:
        console.print(f"no {'' if everything else 'open '}requests in the human queue of {loaded.name}")
    else:
        console.print(report.queue_table(listing.entries))


@queue_app.command("resolve")
def queue_resolve(project: ProjectArg,
                  request_id: Annotated[str, typer.Argument(help="the entry's request id (X-Request-ID) or handoff "
                                                                 "id")],
                  labels: Annotated[list[str], typer.Option("--labels", "--label", "-l",
                                                            help="the answer, <output field>=<value> (repeatable)")],
                  note: Annotated[str | None, typer.Option("--note", help="what the person did")] = None,
                  key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Record a person's answer to a request handed to them, signed (needs the `queue` role). Each entry is
    resolved once.

    Example: slipway queue resolve ticket-triage 3f2a9c… -l category=billing -l priority=high --note "refunded"
    """
    from framework.handoff import parse_labels, resolve
    from framework.spec import load_project

    result = resolve(load_project(project), request_id, parse_labels(labels), note=note, key=_key(key))
    if as_json:
        _print_json(result.to_dict())
    else:
        for message in result.lines():
            console.print(text(message))


@app.command()
def drift(project: ProjectArg, window: WindowOpt = "24h",
          threshold: Annotated[float, typer.Option("--threshold", min=0, max=1,
                                                   help="p-value below which a test says drifted")] = 0.01,
          channel: Annotated[str | None, typer.Option("--channel", help="only traffic served on this channel")] = None,
          as_json: JsonOpt = False) -> None:
    """Do served inputs still look like the eval set? Length, language mix and predicted labels, each a
    two-sample test with its p-value. Exit 1 when the eval set no longer represents traffic.

    Example: slipway drift ticket-triage --window 24h
    """
    from framework.drift import drift as compare
    from framework.spec import load_project

    result = compare(load_project(project), _duration(window, "--window"), threshold=threshold, channel=channel)
    if as_json:
        _print_json(result.to_dict())
    else:
        for message in result.lines():
            console.print(text(message))
    if result.drifted:
        raise typer.Exit(1)


@app.command()
def dashboard(project: ProjectArg,
              port: Annotated[int, typer.Option("--port", help="port on 127.0.0.1 (0: a free one)")] = 2718,
              no_browser: Annotated[bool, typer.Option("--no-browser", help="do not open a browser")] = False) -> None:
    """A read-only marimo app over the store: latency percentiles per version, error rate, cost, feedback,
    drift and the live contract verdict. New traces are ingested every 30 s while it runs; Ctrl-C stops it.

    Example: slipway dashboard ticket-triage
    """
    from framework.dashboard_launch import launch
    from framework.spec import load_project

    loaded = load_project(project)
    board = launch(loaded, port=port, headless=no_browser)
    try:
        board.wait_ready()
        console.print(line(("dashboard", "green"), f" for {loaded.name} on {board.url} (Ctrl-C stops it)"))
        console.file.flush()   # the address must reach a log or pipe now, not when the command ends
        code = board.serve(loaded, warn=_echo)
    finally:
        board.stop()   # never leave marimo holding the port
    raise typer.Exit(code)


def _key(value: str | None):
    from pathlib import Path

    return Path(value).expanduser() if value else None


def _public(row: dict) -> dict:
    """A signed row without its statement and signature, for --json output."""
    return {k: v for k, v in row.items() if k not in ("statement", "signature")}


def main() -> None:
    try:
        app()
    except Exception as exc:  # raised outside a command (ExitCodeGroup handles those inside one)
        sys.exit(report_error(exc, debug="--debug" in sys.argv))


if __name__ == "__main__":
    main()
