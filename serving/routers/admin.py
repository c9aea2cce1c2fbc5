"""Admin API: list adapters, stage or promote a version, roll an alias back. Admin keys only; off without one.

Every change is recorded with the calling key's name (``key:<name>``) in the registry's ``promoted_by`` and
``changed_by``. Changes go through the lifecycle (serving/lifecycle.py): one per alias at a time across the
fleet, so a second one of the same alias waits ``promotion_lock_wait_s`` and is then answered 409 alias_busy.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends, Request

from components import registry
from serving.deps import GatewayDep
from serving.schemas import PromoteRequest, RollbackRequest, StageRequest
from serving.security import actor, require_admin_key

log = logging.getLogger("serving")


def _one_line(text: str | None) -> str | None:
    """The registry keeps the reason as one line (NUL is refused with a 400 by the request schema)."""
    return " ".join(text.split()) if text else None


router = APIRouter(prefix="/v1/admin/adapters", dependencies=[Depends(require_admin_key)], tags=["admin"])


@router.get("", summary="Aliases, champion versions (with who promoted them) and each replica's load state")
async def list_adapters(gw: GatewayDep) -> dict[str, Any]:
    snap = gw.adapters.snapshot()
    try:
        champions = await gw.adapters.db.run(registry.champions)
        staged = await gw.adapters.db.run(registry.staged)
    except Exception as exc:  # the snapshot itself lives in memory: still answer it without the registry's part
        log.warning("admin snapshot without the registry: %s", exc)
        champions, staged = {}, {}
    for entry in snap["aliases"]:
        champ = champions.get(entry["alias"])
        entry["promoted_by"] = champ.promoted_by if champ else None
        entry["promoted_at"] = champ.promoted_at.isoformat() if champ and champ.promoted_at else None
        entry["staged_version"] = staged[entry["alias"]].version if entry["alias"] in staged else None
    return snap


@router.post("/promote", summary="Load a version on every replica, warm it, switch the alias, retire the old")
async def promote(req: PromoteRequest, gw: GatewayDep, request: Request) -> dict[str, Any]:
    reason = _one_line(req.reason) or "promoted via the gateway"
    by = actor(request)
    log.info("promote %s v%d requested by %s (force=%s)", req.alias, req.version, by, req.force)
    return await gw.adapters.promote(req.alias, req.version, reason=reason, force=req.force, actor=by)


@router.post("/stage", summary="Load and warm a version on every replica ahead of its promotion; switch nothing")
async def stage(req: StageRequest, gw: GatewayDep, request: Request) -> dict[str, Any]:
    log.info("stage %s v%d requested by %s", req.alias, req.version, actor(request))
    return await gw.adapters.stage(req.alias, req.version, force=req.force)


@router.post("/rollback", summary="Promote the alias's previous champion again")
async def rollback(req: RollbackRequest, gw: GatewayDep, request: Request) -> dict[str, Any]:
    by = actor(request)
    log.info("rollback of %s requested by %s", req.alias, by)
    return await gw.adapters.rollback(req.alias, actor=by)
