"""Build and serve through the real path: check → bento → `bentoml serve` over HTTP on 127.0.0.1."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from framework.cli import app
from tests.conftest import cli_ok as ok
from tests.conftest import drop_table, edit_toml

runner = CliRunner()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(server: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM (BentoML drains in-flight requests), then kill if it has not stopped within `timeout` s."""
    server.terminate()
    try:
        server.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def _bentoml(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([str(Path(sys.executable).parent / "bentoml"), *args], env=env or os.environ.copy(),
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def loosen_latency(toml: Path) -> None:
    """Checks here test serving, not speed: do not fail a latency clause on a busy machine."""
    for key in ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms"):
        edit_toml(toml, f"{key} = 60000", f"{key} = 600000")


def break_when_served(notebook: Path) -> None:
    """Make the notebook's program raise when TRIAGE_FAIL_ON_PURPOSE is set: a check (without it)
    passes, so the version builds, and a server started with it cannot answer its warm-up."""
    edit_toml(notebook, "    def forward(self, ticket: str):\n",
              "    def forward(self, ticket: str):\n        import os\n\n"
              "        if os.environ.get('TRIAGE_FAIL_ON_PURPOSE'):\n"
              "            raise RuntimeError('broken on purpose')\n")


def _wait_ready(base: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert server.poll() is None, server.stdout.read()
        time.sleep(1)
    pytest.fail("server never became ready")


@pytest.mark.model
def test_build_gate_determinism_and_staleness(tiny_project, tiny_model_present):
    refused = runner.invoke(app, ["build", "ticket-triage"])
    assert refused.exit_code == 1, refused.output
    assert "no check has been run" in refused.output

    assert runner.invoke(app, ["check", "ticket-triage"]).exit_code == 0
    first = runner.invoke(app, ["build", "ticket-triage", "--json"])
    assert first.exit_code == 0, first.output
    built = json.loads(first.stdout)
    assert built["created"] and built["labels"]["slipway.model_sha256"].startswith("b179c952")
    # the contract's alert rules ship in the bento, under its signed manifest
    alerts = Path(built["path"]) / "src" / "slipway" / "alerts.yml"
    rules = yaml.safe_load(alerts.read_text())["groups"][0]["rules"]
    assert {rule["alert"] for rule in rules} >= {"SlipwayLatencyP95", "SlipwayErrorRate", "SlipwayMonthlyBudgetBurn"}
    manifest = json.loads((Path(built["path"]) / "slipway-manifest.json").read_text())["files"]
    assert manifest["src/slipway/alerts.yml"] == hashlib.sha256(alerts.read_bytes()).hexdigest()

    again = runner.invoke(app, ["build", "ticket-triage", "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout)["tag"] == built["tag"]
    assert not json.loads(again.stdout)["created"]

    edit_toml(tiny_project, "timeout_s = 60", "timeout_s = 30")  # a serve setting: no new check needed,
    reserved = runner.invoke(app, ["build", "ticket-triage", "--json"])  # but a new bento version
    assert reserved.exit_code == 0, reserved.output
    assert json.loads(reserved.stdout)["tag"] != built["tag"]

    edit_toml(Path("notebooks/ticket_triage.py"), "Triage one customer-support ticket",
              "Triage one customer support ticket")
    stale = runner.invoke(app, ["build", "ticket-triage"])
    assert stale.exit_code == 1
    assert "stale" in stale.output and "notebook source" in stale.output

    rebuilt = runner.invoke(app, ["build", "ticket-triage", "--check", "--json"])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert json.loads(rebuilt.stdout)["tag"] != built["tag"]

    listed = subprocess.run([str(Path(sys.executable).parent / "bentoml"), "list", "ticket-triage", "-o", "json"],
                            capture_output=True, text=True, env=os.environ.copy(), timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert {b["tag"] for b in json.loads(listed.stdout)} == {built["tag"], json.loads(reserved.stdout)["tag"],
                                                             json.loads(rebuilt.stdout)["tag"]}


@pytest.mark.model
def test_failing_check_blocks_the_build(tiny_project, tiny_model_present):
    edit_toml(tiny_project, 'category_accuracy = ">= 0.0"', 'category_accuracy = ">= 0.999"')
    checked = runner.invoke(app, ["check", "ticket-triage"])
    assert checked.exit_code == 1, checked.output
    refused = runner.invoke(app, ["build", "ticket-triage"])
    assert refused.exit_code == 1
    assert "refusing to build" in refused.output and "category_accuracy" in refused.output, refused.output


@pytest.mark.model
def test_served_bento_answers_concurrently_with_versions(tiny_project, tiny_model_present):
    loosen_latency(tiny_project)
    ok(["check", "ticket-triage"])
    built = json.loads(runner.invoke(app, ["build", "ticket-triage", "--json"]).stdout)
    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "slipway"), "serve", built["tag"],
                               "--port", str(port), "--workers", "2"], env=os.environ.copy(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, server)

        tickets = [f"Ticket {i}: I was charged twice on invoice INV-{i}" for i in range(8)]

        def ask(i):
            return httpx.post(f"{base}/triage", json={"ticket": tickets[i]},
                              headers={"X-Request-ID": f"req-{i}"}, timeout=120)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(8)))
        for i, response in enumerate(answers):
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["request_id"] == f"req-{i}" and response.headers["x-request-id"] == f"req-{i}"
            assert body["category"] in ("billing", "bug", "account", "feature_request", "outage", "abuse")
            assert body["version"] == {"bento": built["tag"], "model_sha256": built["labels"]["slipway.model_sha256"],
                                       "program_hash": built["labels"]["slipway.program_hash"], "flags": {}}

        wrong = httpx.post(f"{base}/triage", json={"tickt": "typo"}, timeout=30)
        assert wrong.status_code == 422 and "ticket" in wrong.text
        broken = httpx.post(f"{base}/triage", content=b'{"ticket": ', headers={"content-type": "application/json"},
                            timeout=30)
        assert broken.status_code == 422
        huge = httpx.post(f"{base}/triage", json={"ticket": "x" * 9000}, timeout=30)
        assert huge.status_code == 413 and huge.json()["request_id"]
        assert "max_input_chars" in huge.json()["error"]

        metrics = httpx.get(f"{base}/metrics", timeout=10).text
        mine = f'bento_version="{built["tag"]}"'
        assert f'slipway_request_seconds_count{{{mine},outcome="ok",tenant=""}}' in metrics
        assert f'slipway_request_seconds_count{{{mine},outcome="rejected",tenant=""}}' in metrics   # the 413
        assert "slipway_tokens_total" in metrics and 'status="413"' in metrics
        alerts = Path(built["path"]) / "src" / "slipway" / "alerts.yml"
        rules = yaml.safe_load(alerts.read_text())["groups"][0]["rules"]
        queried = set(re.findall(r"slipway_[a-z_]+", " ".join(rule["expr"] for rule in rules)))
        assert queried and all(f"{name}{{" in metrics for name in queried), queried   # what the alert rules read
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.mark.model
def test_requests_past_the_timeout_get_503_and_the_worker_survives(tiny_project, tiny_model_present):
    """One worker, a 1 s deadline, six long tickets at once: the queued ones must come back as 503s
    naming their request id (not hang, not crash the worker), and the service keeps answering. Without a
    [fallback] (the demo's hands them to a person: tests/e2e/test_controls_served.py)."""
    drop_table(tiny_project, "[fallback]")
    edit_toml(tiny_project, "timeout_s = 60", "timeout_s = 1")
    loosen_latency(tiny_project)
    ok(["check", "ticket-triage"])
    built = json.loads(runner.invoke(app, ["build", "ticket-triage", "--json"]).stdout)
    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "slipway"), "serve", built["tag"],
                               "--port", str(port), "--workers", "1"], env=os.environ.copy(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, server)
        ticket = "Our exports fail with error 500 every time since Monday. " * 100  # ~5,800 characters

        def ask(i):
            return httpx.post(f"{base}/triage", json={"ticket": ticket}, headers={"X-Request-ID": f"slow-{i}"},
                              timeout=120)

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, range(6)))
        statuses = [a.status_code for a in answers]
        assert set(statuses) <= {200, 503} and 503 in statuses, statuses
        for i, answer in enumerate(answers):
            if answer.status_code == 503:
                assert answer.json()["request_id"] == f"slow-{i}"
                assert "timed out" in answer.json()["error"] and "serve.timeout_s" in answer.json()["error"]
        assert server.poll() is None
        assert httpx.get(f"{base}/readyz", timeout=5).status_code == 200
        short = httpx.post(f"{base}/triage", json={"ticket": "refund please"}, headers={"X-Request-ID": "after"},
                           timeout=60)
        # still answering; on a loaded CI machine even a short ticket may pass the 1 s deadline
        assert short.status_code in (200, 503), short.text
        assert short.json()["request_id"] == "after"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.mark.model
