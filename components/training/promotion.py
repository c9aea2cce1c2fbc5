"""Promotion and rollback: through the gateway's hot-swap when it is up, else straight into the registry.

The gateway (serving/) loads the new champion into every vLLM replica before it switches the alias, then
records it in the registry. When the gateway is not running, the registry is updated here and the gateway's
reconciler loads the champions from it when it starts.
"""

from __future__ import annotations

import getpass
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from components import registry
from components.db import connect
from components.errors import ConfigError, ServiceError
from components.keys import admin_secret, bearer
from components.settings import Settings
from components.training import artifacts

MAX_REASON = 500  # the gateway's admin API takes at most this many characters


@dataclass
class PromotionResult:
    alias: str
    version: int
    served_name: str
    via: str  # "gateway" or "registry"
    note: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_rank(settings: Settings, version: registry.AdapterVersion) -> None:
    """Refuse an adapter whose rank vLLM would refuse (--max-lora-rank), before anything changes."""
    if version.lora_rank > settings.max_lora_rank:
        raise ConfigError(
            f"adapter {version.alias} v{version.version} has LoRA rank {version.lora_rank}, above the servers' "
            f"max_lora_rank {settings.max_lora_rank}; retrain with a smaller lora_r or raise TANDEM_MAX_LORA_RANK"
        )


def local_actor() -> str:
    """Who a change made here without the gateway is recorded as (the registry's promoted_by/changed_by)."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name for this uid (a container)
        return "cli:unknown"


def _gateway(settings: Settings, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """POST to the gateway's admin API with the admin key; None when the gateway is not running."""
    headers = bearer(admin_secret(settings))
    try:
        resp = httpx.post(f"{settings.gateway_url}{path}", json=body, headers=headers, timeout=120.0)
    except (httpx.ConnectError, httpx.ConnectTimeout):
        return None
    if resp.status_code >= 400:
        try:
            detail = resp.json().get("detail") or resp.json().get("error") or resp.text
        except ValueError:
            detail = resp.text
        raise ServiceError(f"the gateway refused {path} ({resp.status_code}): {str(detail)[:300]}")
    data: dict[str, Any] = resp.json() if resp.content else {}
    return data


def promote(
    settings: Settings, alias: str, version: int, reason: str | None = None, force: bool = False
) -> PromotionResult:
    """Make ``alias`` v``version`` the champion (rank checked first).

    A version the evaluation gate rejected is refused unless ``force`` is set; a forced promotion records the
    override and the gate's reasons in the registry, so the lineage shows who went past the gate and why.
    """
    with connect(settings) as conn:
        target = registry.get_version(conn, alias, version)
        check_rank(settings, target)
        artifacts.check_weights(target.artifact_uri)  # safetensors only: a pickled adapter is refused
        if target.status == "champion":
            return PromotionResult(alias, version, target.served_name, "none", "already the champion")
        if target.status == "rejected":
            if not force:
                raise ConfigError(
                    f"adapter {alias} v{version} was rejected by the evaluation gate ({target.reason}); "
                    "pass --force to promote it anyway"
                )
            reason = f"{reason or 'promoted'}, overriding the gate's rejection ({target.reason})"
    reason = reason[:MAX_REASON] if reason else None
    body = {"alias": alias, "version": version, "force": force, "reason": reason}
    if _gateway(settings, "/v1/admin/adapters/promote", body) is not None:
        return PromotionResult(alias, version, target.served_name, "gateway", "hot-swapped by the gateway")
    with connect(settings) as conn:
        registry.set_champion(conn, alias, version, reason=reason, actor=local_actor())
    return PromotionResult(
        alias,
        version,
        target.served_name,
        "registry",
        f"gateway at {settings.gateway_url} not running: registry updated; it loads the champion when it starts",
    )


def stage(settings: Settings, alias: str, version: int) -> dict[str, Any] | None:
    """Have the gateway load and warm a version that passed the gate on every replica, so that its promotion
    only switches the alias. Best effort: None when the gateway is not running (the promotion then loads it).
    """
    return _gateway(settings, "/v1/admin/adapters/stage", {"alias": alias, "version": version})


def rollback(settings: Settings, alias: str) -> PromotionResult:
    """Return ``alias`` to its previous champion."""
    with connect(settings) as conn:
        target = registry.rollback_target(conn, alias)
        check_rank(settings, target)
        artifacts.check_weights(target.artifact_uri)  # safetensors only: a pickled adapter is refused
    if _gateway(settings, "/v1/admin/adapters/rollback", {"alias": alias}) is not None:
        return PromotionResult(alias, target.version, target.served_name, "gateway", "rolled back by the gateway")
    with connect(settings) as conn:
        registry.set_champion(conn, alias, target.version, reason="rollback", actor=local_actor(), rollback=True)
    return PromotionResult(
        alias,
        target.version,
        target.served_name,
        "registry",
        f"gateway at {settings.gateway_url} not running: registry updated; it loads the champion when it starts",
    )
