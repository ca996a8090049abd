"""project.toml → spec: validation errors name file, line and field."""

from __future__ import annotations

import re
import shutil
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from framework import SpecError, load_project, parse_spec
from framework.spec import Threshold, locate
from tests.conftest import REPO, edit_toml


def test_demo_project_validates():
    project = load_project("ticket-triage", root=REPO)
    assert project.spec.pipeline.model in project.spec.models
    assert project.notebook_path.exists()
    assert project.spec.contract.eval["category_macro_f1"].op == ">="


@pytest.mark.parametrize(("key", "value"), [("gpu_layers", -1), ("threads", 1), ("max_tokens", 8),
                                            ("context_size", 2048), ("seed", 7)])
def test_model_settings_a_check_measured_under_are_part_of_the_content(key, value):
    """Answers and latency were measured under these settings; changing one makes the check stale."""
    model = load_project("ticket-triage", root=REPO).model("qwen15")
    assert model.model_copy(update={key: value}).load_settings() != model.load_settings()


def test_unknown_key_names_file_line_and_field(toml_path):
    edit_toml(toml_path, "latency_p95_ms = ", "latency_p59_ms = 1\nlatency_p95_ms = ")
    with pytest.raises(SpecError) as info:
        load_project(str(toml_path))
    message = str(info.value)
    assert str(toml_path) in message
    assert "contract.latency_p59_ms" in message
    assert "unknown key" in message
    line = toml_path.read_text().splitlines().index("latency_p59_ms = 1") + 1
    assert f":{line}:" in message


def test_wrong_type_names_the_field_and_value(toml_path):
    edit_toml(toml_path, "latency_p95_ms = ", 'latency_p95_ms = "fast"  # was ')
    with pytest.raises(SpecError) as info:
        load_project(str(toml_path))
    assert "contract.latency_p95_ms" in str(info.value)
    assert "'fast'" in str(info.value)


def test_broken_toml_reports_the_line(toml_path):
    edit_toml(toml_path, 'owner = "support-platform"', 'owner = "support-platform')
    with pytest.raises(SpecError) as info:
        load_project(str(toml_path))
    assert "not valid TOML" in str(info.value)
    assert f"{toml_path}:" in str(info.value)
    assert info.value.line is not None


def test_pipeline_model_must_be_declared(toml_path):
    edit_toml(toml_path, 'model = "qwen15"', 'model = "gpt-9"')
    with pytest.raises(SpecError, match="gpt-9"):
        load_project(str(toml_path))


def test_every_problem_is_reported_at_once(toml_path):
    edit_toml(toml_path, "error_rate_max = 0.01", "error_rate_max = 3")
    edit_toml(toml_path, "max_tokens = 96", "max_tokens = 0")
    with pytest.raises(SpecError) as info:
        load_project(str(toml_path))
    assert "contract.error_rate_max" in str(info.value)
    assert "models.qwen15.max_tokens" in str(info.value)


def test_unknown_metric_kind_is_rejected(toml_path):
    edit_toml(toml_path, '"format_validity",', '"bleu:category",')
    with pytest.raises(SpecError, match="unknown metric 'bleu:category'"):
        load_project(str(toml_path))


def test_unknown_project_lists_known_ones(project_root):
    with pytest.raises(SpecError, match="known projects: ticket-triage"):
        load_project("nope", root=project_root)


@given(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
       st.sampled_from([">=", "<=", ">", "<", "=="]), st.sampled_from(["", " ", "  "]))
def test_threshold_parse_roundtrip(value, op, pad):
    threshold = Threshold.parse(f"{op}{pad}{value!r}")
    assert threshold.op == op
    assert threshold.value == value
    assert Threshold.parse(str(threshold)).op == op


thresholds = st.builds(
    Threshold, op=st.sampled_from([">=", "<=", ">", "<", "=="]),
    value=st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)).flatmap(
    lambda t: st.sampled_from({">=": ["point", "lower95"], ">": ["point", "lower95"], "<=": ["point", "upper95"],
                               "<": ["point", "upper95"], "==": ["point"]}[t.op]).map(
        lambda basis: t.model_copy(update={"basis": basis})))


@given(thresholds, st.sampled_from(["", " ", "  "]))
def test_threshold_with_basis_round_trips(threshold, pad):
    assert Threshold.parse(str(threshold)) == threshold
    squeezed = str(threshold).replace(" @ ", f"{pad}@{pad}").replace(f"{threshold.op} ", f"{threshold.op}{pad}")
    assert Threshold.parse(squeezed) == threshold


