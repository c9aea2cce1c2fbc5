"""Health, readiness, Prometheus metrics and the playground page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


@router.get("/health", summary="Liveness, with the replicas' state (always 200 while the gateway runs)")
async def health(gw: GatewayDep) -> dict[str, Any]:
    return _status(gw)


@router.get("/ready", summary="Readiness: 200 when at least one vLLM replica is healthy, else 503")
async def ready(gw: GatewayDep) -> JSONResponse:
    status = _status(gw)
    return JSONResponse(status, status_code=200 if status["status"] == "ok" else 503)


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics() -> Response:
    return Response(generate_latest(m.REGISTRY), media_type=CONTENT_TYPE_LATEST)


@router.get("/", summary="The playground page", include_in_schema=False)
async def index() -> Response:
    page = STATIC_DIR / "index.html"
    if page.is_file():
        return FileResponse(page, media_type="text/html")
    return HTMLResponse(_PLACEHOLDER)
