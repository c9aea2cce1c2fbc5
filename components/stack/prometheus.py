"""The Prometheus config `tandem up` writes under the state dir: scrape the local stack, load the rules."""

from __future__ import annotations

from pathlib import Path

import yaml

from components.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
RULES_DIR = REPO_ROOT / "infra" / "prometheus" / "rules"


def scrape_targets(settings: Settings) -> dict[str, list[str]]:
    def hostport(url: str) -> str:
        return url.split("://", 1)[-1].rstrip("/")

    return {
        "tandem-gateway": [f"{settings.host}:{settings.gateway_port}"],
        "vllm": [hostport(u) for u in settings.vllm_endpoints],
        "gpu-exporter": [f"{settings.host}:{settings.gpu_exporter_port}"],
    }


def write_config(settings: Settings) -> Path:
    config = {
        "global": {"scrape_interval": "5s", "evaluation_interval": "5s"},
        "rule_files": [str(p) for p in sorted(RULES_DIR.glob("*.yml"))] if RULES_DIR.exists() else [],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": targets}]}
            for job, targets in scrape_targets(settings).items()
        ],
    }
    path = settings.run_dir / "prometheus.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