def test_threshold_basis_is_parsed_and_described():
    lower = Threshold.parse(">= 0.60 @ lower95")
    assert (lower.op, lower.value, lower.basis) == (">=", 0.6, "lower95")
    assert lower.describe() == ">= 0.6 (95% lower bound)"
    assert Threshold.parse("<= 0.1 @ upper95").describe() == "<= 0.1 (95% upper bound)"
    assert Threshold.parse(">= 0.6 @ point") == Threshold.parse(">= 0.6") == Threshold.parse(0.6)


@pytest.mark.parametrize("raw, message", [
    ("<= 0.6 @ lower95", "use it with >= or >"),
    ("> 0.6 @ upper95", "use it with <= or <"),
    ("== 0.6 @ lower95", "use it with >= or >"),
    (">= 0.6 @ lower90", "unknown basis '@ lower90'"),
    (">= 0.6 @", "unknown basis '@'"),
    (">= 0.6 lower95", "expected a number or a string like"),
])
def test_threshold_basis_misuse_says_what_to_write(raw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Threshold.parse(raw)


def test_contract_basis_error_names_file_line_and_field(toml_path):
    text = toml_path.read_text()
    start = text.index("category_accuracy = ")
    toml_path.write_text(text[:start] + 'category_accuracy = "<= 0.9 @ lower95"' + text[text.index("\n", start):])
    with pytest.raises(SpecError) as info:
        load_project(str(toml_path))
    line = text[:start].count("\n") + 1
    assert f":{line}:" in str(info.value) and "contract.eval.category_accuracy" in str(info.value)
    assert "use it with >= or >" in str(info.value)


@given(st.text(alphabet=string.ascii_letters + string.digits + "!@#%<>=. ", min_size=1, max_size=16))
def test_threshold_parse_accepts_only_the_grammar(raw):
    """Anything parse accepts is `op? number (@ basis)?`; anything else raises a ValueError saying what to write."""
    try:
        threshold = Threshold.parse(raw)
    except ValueError as exc:
        assert "expected" in str(exc) or "use it with" in str(exc)
    else:
        assert re.fullmatch(r"\s*(>=|<=|>|<|==)?\s*[-+]?[\d.]+(e[-+]?\d+)?\s*(@\s*(point|lower95|upper95))?\s*",
                            raw, flags=re.IGNORECASE)
        assert Threshold.parse(str(threshold)) == threshold


@given(st.floats(min_value=-1e3, max_value=1e3, allow_nan=False))
def test_bare_number_means_at_least(value):
    threshold = Threshold.parse(value)
    assert threshold.holds(value) and not threshold.holds(value - 1)


@given(st.text(alphabet=string.ascii_letters + "!@#% ", min_size=1, max_size=12))
def test_threshold_garbage_is_rejected(raw):
    with pytest.raises(ValueError):
        Threshold.parse(raw)


@given(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3), st.integers(0, 5))
def test_locate_finds_key_under_its_table(path, blank_lines):
    *tables, key = path
    header = f"[{'.'.join(tables)}]\n" if tables else ""
    text = "# comment\n" + "\n" * blank_lines + header + f"{key} = 1\n"
    assert locate(text, path) == text.splitlines().index(f"{key} = 1") + 1


@given(st.text(max_size=200))
def test_parse_spec_never_crashes_on_garbage(text):
    with pytest.raises(SpecError):
        parse_spec(text, "fuzz.toml")


def test_every_spec_key_is_documented():
    from framework import spec as s

    doc = (REPO / "docs" / "project-toml.md").read_text()
    for model in (s.ProjectMeta, s.PipelineSpec, s.ModelSpec, s.ModelSource, s.EvalSpec, s.OptimizeSpec,
                  s.ContractSpec, s.ServeSpec, s.TenantSpec, s.GuardrailsSpec, s.InputSizeGuard,
                  s.EmptyGuard, s.InjectionGuard, s.PiiGuard, s.TopicsGuard, s.RuleGuard, s.BlocklistGuard,
                  s.CacheSpec, s.ReleaseSpec):
        for key in model.model_fields:
            assert f"`{key}`" in doc or f"source.{key}" in doc, f"{model.__name__}.{key} missing from docs"


