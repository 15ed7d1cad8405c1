"""The deployment files, checked statically (no container engine runs here): Dockerfiles with hadolint, the
compose file against the Compose specification, Kubernetes manifests against the API schemas, and the pieces
that must agree with each other (ports, health path, config mounts, metric names)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from server.settings import Settings
from tests.deploy.dockerfile import final_stage, instructions

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cuda"]
MANIFESTS = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is missing: run `make install`")
    return str(path)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_pass_hadolint(dockerfile):
    result = subprocess.run([tool("hadolint"), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_are_multi_stage_non_root_with_healthcheck_and_entrypoint(dockerfile):
    steps = instructions(dockerfile.read_text())
    assert sum(1 for op, _ in steps if op == "FROM") == 2
    final = final_stage(steps)
    ops = {op: arg for op, arg in final}
    assert ops["USER"].split(":")[0].isdigit() and ops["USER"] != "0"
    assert "/health" in ops["HEALTHCHECK"] and "8000" in ops["HEALTHCHECK"]
    assert ops["ENTRYPOINT"] == '["qwen-serve"]'
    assert ops["EXPOSE"] == "8000"
    assert '"/models"' in ops["VOLUME"]
    copied = " ".join(arg for op, arg in steps if op == "COPY")
    assert "docker/install.sh" in copied and "docker/requirements.lock" in copied


def test_dockerignore_keeps_what_the_images_copy():
    kept = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
            if line.startswith("!")]
    for dockerfile in DOCKERFILES:
        for op, arg in instructions(dockerfile.read_text()):
            if op == "COPY" and not arg.startswith("--from"):
                for source in arg.split()[:-1]:
                    assert any(source.rstrip("/") == k or source.startswith(k + "/") for k in kept), source


def test_compose_file_follows_the_compose_spec():
    compose = ROOT / "docker" / "compose.yaml"
    result = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(compose)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    spec = yaml.safe_load(compose.read_text())
    server = spec["services"]["qwen-serve"]
    assert (ROOT / "docker" / server["build"]["dockerfile"].removeprefix("docker/")).exists()
    config = server["environment"]["QWEN_SERVE_CONFIG"]
    assert (ROOT / "config" / Path(config).name).exists() and config.startswith("/etc/qwen-serve/")
    assert server["ports"] == ["127.0.0.1:8000:8000"]
    assert spec["services"]["prometheus"]["depends_on"]["qwen-serve"]["condition"] == "service_healthy"
    embed = spec["services"]["qwen-serve-embed"]  # embeddings in a process of their own, beside the chat model
    assert embed["image"] == server["image"] and embed["environment"]["QWEN_SERVE_TASK"] == "embed"
    assert embed["environment"]["QWEN_SERVE_CONFIG"] == config and embed["ports"] == ["127.0.0.1:8001:8000"]
    Settings(task=embed["environment"]["QWEN_SERVE_TASK"])  # a value the server takes


def test_compose_spec_check_has_teeth(tmp_path):
    broken = tmp_path / "compose.yaml"
    broken.write_text("services:\n  a:\n    image: x\n    ports: 8000\n    restart: sometimes-maybe\n")
    result = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(broken)],
                            capture_output=True, text=True)
    assert result.returncode != 0


def test_prometheus_scrapes_the_server():
    config = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["qwen-serve:8000", "qwen-serve-embed:8000"]


def test_kubernetes_manifests_validate_against_the_api_schemas():
    result = subprocess.run([tool("kubernetes-validate"), "--strict", *map(str, MANIFESTS)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(MANIFESTS)


def test_kubernetes_validation_has_teeth(tmp_path):
    broken = tmp_path / "bad.yaml"
    text = (ROOT / "deploy" / "k8s" / "deployment.yaml").read_text().replace("replicas: 1", "replicas: one")
    broken.write_text(text)
    result = subprocess.run([tool("kubernetes-validate"), "--strict", str(broken)], capture_output=True, text=True)
    assert result.returncode != 0


def test_kubernetes_pieces_agree():
    docs = {doc["kind"]: doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text())}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["ports"] == [{"name": "http", "containerPort": 8000}]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert pod["securityContext"]["runAsUser"] == 10001
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["QWEN_SERVE_CONFIG"] == mounts["config"]
    claim = {v["name"]: v for v in pod["volumes"]}["models"]["persistentVolumeClaim"]["claimName"]
    assert claim == docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert docs["Service"]["spec"]["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]
    assert docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    settings_yaml = yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"])
    from server.settings import Settings

    Settings.model_validate(settings_yaml)


def test_hpa_metric_is_one_the_server_exports():
    hpa_text = (ROOT / "deploy" / "k8s" / "hpa.yaml").read_text()
    metrics_source = (ROOT / "server" / "metrics.py").read_text()
    assert "vllm:num_requests_waiting" in hpa_text and '"vllm:num_requests_waiting"' in metrics_source


def test_install_script_is_valid_sh():
    shell = shutil.which("sh")
    result = subprocess.run([shell, "-n", str(ROOT / "docker" / "install.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_grafana_is_provisioned_with_the_dashboard():
    spec = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    mounts = spec["services"]["grafana"]["volumes"]
    for mount in mounts:
        assert (ROOT / "docker" / mount.split(":")[0]).is_dir(), mount
    source = yaml.safe_load((ROOT / "docker/grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((ROOT / "docker/grafana/provisioning/dashboards/qwen-serve.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_the_tensor_parallel_example_requests_one_gpu_per_rank():
    path = ROOT / "deploy" / "k8s" / "tensor-parallel" / "deployment.yaml"
    result = subprocess.run([tool("kubernetes-validate"), "--strict", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    pod = yaml.safe_load(path.read_text())["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    ranks = int(args[args.index("--tensor-parallel-size") + 1])
    assert container["resources"]["requests"]["nvidia.com/gpu"] == ranks == container["resources"]["limits"][
        "nvidia.com/gpu"]
    shm = {v["name"]: v for v in pod["volumes"]}["shm"]["emptyDir"]
    assert shm["medium"] == "Memory" and {"name": "shm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    from server.cli import parse_settings

    assert parse_settings(args).tensor_parallel_size == ranks
