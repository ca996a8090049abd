"""Compile the notebook's program with a DSPy optimiser on the train split, within a declared budget.

The optimiser and its parameters come from [optimize] in project.toml (CLI flags override them). On two
CPU cores an optimiser left to its defaults runs for hours, so every model call it makes goes through a
`CallCounter` that ends the run once `max_calls` or `max_minutes` is spent. MIPROv2 and GEPA are also sized
to the budget through their own knobs, so they normally finish on their own; when the counter does cut
a run short, the best program the optimiser had found is kept if it exposes one (BootstrapFewShot's demos
so far, GEPA's best candidate), else nothing is saved.

Scores before and after are measured on the dev split (never on eval, which is kept for the contract),
and the compiled program is saved only when the optimiser's objective improved *significantly* on dev,
under the paired test of `framework.metrics.paired_delta`: one more ticket right out of 110 is noise, and
saving noise would hand `check` a program no better than the one it replaces. `--force` saves anyway and
says so. Every save writes `<saved_program>.meta.json` beside the program (how it was made: optimiser,
budget, dev before/after, the deltas, forced or not, git commit, time) and a signed `optimize` row in the
audit log; a forced save's row carries an `override` reason, so `slipway audit show` prints it in red.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from framework.errors import NotebookError, SpecError
from framework.evaluate import EvalRun, adapter, git_commit, language_model, load_split, run_eval, store_path
from framework.metrics import PairedDelta, exact_match, paired_delta
from framework.notebook import load_program, notebook_function, output_fields
from framework.spec import OptimizeSpec, Project

UNLIMITED_METRIC_CALLS = 10**9  # GEPA insists on a number; with only max_minutes set, the time stopper ends it


class BudgetSpent(BaseException):  # noqa: N818 - it is a signal, like KeyboardInterrupt, not an error
    """Raised by the call counter inside the optimiser once the budget is used up.

    A BaseException, not an Exception: DSPy's optimisers and its parallel evaluator catch Exception per
    example (a failed example is a measurement to them), which would turn "stop" into "skip this one"
    and let the run go on. This way it unwinds the whole `compile` to `optimize`, which catches it.
    """


@dataclass(frozen=True)
class Step:
    """One progress report: the phase, and how far it is (model calls while compiling, examples while
    scoring dev). `total` is None when nothing bounds the count (no max_calls)."""

    phase: str              # "compile", "dev before" or "dev after"
    done: int
    total: int | None
    elapsed_s: float
    max_s: float | None = None


Progress = Callable[[Step], None]


class CallCounter:
    """Counts the model calls an optimiser makes and ends its run once the budget is spent.

    `charge()` runs before each call: the call after the last allowed one (or any call once the time is
    up) raises `BudgetSpent` instead of reaching the model, so `calls` never exceeds `max_calls`. Time is
    checked between calls: a call in flight when the minutes run out finishes.
    """

    def __init__(self, max_calls: int | None, max_minutes: float | None, progress: Progress | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.max_calls = max_calls
        self.max_s = max_minutes * 60 if max_minutes else None
        self.calls = 0
        self.stopped: str | None = None  # why the budget ended the run, once it has
        self.progress = progress
        self._clock = clock
        self._start = clock()
        self._lock = threading.Lock()

    @property
    def elapsed_s(self) -> float:
        return self._clock() - self._start

    def left(self) -> int | None:
        """Calls still allowed (None: no call budget)."""
        return None if self.max_calls is None else self.max_calls - self.calls

    def out_of_time(self) -> bool:
        return self.max_s is not None and self.elapsed_s >= self.max_s

    def charge(self) -> None:
        with self._lock:
            if self.stopped is None and self.max_calls is not None and self.calls >= self.max_calls:
                self.stopped = f"all {self.max_calls} model calls were used"
            elif self.stopped is None and self.out_of_time():
                self.stopped = f"{self.max_s / 60:g} minutes passed"
            if self.stopped is not None:
                raise BudgetSpent(self.stopped)
            self.calls += 1
            step = Step("compile", self.calls, self.max_calls, self.elapsed_s, self.max_s)
        if self.progress is not None:
            self.progress(step)


class CountingEngine:
    """A DSPy engine that charges each call to a `CallCounter`, then hands it to the real engine.

    Counting at the engine sees every call whatever route it takes through DSPy (predictors, GEPA's
    reflection, MIPROv2's proposer, copies of the LM made with `lm.copy(...)`), and a DSPy callback could
    not stop a run: DSPy logs and swallows exceptions raised in callbacks.
    """

    def __init__(self, engine, counter: CallCounter):
        self.engine = engine
        self.counter = counter

    def complete(self, request):
        self.counter.charge()
        return self.engine.complete(request)

    def stream(self, request):
        self.counter.charge()
        return self.engine.stream(request)

    def __getattr__(self, name: str):
        return getattr(self.engine, name)  # capabilities (supports_response_schema, …) are the real engine's


def counted_lm(lm, counter: CallCounter):
    """A copy of the `dspy.LM` `lm` whose calls are charged to `counter`; `lm` itself (which scores dev)
    stays uncounted."""
    return lm.copy(engine=CountingEngine(lm.engine, counter))


# -- the objective ------------------------------------------------------------------------------------------

def score_of(value: Any) -> float:
    """A metric's result as a number: a bool, a float, or a `dspy.Prediction(score=...)` (GEPA's form)."""
    return float(getattr(value, "score", value))


def metric_fn(project: Project, item: str):
    """The optimiser's metric `(example, prediction, trace=None)` from `exact_match:<field>` or
    `notebook:<function>`."""
    kind, _, arg = item.partition(":")
    if kind == "notebook":
        try:
            return notebook_function(project, arg)
        except NotebookError as exc:
            raise NotebookError(exc.message, path=exc.path, field="optimize.metric", hint=exc.hint) from None

    def matches(example, prediction, trace=None) -> bool:
        return exact_match(example.get(arg), prediction.get(arg)) == 1.0
    return matches


def feedback_metric(metric, fields: tuple[str, ...]):
    """The project's metric in the five-argument form GEPA calls, returning a score and feedback text:
    GEPA's reflection model learns more from "expected category=billing, got category=bug" than from 0."""
    import dspy

    def scored(gold, pred, trace=None, pred_name=None, pred_trace=None):
        value = score_of(metric(gold, pred, trace))
        expected = ", ".join(f"{name}={gold.get(name)}" for name in fields)
        got = ", ".join(f"{name}={pred.get(name) if pred is not None else None}" for name in fields)
        verdict = "right" if value >= 1 else "wrong"
        return dspy.Prediction(score=value, feedback=f"{verdict}: expected {expected}; got {got}")
    return scored


