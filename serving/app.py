"""The RAG gateway: an OpenAI-compatible API over vLLM with retrieval, citations and hot-swapped adapters.

    uvicorn serving.app:create_app --factory --host 127.0.0.1 --port 8000

Clients (HTTP, database pool, embedding model, reconciler) are created in the lifespan, never at import.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import anyio
import httpx
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from components.settings import Settings, get_settings
from serving import errors, eval_metrics, pipeline_metrics
from serving import metrics as m
from serving.adapters import AdapterManager
from serving.db import Database
from serving.deps import Gateway
from serving.middleware import BodySizeLimit, RequestMetrics
from serving.rag import Retriever
from serving.replicas import ReplicaPool
from serving.routers import admin, chat, models, retrieve, system

log = logging.getLogger("serving")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the gateway app (settings from the environment unless given)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from components.db import database_url

        http = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.upstream_timeout_s, connect=3.0),
            # vLLM's server drops a keep-alive connection after 5 s idle (VLLM_HTTP_TIMEOUT_KEEP_ALIVE), which is
            # also the reconciler's interval: reusing one as it closes fails the request with "server
            # disconnected". Let ours expire well before.
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=128, keepalive_expiry=2.0),
        )
        url = await anyio.to_thread.run_sync(database_url, settings)  # may start the embedded server
        db = Database(url, settings.db_pool_size)
        db.open()
        # Scrape-time gauges read from Postgres: pipelines (index freshness, registry) and evaluation scores.
        pipeline_metrics.install(m.REGISTRY, db.pool.connection)
        eval_metrics.install(m.REGISTRY, settings, db.pool)
        pool = ReplicaPool(settings.vllm_endpoints)
        adapters = AdapterManager(settings, pool, http, db)
        retriever = Retriever(settings, db)
        retriever.start_loading()
        app.state.gateway = Gateway(settings, http, pool, adapters, retriever)
        reconciler = asyncio.create_task(adapters.run_reconciler(), name="tandem-reconciler")
        with suppress(TimeoutError):  # serve right away if vLLM is slow; the reconciler keeps trying
            await asyncio.wait_for(adapters.first_round.wait(), timeout=30.0)
        log.info("gateway ready: %d/%d replica(s) healthy", len(pool.healthy), len(pool.replicas))
        try:
            yield
        finally:
            reconciler.cancel()
            with suppress(asyncio.CancelledError):
                await reconciler
            await adapters.close()
            await http.aclose()
            await anyio.to_thread.run_sync(db.close)

    app = FastAPI(
        title="Tandem gateway",
        version="0.1.0",
        description="OpenAI-compatible RAG gateway over vLLM with citations and hot-swapped LoRA adapters.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    errors.install(app)
    for module in (chat, models, retrieve, admin, system):
        app.include_router(module.router)
    if (system.STATIC_DIR).is_dir():
        app.mount("/static", StaticFiles(directory=system.STATIC_DIR), name="static")
    # Outermost first: metrics see every answer, including the 413s of the size limit.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics)
    return app
