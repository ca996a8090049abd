"""The notebook is the pipeline: the framework imports the program from it, no copy."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import dspy
import pytest

from framework import NotebookError, load_program, load_project
from framework.notebook import import_notebook, program_hash
from tests.conftest import REPO, edit_toml


def test_program_comes_from_the_notebook_file():
    project = load_project("ticket-triage", root=REPO)
    program = load_program(project, saved=False)
    assert isinstance(program, dspy.Module)
    module = import_notebook(project.notebook_path)
    assert type(program) is module.TicketTriage
    assert Path(module.__file__).resolve() == (REPO / "notebooks" / "ticket_triage.py").resolve()


def test_editing_the_notebook_prompt_changes_the_program_hash(project_root):
    toml = project_root / "projects" / "ticket-triage" / "project.toml"
    before = program_hash(load_program(load_project(str(toml)), saved=False))
    edit_toml(project_root / "notebooks" / "ticket_triage.py", "Triage one customer-support ticket",
              "Triage exactly one customer-support ticket")
    after = program_hash(load_program(load_project(str(toml)), saved=False))
    assert before != after


def test_missing_program_name_is_a_clear_error(toml_path):
    edit_toml(toml_path, 'program = "TicketTriage"', 'program = "TicketTriager"')
    with pytest.raises(NotebookError) as info:
        load_program(load_project(str(toml_path)))
    assert "pipeline.program" in str(info.value) and "TicketTriage" in str(info.value)


def test_broken_notebook_is_a_clear_error(project_root, toml_path):
    edit_toml(project_root / "notebooks" / "ticket_triage.py", "import dspy", "import dspy_typo")
    with pytest.raises(NotebookError, match="importing the notebook failed"):
        load_program(load_project(str(toml_path)))


def test_saved_program_state_is_applied(project_root, toml_path):
    project = load_project(str(toml_path))
    program = load_program(project, saved=False)
    program.triage.demos = [dspy.Example(ticket="x", category="bug", priority="low", needs_human=False,
                                         reason="r")]
    program.save(str(project.saved_program_path))
    loaded = load_program(project)
    assert len(loaded.triage.demos) == 1
    assert program_hash(loaded) != program_hash(load_program(project, saved=False))


@pytest.mark.skipif(shutil.which("marimo", path=str(Path(sys.executable).parent)) is None,
                    reason="marimo CLI not in this venv")
def test_marimo_check_passes():
    marimo = str(Path(sys.executable).parent / "marimo")
    result = subprocess.run([marimo, "check", str(REPO / "notebooks" / "ticket_triage.py")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def _demo():
    return import_notebook(load_project("ticket-triage", root=REPO).notebook_path)


@pytest.mark.parametrize(("category", "priority", "model_says", "routed"), [
    ("bug", "high", True, False),               # an ordinary bug goes to the normal queue
    ("feature_request", "low", True, False),
    ("bug", "urgent", True, True),              # data loss, a security incident: a person
    ("billing", "medium", True, True),          # billing and account keep the model's judgement
    ("account", "low", False, False),
])
def test_the_demo_routes_as_its_labelling_guide_says(category, priority, model_says, routed):
    answer = _demo().route(dspy.Prediction(category=category, reason="card declined, workspace paused",
                                           priority=priority, needs_human=model_says))
    assert answer.needs_human is routed and answer.reason == "card declined, workspace paused"


def test_a_reason_cut_by_the_grammar_keeps_whole_words_and_counts_as_incomplete():
    demo = _demo()
    cut = "time tracking report double-counts hours for tasks with subtask"   # stopped at the limit
    assert len(cut) == demo.REASON_CHARS - 1
    answer = demo.route(dspy.Prediction(category="bug", reason=cut, priority="high", needs_human=False))
    assert answer.reason == "time tracking report double-counts hours for tasks with"
    assert demo.reason_complete(None, answer) == 0.0
    whole = demo.route(dspy.Prediction(category="bug", reason="app crashes on login,", priority="high",
                                       needs_human=False))
    assert whole.reason == "app crashes on login" and demo.reason_complete(None, whole) == 1.0
