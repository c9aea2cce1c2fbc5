"""The Prometheus config `tandem up` writes under the state dir: scrape the local stack, load the rules."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

from components.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
RULES_DIR = REPO_ROOT / "infra" / "prometheus" / "rules"
# Jobs whose metrics are not at /metrics: Airflow's DAG and task metrics come from the airflow-exporter plugin,
# served by Airflow's API server.
METRICS_PATHS = {"airflow": "/admin/metrics/"}


def scrape_targets(settings: Settings) -> dict[str, list[str]]:
    def hostport(url: str) -> str:
        return url.split("://", 1)[-1].rstrip("/")

    return {
        "tandem-gateway": [f"{settings.host}:{settings.gateway_port + i}" for i in range(settings.gateway_replicas)],
        # dns+ entries are discovered by Prometheus itself (dns_sd_configs in write_config)
        "vllm": [hostport(u) for u in settings.vllm_endpoints if not u.startswith("dns+")],
        "gpu-exporter": [f"{settings.host}:{settings.gpu_exporter_port}"],
        **_monitoring_targets(settings),
    }


def _monitoring_targets(settings: Settings) -> dict[str, list[str]]:
    """Alertmanager, the Postgres exporter and Airflow's metrics plugin, where installed (a host without them
    scrapes the rest)."""
    from components.stack.alertmanager import alertmanager_missing, postgres_exporter_missing

    out = {}
    if alertmanager_missing(settings) is None:
        out["alertmanager"] = [f"{settings.host}:{settings.alertmanager_port}"]
    if postgres_exporter_missing(settings) is None:
        out["postgres"] = [f"{settings.host}:{settings.postgres_exporter_port}"]
    if importlib.util.find_spec("airflow_exporter") is not None:
        out["airflow"] = [f"{settings.host}:{settings.airflow_port}"]
    return out


def dns_sd_configs(settings: Settings) -> list[dict[str, object]]:
    """Prometheus's own DNS discovery for each `dns+http://NAME:PORT` entry of TANDEM_VLLM_URLS (type A)."""
    out: list[dict[str, object]] = []
    for url in settings.vllm_endpoints:
        if url.startswith("dns+"):
            name, _, port = url.split("://", 1)[-1].rstrip("/").rpartition(":")
            out.append({"names": [name], "type": "A", "port": int(port), "refresh_interval": "10s"})
    return out


def write_config(settings: Settings) -> Path:
    config = {
        "global": {"scrape_interval": "5s", "evaluation_interval": "5s"},
        "rule_files": [str(p) for p in sorted(RULES_DIR.glob("*.yml"))] if RULES_DIR.exists() else [],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": targets}]}
            | ({"metrics_path": METRICS_PATHS[job]} if job in METRICS_PATHS else {})
            | ({"dns_sd_configs": dns_sd_configs(settings)} if job == "vllm" and dns_sd_configs(settings) else {})
            for job, targets in scrape_targets(settings).items()
        ],
        "alerting": {
            "alertmanagers": [{"static_configs": [{"targets": [f"{settings.host}:{settings.alertmanager_port}"]}]}]
        },
    }
    path = settings.run_dir / "prometheus.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
