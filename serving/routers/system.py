"""Health, readiness, Prometheus metrics and the playground page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving import metrics as m
from serving.deps import GatewayDep

router = APIRouter(tags=["system"])
STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
_PLACEHOLDER = (
    "<!doctype html><title>Tandem gateway</title><h1>Tandem gateway</h1>"
    "<p>OpenAI-compatible API at <code>/v1</code>; schema at <a href='/docs'>/docs</a>; "
    "metrics at <a href='/metrics'>/metrics</a>.</p>"
)


def _status(gw: Any) -> dict[str, Any]:
    healthy = len(gw.pool.healthy)
    return {
        "status": "ok" if healthy else "degraded",
        "replicas": {"healthy": healthy, "total": len(gw.pool.replicas)},
        "embedder_loaded": gw.retriever.ready,
        "aliases_on_base_model": sorted(gw.adapters.failed),
    }


@router.get("/health", summary="Liveness: always 200 while the gateway serves, with the replicas' state")
async def health(gw: GatewayDep) -> dict[str, Any]:
    return _status(gw)


async def _database_reachable(gw: Any) -> bool:
    budget = gw.settings.ready_db_budget_s
    with anyio.move_on_after(budget + 0.5):  # the pool and statement timeouts end it sooner; this is the backstop
        return await anyio.to_thread.run_sync(gw.adapters.db.reachable, budget, abandon_on_cancel=True)
    return False


@router.get(
    "/ready",
    summary="Readiness: 200 when a vLLM replica is healthy, every champion is loaded or fallen back to the base "
    "model, and Postgres answers within TANDEM_READY_DB_BUDGET_S; else 503 with what is missing",
)
async def ready(gw: GatewayDep) -> JSONResponse:
    status = _status(gw)
    checks = {
        "replica_healthy": status["replicas"]["healthy"] > 0,
        "adapters_reconciled": gw.adapters.first_round.is_set(),
        "database_reachable": await _database_reachable(gw),
    }
    ok = all(checks.values())
    body = {**status, "status": "ready" if ok else "not_ready", "checks": checks}
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics() -> Response:
    return Response(generate_latest(m.REGISTRY), media_type=CONTENT_TYPE_LATEST)


@router.get("/", summary="The playground page", include_in_schema=False)
async def index() -> Response:
    page = STATIC_DIR / "index.html"
    if page.is_file():
        return FileResponse(page, media_type="text/html")
    return HTMLResponse(_PLACEHOLDER)
