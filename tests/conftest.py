"""Shared fixtures: every test works on a copy of the demo project in tmp_path.

The copy keeps tests away from the developer's real store and reports; the
model cache is the real one (models are pulled by `make test` before pytest),
because re-downloading weights per test would test pip, not Slipway.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = "tiny"


PEOPLE = ("alice", "bob", "carol", "dave", "root", "mallory")


@pytest.fixture(scope="session")
def keys(tmp_path_factory) -> dict[str, Path]:
    """An Ed25519 SSH key pair per person (made with ssh-keygen, as a person would), by name."""
    folder = tmp_path_factory.mktemp("keys")
    out = {}
    for name in PEOPLE:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{name}@test", "-f",
                        str(folder / name)], check=True)
        out[name] = folder / name
    return out


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch, tmp_path, keys):
    for key in list(os.environ):
        if key.startswith("SLIPWAY_") and key != "SLIPWAY_CACHE":
            monkeypatch.delenv(key)
    monkeypatch.setenv("DSPY_CACHEDIR", str(tmp_path / "dspy-cache"))
    # Never sign with, or create, the developer's own keys: everyone is alice unless a test says otherwise.
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("SLIPWAY_SIGNING_KEY", str(keys["alice"]))
    yield


def act_as(monkeypatch, keys: dict[str, Path], name: str) -> None:
    """Sign the next commands with `name`'s key (the only way to be someone)."""
    monkeypatch.setenv("SLIPWAY_SIGNING_KEY", str(keys[name]))


# The demo's review policy, as tests use it: alice builds, bob reviews, carol ships, root may override.
ROLES = {"alice": [], "bob": ["approve"], "carol": ["deploy:*", "rollback:*"], "dave": ["rollback:prod"],
         "root": ["override", "audit", "deploy:*"]}


def write_signers(project_dir: Path, keys: dict[str, Path], roles: dict[str, list[str]] | None = None) -> Path:
    from framework import signing

    path = signing.signers_path(project_dir)
    path.unlink(missing_ok=True)
    for name, granted in (roles or ROLES).items():
        signing.add_signer(project_dir, name, signing.public_key(keys[name]), granted)
    return path


@pytest.fixture
def project_root(tmp_path) -> Path:
    """A throw-away repository root holding a copy of the ticket-triage project and its notebook."""
    root = tmp_path / "repo"
    shutil.copytree(REPO / "projects" / "ticket-triage", root / "projects" / "ticket-triage",
                    ignore=shutil.ignore_patterns(".slipway", "program.json"))
    shutil.copytree(REPO / "notebooks", root / "notebooks", ignore=shutil.ignore_patterns("__marimo__"))
    return root


@pytest.fixture
def toml_path(project_root) -> Path:
    return project_root / "projects" / "ticket-triage" / "project.toml"


def cli_ok(args: list[str]):
    """Run a `slipway` command in process and insist it exits 0 (showing its output when not)."""
    from typer.testing import CliRunner

    from framework.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def drop_table(path: Path, header: str) -> None:
    """Take a table (`[fallback]`) out of a project.toml: from its header to the next table."""
    text = path.read_text()
    start = text.index(f"\n{header}\n")
    end = text.find("\n[", start + 1)
    path.write_text(text[:start] + (text[end:] if end >= 0 else "\n"))


def edit_toml(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


@pytest.fixture
def tiny_model_present():
    from framework import load_project
    from framework.weights import model_path

    project = load_project("ticket-triage", root=REPO)
    path = model_path(project.model(TINY))
    if not path.exists():
        pytest.fail(f"tiny model missing at {path}: run `make test` (it pulls it) or "
                    "`slipway models pull ticket-triage --model tiny`")
    return path


@pytest.fixture
def tiny_project(project_root, monkeypatch, keys):
    """The demo project re-pointed at the tiny model with a 12-example eval set and loose thresholds,
    so a full check (what build requires) takes seconds. BENTOML_HOME goes to the throw-away root;
    signers.toml lists alice (builds), bob (approves), carol (deploys, rolls back) and root (overrides)."""
    toml = project_root / "projects" / "ticket-triage" / "project.toml"
    write_signers(toml.parent, keys)
    edit_toml(toml, 'model = "qwen15"', 'model = "tiny"')
    for metric in ("category_macro_f1", "category_accuracy", "priority_band_match", "format_validity",
                   "needs_human_accuracy", '"category_accuracy[non_english]"', '"needs_human_accuracy[injection]"',
                   "reason_complete"):
        text = toml.read_text()
        start = text.index(f"{metric} = ")
        end = text.index("\n", start)
        toml.write_text(text[:start] + f'{metric} = ">= 0.0"' + text[end:])
    for key, value in (("latency_p50_ms", 60000), ("latency_p95_ms", 60000), ("latency_p99_ms", 60000),
                       ("tokens_per_request_max", 100000), ("cost_per_request_max", 1), ("monthly_budget", 100000),
                       ("guardrail_latency_p99_ms", 1000)):
        text = toml.read_text()
        start = text.index(f"{key} = ")
        toml.write_text(text[:start] + f"{key} = {value}" + text[text.index("\n", start):])
    # The answer cache's measurement embeds ~300 texts with qwen05 (minutes): tests/test_cache.py covers it
    text = toml.read_text()
    toml.write_text(text.replace('paraphrases = "data/cache/paraphrases.jsonl"', "")
                    .replace('cache_wrong_hit_rate = "<= 0.0"', ""))
    # The serving tests call without API keys; tests/e2e/test_tenants_served.py turns keys back on.
    edit_toml(toml, "[serve]\n", '[serve]\nauth = "none"\n')
    eval_path = toml.parent / "data" / "eval.jsonl"
    eval_path.write_text("\n".join(eval_path.read_text().splitlines()[:12]) + "\n")
    monkeypatch.setenv("BENTOML_HOME", str(project_root / "bentos"))
    monkeypatch.chdir(project_root)
    return toml
