"""A built bento as a container image, through BentoML's own containerize path (issue 18).

`bentoml containerize` copies a bento and the models it names into a build context and renders a Dockerfile
from the image the bento froze at build time (bento.yaml: base image, system commands, locked requirements).
`build_context` does exactly that with BentoML's functions, then renders the Dockerfile once more, with
BentoML's own template, for the target hardware. The target matters because llama-cpp-python is compiled
inside the image (PyPI carries only its source): the CPU target (default) compiles the portable AVX2/FMA
backend the Makefile builds (a `-march=native` build uses the build machine's AVX-512/AMX kernels and crashed
on other machines); the GPU target compiles llama.cpp's CUDA backend on an NVIDIA CUDA *devel* image, whose
nvcc builds the kernels. The bento's own files, its manifest and signed build statement travel unchanged; the
service verifies them when the container starts (framework/bentos.py says which paths BentoML's containerize
may change), and each GGUF is verified against its sha256 pin when loaded.

`containerize` builds that context with the first container engine BentoML knows that answers here, through
BentoML's builder for it. Without one it refuses, naming each engine tried; `build_context` and
`build_command` then give the folder and the exact command for a machine that has one.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from framework import bentos
from framework.errors import BentoTampered, ContainerBuildFailed, ContainerEngineMissing, ModelError, SpecError
from framework.spec import Project

DOCKERFILE = "env/docker/Dockerfile"   # where BentoML's containerize puts it, relative to the context
# BentoML's image builders, in the order tried. (Its "buildx" backend is docker's plugin; the docker backend
# already builds with BuildKit.)
ENGINES = ("docker", "podman", "buildah", "nerdctl", "buildctl")
# The Makefile's portable CPU build of llama.cpp (LLAMA_CMAKE_ARGS): no -march=native, so the image runs on any
# x86-64 machine with AVX2/FMA, not only on CPUs like the one it was built on.
CPU_CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF "
                  "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF")
# llama.cpp's CUDA backend (as bench/gpu_device.sh builds it), with no CMAKE_CUDA_ARCHITECTURES: with
# GGML_NATIVE off, llama.cpp compiles its portable default set (real code for sm_86/sm_89, PTX for the rest,
# which the driver compiles on first use). To compile for one card only, pass the flags again with
# `--build-arg CMAKE_ARGS="... -DCMAKE_CUDA_ARCHITECTURES=90-real"`.
GPU_CMAKE_ARGS = f"-DGGML_CUDA=ON -DGGML_CUDA_NCCL=OFF -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF {CPU_CMAKE_ARGS}"
# A devel image: llama.cpp's kernels are compiled in the image, and BentoML's own CUDA images are runtime-only
# (no nvcc). Ubuntu 22.04's pip installs BentoML's uv system-wide (24.04 refuses: PEP 668); uv then fetches the
# bento's Python. CUDA 12.4 runs on drivers >= 525 (CUDA's minor-version compatibility).
CUDA_BASE_IMAGE = "nvidia/cuda:12.4.1-devel-ubuntu22.04"
# Served traces (and the service's state beside them) inside the image: in the bento user's home, outside the
# bento. Mount a volume on /home/bentoml/slipway to keep them past the container.
TRACE_DIR = "/home/bentoml/slipway/traces"


def target(gpu: bool = False) -> dict:
    """What the image is built for: {"name", "base_image" (None: the bento's own), "system_packages", "env"}.
    `env` becomes build arguments that stay set in the image (BentoML's template writes `ARG` + `ENV`):
    CMAKE_ARGS is how llama-cpp-python's build takes llama.cpp's flags; SLIPWAY_TRACE_DIR keeps the served
    traces out of the bento's folder (else they land in the working directory, inside it, and a restarted
    container would find files the signed manifest does not list)."""
    env = {"SLIPWAY_TRACE_DIR": TRACE_DIR}
    if gpu:
        # the CUDA image's apt would otherwise ask for answers (tzdata) that a build cannot give
        return {"name": "cuda", "base_image": CUDA_BASE_IMAGE, "system_packages": ["python3-pip"],
                "env": {**env, "DEBIAN_FRONTEND": "noninteractive", "CMAKE_ARGS": GPU_CMAKE_ARGS}}
    return {"name": "cpu", "base_image": None, "system_packages": [], "env": {**env, "CMAKE_ARGS": CPU_CMAKE_ARGS}}


def image_tag(project: Project, version: str, *, gpu: bool = False) -> str:
    """`<project>:<version>` as `bentoml containerize` tags it (what framework/argo.py deploys); the CUDA
    image of the same bento is `<project>:<version>-cuda`."""
    return f"{project.name}:{version}-cuda" if gpu else f"{project.name}:{version}"


def default_context_dir(project: Project, version: str, *, gpu: bool = False) -> Path:
    """`build/containers/<project>-<version>-<cpu|cuda>` under the repository root (git ignores build/)."""
    return project.root / "build" / "containers" / f"{project.name}-{version}-{target(gpu)['name']}"


def build_context(project: Project, version: str, out_dir: Path, *, gpu: bool = False) -> Path:
    """Write the build context of `<project>:<version>`'s image into `out_dir` and return it.

    The context is what `bentoml containerize` builds: the bento's files, its models under `models/`, and
    `env/docker/Dockerfile`, rendered by BentoML's template for the target (`target(gpu)`). It installs the
    bento's locked `env/python/requirements.txt` unchanged. Refuses (BentoTampered) a bento whose files no
    longer match its signed manifest, and (ModelError) a packed GGUF whose sha256 is not the pin in the bento's
    project.toml. `out_dir` must be absent, empty, or a context written before (which is replaced).
    """
    bento = bentos.get(project, version)
    root = Path(bento.path)
    tag = f"{project.name}:{version}"
    bentos.verify(root, tag)   # only what the builder signed goes into an image
    if gpu:
        _require_gpu_layers(root, tag)
    out_dir = Path(out_dir).resolve()
    _clear(out_dir)
    from bentoml._internal.container import construct_containerfile

    # BentoML's own step: copy the bento, resolve its models from the store into models/, render the Dockerfile
    with construct_containerfile(bento, enable_buildkit=False, add_header=True) as (made, _dockerfile):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(made, out_dir)
        Path(made).mkdir()   # TemporaryDirectory removes it on exit
    (out_dir / DOCKERFILE).write_text(render_dockerfile(bento.info, out_dir, gpu=gpu))
    _check_models(out_dir, root, tag)
    return out_dir


def render_dockerfile(info, context: Path, *, gpu: bool = False) -> str:
    """The Dockerfile of the bento's image (`info`: its BentoInfoV2) for the target, by BentoML's template.

    Plain Dockerfile syntax (no BuildKit cache mounts): any engine builds it, and no builder-wide cache can hand
    a CUDA build the llama-cpp-python wheel compiled for the CPU target (the cache key ignores CMAKE_ARGS)."""
    import attrs
    from _bentoml_impl.docker import generate_dockerfile
    from _bentoml_sdk.images import Image
    from bentoml._internal.bento.build_config import BentoEnvSchema
    from bentoml._internal.container import split_envs_by_stage

    image = getattr(info, "image", None)
    if image is None:
        raise SpecError(f"bento {info.tag} has no image section (a BentoML 1.2+ bento); rebuild it with "
                        "`slipway build`")
    chosen = target(gpu)
    if chosen["base_image"]:
        # BentoML's Image: the distro's install command first (build tools, git), then the system packages
        made = Image(base_image=chosen["base_image"], distro="debian", python_version=image.python_version)
        if chosen["system_packages"]:
            made.system_packages(*chosen["system_packages"])
        image = attrs.evolve(image, base_image=made.base_image, commands=list(made.commands))
    runtime, build_stage = split_envs_by_stage(info.envs)
    envs = [*runtime, *(BentoEnvSchema(name=name, value=value) for name, value in chosen["env"].items())]
    return generate_dockerfile(image, context, enable_buildkit=False, add_header=True, envs=envs,
                               secret_envs=build_stage)


def build_command(context: Path, tag: str, *, engine: str = "docker") -> str:
    """The shell command BentoML's builder for `engine` runs to build `context` into the image `tag`."""
    builder = _builder(engine)
    args = builder.construct_build_args(context_path=str(context), file=str(Path(context) / DOCKERFILE),
                                        tag=(tag,))
    return shlex.join([Path(builder.binary).name, *builder.build_cmd, *args])


def engines(names: tuple[str, ...] = ENGINES) -> list[dict]:
    """Each engine's state here, in order: {"engine", "ok", "why"} (why it cannot build, when not ok), by
    BentoML's own health check of that builder."""
    import bentoml.container  # noqa: F401 - registers BentoML's builders

    found = []
    for name in names:
        binary = shutil.which(name)
        if binary is None:
            found.append({"engine": name, "ok": False, "why": "not installed"})
            continue
        with _stderr_to_text() as said:
            try:
                ok, why = bool(_builder(name).health()), None
            except Exception as exc:  # noqa: BLE001 - BentoML's checks run the client: any failure means unusable
                ok, why = False, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not ok:
            detail = ("".join(said).strip() or why or "BentoML's health check failed").splitlines()[-1]
            why = f"{binary} found, but it cannot build: {detail}"
        found.append({"engine": name, "ok": ok, "why": why})
    return found


def containerize(project: Project, version: str, *, gpu: bool = False, engine: str | None = None) -> str:
    """Build the image of `<project>:<version>` for the target with a local container engine (`engine`, else
    the first of ENGINES that answers) and return its tag (`image_tag`).

    Raises ContainerEngineMissing, naming each engine tried and why, when none can build here; then
    `build_context` writes the context and `build_command` says how to build it elsewhere. Raises
    ContainerBuildFailed with the engine's own error when the build fails."""
    if engine is not None and engine not in ENGINES:
        raise SpecError(f"unknown container engine {engine!r}", field="engine",
                        hint=f"one of {', '.join(ENGINES)} (BentoML's builders)")
    bentos.get(project, version)   # an unknown version is said first, before any engine is asked
    tag = image_tag(project, version, gpu=gpu)
    by_hand = (f"`slipway build {project.name} --containerize{' --gpu' if gpu else ''} --context DIR` "
               "(framework.container.build_context) writes the build context; on a machine with an engine run "
               f"`{build_command(Path('DIR'), tag, engine=engine or 'docker')}`")
    tried = engines((engine,) if engine else ENGINES)
    usable = next((e["engine"] for e in tried if e["ok"]), None)
    if usable is None:
        raise ContainerEngineMissing("no container engine can build the image here: "
                                     + "; ".join(f"{e['engine']} ({e['why']})" for e in tried), hint=by_hand)
    builder = _builder(usable)
    with tempfile.TemporaryDirectory(prefix="slipway-image-") as scratch:
        context = build_context(project, version, Path(scratch) / "context", gpu=gpu)
        from bentoml.exceptions import BentoMLException

        try:
            builder.build(context_path=str(context), file=str(context / DOCKERFILE), tag=(tag,))
        except (BentoMLException, OSError) as exc:
            raise ContainerBuildFailed(f"{usable} could not build {tag}: {str(exc).strip()[-2000:]}",
                                       hint=f"fix what it says and run again; or by hand: {by_hand}") from None
    return tag


# -- helpers ----------------------------------------------------------------------------------------------------
def _builder(engine: str):
    """BentoML's builder for `engine`, on the binary found on PATH now (BentoML records the path it found when
    it was first imported, which a later PATH does not change)."""
    from bentoml._internal.container import get_backend
    from bentoml._internal.container.base import OCIBuilder

    known = get_backend(engine)
    binary = shutil.which(Path(known.binary).name) or known.binary
    if binary == known.binary:
        return known
    return OCIBuilder.create(binary, build_cmd=known.build_cmd, enable_buildkit=known.enable_buildkit, env=known.env,
                             health=known.health, construct_build_args=known.construct_build_args)


@contextlib.contextmanager
def _stderr_to_text() -> Iterator[list[str]]:
    """Catch what child processes write to stderr (BentoML's health checks run the engine's client without
    capturing it); the yielded list holds the text once the block has run."""
    said: list[str] = []
    with tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield said
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            said.append(sink.read().decode(errors="replace"))


def _clear(out_dir: Path) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise SpecError(f"{out_dir} is a file, not a folder for the build context", path=str(out_dir))
    if any(out_dir.iterdir()):
        if not ((out_dir / "bento.yaml").is_file() and (out_dir / DOCKERFILE).is_file()):
            raise SpecError(f"{out_dir} is not empty and holds no earlier build context", path=str(out_dir),
                            hint="choose an empty or new folder")
    shutil.rmtree(out_dir)


def _packed(bento_root: Path):
    """The bento's own bento.json and project spec (both covered by its signed manifest)."""
    import json

    from framework.spec import parse_spec

    src = bento_root / "src" / "slipway"
    return (json.loads((src / "bento.json").read_text()),
            parse_spec((src / "project.toml").read_text(), str(src / "project.toml")))


def _require_gpu_layers(bento_root: Path, tag: str) -> None:
    """A CUDA image is for a bento whose pipeline model offloads layers to the GPU. With gpu_layers = 0 the image
    would still run llama.cpp's CUDA build (which moves large prompt batches to the card on its own), under a
    check made without a GPU: on a GPU the answers change (BENCHMARKS.md, "GPU"), so that check vouches for
    neither."""
    config, spec = _packed(bento_root)
    key = config["model_key"]
    if spec.models[key].gpu_layers == 0:
        raise SpecError(f"{tag} runs models.{key} with gpu_layers = 0: its CUDA image would not be the "
                        "configuration its check measured", field=f"models.{key}.gpu_layers",
                        hint="set gpu_layers (e.g. -1: every layer) in project.toml, run `slipway check` on a GPU "
                             "machine and build again; or containerize without --gpu")


def _check_models(context: Path, bento_root: Path, tag: str) -> None:
    """Every GGUF the bento names is in the context and hashes to its pin in the bento's (signed) project.toml.
    The `.verified` stamps copied from this machine's store are dropped, so the container hashes each file once."""
    from bentoml._internal.models import ModelStore

    from framework.weights import sha256_file

    config, spec = _packed(bento_root)
    packed = {config["model_key"]: config["model_tag"], **{t["key"]: t["model_tag"] for t in config.get("tiers", [])},
              **config.get("extra_models", {})}
    store = ModelStore(str(context / "models"))
    for stamp in (context / "models").rglob("*.verified"):
        stamp.unlink()
    for key, model_tag in packed.items():
        if model_tag is None:   # a remote model: nothing packed, its fingerprint is probed when a worker starts
            continue
        path = Path(store.get(model_tag).path) / "model.gguf"
        if not path.is_file():
            raise BentoTampered(f"the build context of {tag} lacks model {model_tag}'s model.gguf", path=str(path))
        actual, pinned = sha256_file(path), spec.models[key].sha256
        if actual != pinned:
            raise ModelError(f"model {model_tag} in the build context hashes to {actual[:12]}…, the bento's "
                             f"project.toml pins {pinned[:12]}…", path=str(path), field=f"models.{key}.sha256",
                             hint="the BentoML model store was changed after the build; rebuild with `slipway build`")
