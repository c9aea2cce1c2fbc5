"""The RAG gateway: an OpenAI-compatible API over vLLM with retrieval, citations and hot-swapped adapters.

    uvicorn serving.app:create_app --factory --host 127.0.0.1 --port 8000

Clients (HTTP, database pool, embedding model, reconciler) are created in the lifespan, never at import.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from functools import partial

import anyio
import httpx
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from components.errors import ConfigError
from components.keys import bearer, vllm_secret
from components.settings import Settings, get_settings
from serving import errors, eval_metrics, limits, pipeline_metrics, scrape_snapshot
from serving import metrics as m
from serving.adapters import AdapterManager
from serving.answer_log import AnswerLog
from serving.db import Database
from serving.deps import Gateway
from serving.discovery import Discovery, warm_callback
from serving.middleware import BodySizeLimit, RequestMetrics
from serving.rag import Retriever
from serving.replicas import ReplicaPool
from serving.routers import admin, chat, dashboards, feedback, models, retrieve, system
from serving.security import load_keys

log = logging.getLogger("serving")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the gateway app (settings from the environment unless given)."""
    settings = settings or get_settings()
    try:
        vllm_key = vllm_secret(settings)
        discovery = Discovery(settings)  # a malformed TANDEM_VLLM_URLS entry stops the start-up here
    except ConfigError as exc:
        raise SystemExit(f"tandem gateway: {exc}") from None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from components.db.gateway_role import gateway_database_url

        http = httpx.AsyncClient(
            # every call this client makes goes to vLLM (chat, adapters, probes): it carries vLLM's key
            headers=bearer(vllm_key),
            timeout=httpx.Timeout(settings.upstream_timeout_s, connect=3.0),
            # vLLM's server drops a keep-alive connection after 5 s idle (VLLM_HTTP_TIMEOUT_KEEP_ALIVE), which is
            # also the reconciler's interval: reusing one as it closes fails the request with "server
            # disconnected". Let ours expire well before.
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=128, keepalive_expiry=2.0),
        )
        # As role tandem_gateway, never the schema owner (may start the embedded server)
        url = await anyio.to_thread.run_sync(gateway_database_url, settings)
        db = Database(
            url,
            settings.db_pool_size,
            statement_timeout_ms=settings.db_statement_timeout_ms,
            pool_timeout_s=settings.db_pool_timeout_s,
        )
        db.open()
        # Gauges read from Postgres (pipelines, evaluation scores), served from snapshots a worker thread
        # refreshes within a time budget: a scrape never waits for the database.
        budget = settings.metrics_db_budget_s
        stale_after = 3 * settings.metrics_refresh_interval_s + budget
        pipeline_source = partial(db.pool.connection, timeout=budget)
        pipeline_metrics.install(m.REGISTRY, pipeline_source, int(budget * 1000), stale_after)
        eval_metrics.install(m.REGISTRY, settings, db.pool, budget, stale_after)
        snapshots = [pipeline_metrics.snapshot(m.REGISTRY), eval_metrics.snapshot(m.REGISTRY)]
        refresher = asyncio.create_task(
            scrape_snapshot.refresh_forever(snapshots, settings.metrics_refresh_interval_s), name="tandem-metrics"
        )
        app.state.limits = limits.Limits(limits.RateLimiter(settings, db), limits.UpstreamGate.from_settings(settings))
        app.state.answer_log = answer_log = AnswerLog(settings, db)  # answers for feedback, written off the path
        answer_log.start()
        # static URLs as they are, dns+ names resolved now and every discovery_interval_s
        pool = ReplicaPool(await anyio.to_thread.run_sync(discovery.resolve), allow_empty=discovery.dynamic)
        discovery.pool = pool
        adapters = AdapterManager(settings, pool, http, db)
        discovery.warm = warm_callback(adapters)  # a replica found later gets the champions before traffic
        retriever = Retriever(settings, db)
        retriever.start_loading()
        app.state.gateway = Gateway(settings, http, pool, adapters, retriever)
        reconciler = asyncio.create_task(adapters.run_reconciler(), name="tandem-reconciler")
        discovering = asyncio.create_task(discovery.run(), name="tandem-discovery") if discovery.dynamic else None
        with suppress(TimeoutError):  # serve right away if vLLM is slow; the reconciler keeps trying
            await asyncio.wait_for(adapters.first_round.wait(), timeout=30.0)
        log.info("gateway ready: %d/%d replica(s) healthy", len(pool.healthy), len(pool.replicas))
        try:
            yield
        finally:
            for task in (reconciler, discovering):
                if task is not None:
                    task.cancel()
                    with suppress(asyncio.CancelledError):
                        await task
            await answer_log.stop()
            await scrape_snapshot.stop(refresher)
            pipeline_metrics.uninstall(m.REGISTRY, pipeline_source)
            eval_metrics.uninstall(m.REGISTRY, db.pool)
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
    try:
        app.state.keys = load_keys(settings)
    except ConfigError as exc:  # a placeholder or malformed key stops the start-up, in one line, no traceback
        raise SystemExit(f"tandem gateway: {exc}") from None
    errors.install(app)
    limits.install(app)
    for module in (chat, feedback, models, retrieve, admin, system, dashboards):
        app.include_router(module.router)
    if (system.STATIC_DIR).is_dir():
        app.mount("/static", StaticFiles(directory=system.STATIC_DIR), name="static")
    # Outermost first: metrics see every answer, including the 413s of the size limit.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics)
    return app