def test_a_notebook_finds_the_project_that_declares_it(project_root, monkeypatch):
    from framework.spec import project_for_notebook

    monkeypatch.delenv("SLIPWAY_PROJECT", raising=False)
    notebook = project_root / "notebooks" / "ticket_triage.py"
    assert project_for_notebook(notebook).name == "ticket-triage"
    # a copy of the notebook no project declares is an error naming the field to set
    copy = project_root / "notebooks" / "copy.py"
    copy.write_text(notebook.read_text())
    with pytest.raises(SpecError, match="no project .* declares this notebook") as raised:
        project_for_notebook(copy)
    assert raised.value.field == "pipeline.notebook" and "SLIPWAY_PROJECT" in str(raised.value)
    # two projects on one notebook: ambiguous, so SLIPWAY_PROJECT decides
    shutil.copytree(project_root / "projects" / "ticket-triage", project_root / "projects" / "second")
    with pytest.raises(SpecError, match=r"several projects .*\(second, ticket-triage\)"):
        project_for_notebook(notebook)
    monkeypatch.setenv("SLIPWAY_PROJECT", str(project_root / "projects" / "second"))
    assert project_for_notebook(notebook).dir.name == "second"


def test_a_slice_clause_is_a_quoted_key_of_contract_eval():
    text = (REPO / "projects" / "ticket-triage" / "project.toml").read_text()
    spec = parse_spec(text.replace("[contract.eval]\n", '[contract.eval]\n"category_accuracy[short]" = '
                                   '">= 0.5 @ lower95"\n', 1))
    assert spec.contract.eval["category_accuracy[short]"].basis == "lower95"
    assert spec.contract.eval["category_accuracy[non_english]"].value == 0.5   # the demo's own slice clause


def test_a_degradation_step_is_checked_where_it_is_declared(toml_path):
    edit_toml(toml_path, "timeout_s = 60",
              'timeout_s = 60\nmax_queue = 2\ndegrade_at = 1\ndegrade = ["max_tokens=lots"]')
    with pytest.raises(SpecError) as info:
        load_project(str(toml_path))
    assert "serve.degrade" in str(info.value) and "whole number" in str(info.value)
    edit_toml(toml_path, 'degrade = ["max_tokens=lots"]', 'degrade = ["max_tokens=32"]')
    serve = load_project(str(toml_path)).spec.serve
    assert (serve.max_queue, serve.degrade_at, serve.degrade) == (2, 1, ["max_tokens=32"])
    # only a cheaper tier of [pipeline] tiers may answer alone under load
    edit_toml(toml_path, 'degrade = ["max_tokens=32"]', 'degrade = ["tier=qwen05", "skip=semantic_cache"]')
    with pytest.raises(SpecError, match="must name a cheaper tier of \\[pipeline\\] tiers \\(none declared\\)"):
        load_project(str(toml_path))
    edit_toml(toml_path, 'model = "qwen15"', 'model = "qwen15"\ntiers = ["qwen05", "qwen15"]')
    assert load_project(str(toml_path)).spec.serve.degrade == ["tier=qwen05", "skip=semantic_cache"]


# -- [pipeline] tiers and [routing] (issue 16) -------------------------------------------------------------

DEMO_TOML = (REPO / "projects" / "ticket-triage" / "project.toml").read_text()


def _tiered(tiers: list[str] | None, routing: str = "") -> str:
    text = DEMO_TOML
    if tiers is not None:
        text = text.replace('adapter = "json"', f"tiers = {tiers!r}\nadapter = \"json\"".replace("'", '"'), 1)
    return text + (f"\n[routing]\n{routing}\n" if routing else "")


def test_tiers_cheapest_first_ending_on_the_pipeline_model_validate():
    routing = 'min_confidence = 0.6\nescalate_on = ["invalid", "confidence"]'
    spec = parse_spec(_tiered(["qwen05", "qwen15"], routing))
    assert spec.pipeline.tiers == ["qwen05", "qwen15"]
    assert spec.routing.min_confidence == 0.6 and spec.routing.escalate_on == ["invalid", "confidence"]
    assert parse_spec(_tiered(["qwen05", "qwen15"])).routing is None   # the defaults apply


@given(st.lists(st.sampled_from(["qwen05", "qwen15", "tiny", "ghost"]), max_size=4))
def test_tiers_are_declared_models_at_least_two_and_end_on_the_pipeline_model(tiers):
    valid = len(tiers) >= 2 and all(k != "ghost" for k in tiers) and tiers[-1] == "qwen15"
    try:
        spec = parse_spec(_tiered(tiers))
    except SpecError as exc:
        assert not valid
        assert "pipeline.tiers" in str(exc)      # every problem names the field (and the item)
        if "ghost" in tiers:
            assert f"pipeline.tiers.{tiers.index('ghost')}" in str(exc) and "'ghost' is not one of" in str(exc)
    else:
        assert valid and spec.pipeline.tiers == tiers


