"""Admin API: list adapters, stage or promote a version, roll an alias back. Needs an admin key once any is set."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from serving.deps import GatewayDep
from serving.schemas import PromoteRequest, RollbackRequest, StageRequest
from serving.security import require_admin_key


def _one_line(text: str | None) -> str | None:
    """The registry keeps the reason as one line (NUL is refused with a 400 by the request schema)."""
    return " ".join(text.split()) if text else None


router = APIRouter(prefix="/v1/admin/adapters", dependencies=[Depends(require_admin_key)], tags=["admin"])


@router.get("", summary="Aliases, champion versions and each replica's load state")
async def list_adapters(gw: GatewayDep) -> dict[str, Any]:
    return gw.adapters.snapshot()


@router.post("/promote", summary="Load a version on every replica, warm it, switch the alias, retire the old")
async def promote(req: PromoteRequest, gw: GatewayDep) -> dict[str, Any]:
    reason = _one_line(req.reason) or "promoted via the gateway"
    return await gw.adapters.promote(req.alias, req.version, reason=reason, force=req.force)


@router.post("/stage", summary="Load and warm a version on every replica ahead of its promotion; switch nothing")
async def stage(req: StageRequest, gw: GatewayDep) -> dict[str, Any]:
    return await gw.adapters.stage(req.alias, req.version, force=req.force)


@router.post("/rollback", summary="Promote the alias's previous champion again")
async def rollback(req: RollbackRequest, gw: GatewayDep) -> dict[str, Any]:
    return await gw.adapters.rollback(req.alias)