def objective_scores(metric, run: EvalRun) -> dict[str, float]:
    """The optimiser's metric per dev example (by example id) of a scored run; an error or a blocked
    example scores 0, as in every other metric."""
    import dspy

    scores = {}
    for record in run.records:
        if record["output"] is None:
            scores[record["example_id"]] = 0.0
            continue
        example = dspy.Example(**record["inputs"], **record["expected"])
        scores[record["example_id"]] = score_of(metric(example, dspy.Prediction(**record["output"]), None))
    return scores


def objective_delta(old: dict[str, float], new: dict[str, float], *, samples: int) -> PairedDelta:
    """Paired test of the objective over the examples both runs scored."""
    shared = [key for key in new if key in old]
    return paired_delta([old[k] for k in shared], [new[k] for k in shared], samples=samples)


def improved(delta: PairedDelta) -> bool:
    """The save rule: the objective went up on dev, and the paired test says it is not noise (p < 0.05)."""
    return delta.significant and delta.delta > 0


def describe(delta: PairedDelta) -> str:
    low, high = delta.interval
    return (f"{delta.old:.3f} → {delta.new:.3f}, {delta.delta:+.3f} on {delta.n} dev examples "
            f"(95% interval {low:+.3f} to {high:+.3f}, p = {delta.p_value:.3g})")


