"""Admin API: list adapters, promote a version, roll an alias back. Needs an admin key once any is set."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from serving.deps import GatewayDep
from serving.schemas import PromoteRequest, RollbackRequest
from serving.security import require_admin_key


def _clean_reason(text: str | None) -> str | None:
    """Postgres text cannot hold NUL; the registry keeps one line."""
    return " ".join(text.replace("\x00", "").split()) if text else None


router = APIRouter(prefix="/v1/admin/adapters", dependencies=[Depends(require_admin_key)], tags=["admin"])


@router.get("", summary="Aliases, champion versions and each replica's load state")
async def list_adapters(gw: GatewayDep) -> dict[str, Any]:
    return gw.adapters.snapshot()


@router.post("/promote", summary="Load a version on every replica, warm it, switch the alias, retire the old")
async def promote(req: PromoteRequest, gw: GatewayDep) -> dict[str, Any]:
    reason = _clean_reason(req.reason) or "promoted via the gateway"
    return await gw.adapters.promote(req.alias, req.version, reason=reason, force=req.force)


@router.post("/rollback", summary="Promote the alias's previous champion again")
async def rollback(req: RollbackRequest, gw: GatewayDep) -> dict[str, Any]:
    return await gw.adapters.rollback(req.alias)
