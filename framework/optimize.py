"""Compile the notebook's program with a DSPy optimiser on the train split.

The optimiser and its parameters come from [optimize] in project.toml; scores
before and after are measured on the dev split (never on eval, which is kept
for the contract). The result is saved with DSPy's own `Module.save` JSON
format beside project.toml, and eval/check/build load it when present.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from framework.evaluate import adapter, language_model, load_split, run_eval
from framework.metrics import exact_match
from framework.notebook import load_program, notebook_function
from framework.spec import Project


@dataclass
class OptimizeOutcome:
    """Dev-split metrics (all of [eval].metrics) before and after compiling."""

    optimizer: str
    before: dict[str, float]
    after: dict[str, float]
    path: Path
    demos: int
    saved: bool = True
    objective: str = ""
    objective_before: float = float("nan")
    objective_after: float = float("nan")


def _metric_fn(project: Project):
    item = project.spec.optimize.metric
    kind, _, arg = item.partition(":")
    if kind == "notebook":
        return notebook_function(project, arg)
    if kind == "exact_match":
        return lambda example, pred, trace=None: exact_match(example.get(arg), pred.get(arg)) == 1.0
    raise ValueError(f"optimize.metric must be exact_match:<field> or notebook:<fn>, got {item!r}")


def _make_optimizer(project: Project, metric):
    import dspy

    spec = project.spec.optimize
    params = dict(spec.params)
    if spec.optimizer == "LabeledFewShot":
        return dspy.LabeledFewShot(**params)
    if spec.optimizer == "BootstrapFewShot":
        return dspy.BootstrapFewShot(metric=metric, **params)
    if spec.optimizer == "BootstrapFewShotWithRandomSearch":
        return dspy.BootstrapFewShotWithRandomSearch(metric=metric, **params)
    return dspy.MIPROv2(metric=metric, **params)


def objective(project: Project, run) -> float:
    """Mean of the optimiser's own metric over a dev run's records (errors score 0)."""
    import dspy

    metric = _metric_fn(project)
    scores = []
    for record in run.records:
        if record["output"] is None:
            scores.append(0.0)
            continue
        example = dspy.Example(**record["inputs"], **record["expected"])
        scores.append(float(metric(example, dspy.Prediction(**record["output"]), None)))
    return sum(scores) / len(scores) if scores else float("nan")


def optimize(project: Project, *, model_key: str | None = None, dev_limit: int | None = None,
             force: bool = False) -> OptimizeOutcome:
    """Compile, score both programs on dev, and save the compiled one only if it is not worse there.

    An optimiser can overfit a small train split (BootstrapFewShot did, on the demo): keeping the
    baseline unless dev agrees is what stops `optimize` from quietly making the pipeline worse.
    """
    import dspy

    baseline = load_program(project, saved=False)
    trainset = [ex.to_dspy() for ex in load_split(project, "train", baseline)]
    lm = language_model(project, model_key)
    before = run_eval(project, split="dev", limit=dev_limit, program=baseline, model_key=model_key)
    with dspy.context(lm=lm, adapter=adapter(project)):
        compiled = _make_optimizer(project, _metric_fn(project)).compile(load_program(project, saved=False),
                                                                          trainset=trainset)
    after = run_eval(project, split="dev", limit=dev_limit, program=compiled, model_key=model_key)
    objective_before, objective_after = objective(project, before), objective(project, after)
    path = project.saved_program_path
    saved = force or objective_after >= objective_before
    if saved:
        compiled.save(str(path))
    demos = sum(len(p.demos) for p in compiled.predictors())
    return OptimizeOutcome(optimizer=project.spec.optimize.optimizer, before=dict(before.metrics),
                           after=dict(after.metrics), path=path, demos=demos, saved=saved,
                           objective=project.spec.optimize.metric,
                           objective_before=objective_before, objective_after=objective_after)
