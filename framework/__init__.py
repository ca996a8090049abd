"""Slipway: take a DSPy pipeline from a marimo notebook to a contract-gated service.

The public API, in the order data flows through it:
project.toml → `load_project` → `load_program` (from the notebook) →
`language_model` (llama.cpp) → `run_eval` → `judge` / `check` → report →
`error_analysis` (slices, confusion, misclassified) → `optimize` →
`build` (a BentoML bento, refused unless the check passed) → `review` (against the baseline) →
`approve` → `deploy` / `rollback` (channels) or `start_canary` (judged step by step on live traffic by
`slipway serve --channel`; `containerize` for the bento's image, `rollout_manifests` for Argo Rollouts, `capacity`
for the replicas the declared volume needs) → `slipway serve` (with its `answer_cache`) → traces
(`ingest_traces`) → the live contract (`slo`), feedback back into the eval set (`harvest`, `accept_harvest`),
`drift`, and the requests a failed model handed to a person (`human_queue`, `resolve_handoff`).
Approvals, deploys and rollbacks are signed with the person's SSH key (`key=`, a path; see
framework/signing.py and docs/trust.md).
Heavy libraries (dspy, llama_cpp, duckdb) are imported only when used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# `check`, `build`, `capacity`, `review`, `slo`, `harvest`, `drift` and `optimize` share their names with their
# modules: import them eagerly so that a later `import framework.check` cannot replace the function with the module.
# These modules import dspy, llama_cpp and bentoml only inside their functions.
from framework.build import build
from framework.capacity import capacity
from framework.check import check
from framework.drift import drift
from framework.errors import (
    AuditBroken,
    BentoTampered,
    ContainerBuildFailed,
    ContainerEngineMissing,
    ContractFailed,
    DatasetError,
    HandoffError,
    IdentityError,
    ModelError,
    NotebookError,
    NotReady,
    ReleaseRefused,
    RemoteModelError,
    SlipwayError,
    SpecError,
    StoreError,
    TiersExhausted,
)
from framework.harvest import harvest
from framework.optimize import optimize
from framework.release import approve, deploy, rollback
from framework.review import review
from framework.routing import calibrate
from framework.slo import slo
from framework.spec import Project, ProjectSpec, load_project, parse_spec, project_for_notebook

if TYPE_CHECKING:
    from framework.contract import Verdict
    from framework.evaluate import EvalRun

__all__ = [
    "AuditBroken",
    "BentoTampered",
    "ContainerBuildFailed",
    "ContainerEngineMissing",
    "ContractFailed",
    "DatasetError",
    "HandoffError",
    "IdentityError",
    "ModelError",
    "NotReady",
    "NotebookError",
    "Project",
    "ProjectSpec",
    "ReleaseRefused",
    "RemoteModelError",
    "SlipwayError",
    "SpecError",
    "StoreError",
    "TiersExhausted",
    "accept_harvest",
    "adapter",
    "answer_cache",
    "approve",
    "build",
    "calibrate",
    "capacity",
    "check",
    "containerize",
    "deploy",
    "drift",
    "error_analysis",
    "harvest",
    "human_queue",
    "ingest_traces",
    "judge",
    "kube_manifests",
    "language_model",
    "load_program",
    "load_project",
    "load_split",
    "optimize",
    "parse_spec",
    "project_for_notebook",
    "resolve_handoff",
    "review",
    "rollback",
    "rollout_manifests",
    "run_eval",
    "slo",
    "start_canary",
]


def load_program(project: Project, *, saved: bool = True):
    """The project's DSPy program, imported from its notebook (saved state applied)."""
    from framework.notebook import load_program as _load

    return _load(project, saved=saved)


def language_model(project: Project, model_key: str | None = None, *, gpu_layers: int | None = None):
    """A `dspy.LM` running the project's GGUF in process through llama.cpp."""
    from framework.evaluate import language_model as _lm

    return _lm(project, model_key, gpu_layers=gpu_layers)


