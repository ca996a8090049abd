"""`slipway optimize`: a DSPy optimiser on train within a counted budget, dev before/after with the paired
test, and a save only when the objective's improvement is significant (or forced, and recorded)."""

from __future__ import annotations

import importlib
import json
import threading

import dspy
import pytest
from typer.testing import CliRunner

from framework import load_program, load_project
from framework.cli import app
from framework.dataset import load_examples
from framework.errors import SpecError
from framework.lm import CallStats, respond
from framework.notebook import program_hash
from framework.spec import parse_spec
from tests.conftest import TINY, edit_toml

# framework/__init__ re-exports functions named like these modules; patch the modules themselves
optimize_module = importlib.import_module("framework.optimize")
evaluate = importlib.import_module("framework.evaluate")


# -- fakes: no model is loaded by any test below the model-marked ones -----------------------------------------

def fill(schema: dict, defs: dict | None = None):
    """A JSON value that fits `schema`: the first enum value, "fake" for strings, false, 0, []."""
    defs = schema.get("$defs", {}) if defs is None else defs
    if "$ref" in schema:
        return fill(defs[schema["$ref"].split("/")[-1]], defs)
    if "enum" in schema:
        return schema["enum"][0]
    if "anyOf" in schema:
        return fill(schema["anyOf"][0], defs)
    if schema.get("type") == "object":
        return {name: fill(prop, defs) for name, prop in schema.get("properties", {}).items()}
    return {"boolean": False, "integer": 0, "number": 0.0, "array": [], "null": None}.get(schema.get("type"), "fake")


class FakeEngine:
    """A DSPy engine that answers every call without a model: JSON fitting the call's response schema, so
    the project's JSON adapter parses it (triage answers are billing/low/false). Counts what reaches it."""

    supports_response_schema = True
    supports_function_calling = False
    supports_reasoning = False
    supported_params = frozenset({"response_format", "temperature", "max_tokens", "stop", "seed", "top_p"})

    def __init__(self):
        self.calls = 0
        self.lock = threading.Lock()

    def complete(self, request):
        with self.lock:
            self.calls += 1
        fmt = request.config.response_format or {}
        schema = fmt.get("schema") if fmt.get("type") == "json_schema" else None
        text = json.dumps(fill(schema)) if schema else "fake"
        return respond("fake", text, CallStats(1.0, 10, 0, 5, "stop"), schema)

    def stream(self, request):
        from dspy.lm15 import response_to_events

        return response_to_events(self.complete(request))


def fake_lm(engine: FakeEngine | None = None):
    return dspy.LM(model="fake/fake", engine=engine or FakeEngine(), cache=False, num_retries=0, max_tokens=96)


class FakeLabelledTriage(dspy.Module):
    """Answers each dev ticket from its labels, except the tickets in `wrong` (a wrong category); never
    calls a model."""

    def __init__(self, inner, answers: dict[str, dict], wrong: frozenset[str] = frozenset()):
        super().__init__()
        self.inner = inner  # the notebook's program, so predictors() and the output fields are the real ones
        self.answers = answers
        self.wrong = wrong

    def forward(self, ticket):
        answer = dict(self.answers[ticket])
        if ticket in self.wrong:
            answer["category"] = "abuse" if answer["category"] != "abuse" else "billing"
        return dspy.Prediction(**answer, reason="from the labels")


class FakeOptimizer:
    """Compiles the student into a labelled program that gets the tickets in `wrong` wrong."""

    def __init__(self, answers, wrong: frozenset[str]):
        self.answers, self.wrong = answers, wrong

    def compile(self, student, trainset=None):
        return FakeLabelledTriage(student.inner, self.answers, self.wrong)


class FakeLoopingOptimizer:
    """An optimiser that wants more than any budget: it calls the model until something stops it, from
    `threads` threads through DSPy's own parallel executor (which catches Exception per item)."""

    def __init__(self, threads: int = 1):
        self.threads = threads

    def compile(self, student, trainset=None):
        from dspy.utils.parallelizer import ParallelExecutor

        def ask(i):
            return dspy.settings.lm(f"question {i}")
        while True:
            ParallelExecutor(num_threads=self.threads, disable_progress_bar=True).execute(ask, list(range(20)))