def decide(delta: PairedDelta, force: bool) -> tuple[bool, bool, str]:
    """(save, forced, why). `forced`: --force saved what the rule alone would not have."""
    if improved(delta):
        return True, False, f"significant improvement of the objective: {describe(delta)}"
    if force:
        return True, True, f"saved with --force although not a significant improvement: {describe(delta)}"
    return False, False, (f"not a significant improvement of the objective: {describe(delta)}; the current "
                          "program stays (--force saves it anyway, and records that it did)")


# -- the optimisers and their budgets -----------------------------------------------------------------------

def effective_spec(project: Project, **overrides) -> OptimizeSpec:
    """[optimize] with the CLI's options laid over it (None: not given), validated like project.toml.

    `params` are keyword arguments of [optimize].optimizer: with another optimiser named on the command
    line they are dropped (BootstrapFewShot's max_rounds means nothing to GEPA).
    """
    data = project.spec.optimize.model_dump(exclude_unset=True)
    data.update({key: value for key, value in overrides.items() if value is not None})
    if data.get("optimizer", "LabeledFewShot") != project.spec.optimize.optimizer:
        data.pop("params", None)
    try:
        return OptimizeSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(part) for part in ("optimize", *err["loc"]))
        raise SpecError(err["msg"].removeprefix("Value error, "), path=str(project.toml_path), field=where,
                        hint="fix it under [optimize] in project.toml, or the matching `slipway optimize` "
                             "option (--optimizer, --max-calls, --max-minutes, --train-limit, --dev-limit)"
                        ) from None


def train_sample(examples: list, limit: int | None, stratify: tuple[str, ...] = ()) -> list:
    """A fixed (seeded) sample of `limit` examples, in an order that mixes labels.

    The splits are written in blocks by label, and few-shot optimisers take demos from the front: in file
    order the demos would all be billing tickets. With `stratify` (expected fields, or `tags` for an
    example's first tag) the order deals one example from each group in turn, so the first N demos an
    optimiser keeps cover the categories and slices; without it the order is a seeded shuffle.
    """
    rng = random.Random(0)
    if limit is not None and limit < len(examples):
        examples = [examples[i] for i in sorted(rng.sample(range(len(examples)), limit))]
    if not stratify:
        return rng.sample(examples, len(examples))
    groups: dict[tuple, list] = {}
    for ex in examples:
        key = tuple(str((ex.tags[:1] or ("untagged",))[0]) if f == "tags" else str(ex.expected.get(f))
                    for f in stratify)
        groups.setdefault(key, []).append(ex)
    queues = [rng.sample(members, len(members)) for _, members in sorted(groups.items())]
    rng.shuffle(queues)
    order = []
    while any(queues):
        order.extend(queue.pop() for queue in queues if queue)
    return order


