"""Import the DSPy program from its marimo notebook: the notebook is the only copy.

A marimo notebook is a plain Python file. Its `app.setup` block and the
`@app.class_definition` / `@app.function` cells are ordinary top-level
definitions, so importing the file gives us the program class without running
any UI cell. When the project holds a saved program (DSPy's JSON save format,
written by `slipway optimize`), its demos and instructions are loaded on top.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from framework.content import program_hash, program_state  # noqa: F401  (re-exported for callers)
from framework.errors import NotebookError
from framework.spec import Project


def import_notebook(path: Path) -> ModuleType:
    """Import a notebook file as a module (cached per path and content)."""
    if not path.exists():
        raise NotebookError("notebook not found", path=str(path), field="pipeline.notebook",
                            hint="fix [pipeline].notebook in project.toml (relative to the repository root)")
    source = path.read_bytes()
    # Keyed on path and content: an edited notebook re-imports, and two copies of one
    # notebook (a test's throw-away project, a bento) never share a module.
    key = hashlib.sha256(str(path.resolve()).encode() + b"\0" + source).hexdigest()[:12]
    name = f"slipway_notebook_{path.stem}_{key}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise NotebookError(f"importing the notebook failed: {type(exc).__name__}: {exc}", path=str(path),
                            hint=f"run `marimo check {path}` and fix the setup cell / definitions") from None
    return module


def program_factory(project: Project):
    module = import_notebook(project.notebook_path)
    name = project.spec.pipeline.program
    factory = getattr(module, name, None)
    if factory is None:
        found = sorted(n for n in vars(module) if not n.startswith("_") and isinstance(vars(module)[n], type))
        raise NotebookError(f"no top-level {name!r} in the notebook", path=str(project.notebook_path),
                            field="pipeline.program",
                            hint=f"define it with @app.class_definition (classes found: {', '.join(found)})")
    return factory


def load_program(project: Project, *, saved: bool = True):
    """A fresh program instance; with the saved state applied when `saved` and present."""
    import dspy

    program = program_factory(project)()
    if not isinstance(program, dspy.Module):
        raise NotebookError(f"{project.spec.pipeline.program} did not produce a dspy.Module",
                            path=str(project.notebook_path), field="pipeline.program")
    if saved and project.saved_program_path.exists():
        try:
            program.load(str(project.saved_program_path))
        except Exception as exc:
            raise NotebookError(f"cannot load the saved program: {exc}", path=str(project.saved_program_path),
                                field="pipeline.saved_program",
                                hint="it no longer matches the notebook's program; re-run `slipway optimize` "
                                     "or delete the file") from None
    return program


def notebook_function(project: Project, name: str):
    """A top-level function of the notebook (used for custom metrics)."""
    module = import_notebook(project.notebook_path)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise NotebookError(f"no function {name!r} in the notebook", path=str(project.notebook_path),
                            field="eval.metrics", hint=f"define `{name}(example, prediction, trace=None)` "
                            "with @app.function")
    return fn


def input_fields(program) -> tuple[str, ...]:
    """Input field names of the program's first predictor (the program's own inputs)."""
    predictors = program.predictors()
    return tuple(predictors[0].signature.input_fields) if predictors else ()


def output_fields(program) -> tuple[str, ...]:
    predictors = program.predictors()
    return tuple(predictors[-1].signature.output_fields) if predictors else ()


def warm_up_inputs(program) -> dict:
    """A harmless request for the program: the warm-up answer, and the build's prefix state, use it."""
    fields = program.predictors()[0].signature.input_fields
    return {name: "Hello, how do I export my data?" if fields[name].annotation is str
            else fields[name].annotation() for name in input_fields(program)}