def dev_answers(project) -> tuple[dict[str, dict], list[str]]:
    examples = load_examples(project.split_path("dev"), input_fields=("ticket",))
    return {ex.inputs["ticket"]: ex.expected for ex in examples}, [ex.inputs["ticket"] for ex in examples]


def no_model(monkeypatch):
    """Every model the run would load is a FakeEngine; the guardrails' tokenizer is not loaded either."""
    monkeypatch.setattr(optimize_module, "language_model", lambda *a, **k: fake_lm())
    monkeypatch.setattr(evaluate, "language_model", lambda *a, **k: fake_lm())
    monkeypatch.setattr(evaluate, "project_guard", lambda *a, **k: None)


def fake_labelled(monkeypatch, project, before_wrong: int, after_wrong: int):
    """The current program gets the first `before_wrong` dev tickets wrong; the compiled one the first
    `after_wrong`."""
    answers, tickets = dev_answers(project)
    real_load_program = optimize_module.load_program
    monkeypatch.setattr(optimize_module, "load_program", lambda p, saved=True: FakeLabelledTriage(
        real_load_program(p, saved=False), answers, frozenset(tickets[:before_wrong])))
    monkeypatch.setattr(optimize_module, "_make_optimizer", lambda *a, **k: optimize_module.Plan(
        FakeOptimizer(answers, frozenset(tickets[:after_wrong]))))
    no_model(monkeypatch)
    return len(tickets)


def audit_rows(project):
    from framework.store import Store

    with Store(evaluate.store_path(project), read_only=True) as store:
        return [r for r in store.audit_rows() if r["action"] == "optimize"]


# -- the save rule ----------------------------------------------------------------------------------------------

def test_one_more_ticket_right_out_of_110_is_not_saved(toml_path, monkeypatch):
    """The rule, without --force: a gain the paired test cannot tell from noise leaves the program alone."""
    project = load_project(str(toml_path))
    n = fake_labelled(monkeypatch, project, before_wrong=20, after_wrong=19)
    outcome = optimize_module.optimize(project, model_key=TINY)
    assert n == outcome.dev_n == 110
    # the fake gets one more ticket's category right: a third of triage_match (category, needs_human, band)
    assert outcome.objective_after - outcome.objective_before == pytest.approx(1 / 3 / 110)
    assert outcome.objective_delta["significant"] is False and outcome.objective_delta["p_value"] > 0.05
    assert not outcome.saved and not outcome.forced
    assert "not a significant improvement" in outcome.why and "95% interval" in outcome.why
    assert not project.saved_program_path.exists()
    assert not optimize_module.provenance_path(project.saved_program_path).exists()
    assert audit_rows(project) == []


def test_a_large_significant_improvement_is_saved_with_its_provenance(toml_path, monkeypatch):
    project = load_project(str(toml_path))
    fake_labelled(monkeypatch, project, before_wrong=30, after_wrong=0)
    outcome = optimize_module.optimize(project, model_key=TINY)
    # 30 more categories right: a third of triage_match each
    assert outcome.objective_delta["significant"] and outcome.objective_delta["delta"] == pytest.approx(30 / 3 / 110)
    assert outcome.saved and not outcome.forced
    assert project.saved_program_path.exists()
    meta = json.loads(optimize_module.provenance_path(project.saved_program_path).read_text())
    assert meta["forced"] is False and meta["saved"] is True and meta["optimizer"] == "BootstrapFewShot"
    assert meta["objective_delta"]["p_value"] < 0.05 and meta["dev_before"] and meta["dev_after"]
    assert {d["metric"] for d in meta["deltas"]} >= {"category_accuracy", "category_macro_f1"}
    assert meta["program_sha256"] and meta["at"] and "git_commit" in meta and meta["budget"]["calls"] == 0
    (row,) = audit_rows(project)
    details = json.loads(row["details"])
    assert details["forced"] is False and details.get("override") is None
    assert details["program_sha256"] == meta["program_sha256"] and meta["audit_seq"] == row["seq"]


