"""The CPU image's steps, replayed outside a container: docker/install.sh into a fresh virtual environment (from the
wheels `make install` caches, without a network), the build stage's asset fetch, then the final stage's ENTRYPOINT
under its ENV (paths mapped into a temporary folder) with the compose file's config. The server must come up
healthy, answer, pass the image's HEALTHCHECK command, and exit 0 on SIGTERM."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.deploy.dockerfile import env_of, final_stage, instructions
from tests.deploy.wheelhouse import offline_env
from tests.integration.conftest import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Iterator[dict[str, Path]]:
    """The image's file system, mapped: /opt/venv, /opt/qwen-serve, /models, /etc/qwen-serve; removed after the
    module (its virtual environment holds torch: over 2 GB)."""
    root = tmp_path_factory.mktemp("image")
    paths = {"/opt/venv": root / "venv", "/opt/qwen-serve": root / "qwen-serve", "/models": root / "models",
             "/etc/qwen-serve": ROOT / "config"}
    steps = instructions(DOCKERFILE.read_text())
    build_stage = steps[: len(steps) - len(final_stage(steps))]
    # every wheel from the cache `make install` fills: no network inside `make test`
    build_env = {**os.environ, **mapped(env_of(build_stage), paths), "TORCH_INDEX_URL": "", **offline_env()}
    # the project step; the one before it installs g++ with apt (root only, and this machine has a compiler)
    (run,) = [arg for op, arg in build_stage if op == "RUN" and "install.sh" in arg]
    for command in run.split("&&"):
        argv = [mapped_value(word, paths) for word in shlex.split(command)]
        argv = [str(ROOT) if word == "/src" else word for word in argv]
        subprocess.run(argv, cwd=ROOT, env=build_env, check=True, timeout=900)
    yield paths
    shutil.rmtree(root)


def mapped_value(value: str, paths: dict[str, Path]) -> str:
    for inside, outside in paths.items():
        value = value.replace(inside, str(outside))
    return value


def mapped(env: dict[str, str], paths: dict[str, Path]) -> dict[str, str]:
    return {key: mapped_value(value, paths) for key, value in env.items()}


def test_build_stage_ships_the_native_kernel_built(image):
    """The final image has no compiler: the kernel must be built into the asset folder it copies."""
    from engine.kernels import native

    built = {path.name.split("-")[1] for path in (image["/opt/qwen-serve"] / "assets" / "kernels").glob("*.so")}
    assert built == set(native.ISAS)  # every build, whatever CPU the image will run on


def test_entrypoint_serves_the_compose_config_and_drains_on_sigterm(image):
    steps = final_stage(instructions(DOCKERFILE.read_text()))
    ops = dict(steps)
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    env = {"HOME": os.environ.get("HOME", "/tmp"), "PATH": os.environ["PATH"]}
    env |= mapped(env_of(steps), image)
    env["PATH"] = env["PATH"].replace("$PATH", os.environ["PATH"])
    env |= mapped({k: str(v) for k, v in compose["services"]["qwen-serve"]["environment"].items()}, image)
    port = free_port()
    entrypoint = json.loads(ops["ENTRYPOINT"])
    assert Path(shutil.which(entrypoint[0], path=env["PATH"])).parent == image["/opt/venv"] / "bin"
    process = subprocess.Popen([*entrypoint, "--host", "127.0.0.1", "--port", str(port)], env=env,
                               cwd=image["/models"].parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        assert wait_healthy(f"http://127.0.0.1:{port}", 180), "the image's server did not become healthy"
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
            "model": "SmolLM2-135M-Instruct", "max_tokens": 8,
            "messages": [{"role": "user", "content": "What is the capital of Germany?"}]}).json()
        assert reply["choices"][0]["message"]["content"]
        check = json.loads(ops["HEALTHCHECK"].split("CMD", 1)[1])
        check = [word.replace("8000", str(port)) for word in check]
        assert subprocess.run(check, env=env, timeout=30).returncode == 0
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        output = process.communicate()[0]
    assert "ready: model SmolLM2-135M-Instruct" in output
