"""The marimo notebook runs top to bottom (as `marimo edit` would) on the real tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.model
def test_notebook_runs_and_shows_scores_and_verdict(project_root, tiny_model_present, tmp_path):
    marimo = Path(sys.executable).parent / "marimo"
    out = tmp_path / "notebook.html"
    env = {**os.environ, "SLIPWAY_MODEL": "tiny"}
    result = subprocess.run([str(marimo), "export", "html", "notebooks/ticket_triage.py", "-o", str(out)],
                            cwd=project_root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    html = out.read_text()
    assert "Live dev scores" in html
    assert "Contract verdict on this slice" in html
    assert "category_macro_f1" in html
