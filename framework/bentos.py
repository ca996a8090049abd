"""The repository's BentoML store (`bentos/`), the one lookup of a bento, and its file manifest.

Everything that touches BentoML's store lives here, so build, release, review and serve share
one way to find `<project>:<version>`. A bento's manifest is the sha256 of every file inside it
(bento.yaml with its labels, the framework code, the notebook, the saved program, the eval set,
the contract, the signed check), written at build time and signed with the build (framework/build.py).
Verifying it on serve and deploy catches a file edited after the build; the model itself is pinned
separately by its sha256 and verified when loaded.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from framework.content import file_hash, json_hash
from framework.errors import BentoTampered, SpecError
from framework.spec import Project

MANIFEST = "slipway-manifest.json"      # {"files": {relative path: sha256}}
BUILD_SIGNATURE = "slipway-build.json"  # the signed build statement (signing.Signed), naming the manifest's hash
# Never part of a manifest: the manifest and its signature themselves, and bytecode caches Python writes
# beside the sources on import (`slipway serve` points PYTHONPYCACHEPREFIX elsewhere so none is read).
UNLISTED = {MANIFEST, BUILD_SIGNATURE}
# Inside an image made by BentoML's containerize path (`bentoml containerize`, `slipway build --containerize`),
# BentoML has rendered the bento's Dockerfile again for that build and copied the models the bento names into
# models/ (Hugging Face ones into hf-models/). Serving reads neither: each GGUF is verified against its sha256
# pin when it is loaded (framework/weights.py). So in a container, and only there, the Dockerfile may differ
# and files may be added under those folders; every other file must still match the signed manifest.
CONTAINER_REWRITTEN = {"env/docker/Dockerfile"}
CONTAINER_ADDED = ("models/", "hf-models/")


def in_container() -> bool:
    """True inside an image built by BentoML's containerize path (its Dockerfile sets BENTOML_CONTAINERIZED)."""
    return os.environ.get("BENTOML_CONTAINERIZED", "").strip().lower() in ("true", "1", "yes")


def bentoml_home(project: Project) -> Path:
    """The repository's own BentoML store: `bentos/` beside `projects/`, or BENTOML_HOME made absolute.

    BentoML's workers run in the bento's folder, so a relative BENTOML_HOME would point somewhere else there.
    """
    return Path(os.environ.get("BENTOML_HOME") or project.root / "bentos").resolve()


def use_bentoml_home(project: Project) -> Path:
    """Point BentoML at the repository store; must run before `import bentoml`."""
    home = bentoml_home(project)
    home.mkdir(parents=True, exist_ok=True)
    os.environ["BENTOML_HOME"] = str(home)
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    if "bentoml" in sys.modules:
        _repoint_imported_bentoml(home)
    return home


def _repoint_imported_bentoml(home: Path) -> None:
    """BentoML reads BENTOML_HOME once, at first use. A process that builds for two repositories
    (a notebook, the test suite) would otherwise write the second project's bento into the first
    one's store, so override BentoML's store providers with ones rooted at `home`."""
    from bentoml._internal.bento import BentoStore
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore

    dirs = {name: home / name for name in ("bentos", "models", "envs", "tmp")}
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    BentoMLContainer.bentoml_home.set(str(home))
    BentoMLContainer.bento_store_dir.set(str(dirs["bentos"]))
    BentoMLContainer.model_store_dir.set(str(dirs["models"]))
    BentoMLContainer.env_store_dir.set(str(dirs["envs"]))
    BentoMLContainer.tmp_bento_store_dir.set(str(dirs["tmp"]))
    BentoMLContainer.bento_store.set(BentoStore(str(dirs["bentos"])))
    BentoMLContainer.tmp_bento_store.set(BentoStore(str(dirs["tmp"])))
    BentoMLContainer.model_store.set(ModelStore(str(dirs["models"])))


def builds(project: Project) -> list:
    """Every bento of the project, oldest first."""
    use_bentoml_home(project)
    import bentoml

    return sorted(bentoml.list(project.name), key=lambda b: b.info.creation_time)


def get(project: Project, version: str | None = None):
    """The bento `<project>:<version>` (newest when `version` is None), or a SpecError saying how to find one."""
    use_bentoml_home(project)
    import bentoml

    if version is None:
        found = builds(project)
        if not found:
            raise SpecError(f"{project.name} has no build yet", path=str(project.toml_path),
                            hint=f"run `slipway build {project.name}`")
        return found[-1]
    try:
        return bentoml.get(f"{project.name}:{version}")
    except bentoml.exceptions.NotFound:
        raise SpecError(f"no bento {project.name}:{version}", path=str(project.toml_path),
                        hint=f"list builds with `slipway status {project.name}` or `BENTOML_HOME="
                             f"{bentoml_home(project)} bentoml list {project.name}`") from None


def labels(project: Project, version: str) -> dict[str, str]:
    """The labels `slipway build` wrote on `<project>:<version>`."""
    return dict(get(project, version).info.labels)


