"""The bento's image through BentoML's containerize path (framework/container.py).

The bento here is a real BentoML bento, built by `bentoml.bentos.build` into the test's own BENTOML_HOME, of a
small stand-in service with a stand-in GGUF, and signed as `slipway build` signs: the container step reads only
what BentoML and the manifest give it, so it needs no checked pipeline and no model run. No container engine
runs here; `FakeEngine` is a `docker` client script on PATH that records how BentoML's builder calls it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path

import pytest

from framework import audit, bentos, container, signing
from framework.errors import BentoTampered, ContainerBuildFailed, ContainerEngineMissing, ModelError, SpecError
from framework.spec import load_project

VERSION = "c0ffee0000000000v1"
PINNED = ["llama-cpp-python==0.3.36", "dspy==3.4.1", "duckdb==2.0.1"]   # as a locked requirements.txt pins them
GGUF = b"GGUF" + bytes(range(256)) * 16    # stands in for the model file: only its bytes and sha256 matter
SHA = hashlib.sha256(GGUF).hexdigest()
MODEL_TAG = f"ticket-triage-tiny:{SHA[:20]}"
SERVICE = '''
import bentoml


@bentoml.service(name="ticket_triage")
class StandIn:
    gguf = bentoml.models.BentoModel("{tag}")

    @bentoml.api
    def ping(self) -> str:
        return "pong"
'''


@pytest.fixture(params=["cpu"])
def built(request, project_root, monkeypatch, keys, tmp_path):
    """`ticket-triage:<VERSION>` in the test's BentoML store: the model packed like build._ensure_model does,
    slipway/bento.json and project.toml (pinning the model's sha256) inside, manifest and build statement signed."""
    monkeypatch.setenv("BENTOML_HOME", str(project_root / "bentos"))
    monkeypatch.delenv("BENTOML_CONTAINERIZED", raising=False)
    toml = project_root / "projects" / "ticket-triage" / "project.toml"
    text = toml.read_text().replace('model = "qwen15"', 'model = "tiny"', 1)
    tiny_sha = re.search(r'\[models\.tiny\][^\[]*?sha256 = "([0-9a-f]{64})"', text).group(1)
    text = text.replace(tiny_sha, SHA)
    if request.param == "gpu":   # a bento checked for the GPU: its model offloads every layer
        text = text.replace(f'sha256 = "{SHA}"', f'sha256 = "{SHA}"\ngpu_layers = -1', 1)
    toml.write_text(text)
    project = load_project(str(toml))
    bentos.use_bentoml_home(project)
    import bentoml

    with bentoml.models.create(MODEL_TAG, labels={"sha256": SHA}) as model:
        (Path(model.path) / "model.gguf").write_bytes(GGUF)
        (Path(model.path) / "model.gguf.verified").write_text("a stamp of this machine")
    ctx = tmp_path / "build-ctx"
    (ctx / "slipway").mkdir(parents=True)
    (ctx / "standin_service.py").write_text(SERVICE.format(tag=MODEL_TAG))
    (ctx / "slipway" / "project.toml").write_text(toml.read_text())
    (ctx / "slipway" / "bento.json").write_text(json.dumps(
        {"project": "ticket-triage", "model_key": "tiny", "model_tag": MODEL_TAG, "tiers": [], "extra_models": {}}))
    bento = bentoml.bentos.build("standin_service:StandIn", name="ticket-triage", version=VERSION, build_ctx=str(ctx),
                                 include=["standin_service.py", "slipway/**"], models=[MODEL_TAG],
                                 labels={"slipway.model_sha256": SHA},
                                 python={"packages": PINNED, "lock_packages": False})
    root = Path(bento.path)
    manifest = bentos.write_manifest(root)
    signed = signing.sign(audit.statement("ticket-triage", "build", f"ticket-triage:{VERSION}",
                                          {"manifest_sha256": manifest}), keys["alice"])
    (root / bentos.BUILD_SIGNATURE).write_text(json.dumps(signed.to_dict(), indent=1, sort_keys=True))
    return project, root


def _instructions(dockerfile: str) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", dockerfile)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _install_index(lines: list[str]) -> int:
    return next(i for i, line in enumerate(lines)
                if line.startswith("RUN") and "pip install -r $BENTO_PATH/env/python/requirements.txt" in line)


def test_the_cpu_context_is_the_bento_its_pinned_requirements_and_model(built, tmp_path):
    project, root = built
    out = container.build_context(project, VERSION, tmp_path / "ctx")
    assert out == (tmp_path / "ctx").resolve()
    lines = _instructions((out / container.DOCKERFILE).read_text())
    own = _instructions((root / container.DOCKERFILE).read_text())   # the Dockerfile the bento was built with
    assert lines[0] == own[0] and lines[0].startswith("FROM python:3.")   # its own base image
    # the bento's locked requirements, byte for byte, are what the image installs
    assert (out / "env/python/requirements.txt").read_bytes() == (root / "env/python/requirements.txt").read_bytes()
    assert all(pin in (out / "env/python/requirements.txt").read_text().splitlines() for pin in PINNED)
    install = _install_index(lines)
    # llama-cpp-python compiles with the Makefile's portable CPU flags, set before the install runs
    arg = next(i for i, line in enumerate(lines) if line.startswith("ARG CMAKE_ARGS="))
    assert arg < install and "ENV CMAKE_ARGS=$CMAKE_ARGS" in lines[arg:install]
    assert "-DGGML_NATIVE=OFF" in lines[arg] and "-DGGML_AVX2=ON" in lines[arg] and "CUDA" not in lines[arg]
    assert lines[-1] == 'ENTRYPOINT [ "/home/bentoml/bento/env/docker/entrypoint.sh" ]'
    assert f"ARG SLIPWAY_TRACE_DIR={container.TRACE_DIR}" in lines   # traces outside the bento's folder
    # every file of the bento is in the context unchanged, except the Dockerfile rendered for the image
    listed = json.loads((root / bentos.MANIFEST).read_text())["files"]
    for rel, digest in listed.items():
        if rel != container.DOCKERFILE:
            assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == digest, rel
    assert (out / bentos.BUILD_SIGNATURE).read_bytes() == (root / bentos.BUILD_SIGNATURE).read_bytes()
    # the model the bento names is in models/, hashing to the pin that the signed bento carries
    gguf = out / "models" / "ticket-triage-tiny" / SHA[:20] / "model.gguf"
    assert hashlib.sha256(gguf.read_bytes()).hexdigest() == SHA
    assert f'sha256 = "{SHA}"' in (out / "src/slipway/project.toml").read_text()
    assert f"slipway.model_sha256: {SHA}" in (out / "bento.yaml").read_text()
    assert not list((out / "models").rglob("*.verified"))   # the container hashes the file itself once


@pytest.mark.parametrize("built", ["gpu"], indirect=True)
def test_the_gpu_context_compiles_llama_cpp_with_cuda_on_a_cuda_devel_image(built, tmp_path):
    project, root = built
    out = container.build_context(project, VERSION, tmp_path / "ctx", gpu=True)
    lines = _instructions((out / container.DOCKERFILE).read_text())
    assert lines[0] == f"FROM {container.CUDA_BASE_IMAGE} AS base-container"
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-devel-ubuntu[\d.]+", container.CUDA_BASE_IMAGE)   # nvcc is in devel
    install = _install_index(lines)
    arg = next(i for i, line in enumerate(lines) if line.startswith("ARG CMAKE_ARGS="))
    assert arg < install and "-DGGML_CUDA=ON" in lines[arg] and "-DGGML_NATIVE=OFF" in lines[arg]
    # BentoML installs uv with pip, which the CUDA image lacks: the system packages bring it, before uv is needed
    pip = next(i for i, line in enumerate(lines) if line.startswith("RUN apt-get install") and "python3-pip" in line)
    # the instruction that installs uv: BentoML 1.4.39 `command -v uv || pip install uv`, 1.4.40 the same test
    # before a hash-pinned pip install; both before the venv that needs it
    uv = next(i for i, line in enumerate(lines) if "command -v uv" in line)
    assert pip < uv < install
    assert (out / "env/python/requirements.txt").read_bytes() == (root / "env/python/requirements.txt").read_bytes()
    assert container.image_tag(project, VERSION, gpu=True) == f"ticket-triage:{VERSION}-cuda"
    assert container.image_tag(project, VERSION) == f"ticket-triage:{VERSION}"


def test_a_bento_checked_without_a_gpu_gets_no_cuda_image(built, tmp_path):
    project, _ = built
    with pytest.raises(SpecError, match="gpu_layers = 0") as caught:
        container.build_context(project, VERSION, tmp_path / "ctx", gpu=True)
    assert caught.value.field == "models.tiny.gpu_layers" and "slipway check" in caught.value.hint
    assert not (tmp_path / "ctx").exists()


def test_the_service_verifies_the_context_as_the_container_will_see_it(built, tmp_path, monkeypatch):
    """What the service checks at start (bentos.verify on $BENTO_PATH): BentoML's rewritten Dockerfile and the
    models it copies in are allowed inside a container, and only there; any other change is still caught."""
    project, root = built
    out = container.build_context(project, VERSION, tmp_path / "ctx")
    with pytest.raises(BentoTampered, match="changed after the build|added to the bento"):
        bentos.verify(out)                                     # outside a container: not the bento as built
    monkeypatch.setenv("BENTOML_CONTAINERIZED", "true")         # as BentoML's Dockerfile sets it
    bentos.verify(out, f"ticket-triage:{VERSION}")
    (out / "models" / "ticket-triage-tiny" / SHA[:20] / "model.gguf.verified").write_text("stamp")
    bentos.verify(out)                                         # weights.verify's stamp beside the model
    program = out / "src" / "slipway" / "project.toml"
    program.write_text(program.read_text() + "\n# edited\n")
    with pytest.raises(BentoTampered, match="changed after the build"):
        bentos.verify(out)
    (out / "src" / "slipway" / "project.toml").write_bytes((root / "src/slipway/project.toml").read_bytes())
    (out / "src" / "extra.py").write_text("print('added')\n")
    with pytest.raises(BentoTampered, match="added to the bento"):
        bentos.verify(out)


def test_a_changed_bento_or_model_is_not_containerized(built, tmp_path):
    project, root = built
    edited = root / "src" / "slipway" / "bento.json"
    original = edited.read_bytes()
    edited.write_bytes(original + b" ")
    with pytest.raises(BentoTampered, match="changed after the build"):
        container.build_context(project, VERSION, tmp_path / "ctx")
    edited.write_bytes(original)
    import bentoml

    gguf = Path(bentoml.models.get(MODEL_TAG).path) / "model.gguf"
    gguf.write_bytes(GGUF[:-1] + b"\x00")
    with pytest.raises(ModelError, match="pins"):
        container.build_context(project, VERSION, tmp_path / "ctx")


@pytest.mark.parametrize("built", ["gpu"], indirect=True)
def test_the_context_folder_is_replaced_only_when_it_holds_an_earlier_context(built, tmp_path):
    project, _ = built
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(SpecError, match="not empty"):
        container.build_context(project, VERSION, mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    out = container.build_context(project, VERSION, tmp_path / "ctx")
    (out / "stale").write_text("from before")
    container.build_context(project, VERSION, out, gpu=True)
    assert not (out / "stale").exists() and "nvidia/cuda" in (out / container.DOCKERFILE).read_text()
    assert container.default_context_dir(project, VERSION, gpu=True) == (
        project.root / "build" / "containers" / f"ticket-triage-{VERSION}-cuda")


class FakeEngine:
    """A `docker` client on PATH: `version` answers like a running daemon (or fails like one that is not),
    `build` records its arguments and the Dockerfile it was given, and exits with `build_exit`."""

    def __init__(self, folder: Path, *, daemon: bool = True, build_exit: int = 0):
        self.folder, self.log = folder, folder / "calls.jsonl"
        folder.mkdir(parents=True, exist_ok=True)
        script = folder / "docker"
        version = ('echo \'"28.2.2"\'' if daemon else
                   'echo "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. '
                   'Is the docker daemon running?" >&2; exit 1')
        script.write_text(f"""#!/bin/sh
if [ "$1" = version ]; then {version}; fi
if [ "$1" = build ]; then
  python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> {self.log}
  for a in "$@"; do case "$prev" in --file) cp "$a" {folder}/Dockerfile.seen;; esac; prev="$a"; done
  [ {build_exit} = 0 ] || echo "failed to solve: pip install exited 1" >&2
  exit {build_exit}
fi
""")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)

    def calls(self) -> list[list[str]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []


@pytest.mark.parametrize("built", ["gpu"], indirect=True)
def test_containerize_builds_with_the_engine_found_through_bentomls_builder(built, tmp_path, monkeypatch):
    project, _ = built
    engine = FakeEngine(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{engine.folder}{os.pathsep}{os.environ['PATH']}")
    tag = container.containerize(project, VERSION, gpu=True, engine="docker")
    assert tag == f"ticket-triage:{VERSION}-cuda"
    [args] = engine.calls()
    assert args[0] == "build" and args[args.index("--tag") + 1] == tag
    assert args[args.index("--file") + 1].endswith(container.DOCKERFILE)
    assert "-DGGML_CUDA=ON" in (engine.folder / "Dockerfile.seen").read_text()
    # the command printed for a machine with an engine is the one BentoML's builder runs
    context = Path(args[-1])
    assert container.build_command(context, tag) == (
        f"docker build --file {context / container.DOCKERFILE} --tag {tag} {context}")


def test_a_failed_image_build_says_what_the_engine_said(built, tmp_path, monkeypatch):
    project, _ = built
    engine = FakeEngine(tmp_path / "bin", build_exit=1)
    monkeypatch.setenv("PATH", f"{engine.folder}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(ContainerBuildFailed, match="docker could not build") as caught:
        container.containerize(project, VERSION, engine="docker")
    assert "docker build --file" in caught.value.hint


def test_without_an_engine_containerize_refuses_naming_each_engine_tried(built, tmp_path, monkeypatch):
    project, _ = built
    engine = FakeEngine(tmp_path / "bin", daemon=False)
    monkeypatch.setenv("PATH", str(engine.folder))     # docker's client without a daemon; nothing else
    with pytest.raises(ContainerEngineMissing) as caught:
        container.containerize(project, VERSION, gpu=True)
    message = caught.value.message
    for name in container.ENGINES:
        assert f"{name} (" in message
    assert "podman (not installed)" in message
    assert "docker" in message and "Cannot connect to the Docker daemon" in message
    assert "--containerize --gpu --context DIR" in caught.value.hint
    assert f"--tag ticket-triage:{VERSION}-cuda DIR" in caught.value.hint
    assert caught.value.code == "container-engine-missing" and caught.value.exit_code == 2
    with pytest.raises(SpecError, match="unknown container engine"):
        container.containerize(project, VERSION, engine="kaniko")


def test_the_new_error_codes_are_documented():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    assert f"`{ContainerEngineMissing.code}`" in docs and f"`{ContainerBuildFailed.code}`" in docs


@pytest.mark.model
def test_a_real_builds_context_serves_as_its_container_would(tiny_project, tiny_model_present, tmp_path):
    """The real path without an engine: check and build the demo on the tiny model, write the CPU context, then
    run it as the image's entrypoint does (`bentoml serve $BENTO_PATH`, in $BENTO_PATH, with the image's
    environment): the service verifies the context, loads the model from models/ and answers."""
    import socket
    import subprocess
    import sys
    import time

    import httpx
    from typer.testing import CliRunner

    from framework.cli import app
    from tests.conftest import cli_ok, edit_toml

    for clause in ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms"):   # this tests the image, not speed
        edit_toml(tiny_project, f"{clause} = 60000", f"{clause} = 600000")
    cli_ok(["check", "ticket-triage"])
    tag = json.loads(CliRunner().invoke(app, ["build", "ticket-triage", "--json"]).stdout)["tag"]
    project = load_project(str(tiny_project))
    version = tag.split(":")[1]
    out = container.build_context(project, version, tmp_path / "ctx")
    requirements = (out / "env/python/requirements.txt").read_text().splitlines()
    import llama_cpp

    assert f"llama-cpp-python=={llama_cpp.__version__}" in requirements   # the bento's lock, pinned
    config = json.loads((out / "src/slipway/bento.json").read_text())
    name, model_version = config["model_tag"].split(":")
    gguf = out / "models" / name / model_version / "model.gguf"
    assert hashlib.sha256(gguf.read_bytes()).hexdigest() == project.model("tiny").sha256

    env = {**os.environ, **container.target()["env"], "BENTOML_CONTAINERIZED": "true", "BENTO_PATH": str(out),
           "BENTOML_HOME": str(tmp_path / "home"), "SLIPWAY_TRACE_DIR": str(tmp_path / "traces")}
    env.pop("CMAKE_ARGS")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "bentoml"), "serve", str(out), "--host",
                               "127.0.0.1", "--port", str(port)], cwd=out, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, server.stdout.read()
            time.sleep(1)
        else:
            pytest.fail("the containerized layout never became ready")
        answer = httpx.post(f"{base}/triage", json={"ticket": "The whole dashboard is down for everyone"}, timeout=120)
        assert answer.status_code == 200, answer.text
        assert answer.json()["version"]["bento"] == tag
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    assert list((tmp_path / "traces").rglob("*.jsonl"))     # traces went outside the bento
    with pytest.MonkeyPatch.context() as patch:              # a restarted container verifies the same files again
        patch.setenv("BENTOML_CONTAINERIZED", "true")
        bentos.verify(out, tag)