def test_a_compiled_program_worse_on_dev_is_not_saved(toml_path, monkeypatch):
    project = load_project(str(toml_path))
    fake_labelled(monkeypatch, project, before_wrong=0, after_wrong=40)
    outcome = optimize_module.optimize(project, model_key=TINY, dev_limit=50)
    # 40 of 50 categories wrong: each costs a third of triage_match
    assert outcome.dev_n == 50 and outcome.objective_before == 1.0
    assert outcome.objective_after == pytest.approx(1 - 40 / 3 / 50)
    assert outcome.objective_delta["significant"] and not outcome.saved
    assert not project.saved_program_path.exists()


def test_force_saves_a_non_significant_gain_and_records_it(toml_path, monkeypatch):
    project = load_project(str(toml_path))
    fake_labelled(monkeypatch, project, before_wrong=20, after_wrong=19)
    result = CliRunner().invoke(app, ["optimize", str(toml_path), "--model", TINY, "--force", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)   # progress went to stderr: stdout is JSON only
    assert data["saved"] is True and data["forced"] is True and "--force" in data["why"]
    assert data["objective_delta"]["significant"] is False and "interval" in data["objective_delta"]
    assert {d["metric"] for d in data["deltas"]} >= {"category_accuracy"}
    meta = json.loads(optimize_module.provenance_path(project.saved_program_path).read_text())
    assert meta["forced"] is True
    (row,) = audit_rows(project)
    assert json.loads(row["details"])["forced"] is True and "--force" in json.loads(row["details"])["override"]


# -- the budget -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("threads", [1, 4])
def test_a_call_budget_stops_an_optimiser_that_wants_more(toml_path, monkeypatch, threads):
    project = load_project(str(toml_path))
    engine = FakeEngine()
    monkeypatch.setattr(optimize_module, "language_model", lambda *a, **k: fake_lm(engine))
    monkeypatch.setattr(optimize_module, "_make_optimizer", lambda *a, **k: optimize_module.Plan(
        FakeLoopingOptimizer(threads)))
    steps = []
    outcome = optimize_module.optimize(project, model_key=TINY, max_calls=7, progress=steps.append)
    assert outcome.calls == 7 == engine.calls and outcome.budget_spent
    assert not outcome.saved and "budget spent before the optimiser finished" in outcome.why
    assert "nothing saved" in outcome.why and not project.saved_program_path.exists()
    assert [s.done for s in steps] == list(range(1, 8)) and {s.total for s in steps} == {7}


def test_a_time_budget_stops_the_run_between_calls():
    ticks = iter(range(0, 1000, 30))   # each look at the clock is 30 s later
    counter = optimize_module.CallCounter(None, 2, clock=lambda: next(ticks))
    with pytest.raises(optimize_module.BudgetSpent, match="2 minutes passed"):
        for _ in range(100):
            counter.charge()
    assert 0 < counter.calls < 5 and counter.stopped
    with pytest.raises(optimize_module.BudgetSpent):   # once spent, every later call is refused
        counter.charge()


def test_bootstrap_cut_short_keeps_the_demos_found_so_far(toml_path, monkeypatch):
    """Real BootstrapFewShot on a FakeEngine (every answer billing/low/false): the first train tickets of
    the sample that are billing ones each bootstrap a demo, until the budget stops it."""
    edit_toml(toml_path, 'metric = "notebook:triage_match"', 'metric = "exact_match:category"')
    project = load_project(str(toml_path))
    no_model(monkeypatch)
    sample = optimize_module.train_sample(load_examples(project.split_path("train"), input_fields=("ticket",)), 30,
                                          tuple(project.spec.optimize.stratify))   # the order optimize uses
    # a budget that ends the run after two billing tickets: fewer demos than the 8 it asks for
    calls = next(n for n in range(1, 31) if sum(ex.expected["category"] == "billing" for ex in sample[:n]) == 2)
    outcome = optimize_module.optimize(project, model_key=TINY, max_calls=calls, train_limit=30, dev_limit=4)
    assert outcome.calls == calls and outcome.budget_spent and outcome.demos == 2
    assert "cut the optimiser short" in outcome.why and not outcome.saved  # same answers before and after


def test_gepa_runs_inside_its_budget_with_feedback_and_the_local_reflection_model(toml_path, monkeypatch):
    """Real GEPA on a FakeEngine: its own budget knob comes from max_calls, the stopper ends it before the
    counter has to, and the reflection model is the project's (counted) model."""
    project = load_project(str(toml_path))
    engine = FakeEngine()
    monkeypatch.setattr(optimize_module, "language_model", lambda *a, **k: fake_lm(engine))
    monkeypatch.setattr(evaluate, "language_model", lambda *a, **k: fake_lm())
    monkeypatch.setattr(evaluate, "project_guard", lambda *a, **k: None)
    plans = []
    real_make = optimize_module._make_optimizer
    monkeypatch.setattr(optimize_module, "_make_optimizer", lambda *a: plans.append(real_make(*a)) or plans[-1])
    outcome = optimize_module.optimize(project, model_key=TINY, optimizer="GEPA", max_calls=40, train_limit=9,
                                       dev_limit=3)
    (plan,) = plans
    assert plan.optimizer.max_metric_calls == 40
    assert isinstance(plan.optimizer.reflection_lm.engine, optimize_module.CountingEngine)
    assert outcome.calls == engine.calls <= 40 and not outcome.budget_spent
    assert plan.stopper.state is not None and outcome.dev_n == 3


def test_gepa_metric_gives_feedback_naming_expected_and_got():
    def all_match(example, prediction, trace=None):
        return example.category == prediction.category and example.priority == prediction.priority

    metric = optimize_module.feedback_metric(all_match, ("category", "priority"))
    gold = dspy.Example(ticket="t", category="billing", priority="low").with_inputs("ticket")
    result = metric(gold, dspy.Prediction(category="bug", priority="low"), None, "triage", [])
    assert result.score == 0.0
    assert result.feedback == "wrong: expected category=billing, priority=low; got category=bug, priority=low"


def test_mipro_is_sized_to_the_call_budget(toml_path, monkeypatch):
    import optuna  # noqa: F401 - a dependency: MIPROv2 searches with it
    project = load_project(str(toml_path))
    engine = FakeEngine()
    monkeypatch.setattr(optimize_module, "language_model", lambda *a, **k: fake_lm(engine))
    monkeypatch.setattr(evaluate, "language_model", lambda *a, **k: fake_lm())
    monkeypatch.setattr(evaluate, "project_guard", lambda *a, **k: None)
    outcome = optimize_module.optimize(project, model_key=TINY, optimizer="MIPROv2", max_calls=80, train_limit=12,
                                       dev_limit=3)
    assert "num_trials=" in outcome.plan and outcome.calls == engine.calls <= 80 and not outcome.budget_spent


def test_a_budget_too_small_for_gepa_fails_before_any_call(toml_path, monkeypatch):
    project = load_project(str(toml_path))
    no_model(monkeypatch)
    with pytest.raises(SpecError) as caught:
        optimize_module.optimize(project, model_key=TINY, optimizer="GEPA", max_calls=3, train_limit=30)
    assert caught.value.field == "optimize.max_calls" and "at least" in caught.value.hint


# -- the spec ---------------------------------------------------------------------------------------------------

def _with_optimize(toml_path, body: str) -> str:
    text = toml_path.read_text()
    start = text.index("[optimize]")
    end = text.index("[serve]")
    return text[:start] + "[optimize]\n" + body + "\n\n" + text[end:]


@pytest.mark.parametrize(("body", "field", "words"), [
    ('optimizer = "BootstrapFewShot"\nmax_calls = 0', "optimize.max_calls", "greater than or equal to 1"),
    ('optimizer = "BootstrapFewShot"\nmax_minutes = -1', "optimize.max_minutes", "greater than 0"),
    ('optimizer = "BootstrapFewShot"\ntrain_limit = 0', "optimize.train_limit", "greater than or equal to 1"),
    ('optimizer = "GEPA"', "optimize", "GEPA needs a budget: set max_calls"),
    ('optimizer = "GEPA"\nmax_calls = 50\nparams = { max_metric_calls = 9 }', "optimize", "max_metric_calls"),
    ('optimizer = "Random"', "optimize.optimizer", "GEPA"),
    ('metric = "accuracy"', "optimize.metric", "exact_match:<field> or notebook:<function>"),
    ('max_call = 5', "optimize.max_call", "unknown key"),
])
def test_optimize_spec_errors_name_the_field(toml_path, body, field, words):
    with pytest.raises(SpecError) as caught:
        parse_spec(_with_optimize(toml_path, body), str(toml_path))
    assert caught.value.field == field and words in caught.value.message


def test_the_demo_optimize_table_still_parses_and_cli_options_override_it(toml_path):
    assert load_project(str(toml_path)).spec.optimize.max_calls == 120
    edit_toml(toml_path, "max_calls = 120", "# no budget")
    project = load_project(str(toml_path))
    assert project.spec.optimize.max_calls is None and project.spec.optimize.optimizer == "BootstrapFewShot"
    spec = optimize_module.effective_spec(project, optimizer="GEPA", max_calls=50, dev_limit=None)
    assert (spec.optimizer, spec.max_calls, spec.metric) == ("GEPA", 50, "notebook:triage_match")
    with pytest.raises(SpecError) as caught:
        optimize_module.effective_spec(project, optimizer="GEPA")
    assert caught.value.field == "optimize" and "--max-calls" in caught.value.hint


# -- the real model (tiny) --------------------------------------------------------------------------------------

@pytest.mark.model
def test_optimize_saves_a_program_that_eval_then_uses(toml_path, tiny_model_present):
    edit_toml(toml_path, 'optimizer = "BootstrapFewShot"', 'optimizer = "LabeledFewShot"')
    edit_toml(toml_path, "params = { max_bootstrapped_demos = 8, max_labeled_demos = 0, max_rounds = 1 }",
              "params = { k = 3 }")
    project = load_project(str(toml_path))
    before_hash = program_hash(load_program(project))
    result = CliRunner().invoke(app, ["optimize", str(toml_path), "--model", TINY, "--dev-limit", "3", "--force",
                                      "--max-calls", "5", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["demos"] == 3 and data["saved"] is True and data["budget"]["calls"] == 0  # labels: no calls
    assert set(data["dev_before"]) == set(data["dev_after"]) >= {"category_accuracy", "category_macro_f1"}
    saved = json.loads(project.saved_program_path.read_text())
    assert len(saved["triage"]["demos"]) == 3  # DSPy's own save format
    assert program_hash(load_program(project)) != before_hash
    assert json.loads(optimize_module.provenance_path(project.saved_program_path).read_text())["dev_n"] == 3


@pytest.mark.model
def test_the_budget_counts_real_model_calls(toml_path, tiny_model_present):
    """BootstrapFewShot on the tiny model wants up to 20 calls here; the budget allows 2."""
    project = load_project(str(toml_path))
    outcome = optimize_module.optimize(project, model_key=TINY, optimizer="BootstrapFewShot", max_calls=2,
                                       train_limit=20, dev_limit=3)
    assert outcome.calls == 2 and outcome.budget_spent
    assert "cut" in outcome.why or "nothing saved" in outcome.why



@pytest.mark.model
def test_gepa_end_to_end_on_the_tiny_model(toml_path, tiny_model_present):
    """GEPA with the tiny model as task and reflection model, on 4 train examples and a budget of 12 calls."""
    project = load_project(str(toml_path))
    outcome = optimize_module.optimize(project, model_key=TINY, optimizer="GEPA", max_calls=12, train_limit=4,
                                       dev_limit=2)
    assert 0 < outcome.calls <= 12 and outcome.dev_n == 2 and outcome.objective_delta is not None


def test_a_stratified_train_order_deals_every_group_before_repeating_one(toml_path):
    """The splits are written in blocks by label; few-shot optimisers keep demos from the front of the
    train order, so the first dozen must already cover every category and both needs_human values."""
    project = load_project(str(toml_path))
    train = load_examples(project.split_path("train"), input_fields=("ticket",))
    order = optimize_module.train_sample(train, None, ("category", "needs_human"))
    groups = {(ex.expected["category"], ex.expected["needs_human"]) for ex in train}
    first = {(ex.expected["category"], ex.expected["needs_human"]) for ex in order[:len(groups)]}
    assert first == groups
    assert sorted(ex.id for ex in order) == sorted(ex.id for ex in train)   # a reordering, nothing lost
    assert [ex.id for ex in optimize_module.train_sample(train, None, ("category", "needs_human"))] == \
        [ex.id for ex in order]   # seeded: the same demos every run
    sample = optimize_module.train_sample(train, 60, ("tags",))
    assert len(sample) == 60 and len({(ex.tags[:1] or ("untagged",))[0] for ex in sample[:5]}) == 5