def adapter(project: Project):
    """The DSPy adapter the project declares (JSON by default: typed outputs, grammar-constrained)."""
    from framework.evaluate import adapter as _adapter

    return _adapter(project)


def answer_cache(project: Project):
    """The served answer cache `[cache]` declares (framework/cache.py, docs/cache.md), with its embedding
    model loaded and sha256-verified when `semantic = true`."""
    from framework.cache import AnswerCache, load_embedder

    spec = project.spec.cache
    return AnswerCache.from_spec(spec, load_embedder(project) if spec.semantic else None)


def start_canary(project: Project, version: str, channel: str, *, first: int | None = None, key=None) -> dict:
    """Start a canary of `version` on `channel` (signed; the deploy gate must open): `slipway serve --channel`
    sends it `first`% of requests, then each `[release]` step, and promotes or rolls it back on live figures."""
    from framework.rollout import start

    return start(project, version, channel, first=first, key=key)


def rollout_manifests(project: Project, version: str, **kwargs) -> list[dict]:
    """The `[release]` canary as an Argo Rollouts `Rollout` and an `AnalysisTemplate` over the contract's alert
    expressions (framework/argo.py, docs/kubernetes.md)."""
    from framework.argo import rollout_manifests as _manifests

    return _manifests(project, version, **kwargs)


def kube_manifests(project: Project, version: str, **kwargs) -> list[dict]:
    """Plain Kubernetes objects serving `version` on a channel: ConfigMap, Deployment, Service, autoscaler
    (framework/kube.py, docs/kubernetes.md)."""
    from framework.kube import manifests as _manifests

    return _manifests(project, version, **kwargs)


def containerize(project: Project, version: str, *, gpu: bool = False, engine: str | None = None) -> str:
    """Build `<project>:<version>`'s container image through BentoML's containerize path, for the CPU or (`gpu`)
    a CUDA llama.cpp, with a local engine; returns the image tag (framework/container.py, docs/kubernetes.md)."""
    from framework.container import containerize as _containerize

    return _containerize(project, version, gpu=gpu, engine=engine)


def load_split(project: Project, split: str):
    """Examples of a split ("train", "dev" or "eval") as `framework.dataset.Example`s."""
    from framework.evaluate import load_split as _load

    return _load(project, split)


def run_eval(project: Project, **kwargs) -> EvalRun:
    """Score a split on the real model; see `framework.evaluate.run_eval` for options."""
    from framework.evaluate import run_eval as _run

    return _run(project, **kwargs)


def judge(project: Project, run: EvalRun) -> Verdict:
    """The contract verdict for a run's measurements (pure; records nothing)."""
    from framework.contract import judge as _judge

    return _judge(project.spec.contract, run.measurements)


def error_analysis(run: EvalRun, metric: str | None = None, **kwargs) -> dict:
    """Where a run fails: worst slices, a confusion table per label field, misclassified examples with the
    model's reason (framework/analysis.py)."""
    from framework.analysis import error_analysis as _analysis

    return _analysis(run, metric, **kwargs)


def ingest_traces(project: Project):
    """Copy served workers' new trace and feedback lines into the store (idempotent); see framework/traces.py."""
    from framework.traces import ingest

    return ingest(project)


def accept_harvest(project: Project, **kwargs):
    """Add reviewed candidates to the eval set with provenance, signed (`key=`; needs the curate role)."""
    from framework.harvest import accept

    return accept(project, **kwargs)


def human_queue(project: Project, *, everything: bool = False):
    """Requests the served bento handed to a person (`[fallback] action = "human"`), after ingesting new ones:
    the open ones, or with `everything` the resolved ones too (framework/handoff.py)."""
    from framework.handoff import queue

    return queue(project, everything=everything)


def resolve_handoff(project: Project, ident: str, labels: dict, **kwargs):
    """Record a person's answer to a request in the human queue, signed (`key=`; needs the queue role)."""
    from framework.handoff import resolve

    return resolve(project, ident, labels, **kwargs)
