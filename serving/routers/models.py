"""GET /v1/models: the base model and every alias, in the OpenAI list format."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends

from serving.deps import GatewayDep
from serving.security import require_api_key

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["models"])
_STARTED = int(time.time())


@router.get("/v1/models", summary="The base model and the adapter aliases")
async def list_models(gw: GatewayDep) -> dict[str, Any]:
    adapters = gw.adapters
    data: list[dict[str, Any]] = [
        {"id": adapters.base_model, "object": "model", "created": _STARTED, "owned_by": "tandem", "root": None}
    ]
    for alias in sorted(adapters.known_aliases | set(adapters.champions)):
        champ = adapters.champions.get(alias)
        data.append(
            {
                "id": alias,
                "object": "model",
                "created": _STARTED,
                "owned_by": "tandem",
                "root": adapters.base_model,
                "tandem": {
                    "adapter_version": champ.version if champ else None,
                    "served_model": champ.served_name if champ else adapters.base_model,
                    "fallback": champ is None or not gw.pool.holding(champ.served_name),
                },
            }
        )
    return {"object": "list", "data": data}
