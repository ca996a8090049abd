"""The marimo notebook runs top to bottom (as `marimo edit` would) on the real tiny model."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.model
def test_notebook_runs_and_shows_scores_and_verdict(project_root, tiny_model_present, tmp_path):
    marimo = Path(sys.executable).parent / "marimo"
    out = tmp_path / "notebook.html"
    # SLIPWAY_ERROR_ANALYSIS presses the error-analysis button for the first 8 dev examples
    env = {**os.environ, "SLIPWAY_MODEL": "tiny", "SLIPWAY_ERROR_ANALYSIS": "8"}
    result = subprocess.run([str(marimo), "export", "html", "notebooks/ticket_triage.py", "-o", str(out)],
                            cwd=project_root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    html = out.read_text()
    assert "Live dev scores" in html
    assert "Contract verdict on these examples" in html
    assert "category_macro_f1" in html
    # the error-analysis cell ran on the dev split and rendered its parts (the page also holds the notebook's
    # source, so each string below is one only an output contains: a number, or a field name filled in)
    assert "Error analysis: dev split, 8 examples" in html
    assert "Confusion: category" in html and "Confusion: needs_human" in html
    assert re.search(r"Misclassified dev examples\S* \(\d+ shown\)", html)


@pytest.mark.model
def test_opening_the_notebook_does_not_run_the_error_analysis(project_root, tiny_model_present, tmp_path):
    """Without the button pressed, the cell stops and says how to run it (no minutes of model calls)."""
    marimo = Path(sys.executable).parent / "marimo"
    out = tmp_path / "notebook.html"
    env = {k: v for k, v in os.environ.items() if k != "SLIPWAY_ERROR_ANALYSIS"} | {"SLIPWAY_MODEL": "tiny"}
    result = subprocess.run([str(marimo), "export", "html", "notebooks/ticket_triage.py", "-o", str(out)],
                            cwd=project_root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    html = out.read_text()
    assert "Press the button to score the dev split and see where the pipeline fails.\\u003C/em" in html
    assert not re.search(r"Error analysis: dev split, \d+ examples", html) and "Confusion: category" not in html