# -- manifest ------------------------------------------------------------------
def _files(root: Path) -> dict[str, str]:
    """sha256 of every regular file below `root`. A symlink (to a file or a folder) is refused outright:
    it would let the bento's content change outside it, and Python would import through it."""
    out = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" or (here / d).is_symlink())
        for name in sorted(files) + [d for d in dirs if (here / d).is_symlink()]:
            path = here / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink() or not path.is_file():
                raise BentoTampered("the bento holds a symlink or special file, which no build writes",
                                    path=str(path), hint="remove it, or rebuild with `slipway build`")
            if rel not in UNLISTED:
                out[rel] = file_hash(path)
    return out


def write_manifest(bento_dir: Path) -> str:
    """Hash every file of a freshly built bento into its manifest; returns the manifest's own sha256."""
    manifest = {"files": _files(bento_dir)}
    (bento_dir / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return json_hash(manifest)


def check_manifest(bento_dir: Path, *, container: bool | None = None) -> str:
    """The manifest's sha256 when every file matches it; else `BentoTampered` naming the changed,
    missing or added file. In a container (`container`, default `in_container()`), the Dockerfile BentoML
    rendered for the image and the models it copied in are the only exceptions. The release gate passes
    `container=False`: an environment variable must never loosen what a deploy vouches for."""
    path = bento_dir / MANIFEST
    if not path.exists():
        raise BentoTampered("the bento has no manifest: it was not built by this Slipway, or the manifest "
                            "was deleted", path=str(path), hint="rebuild it with `slipway build`")
    try:
        manifest = json.loads(path.read_text())
        listed: dict[str, str] = dict(manifest["files"])
    except (ValueError, KeyError, TypeError):
        raise BentoTampered("the manifest is not the JSON `slipway build` writes", path=str(path),
                            hint="rebuild it with `slipway build`") from None
    actual = _files(bento_dir)
    container = in_container() if container is None else container
    if container:
        actual = {rel: digest for rel, digest in actual.items() if not rel.startswith(CONTAINER_ADDED)}
    for rel, digest in sorted(listed.items()):
        if rel not in actual:
            raise BentoTampered("a file of the bento is missing since the build", path=str(bento_dir / rel),
                                hint="restore the bento (`bentoml import`) or rebuild it")
        if actual[rel] != digest and not (container and rel in CONTAINER_REWRITTEN):
            raise BentoTampered("this file was changed after the build (its sha256 no longer matches the "
                                "signed manifest)", path=str(bento_dir / rel),
                                hint="rebuild with `slipway build` instead of editing a bento")
    added = sorted(set(actual) - set(listed))
    if added:
        raise BentoTampered("a file was added to the bento after the build", path=str(bento_dir / added[0]),
                            hint="remove it or rebuild with `slipway build`")
    return json_hash(manifest)


def build_statement(bento_dir: Path) -> dict[str, Any]:
    """The signed build statement stored beside the manifest (signing.Signed as a dict)."""
    path = bento_dir / BUILD_SIGNATURE
    if not path.exists():
        raise BentoTampered("the bento carries no signed build statement", path=str(path),
                            hint="rebuild it with `slipway build`")
    try:
        data = json.loads(path.read_text())
        if not (isinstance(data["statement"], dict) and isinstance(data["key"], str)
                and isinstance(data["signature"], str)):
            raise TypeError("wrong types")
    except (ValueError, KeyError, TypeError):
        raise BentoTampered("the signed build statement is not what `slipway build` writes", path=str(path),
                            hint="rebuild it with `slipway build`") from None
    return data


def verify(bento_dir: Path, target: str | None = None, signers=None) -> str:
    """Every file matches the manifest, and a build statement for `target` (`<project>:<version>`) with a
    valid signature vouches for that manifest; with `signers` (a signing.SignersSpec, the project's own
    file from git), its key must also be listed and not revoked. Returns the manifest's sha256.

    Without `signers` this only proves the bento is what *some* key built: plain `bentoml serve` and the
    service can check no more, having no trust root outside the bento. `slipway serve` passes the signers."""
    from framework import signing

    manifest = check_manifest(bento_dir)
    signed = signing.Signed.from_dict(build_statement(bento_dir))
    details = signed.statement.get("details") or {}
    if (not signing.signature_holds(signed) or signed.statement.get("action") != "build"
            or details.get("manifest_sha256") != manifest
            or (target is not None and signed.statement.get("target") != target)):
        raise BentoTampered("the signed build statement does not vouch for this manifest (edited or forged)",
                            path=str(bento_dir / BUILD_SIGNATURE), hint="rebuild it with `slipway build`")
    if signers is not None and (why := signing.refusal(signing.verify(signed, signers), None)):
        raise BentoTampered(f"the build is not signed by a key of this project: {why}",
                            path=str(bento_dir / BUILD_SIGNATURE),
                            hint="rebuild it with a key listed in signers.toml, or list the builder's key")
    return manifest