def split_for_validation(examples: list) -> tuple[list, list]:
    """(train, val) for optimisers that score candidates on held-out examples (MIPROv2, GEPA): the last
    third of the train sample, so dev stays untouched until the before/after comparison."""
    cut = len(examples) - max(1, len(examples) // 3)
    return examples[:cut], examples[cut:]


@dataclass
class Plan:
    """An optimiser ready to compile: its compile() keywords, how the budget was mapped onto its own
    knobs (for the report and the provenance file), and GEPA's stopper (which sees its state)."""

    optimizer: Any
    compile_kwargs: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    stopper: GepaStopper | None = None


class GepaStopper:
    """GEPA's own stop check, run between its iterations.

    It stops GEPA when the time is up or when the next iteration might not fit the calls left (a
    reflection minibatch run with traces, one reflection call per predictor, the new candidate on the
    minibatch, and the valset if it is accepted), so GEPA ends cleanly with its best candidate instead
    of being cut mid-iteration. It also keeps GEPA's latest state: if the counter does cut the run, the
    best candidate so far is still known.
    """

    def __init__(self, counter: CallCounter, reserve: int):
        self.counter = counter
        self.reserve = reserve
        self.state = None

    def __call__(self, gepa_state) -> bool:
        self.state = gepa_state
        left = self.counter.left()
        return self.counter.out_of_time() or (left is not None and left < self.reserve)


def _too_small(spec: OptimizeSpec, project: Project, needed: int, what: str) -> SpecError:
    return SpecError(f"max_calls = {spec.max_calls} is too small for {spec.optimizer} here: {what} needs about "
                     f"{needed} model calls", path=str(project.toml_path), field="optimize.max_calls",
                     hint=f"raise it to at least {needed} (--max-calls), or lower train_limit (--train-limit)")


def _mipro_plan(project: Project, spec: OptimizeSpec, metric, lm, trainset: list, n_predictors: int) -> Plan:
    """MIPROv2 sized to max_calls: auto off, few candidates, and as many trials as the calls left after
    bootstrapping and instruction proposal allow (DSPy's own estimate of each step, as an upper bound)."""
    import importlib.util

    import dspy

    if importlib.util.find_spec("optuna") is None:
        raise SpecError("MIPROv2 needs optuna, which is not installed", path=str(project.toml_path),
                        field="optimize.optimizer", hint="pip install optuna (DSPy's `dspy[optuna]` extra), "
                                                         "or pick another optimiser")
    if len(trainset) < 3:
        raise SpecError(f"MIPROv2 needs at least 3 train examples, got {len(trainset)}", path=str(project.toml_path),
                        field="optimize.train_limit", hint="raise train_limit (--train-limit)")
    params = dict(spec.params)
    train, val = split_for_validation(trainset)
    if spec.max_calls is None:  # no call budget: DSPy's light preset; max_minutes (if set) still ends it
        params.setdefault("auto", "light")
        return Plan(dspy.MIPROv2(metric=metric, task_model=lm, prompt_model=lm, **params),
                    {"trainset": train, "valset": val}, f"auto={params['auto']}")
    if params.get("auto") is not None:
        raise SpecError("params.auto and max_calls both size MIPROv2", path=str(project.toml_path),
                        field="optimize.params", hint="remove auto from params: with max_calls Slipway sizes the run")
    candidates = int(params.pop("num_candidates", 3))
    bootstrapped = int(params.get("max_bootstrapped_demos", 4))
    minibatch = min(len(val), 10)
    steps = 5
    # DSPy builds candidates-2 bootstrapped demo sets (besides zero-shot and labelled-only), each walking
    # the train part until enough demos pass; proposal is its own estimate (MIPROv2._estimate_lm_calls)
    bootstrap = max(0, candidates - 2) * len(train) if bootstrapped else 0
    proposal = 10 + candidates * n_predictors + n_predictors + 1
    fixed = bootstrap + proposal + len(val)

    def cost(trials: int) -> int:
        return fixed + trials * minibatch + (trials // steps + 1) * len(val)
    if cost(1) > spec.max_calls:
        raise _too_small(spec, project, cost(1), f"one trial ({candidates} candidates, {len(train)} train and "
                                                 f"{len(val)} validation examples)")
    trials = 1
    while cost(trials + 1) <= spec.max_calls and trials < 100:
        trials += 1
    params["auto"] = None
    optimizer = dspy.MIPROv2(metric=metric, task_model=lm, prompt_model=lm, num_candidates=candidates, **params)
    kwargs = {"trainset": train, "valset": val, "num_trials": trials, "minibatch_size": minibatch,
              "minibatch_full_eval_steps": steps}
    return Plan(optimizer, kwargs, f"auto=None, num_candidates={candidates}, num_trials={trials}, "
                                   f"minibatch_size={minibatch} (about {cost(trials)} calls planned)")


def _gepa_plan(project: Project, spec: OptimizeSpec, metric, lm, counter: CallCounter, trainset: list,
               program) -> Plan:
    """GEPA with its budget knob (max_metric_calls) set from max_calls, a stopper that keeps it inside the
    counted budget, and the project's own local model as the reflection model (nothing leaves the machine)."""
    import dspy

    if len(trainset) < 2:
        raise SpecError(f"GEPA needs at least 2 train examples, got {len(trainset)}", path=str(project.toml_path),
                        field="optimize.train_limit", hint="raise train_limit (--train-limit)")
    params = dict(spec.params)
    train, val = split_for_validation(trainset)
    minibatch = int(params.setdefault("reflection_minibatch_size", min(3, len(train))))
    reserve = 2 * minibatch + len(program.predictors()) + len(val)
    if spec.max_calls is not None and spec.max_calls < len(val) + reserve:
        raise _too_small(spec, project, len(val) + reserve, f"scoring the {len(val)} validation examples and one "
                                                            "reflection step")
    stopper = GepaStopper(counter, reserve)
    fields = tuple(name for name in output_fields(program) if name in train[0].labels())
    reflection = lm.copy(max_tokens=max(lm.kwargs.get("max_tokens") or 0, 1024))  # a new instruction is long
    optimizer = dspy.GEPA(metric=feedback_metric(metric, fields), max_metric_calls=spec.max_calls or
                          UNLIMITED_METRIC_CALLS, reflection_lm=reflection, gepa_kwargs={"stop_callbacks": [stopper]},
                          **params)
    return Plan(optimizer, {"trainset": train, "valset": val}, f"max_metric_calls={spec.max_calls or 'unbounded'}, "
                f"reflection_minibatch_size={minibatch}, {len(train)} train / {len(val)} validation examples",
                stopper)


def _make_optimizer(project: Project, spec: OptimizeSpec, metric, lm, counter: CallCounter, trainset: list,
                    program) -> Plan:
    import dspy

    params = dict(spec.params)
    try:
        if spec.optimizer == "LabeledFewShot":
            return Plan(dspy.LabeledFewShot(**params), {"trainset": trainset})
        if spec.optimizer == "BootstrapFewShot":
            return Plan(dspy.BootstrapFewShot(metric=metric, **params), {"trainset": trainset})
        if spec.optimizer == "BootstrapFewShotWithRandomSearch":
            return Plan(dspy.BootstrapFewShotWithRandomSearch(metric=metric, **params), {"trainset": trainset})
        if spec.optimizer == "MIPROv2":
            return _mipro_plan(project, spec, metric, lm, trainset, len(program.predictors()))
        return _gepa_plan(project, spec, metric, lm, counter, trainset, program)
    except TypeError as exc:  # a key in params the optimiser does not take
        raise SpecError(f"dspy.{spec.optimizer} does not take these params: {exc}", path=str(project.toml_path),
                        field="optimize.params", hint=f"see the keyword arguments of dspy.{spec.optimizer}") from None


def best_so_far(plan: Plan, student):
    """The best program an optimiser had found when the budget cut it short, where it exposes one:
    BootstrapFewShot's demos bootstrapped so far, GEPA's best-scoring candidate. None otherwise (MIPROv2
    and random search keep theirs in local variables)."""
    import dspy

    optimizer = plan.optimizer
    if isinstance(optimizer, dspy.BootstrapFewShot) and any(getattr(optimizer, "name2traces", {}).values()):
        optimizer.validation = getattr(optimizer, "validation", [])  # labelled extras: unknown this early
        return optimizer._train()
    state = plan.stopper.state if plan.stopper is not None else None
    if state is not None and state.program_candidates:
        scores = state.program_full_scores_val_set
        candidate = state.program_candidates[max(range(len(scores)), key=scores.__getitem__)]
        program = student.deepcopy()
        for name, predictor in program.named_predictors():
            if name in candidate:
                predictor.signature = predictor.signature.with_instructions(candidate[name])
        return program
    return None


def compile_within_budget(project: Project, plan: Plan, student, lm):
    """(compiled program or None, whether the budget cut the run short); `lm` is the counted one. DSPy's
    optimisers print to stdout: that goes to stderr here, so `--json` output stays JSON."""
    import dspy

    with dspy.context(lm=lm, adapter=adapter(project)), contextlib.redirect_stdout(sys.stderr):
        try:
            return plan.optimizer.compile(student, **plan.compile_kwargs), False
        except BudgetSpent:
            return best_so_far(plan, student), True


# -- the outcome, the save and its record -------------------------------------------------------------------

@dataclass
class OptimizeOutcome:
    """What `slipway optimize` did: the dev split before and after (all of [eval].metrics, each with its
    paired delta, and the optimiser's objective), the budget used, and whether the program was saved."""

    optimizer: str
    path: Path
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    demos: int = 0
    instructions_changed: int = 0
    saved: bool = False
    forced: bool = False
    why: str = ""
    objective: str = ""
    objective_before: float = math.nan
    objective_after: float = math.nan
    objective_delta: dict[str, Any] | None = None   # PairedDelta.to_dict(): delta, interval, p_value, significant
    deltas: list[dict[str, Any]] = field(default_factory=list)  # per [eval] metric, as the review shows them
    calls: int = 0
    max_calls: int | None = None
    max_minutes: float | None = None
    elapsed_s: float = 0.0
    budget_spent: bool = False          # the counter cut the optimiser short
    plan: str = ""                      # how the budget was mapped onto the optimiser's own knobs
    train_n: int = 0
    dev_n: int = 0
    provenance: Path | None = None      # <saved_program>.meta.json, written on every save
    audit_seq: int | None = None        # the signed `optimize` row, on every save

    def to_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer, "saved": self.saved, "forced": self.forced, "why": self.why,
                "dev_before": self.before, "dev_after": self.after, "deltas": self.deltas,
                "objective": self.objective, "objective_before": self.objective_before,
                "objective_after": self.objective_after, "objective_delta": self.objective_delta,
                "demos": self.demos, "instructions_changed": self.instructions_changed,
                "budget": {"max_calls": self.max_calls, "max_minutes": self.max_minutes, "calls": self.calls,
                           "elapsed_s": round(self.elapsed_s, 3), "spent": self.budget_spent, "plan": self.plan},
                "train_n": self.train_n, "dev_n": self.dev_n, "path": str(self.path),
                "provenance": str(self.provenance) if self.provenance else None, "audit_seq": self.audit_seq}


def provenance_path(saved_program: Path) -> Path:
    """`program.json` → `program.meta.json`: how the saved program was made, beside it."""
    return saved_program.with_suffix(".meta.json")


def _instructions_changed(student, compiled) -> int:
    before = {name: p.signature.instructions for name, p in student.named_predictors()}
    return sum(1 for name, p in compiled.named_predictors() if before.get(name) != p.signature.instructions)


def _provenance(project: Project, spec: OptimizeSpec, outcome: OptimizeOutcome, model_key: str,
                runs: tuple[EvalRun, EvalRun]) -> dict[str, Any]:
    from framework.content import file_hash

    model = project.model(model_key)
    return {"v": 1, "project": project.name, "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "git_commit": git_commit(project.root), "program_sha256": file_hash(outcome.path),
            "optimizer": spec.optimizer, "metric": spec.metric, "params": spec.params,
            "model": {"key": model_key, "name": model.name, "sha256": model.identity},
            "train_limit": spec.train_limit, "dev_limit": spec.dev_limit,
            "dev_runs": {"before": runs[0].run_id, "after": runs[1].run_id}, **outcome.to_dict()}


def _rounded(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else round(value, 4)


def _audit(project: Project, provenance: dict[str, Any], key: Path) -> int:
    """A signed `optimize` row; a forced save carries an `override` reason, which the audit view marks."""
    from framework import audit, signing
    from framework.store import Store

    delta = provenance["objective_delta"] or {}
    details = {"optimizer": provenance["optimizer"], "program": Path(provenance["path"]).name,
               "program_sha256": provenance["program_sha256"], "forced": provenance["forced"],
               "objective": provenance["objective"], "delta": _rounded(delta.get("delta")),
               "p_value": _rounded(delta.get("p_value")),
               "calls": provenance["budget"]["calls"], "git_commit": provenance["git_commit"],
               "override": provenance["why"] if provenance["forced"] else None}
    signed = signing.sign(audit.statement(project.name, "optimize", project.name, details), key)
    signer = signing.verify(signed, signing.load_signers(project.dir))
    with Store(store_path(project)) as store, store.transaction():
        row = audit.append(store, signed, signer.name if signer else signed.fingerprint)
    return int(row["seq"])


def _save(project: Project, spec: OptimizeSpec, outcome: OptimizeOutcome, compiled, model_key: str,
          runs: tuple[EvalRun, EvalRun], key: Path) -> None:
    compiled.save(str(outcome.path))
    outcome.provenance = provenance_path(outcome.path)
    data = _provenance(project, spec, outcome, model_key, runs)
    outcome.audit_seq = data["audit_seq"] = _audit(project, data, key)
    outcome.provenance.write_text(json.dumps(data, indent=2, default=str) + "\n")


def _dev_run(project: Project, phase: str, program, model_key: str | None, limit: int | None,
             progress: Progress | None) -> EvalRun:
    start = time.monotonic()

    def report(done: int, total: int) -> None:
        if progress is not None:
            progress(Step(phase, done, total, time.monotonic() - start))
    return run_eval(project, split="dev", limit=limit, program=program, model_key=model_key, progress=report)


def optimize(project: Project, *, model_key: str | None = None, optimizer: str | None = None,
             max_calls: int | None = None, max_minutes: float | None = None, train_limit: int | None = None,
             dev_limit: int | None = None, force: bool = False, progress: Progress | None = None,
             key: Path | None = None) -> OptimizeOutcome:
    """Compile on train within the budget, score the current and the compiled program on dev, and save the
    compiled one only when the objective's paired improvement is significant (or with `force`).

    "Current" is what eval and check use now: the saved program if there is one, else the notebook's.
    Keyword options override [optimize]; None keeps what project.toml says.
    """
    from framework import signing
    from framework.review import metric_deltas

    spec = effective_spec(project, optimizer=optimizer, max_calls=max_calls, max_minutes=max_minutes,
                          train_limit=train_limit, dev_limit=dev_limit)
    model_key = model_key or project.spec.pipeline.model
    key_path = signing.find_key(key, create=True)  # before minutes of compiling: a missing key fails now
    metric = metric_fn(project, spec.metric)
    student = load_program(project, saved=False)
    trainset = [ex.to_dspy() for ex in train_sample(load_split(project, "train", student), spec.train_limit,
                                                     tuple(spec.stratify))]
    base = language_model(project, model_key)  # loaded before the clock starts
    counter = CallCounter(spec.max_calls, spec.max_minutes, progress)
    lm = counted_lm(base, counter)  # dev scoring below uses its own LM: uncounted
    plan = _make_optimizer(project, spec, metric, lm, counter, trainset, student)
    compiled, cut_short = compile_within_budget(project, plan, student, lm)
    outcome = OptimizeOutcome(optimizer=spec.optimizer, path=project.saved_program_path, objective=spec.metric,
                              calls=counter.calls, max_calls=spec.max_calls, max_minutes=spec.max_minutes,
                              elapsed_s=counter.elapsed_s, budget_spent=cut_short, plan=plan.note,
                              train_n=len(trainset))
    if compiled is None:
        outcome.why = f"budget spent before the optimiser finished ({counter.stopped}): nothing saved"
        return outcome
    outcome.demos = sum(len(p.demos) for p in compiled.predictors())
    outcome.instructions_changed = _instructions_changed(student, compiled)
    before = _dev_run(project, "dev before", load_program(project), model_key, spec.dev_limit, progress)
    after = _dev_run(project, "dev after", compiled, model_key, spec.dev_limit, progress)
    samples = project.spec.eval.bootstrap_samples
    old = {r["example_id"]: r for r in before.records}
    new = {r["example_id"]: r for r in after.records}
    _, outcome.deltas = metric_deltas(old, new, project.spec.eval.metrics, samples=samples)
    delta = objective_delta(objective_scores(metric, before), objective_scores(metric, after), samples=samples)
    outcome.before, outcome.after, outcome.dev_n = dict(before.metrics), dict(after.metrics), delta.n
    outcome.objective_before, outcome.objective_after = delta.old, delta.new
    outcome.objective_delta = delta.to_dict()
    outcome.saved, outcome.forced, outcome.why = decide(delta, force)
    if cut_short:
        outcome.why = f"the budget cut the optimiser short ({counter.stopped}); its best program so far: {outcome.why}"
    if outcome.saved:
        _save(project, spec, outcome, compiled, model_key, (before, after), key_path)
    return outcome
