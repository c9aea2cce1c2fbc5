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
        "tandem-gateway": [f"{settings.host}:{settings.gateway_port}"],
        "vllm": [hostport(u) for u in settings.vllm_endpoints],
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


def write_config(settings: Settings) -> Path:
    config = {
        "global": {"scrape_interval": "5s", "evaluation_interval": "5s"},
        "rule_files": [str(p) for p in sorted(RULES_DIR.glob("*.yml"))] if RULES_DIR.exists() else [],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": targets}]}
            | ({"metrics_path": METRICS_PATHS[job]} if job in METRICS_PATHS else {})
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
