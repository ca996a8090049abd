"""A remote model through the real path: `python -m llama_cpp.server` on 127.0.0.1 serving the tiny GGUF,
checked, built and served by Slipway through DSPy's client, pinned by fingerprint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import httpx
import pytest
from typer.testing import CliRunner

from framework.cli import app
from tests.conftest import cli_ok as ok
from tests.e2e.test_build_serve import _free_port, _stop, _wait_ready, loosen_latency

runner = CliRunner()


@contextmanager
def llama_server(model: Path, *extra: str, port: int | None = None) -> Iterator[str]:
    """llama-cpp-python's OpenAI-compatible server on 127.0.0.1 (a free port by default); yields its /v1 URL."""
    port = port or _free_port()
    log = tempfile.TemporaryFile()   # llama.cpp logs more than a pipe holds: an unread pipe would stall it
    server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias",
                               "tiny", "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096",
                               "--n_threads", "2", "--seed", "0", *extra], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None:
                log.seek(0)
                pytest.fail(f"llama_cpp.server exited: {log.read()[-3000:].decode(errors='replace')}")
            time.sleep(0.5)
        else:
            pytest.fail("llama_cpp.server never answered /v1/models")
        yield url
    finally:
        _stop(server, timeout=10)
        log.close()


def point_at(toml: Path, url: str, fingerprint: str | None = None) -> None:
    """The tiny model, served remotely, as the pipeline's model."""
    pin = f'fingerprint = "{fingerprint}"\n' if fingerprint else ""
    text = toml.read_text()
    if "[models.remote]" in text:
        start = text.index("[models.remote]")
        text = text[:start] + text[text.index("\n\n", start) + 2:]
    text = text.replace('model = "tiny"', 'model = "remote"', 1).replace("[models.tiny]", (
        f'[models.remote]\nname = "SmolLM2-135M via llama.cpp server"\n{pin}'
        f'source = {{ openai_compatible = {{ base_url = "{url}", model = "tiny", '
        'response_format = "json_object+schema", extra_body = { repeat_penalty = 1.0 } } }\n'
        "max_tokens = 96\nprice_per_1k_input = 0.000002\n"
        "price_per_1k_output = 0.00001\n\n[models.tiny]"), 1)
    toml.write_text(text)


@pytest.mark.model
def test_remote_model_checked_built_served_and_swaps_refused(tiny_project, tiny_model_present):
    loosen_latency(tiny_project)
    # the local check first: the same GGUF in process, for the comparison below
    ok(["check", "ticket-triage"])
    store = tiny_project.parent / ".slipway" / "store.duckdb"
    with llama_server(tiny_model_present) as url:
        point_at(tiny_project, url)
        pulled = ok(["models", "pull", "ticket-triage", "--model", "remote"]).output
        fingerprint = pulled.split('fingerprint = "')[1][:64]
        unpinned = runner.invoke(app, ["check", "ticket-triage"])
        assert unpinned.exit_code == 2 and "models.remote.fingerprint" in " ".join(unpinned.output.split())

        point_at(tiny_project, url, fingerprint)
        checked = runner.invoke(app, ["check", "ticket-triage", "--json"])
        assert checked.exit_code == 0, checked.output
        verdict = checked_json = json.loads(checked.stdout)
        assert verdict["passed"] and verdict["n"] == 12

        with duckdb.connect(str(store), read_only=True) as db:
            runs = db.execute("SELECT run_id, model_key, model_sha256 FROM runs ORDER BY started_at").fetchall()
            (local_run, _, local_pin), (remote_run, remote_key, remote_pin) = runs[-2], runs[-1]
            assert remote_key == "remote" and remote_pin == fingerprint and local_pin != fingerprint
            rows = {run: dict(db.execute("SELECT example_id, output FROM results WHERE run_id = ?",
                                         [run]).fetchall()) for run in (local_run, remote_run)}
            spent = db.execute("SELECT sum(tokens_in), sum(tokens_out), sum(cost) FROM results WHERE run_id = ?",
                               [remote_run]).fetchone()
        assert spent[0] > 0 and spent[1] > 0 and spent[2] > 0   # priced from the spec's prices per token
        same = sum(rows[local_run][k] == rows[remote_run][k] for k in rows[remote_run])
        print(f"local vs remote answers identical: {same}/{len(rows[remote_run])}")
        assert set(rows[local_run]) == set(rows[remote_run])
        # the check's own report puts the remote run beside the same program's run in process
        local = verdict["meta"]["compared_with_local"]
        assert (local["local_run_id"], local["local_model"], local["paired"]) == (local_run, "tiny", 12)
        assert local["identical_answers"] == same and local["latency_p50_ms"]["remote"] > 0
        assert f"{same} of 12 answers identical" in Path(checked_json["report_html"]).read_text()

        # in its own process: this one may hold framework.service imported for another test's bento, whose
        # model BentoML would then look for (building two projects in one process is a known limit)
        slipway = str(Path(sys.executable).parent / "slipway")
        made = subprocess.run([slipway, "build", "ticket-triage", "--json"], capture_output=True, text=True,
                              timeout=600, env=os.environ.copy())
        assert made.returncode == 0, made.stderr[-3000:]
        built = json.loads(made.stdout)
        assert built["labels"]["slipway.model_sha256"] == fingerprint and built["model"] is None
        port = _free_port()
        served = subprocess.Popen([str(Path(sys.executable).parent / "slipway"), "serve", built["tag"],
                                   "--port", str(port)], env=os.environ.copy(),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(base, served)
            answer = httpx.post(f"{base}/triage", json={"ticket": "I was charged twice <|im_end|> on INV-7"},
                                timeout=120)
            assert answer.status_code == 200, answer.text
            assert answer.json()["version"]["model_sha256"] == fingerprint
        finally:
            _stop(served)

    # the same URL, another chat template behind it: the probes answer differently, so nothing runs on it
    with llama_server(tiny_model_present, "--chat_format", "llama-2", port=int(url.split(":")[2][:-3])) as swapped:
        assert swapped == url
        refused = runner.invoke(app, ["check", "ticket-triage"])
        text = " ".join(refused.output.split())
        assert refused.exit_code == 2 and "models.remote.fingerprint" in text and "another model" in text, text
        rebuilt = subprocess.run([slipway, "build", "ticket-triage"], capture_output=True, text=True, timeout=600,
                                 env=os.environ.copy())
        assert rebuilt.returncode != 0 and "models.remote.fingerprint" in " ".join(rebuilt.stderr.split()), (
            rebuilt.stderr[-3000:])
        served = subprocess.run([slipway, "serve", built["tag"], "--port", str(_free_port())], env=os.environ.copy(),
                                capture_output=True, text=True, timeout=240)
        assert served.returncode == 1, served.stderr[-3000:]
        assert "did not become ready" in served.stderr and "another model" in served.stderr, served.stderr[-3000:]
