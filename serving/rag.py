"""Retrieval for the gateway: embed the query, hybrid-search Postgres, both off the event loop.

Every search first checks, in the same pooled connection, that the query encoder is the active embedding
generation's model (``components.query_encoder.check_generation``), at start-up too: on a mismatch retrieval
answers 503 with a one-line error and ``tandem_query_encoder_mismatch`` is 1, never a silent full-text search.
"""

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


def _checked_search(conn: Any, model_id: str, dim: int, query: str, vector: Any, **kwargs: Any) -> list[Any]:
    """hybrid_search, after checking that ``model_id`` made the active generation's vectors."""
    from components.query_encoder import check_generation
    from components.retrieval import hybrid_search

    check_generation(conn, model_id, dim)
    conn.commit()  # a read: hybrid_search starts from an idle connection and leaves it idle
    result: list[Any] = hybrid_search(conn, query, vector, **kwargs)
    return result


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
        await self._check_generation()
        return self._embedder

    async def _check_generation(self) -> None:
        """At start-up: say at once when the index was embedded with another model (every search checks again)."""
        from components.query_encoder import EncoderMismatchError, check_generation

        try:
            await self.db.run(check_generation, self._embedder.model_id, self._embedder.dim)
        except EncoderMismatchError as exc:
            m.QUERY_ENCODER_MISMATCH.set(1)
            log.error("retrieval will answer 503: %s", exc)
            return
        except Exception as exc:  # Postgres not up yet: every search checks again
            log.warning("could not compare the query encoder with the active embedding generation: %s", exc)
            return
        m.QUERY_ENCODER_MISMATCH.set(0)

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
        from components.query_encoder import EncoderMismatchError

        embedder = await self.embedder()
        started = time.perf_counter()
        vector = await anyio.to_thread.run_sync(embedder.encode_query, query, limiter=self._model_limiter)
        m.EMBED_LATENCY.observe(time.perf_counter() - started)
        started = time.perf_counter()
        try:
            chunks: list[Any] = await self.db.run(
                _checked_search,
                embedder.model_id,
                embedder.dim,
                query,
                vector,
                top_k=top_k,
                filters=filters or None,
                candidates=self.settings.rag_candidates,
            )
        except EncoderMismatchError as exc:
            m.QUERY_ENCODER_MISMATCH.set(1)
            m.RETRIEVAL_ERRORS.labels(stage="encoder").inc()
            raise ApiError(503, str(exc), code="query_encoder_mismatch") from exc
        except (ConfigError, ValueError, KeyError, TypeError) as exc:
            raise ApiError(400, f"filters: {exc}", param="filters", code="invalid_filter") from exc
        except (psycopg.Error, TandemError) as exc:
            m.RETRIEVAL_ERRORS.labels(stage="retrieve").inc()
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ApiError(503, f"retrieval failed: {first}", code="retrieval_unavailable") from exc
        m.QUERY_ENCODER_MISMATCH.set(0)
        m.RETRIEVE_LATENCY.labels(filtered="yes" if filters else "no").observe(time.perf_counter() - started)
        m.RETRIEVED_CHUNKS.observe(len(chunks))
        return chunks
