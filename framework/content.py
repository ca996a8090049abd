"""What a passing check and a signed approval vouch for: every input to the content hash, in one place.

A check is reused, a build is allowed and a bento version is named by `content_hash`; an approval
signs it. It must change whenever what the model sees or how answers are scored can change, and
only then (a needless change costs a re-check; a missed one lets a stale verdict open the gate).

| part              | covers                                                                   |
|-------------------|--------------------------------------------------------------------------|
| `program_hash`    | the DSPy program state: instructions, demos, signature fields and types  |
| `prompt_hash`     | the messages the adapter renders for a fixed probe input, per predictor  |
| `notebook_hash`   | the notebook's source bytes (program code, custom metrics)               |
| `dataset_hash`    | the split's bytes (inputs and labels)                                    |
| `settings_hash`   | model sha256 (weights, tokenizer, chat template) and load/decode settings|
|                   | (a remote model: its server, name, response format and fingerprint)      |
| `code_hash`       | Slipway's modules on the answer and scoring path (ANSWER_PATH_MODULES)   |
| `guardrails_hash` | the `[guardrails]` table: checks, actions, rules (they change answers)    |
| `routing_hash`    | a routed run's tiers (each model's settings and prices) and `[routing]`   |
| `cache_hash`      | with `[cache] paraphrases`: what the check's cache figures depend on: the |
|                   | `[cache]` table, the set's bytes, the embedding model's sha256/settings,  |
|                   | framework/cache.py (absent without a set: nothing of it is measured)      |
| `versions`        | slipway, dspy and llama-cpp-python releases (adapter code, llama.cpp)     |
| split, limit, metrics, adapter, prices | which examples, metric declarations, adapter; prices of a recorded cost |

`contract_hash` is separate: the same measured run can be judged against a changed contract.
docs/trust.md reproduces this table.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any

from framework.spec import ModelSpec, Project

# Modules whose code decides what the model is sent, how its output is decoded, or how it is scored.
# A name without .py is a sub-package: every .py file in it counts.
ANSWER_PATH_MODULES = ("confidence.py", "content.py", "dataset.py", "evaluate.py", "guardrails.py", "injection",
                       "lm.py", "metrics.py", "notebook.py", "redact.py", "remote.py", "routing.py", "structured.py")
LIBRARIES = ("slipway", "dspy", "llama_cpp_python")
PROBE = "Slipway probe input ({field}): the rendered prompt around this text is part of the content hash."


def sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def json_hash(value: Any) -> str:
    return sha256(json.dumps(value, sort_keys=True, default=str))


def file_hash(path: Path) -> str:
    return sha256(path.read_bytes())


def program_state(program) -> dict:
    """Instructions, demos and signature of every predictor (DSPy's own save state)."""
    return program.dump_state()


def program_hash(program) -> str:
    return json_hash(program_state(program))


def prompt_hash(program, adapter) -> str:
    """Hash of the messages `adapter` renders for each predictor on a fixed probe input.

    Catches what the program state does not: a changed adapter (DSPy release, Slipway's JSON adapter),
    field descriptions rendered differently, the output-format reminder moved. The chat template that
    wraps these messages comes from the GGUF, covered by the model's sha256.
    """
    rendered = []
    for name, predictor in program.named_predictors():
        signature = predictor.signature
        inputs = {field: PROBE.format(field=field) for field in signature.input_fields}
        rendered.append({"predictor": name, "messages": adapter.format(signature, predictor.demos, inputs)})
    return json_hash(rendered)


def settings_hash(spec: ModelSpec) -> str:
    return json_hash(spec.load_settings())


def code_hash() -> str:
    folder = Path(__file__).resolve().parent

    def files(name: str) -> dict[str, str]:
        path = folder / name
        if path.is_dir():
            return {f"{name}/{p.relative_to(path)}": file_hash(p) for p in sorted(path.rglob("*.py"))}
        return {name: file_hash(path)}

    return json_hash({key: value for name in ANSWER_PATH_MODULES for key, value in files(name).items()})


def versions() -> dict[str, str]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def routing_hash(project: Project) -> str:
    """The routed pipeline's tiers, in order, with each model's settings and prices, and `[routing]` (the bar
    and the reasons): changing any of them changes which model answers which request, and its cost."""
    tiers = [{"key": key, "settings": project.model(key).load_settings(),
              "prices": [project.model(key).price_per_1k_input, project.model(key).price_per_1k_cached_input,
                         project.model(key).price_per_1k_output]} for key in project.tier_keys]
    return json_hash({"tiers": tiers, "routing": project.routing.model_dump(mode="json")})


def content_hashes(project: Project, program, split: str, model_key: str, limit: int | None, *,
                   routed: bool | None = None) -> dict[str, str]:
    """Every named part and the `content_hash` over all of them. `routed` (default: the project has tiers
    and `model_key` is pipeline.model, as framework/evaluate.py `is_routed` decides) adds `routing_hash`."""
    from framework.evaluate import adapter

    parts = {
        "program_hash": program_hash(program),
        "prompt_hash": prompt_hash(program, adapter(project)),
        "notebook_hash": file_hash(project.notebook_path),
        "dataset_hash": file_hash(project.split_path(split)),
        "settings_hash": settings_hash(project.model(model_key)),
        "code_hash": code_hash(),
        "versions_hash": json_hash(versions()),
    }
    model = project.model(model_key)
    prices = {"input": model.price_per_1k_input, "cached_input": model.price_per_1k_cached_input,
              "output": model.price_per_1k_output}  # a run's recorded cost was priced with these
    parts["guardrails_hash"] = json_hash(project.spec.guardrails.model_dump(mode="json"))
    if routed is None:
        routed = bool(project.spec.pipeline.tiers) and model_key == project.spec.pipeline.model
    if routed:
        parts["routing_hash"] = routing_hash(project)
    cache = cache_hash(project)
    if cache is not None:   # only a project that measures its cache: other projects' hashes do not move
        parts["cache_hash"] = cache
    # The program's name too: two classes of one notebook with the same predictors (a subclass that only
    # changes forward()) hash alike in program_hash and notebook_hash, and must not share a check.
    key = {**parts, "split": split, "limit": limit, "metrics": project.spec.eval.metrics,
           "adapter": project.spec.pipeline.adapter, "prices": prices, "program": project.spec.pipeline.program}
    parts["content_hash"] = json_hash(key)
    return parts


def cache_hash(project: Project) -> str | None:
    """What `slipway check`'s cache_hit_rate and cache_wrong_hit_rate depend on, or None when the project
    declares no paraphrase set (then the check reports nothing of the cache)."""
    spec = project.spec.cache
    if spec.paraphrases is None:
        return None
    path = project.dir / spec.paraphrases
    model = project.model(spec.embedding_model) if spec.embedding_model else None
    # ttl_s, max_entries and the semantic switch change serving, not the figures (measured either way)
    return json_hash({"cache": spec.model_dump(mode="json", exclude={"ttl_s", "max_entries", "semantic"}),
                      "paraphrases": file_hash(path) if path.exists() else "missing",
                      "embedding_model": model.load_settings() if model else None,
                      "code": file_hash(Path(__file__).resolve().parent / "cache.py")})


def contract_hash(project: Project) -> str:
    """The contract's clauses. Review policy (approvals required, self-approval) is not a clause:
    changing who must approve does not invalidate a measured verdict."""
    return json_hash(project.spec.contract.model_dump(mode="json",
                                                      exclude={"approvals_required", "allow_self_approval"}))