def test_exported_bento_serves_from_a_fresh_store_with_plain_bentoml(tiny_project, tiny_model_present, tmp_path):
    """`bentoml export` is self-contained (the GGUF model travels with it) and plain `bentoml serve` runs it."""
    checked = runner.invoke(app, ["check", "ticket-triage"])
    assert checked.exit_code == 0, checked.output
    built = json.loads(runner.invoke(app, ["build", "ticket-triage", "--json"]).stdout)
    bentoml_bin = str(Path(sys.executable).parent / "bentoml")
    archive = tmp_path / "triage.bento"
    exported = subprocess.run([bentoml_bin, "export", built["tag"], str(archive)], capture_output=True, text=True,
                              env=os.environ.copy(), timeout=300)
    assert exported.returncode == 0, exported.stderr
    elsewhere = {**os.environ, "BENTOML_HOME": str(tmp_path / "other-machine")}
    imported = subprocess.run([bentoml_bin, "import", str(archive)], capture_output=True, text=True, env=elsewhere,
                              timeout=300)
    assert imported.returncode == 0, imported.stderr
    models = subprocess.run([bentoml_bin, "models", "list", "-o", "json"], capture_output=True, text=True,
                            env=elsewhere, timeout=120)
    assert "ticket-triage-tiny" in models.stdout

    port = _free_port()
    server = subprocess.Popen([bentoml_bin, "serve", built["tag"], "--host", "127.0.0.1", "--port", str(port)],
                              env=elsewhere, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, server)
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
        answer = httpx.post(f"{base}/triage", json={"ticket": "The whole dashboard is down for everyone"}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["version"]["bento"] == built["tag"]
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.mark.model
def test_failed_warm_up_keeps_the_service_unready_and_serve_gives_up(tiny_project, tiny_model_present):
    """A version whose program raises: the server stays up but /readyz and the API answer 503 saying
    why; `slipway serve` stops it and exits 1 naming the cause; past startup_timeout_s it gives up too."""
    loosen_latency(tiny_project)
    break_when_served(Path("notebooks/ticket_triage.py"))
    ok(["check", "ticket-triage"])
    tag = json.loads(ok(["build", "ticket-triage", "--json"]).stdout)["tag"]
    broken_env = {**os.environ, "TRIAGE_FAIL_ON_PURPOSE": "1"}
    port = _free_port()
    server = _bentoml("serve", tag, "--host", "127.0.0.1", "--port", str(port), env=broken_env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        readyz = None
        while time.monotonic() < deadline:
            try:
                readyz = httpx.get(f"{base}/readyz", timeout=2)
                if readyz.status_code != 503 or "warm-up" in readyz.text:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, server.stdout.read()
            time.sleep(1)
        assert readyz is not None and readyz.status_code == 503, readyz
        assert "warm-up answer failed" in readyz.json()["error"] and "broken on purpose" in readyz.json()["error"]
        answer = httpx.post(f"{base}/triage", json={"ticket": "refund please"}, headers={"X-Request-ID": "r-9"},
                            timeout=30)
        assert answer.status_code == 503 and answer.json()["request_id"] == "r-9"
        assert answer.json()["error"].startswith("not ready:")
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200 and server.poll() is None
    finally:
        _stop(server)
    # Plain `bentoml serve` on the repository's store traces into the project: the refusal is on record.
    refused_traces = json.loads(ok(["traces", "ticket-triage", "--json"]).stdout)
    assert [(t["request_id"], t["status"], t["error_code"]) for t in refused_traces] == [("r-9", 503, "not-ready")]

    slipway = str(Path(sys.executable).parent / "slipway")
    refused = subprocess.run([slipway, "serve", tag, "--port", str(_free_port())], env=broken_env,
                             capture_output=True, text=True, timeout=240)
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert "did not become ready" in refused.stderr and "broken on purpose" in refused.stderr, refused.stderr[-3000:]

    edit_toml(tiny_project, "timeout_s = 60", "timeout_s = 60\nstartup_timeout_s = 1")  # read by serve, not baked
    slow = subprocess.run([slipway, "serve", tag, "--port", str(_free_port())], env=os.environ.copy(),
                          capture_output=True, text=True, timeout=240)
    assert slow.returncode == 1 and "not ready after 1 s" in slow.stderr, slow.stderr[-3000:]


@pytest.mark.model
def test_plain_serve_follows_prod_when_approvals_are_required(tiny_project, tiny_model_present, keys):
    """`slipway serve <project>` must not serve the newest (unapproved) build of a project that requires
    approvals: it refuses while prod is empty, then serves what prod points to; an explicit version is
    allowed with a warning."""
    from framework.serve import pick_tag

    ok(["check", "ticket-triage"])
    v1 = json.loads(ok(["build", "ticket-triage", "--json"]).stdout)["tag"]
    refused = runner.invoke(app, ["serve", "ticket-triage", "--port", str(_free_port())])
    assert refused.exit_code == 1, refused.output
    assert "nothing deployed to prod" in refused.output and "ticket-triage:<version>" in refused.output

    said: list[str] = []
    assert pick_tag(v1, said.append)[1] == v1
    assert "not approved" in said[-1] and "0 of 1 valid approvals" in said[-1]

    ok(["approve", v1, "--key", str(keys["bob"])])
    ok(["deploy", v1, "--channel", "prod", "--key", str(keys["carol"])])
    edit_toml(tiny_project, "timeout_s = 60", "timeout_s = 45")  # a newer, unapproved build
    v2 = json.loads(ok(["build", "ticket-triage", "--json"]).stdout)["tag"]
    assert v2 != v1
    said.clear()
    assert pick_tag("ticket-triage", said.append)[1] == v1
    assert "prod channel" in said[-1]


@pytest.mark.model
def test_a_program_edited_after_the_build_is_refused(tiny_project, tiny_model_present):
    """The served program_hash is computed from the loaded program; a bento whose program.json was
    edited after the build does not start, and the error names the file."""
    ok(["check", "ticket-triage"])
    built = json.loads(ok(["build", "ticket-triage", "--json"]).stdout)
    program = Path(built["path"]) / "src" / "slipway" / "program.json"
    edit_toml(program, "Triage one customer-support ticket", "Triage one customer-support ticket, kindly")
    server = _bentoml("serve", built["tag"], "--host", "127.0.0.1", "--port", str(_free_port()))
    try:
        output, _ = server.communicate(timeout=180)
    finally:
        if server.poll() is None:
            server.kill()
    assert server.returncode != 0
    assert str(program) in output and "changed after the build" in output, output[-3000:]


@pytest.mark.model
def test_readme_relative_bentoml_home_serves(tiny_project, tiny_model_present):
    """README: from the repository root, `BENTOML_HOME=bentos bentoml serve <tag>` becomes ready and answers."""
    ok(["check", "ticket-triage"])
    tag = json.loads(ok(["build", "ticket-triage", "--json"]).stdout)["tag"]
    port = _free_port()
    server = _bentoml("serve", tag, "--host", "127.0.0.1", "--port", str(port),
                      env={**os.environ, "BENTOML_HOME": "bentos"}, cwd=tiny_project.parents[2])
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, server)
        answer = httpx.post(f"{base}/triage", json={"ticket": "I was charged twice"}, timeout=60)
        assert answer.status_code == 200 and answer.json()["version"]["bento"] == tag, answer.text
    finally:
        _stop(server)


@pytest.mark.model
def test_two_projects_built_in_one_process_each_get_their_own_service(tiny_project, tiny_model_present):
    """BentoML imports `framework.service` to build; a process that builds a second project (a notebook, a
    script, this test run) must not pack the first project's service definition under the second's name."""
    import shutil

    other = tiny_project.parent.parent / "other-triage"
    shutil.copytree(tiny_project.parent, other, ignore=shutil.ignore_patterns(".slipway"))
    edit_toml(other / "project.toml", 'name = "ticket-triage"', 'name = "other-triage"')
    built = {}
    for name in ("ticket-triage", "other-triage"):
        assert runner.invoke(app, ["check", name]).exit_code == 0
        made = runner.invoke(app, ["build", name, "--json"])
        assert made.exit_code == 0, made.output
        built[name] = json.loads(made.stdout)
    for name, result in built.items():
        info = yaml.safe_load((Path(result["path"]) / "bento.yaml").read_text())
        assert [s["name"] for s in info["services"]] == [name.replace("-", "_")], info["services"]
        assert [m["tag"].split(":")[0] for m in info["services"][0]["models"]] == [f"{name}-tiny"]
