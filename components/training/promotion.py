"""Promotion and rollback: through the gateway's hot-swap when it is up, else straight into the registry.

The gateway (serving/lifecycle.py) loads the new champion into every vLLM replica before it switches the alias,
then records it in the registry. When the gateway is not running, the registry is updated here and the gateways'
reconcilers load the champions from it. Either way the switch runs under the alias's fleet-wide advisory lock
(``registry.lock_alias``) and its commit notifies every gateway; a second switch of the alias waits
``promotion_lock_wait_s`` and is then refused with a one-line error. The rules (rank, safetensors, a
gate-rejected version needs force) are ``components.adapter_rules``, the same ones the gateway applies.
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass
from typing import Any

import httpx

from components import adapter_rules, registry
from components.db import connect
from components.errors import ServiceError
from components.keys import admin_secret, bearer
from components.records import Record
from components.settings import Settings

MAX_REASON = 500  # the gateway's admin API takes at most this many characters


@dataclass
class PromotionResult(Record):
    alias: str
    version: int
    served_name: str
    via: str  # "gateway" or "registry"
    note: str


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
            error = resp.json().get("error")
            detail = (error.get("message") if isinstance(error, dict) else error) or resp.text
        except (ValueError, AttributeError):
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
        adapter_rules.check_servable(target, settings.max_lora_rank)
        if target.status == "champion":
            return PromotionResult(alias, version, target.served_name, "none", "already the champion")
        adapter_rules.check_promotable(target, force, force_hint="pass --force")
        reason = adapter_rules.override_reason(target, reason, force)
    reason = reason[:MAX_REASON] if reason else None
    body = {"alias": alias, "version": version, "force": force, "reason": reason}
    if _gateway(settings, "/v1/admin/adapters/promote", body) is not None:
        return PromotionResult(alias, version, target.served_name, "gateway", "hot-swapped by the gateway")
    with connect(settings) as conn, conn.transaction():
        registry.lock_alias(conn, alias, settings.promotion_lock_wait_s)
        target = registry.get_version(conn, alias, version)  # again under the lock: another switch may have run
        adapter_rules.check_promotable(target, force, force_hint="pass --force")
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
        adapter_rules.check_servable(target, settings.max_lora_rank)
    if _gateway(settings, "/v1/admin/adapters/rollback", {"alias": alias}) is not None:
        return PromotionResult(alias, target.version, target.served_name, "gateway", "rolled back by the gateway")
    with connect(settings) as conn, conn.transaction():
        registry.lock_alias(conn, alias, settings.promotion_lock_wait_s)
        target = registry.rollback_target(conn, alias)  # again under the lock: another switch may have run
        adapter_rules.check_servable(target, settings.max_lora_rank)
        registry.set_champion(conn, alias, target.version, reason="rollback", actor=local_actor(), rollback=True)
    return PromotionResult(
        alias,
        target.version,
        target.served_name,
        "registry",
        f"gateway at {settings.gateway_url} not running: registry updated; it loads the champion when it starts",
    )
