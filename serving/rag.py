"""Retrieval for the gateway: embed the query, hybrid-search Postgres, both off the event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

import anyio
import psycopg

from components.errors import ConfigError, TandemError
from components.settings import Settings
from serving import metrics as m
from serving.db import Database
from serving.errors import ApiError

log = logging.getLogger(__name__)


def chunk_dict(chunk: Any) -> dict[str, Any]:
    """A RetrievedChunk as JSON-ready data."""
    if dataclasses.is_dataclass(chunk) and not isinstance(chunk, type):
        data = dataclasses.asdict(chunk)
    else:
        data = dict(vars(chunk))
    data["score"] = float(data.get("score", 0.0))
    return data


class Retriever:
    """Loads the query encoder once (in the background at start-up) and runs hybrid_search through the pool."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self._embedder: Any = None
        self._loading: asyncio.Task[Any] | None = None
        # One query at a time in the model: on a few cores parallel torch calls only fight over them.
        self._model_limiter = anyio.CapacityLimiter(1)

    def start_loading(self) -> None:
        if self._loading is None:
            self._loading = asyncio.create_task(self._load())

    async def _load(self) -> Any:
        from components.query_encoder import load_query_encoder

        self._embedder = await anyio.to_thread.run_sync(load_query_encoder, self.settings)
        log.info("embedding model %s loaded (%s)", self._embedder.model_id, self._embedder.runtime)
        m.QUERY_ENCODER.labels(runtime=self._embedder.runtime).set(1)
        return self._embedder

    @property
    def ready(self) -> bool:
        return self._embedder is not None

    async def embedder(self) -> Any:
        if self._embedder is not None:
            return self._embedder
        self.start_loading()
        assert self._loading is not None
        try:
            return await asyncio.shield(self._loading)
        except TandemError as exc:
            m.RETRIEVAL_ERRORS.labels(stage="embed").inc()
            raise ApiError(503, f"embedding model unavailable: {exc}", code="retrieval_unavailable") from exc

    async def search(self, query: str, top_k: int, filters: dict[str, Any] | None) -> list[Any]:
        """The top_k chunks for ``query`` (metadata ``filters`` are passed to SQL as bind parameters only)."""
        query = query.replace("\x00", " ").strip()
        if not query:
            return []
        try:
            from components.retrieval import hybrid_search
        except ImportError as exc:
            raise ApiError(
                503, "retrieval is not installed (components.retrieval)", code="retrieval_unavailable"
            ) from exc
        embedder = await self.embedder()
        started = time.perf_counter()
        vector = await anyio.to_thread.run_sync(embedder.encode_query, query, limiter=self._model_limiter)
        m.EMBED_LATENCY.observe(time.perf_counter() - started)
        started = time.perf_counter()
        try:
            chunks: list[Any] = await self.db.run(
                hybrid_search,
                query,
                vector,
                top_k=top_k,
                filters=filters or None,
                candidates=self.settings.rag_candidates,
            )
        except (ConfigError, ValueError, KeyError, TypeError) as exc:
            raise ApiError(400, f"filters: {exc}", param="filters", code="invalid_filter") from exc
        except (psycopg.Error, TandemError) as exc:
            m.RETRIEVAL_ERRORS.labels(stage="retrieve").inc()
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ApiError(503, f"retrieval failed: {first}", code="retrieval_unavailable") from exc
        m.RETRIEVE_LATENCY.labels(filtered="yes" if filters else "no").observe(time.perf_counter() - started)
        m.RETRIEVED_CHUNKS.observe(len(chunks))
        return chunks