@given(st.floats(min_value=-5, max_value=5, allow_nan=False))
def test_the_confidence_bar_is_between_0_and_2(bar):
    text = _tiered(["tiny", "qwen15"], f"min_confidence = {bar!r}")
    if 0 <= bar <= 2:
        assert parse_spec(text).routing.min_confidence == bar
    else:
        with pytest.raises(SpecError, match="routing.min_confidence"):
            parse_spec(text)


def test_routing_without_tiers_and_an_empty_escalate_on_are_errors_naming_the_field():
    with pytest.raises(SpecError, match=r"routing: \[routing\] applies to a tiered pipeline") as info:
        parse_spec(_tiered(None, "min_confidence = 0.6"))
    assert info.value.field == "routing"
    with pytest.raises(SpecError, match="never escalates") as info:
        parse_spec(_tiered(["qwen05", "qwen15"], "escalate_on = []"))
    assert info.value.field == "routing.escalate_on"
    with pytest.raises(SpecError, match="Input should be 'invalid', 'rule' or 'confidence'"):
        parse_spec(_tiered(["qwen05", "qwen15"], 'escalate_on = ["slow"]'))


def test_every_routing_key_is_documented():
    from framework.spec import RoutingSpec

    doc = (REPO / "docs" / "project-toml.md").read_text()
    assert "## [routing]" in doc and "`tiers`" in doc
    for key in RoutingSpec.model_fields:
        assert f"`{key}`" in doc, f"RoutingSpec.{key} missing from docs"
CACHE = "\n[cache]\nsemantic = true\nembedding_model = \"qwen05\"\nthreshold = 0.9\n"


def _with_cache(toml_path, table: str) -> None:
    text = toml_path.read_text()
    start = text.find("\n[cache]")
    if start >= 0:   # the demo declares one: replace it (it runs to the next table)
        end = text.find("\n[", start + 1)
        text = text[:start] + (text[end:] if end >= 0 else "\n")
    toml_path.write_text(text + table)


def test_cache_defaults_to_exact_only():
    from framework.spec import CacheSpec

    spec = CacheSpec()
    assert (spec.exact, spec.semantic, spec.embedding_model, spec.paraphrases) == (True, False, None, None)


def test_cache_section_validates(toml_path):
    _with_cache(toml_path, CACHE)
    spec = load_project(str(toml_path)).spec.cache
    assert (spec.semantic, spec.embedding_model, spec.threshold) == (True, "qwen05", 0.9)


@pytest.mark.parametrize(("table", "field", "message"), [
    (CACHE.replace('"qwen05"', '"minilm"'), "cache.embedding_model", "'minilm' is not one of the [models.*]"),
    (CACHE.replace("0.9", "1.5"), "cache.threshold", "less than or equal to 1"),
    (CACHE.replace("0.9", "0"), "cache.threshold", "greater than 0"),
    (CACHE + "ttl_s = -1\n", "cache.ttl_s", "greater than 0"),
    (CACHE + "max_entries = 0\n", "cache.max_entries", "greater than or equal to 1"),
    (CACHE + 'pooling = "cls"\n', "cache.pooling", "'mean' or 'last'"),
    (CACHE + 'template = "Ticket: {ticket}"\n', "cache.template", "one {text}"),
    (CACHE + "semantc = true\n", "cache.semantc", "unknown key"),
    ("\n[cache]\nsemantic = true\n", "cache", "semantic = true needs embedding_model"),
    ('\n[cache]\nparaphrases = "data/cache/paraphrases.jsonl"\n', "cache", "paraphrases needs embedding_model"),
])
def test_cache_errors_name_the_field(toml_path, table, field, message):
    _with_cache(toml_path, table)
    with pytest.raises(SpecError) as info:
        load_project(str(toml_path))
    text = str(info.value) + " " + str(getattr(info.value, "field", ""))
    assert field in text and message in text, text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-5, 120), max_size=6), st.sampled_from(["none", "caller", "header:X-User", "header:",
                                                                     "cookie:x", "header:a b", "CALLER"]))
def test_release_steps_and_sticky_are_accepted_exactly_when_well_formed(steps, sticky):
    """Property: steps must lie in 1..100, increase strictly and end at 100; sticky is one of three forms."""
    from pydantic import ValidationError

    from framework.spec import ReleaseSpec

    good_steps = bool(steps) and steps[-1] == 100 and all(1 <= s <= 100 for s in steps) and all(
        b > a for a, b in zip(steps, steps[1:], strict=False))
    good_sticky = sticky in ("none", "caller", "header:X-User")
    try:
        ReleaseSpec(steps=steps, sticky=sticky)
        accepted = True
    except ValidationError:
        accepted = False
    assert accepted == (good_steps and good_sticky)
