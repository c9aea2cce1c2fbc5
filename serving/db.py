"""The gateway's Postgres access: one psycopg pool, used from worker threads so the event loop never blocks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import psycopg
from psycopg_pool import ConnectionPool

T = TypeVar("T")


def _configure(conn: psycopg.Connection) -> None:
    from pgvector.psycopg import register_vector

    try:
        register_vector(conn)
    except psycopg.ProgrammingError:  # extension not created yet (migrations not run): plain SQL still works
        conn.rollback()
    conn.commit()


class Database:
    """A small wrapper over ``psycopg_pool.ConnectionPool`` whose calls run in a worker thread."""

    def __init__(self, url: str, max_size: int = 4) -> None:
        self.pool = ConnectionPool(
            url, min_size=1, max_size=max_size, configure=_configure, open=False, timeout=10.0, name="tandem"
        )
        # Threads for DB calls are limited to the pool size; waiting for a connection happens in the loop.
        self.limiter = anyio.CapacityLimiter(max_size)

    def open(self) -> None:
        self.pool.open(wait=False)

    def close(self) -> None:
        self.pool.close()

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(conn, *args, **kwargs)`` on a pooled connection in a worker thread; committed when it returns."""

        def call() -> T:
            with self.pool.connection() as conn:
                return fn(conn, *args, **kwargs)

        return await anyio.to_thread.run_sync(call, limiter=self.limiter)
