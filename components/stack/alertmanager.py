"""Alertmanager and the Postgres exporter in the local stack: their commands and the config `tandem up` writes.

Both are Debian's packages (``prometheus-alertmanager``, ``prometheus-postgres-exporter``); a host without them
runs the rest of the stack, and `tandem status` names the package to install.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from components.settings import Settings

ALERTMANAGER_BINARIES = ("prometheus-alertmanager", "alertmanager")  # Debian's name first, upstream's second
POSTGRES_EXPORTER_BINARIES = ("prometheus-postgres-exporter", "postgres_exporter")
WEBHOOK_PATH = "/v1/admin/alerts/webhook"
EXPORTER_QUERIES = Path(__file__).resolve().parents[2] / "infra" / "postgres-exporter" / "queries.yml"


def _which(names: tuple[str, ...]) -> str | None:
    return next((path for path in map(shutil.which, names) if path), None)


def alertmanager_missing(settings: Settings) -> str | None:
    if _which(ALERTMANAGER_BINARIES) is None:
        return "Alertmanager is not installed: apt-get install -y prometheus-alertmanager (or `make system`)"
    return None


def postgres_exporter_missing(settings: Settings) -> str | None:
    if _which(POSTGRES_EXPORTER_BINARIES) is None:
        return (
            "the Postgres exporter is not installed: apt-get install -y prometheus-postgres-exporter (or `make system`)"
        )
    return None


def alertmanager_config(settings: Settings) -> dict[str, object]:
    """One route to the gateway's webhook, which stores each notification in Postgres for the dashboards page.

    The webhook is an admin endpoint: Alertmanager sends the admin key from a file only this user can read
    (written by ``write_alertmanager_config``), as compose and Kubernetes do (infra/alertmanager/alertmanager.yml).
    """
    webhook: dict[str, object] = {"url": settings.gateway_url + WEBHOOK_PATH, "send_resolved": True}
    webhook["http_config"] = {"authorization": {"type": "Bearer", "credentials_file": str(webhook_key_path(settings))}}
    return {
        "route": {
            "receiver": "tandem-gateway",
            "group_by": ["alertname", "alias"],
            "group_wait": "5s",
            "group_interval": "10s",
            "repeat_interval": "4h",
        },
        "receivers": [
            {
                "name": "tandem-gateway",
                "webhook_configs": [webhook],
            }
        ],
    }


def webhook_key_path(settings: Settings) -> Path:
    return settings.run_dir / "alertmanager-webhook.key"


def write_alertmanager_config(settings: Settings) -> Path:
    """The config, and beside it the admin key the webhook needs (mode 0600; none configured: an empty file,
    and the gateway refuses the webhook, as it refuses every admin request without admin keys)."""
    import os

    from components.keys import admin_secret

    path = settings.run_dir / "alertmanager.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    key = webhook_key_path(settings)
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(admin_secret(settings) or "")
    os.chmod(key, 0o600)
    path.write_text(yaml.safe_dump(alertmanager_config(settings), sort_keys=False))
    return path


def alertmanager_command(settings: Settings) -> list[str]:
    binary = _which(ALERTMANAGER_BINARIES) or ALERTMANAGER_BINARIES[0]
    return [
        binary,
        f"--config.file={write_alertmanager_config(settings)}",
        f"--storage.path={settings.state_dir / 'alertmanager'}",
        f"--web.listen-address={settings.host}:{settings.alertmanager_port}",
        # One instance: no gossip port (its default, 9094, would clash between two stacks on one host).
        "--cluster.listen-address=",
    ]


def postgres_exporter_command(settings: Settings) -> list[str]:
    binary = _which(POSTGRES_EXPORTER_BINARIES) or POSTGRES_EXPORTER_BINARIES[0]
    return [
        binary,
        f"--web.listen-address={settings.host}:{settings.postgres_exporter_port}",
        # Debian's 0.11 has no table statistics of its own: the dead tuples of the chunk table come from here.
        f"--extend.query-path={EXPORTER_QUERIES}",
        # its bgwriter collector reads columns PostgreSQL 17 removed, and logs an error at every scrape
        "--no-collector.bgwriter",
    ]


def postgres_exporter_env(settings: Settings) -> dict[str, str]:
    """The exporter reads its DSN from the environment, never from the command line (``ps`` would show it)."""
    from components.db.postgres import database_url

    return {"DATA_SOURCE_NAME": database_url(settings)}
