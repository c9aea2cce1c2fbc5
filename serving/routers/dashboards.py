"""The dashboards page: the panels of infra/grafana/dashboards/*.json drawn from live Prometheus, and the alerts
Alertmanager sent to the gateway's webhook.

The browser talks to the gateway only: the page's Prometheus queries go through a read-only proxy here (instant
and range queries, nothing else), so it needs no second origin and Prometheus stays on loopback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPBearer

from serving import alert_store
from serving.deps import GatewayDep
from serving.errors import ApiError
from serving.security import require_admin_key, require_api_key

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS_DIR = REPO_ROOT / "infra" / "grafana" / "dashboards"
STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
# What the proxy forwards: the parameters of Prometheus's instant and range query APIs.
QUERY_PARAMS = {"query", "time", "start", "end", "step", "timeout"}

router = APIRouter(tags=["dashboards"])


@router.get("/dashboards", summary="The dashboards page", include_in_schema=False)
async def page() -> Response:
    return FileResponse(STATIC_DIR / "dashboards.html", media_type="text/html")


def load_boards(folder: Path = DASHBOARDS_DIR) -> list[dict[str, Any]]:
    """Every dashboard file as {file, board} or, when it cannot be read, {file, error}: one bad file hides nothing
    else."""
    out: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.json")):
        try:
            board = json.loads(path.read_text())
            if not isinstance(board, dict) or not isinstance(board.get("panels"), list):
                raise ValueError("expected an object with a 'panels' list")
            out.append({"file": path.name, "board": board})
        except (OSError, ValueError) as exc:
            out.append({"file": path.name, "error": f"{path.name} cannot be drawn: {' '.join(str(exc).split())}"})
    return out


@router.get("/dashboards/boards", dependencies=[Depends(require_api_key)], summary="The dashboard definitions")
async def boards() -> dict[str, Any]:
    return {"boards": load_boards()}


def prometheus_url(gw: Any) -> str:
    settings = gw.settings
    return (settings.prometheus_url or f"http://{settings.host}:{settings.prometheus_port}").rstrip("/")


_PROXY = "/dashboards/prometheus/api/v1/{kind}"
_PROXY_SUMMARY = "Read-only proxy to Prometheus's query and query_range APIs"


# one handler, two operations with their own ids (the chart plugin sends GET, long queries go as a POST form)
@router.get(_PROXY, dependencies=[Depends(require_api_key)], summary=_PROXY_SUMMARY, operation_id="prometheus_get")
@router.post(_PROXY, dependencies=[Depends(require_api_key)], summary=_PROXY_SUMMARY, operation_id="prometheus_post")
async def prometheus_query(kind: str, request: Request, gw: GatewayDep) -> Response:
    if kind not in ("query", "query_range"):
        raise ApiError(404, f"only query and query_range are proxied, not {kind!r}", code="not_found")
    params = dict(request.query_params)
    if request.method == "POST":
        form = await request.form()
        params.update({k: v for k, v in form.items() if isinstance(v, str)})
    unknown = sorted(set(params) - QUERY_PARAMS)
    if unknown:
        raise ApiError(400, f"unknown parameter {unknown[0]!r}: expected {', '.join(sorted(QUERY_PARAMS))}")
    if not params.get("query"):
        raise ApiError(400, "missing 'query': a PromQL expression", param="query")
    try:
        resp = await gw.http.post(f"{prometheus_url(gw)}/api/v1/{kind}", data=params, timeout=30.0)
    except httpx.HTTPError as exc:
        raise ApiError(502, f"Prometheus at {prometheus_url(gw)} is not reachable: {type(exc).__name__}") from exc
    # Prometheus's own body (success, or its error with errorType) so the page can show the panel's error.
    return Response(resp.content, status_code=resp.status_code, media_type="application/json")


@router.get("/dashboards/alerts", dependencies=[Depends(require_api_key)], summary="Alerts received from Alertmanager")
async def alerts(gw: GatewayDep, limit: int = 50) -> dict[str, Any]:
    if not 1 <= limit <= 500:
        raise ApiError(400, "limit: expected 1..500", param="limit")
    return await gw.adapters.db.run(alert_store.recent, limit)


async def _webhook_auth(request: Request) -> None:
    """The webhook is an admin endpoint like any other: the local stack's Alertmanager sends the admin key from a
    file (components/stack/alertmanager.py), compose and Kubernetes from their secret."""
    credentials = await HTTPBearer(auto_error=False)(request)
    require_admin_key(request, credentials)


@router.post(
    "/v1/admin/alerts/webhook",
    dependencies=[Depends(_webhook_auth)],
    summary="Alertmanager's webhook receiver: stores each alert in Postgres for the dashboards page",
)
async def webhook(payload: alert_store.WebhookPayload, gw: GatewayDep) -> JSONResponse:
    stored = await gw.adapters.db.run(alert_store.store, payload)
    return JSONResponse({"stored": stored})
