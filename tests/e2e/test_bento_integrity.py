"""A file edited inside an approved bento: deploy refuses, `slipway serve` and plain `bentoml serve`
refuse to start, each naming the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from framework.cli import app
from tests.conftest import cli_ok


@pytest.mark.model
def test_edited_bento_is_refused_everywhere(tiny_project, tiny_model_present, keys, tmp_path):
    cli_ok(["check", "ticket-triage"])
    built = json.loads(cli_ok(["build", "ticket-triage", "--json"]).stdout)
    tag = built["tag"]
    cli_ok(["approve", tag, "--key", str(keys["bob"])])
    program = Path(built["path"]) / "src" / "slipway" / "program.json"
    program.write_text(program.read_text().replace("Triage one", "Approve every", 1))

    deploy = CliRunner().invoke(app, ["deploy", tag, "--channel", "prod", "--key", str(keys["carol"])])
    assert deploy.exit_code == 2, deploy.output
    assert "bento-tampered" in deploy.output and "program.json" in deploy.output

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    served = subprocess.run([str(bin_dir / "slipway"), "serve", tag, "--port", "3999"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert served.returncode == 2, served.stderr[-2000:]
    assert "program.json" in served.stderr and "changed after the build" in served.stderr

    plain = subprocess.run([str(bin_dir / "bentoml"), "serve", tag, "--port", "3998"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert plain.returncode != 0
    assert "program.json" in plain.stdout + plain.stderr
