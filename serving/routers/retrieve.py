"""POST /v1/retrieve: the chunks alone, as the chat endpoint would cite them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from serving.deps import GatewayDep
from serving.errors import ApiError
from serving.limits import check_filters, get_limits, subject_of
from serving.rag import chunk_dict
from serving.schemas import RetrieveRequest
from serving.security import require_api_key

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["retrieval"])


@router.post("/v1/retrieve", summary="Hybrid retrieval (vector + full-text, RRF) without generation")
async def retrieve(req: RetrieveRequest, request: Request, gw: GatewayDep) -> dict[str, Any]:
    top_k = req.top_k or gw.settings.rag_top_k
    if top_k > gw.settings.max_top_k:
        raise ApiError(400, f"top_k: at most {gw.settings.max_top_k} (got {top_k})", param="top_k")
    check_filters(req.filters, gw.settings)
    await get_limits(request).rate.check(subject_of(request))
    chunks = await gw.retriever.search(req.query, top_k, req.filters)
    return {"chunks": [chunk_dict(c) for c in chunks]}
