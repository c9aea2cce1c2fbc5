"""The gateway's Postgres access: one psycopg pool, used from worker threads so the event loop never blocks.

Every pooled connection gets ``statement_timeout`` (TANDEM_DB_STATEMENT_TIMEOUT_MS): no gateway query, however
slow Postgres is, holds a connection and a worker thread for longer.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import anyio
import psycopg
from psycopg_pool import ConnectionPool

T = TypeVar("T")


def _configure(conn: psycopg.Connection, statement_timeout_ms: int = 0) -> None:
    from pgvector.psycopg import register_vector

    try:
        register_vector(conn)
    except psycopg.ProgrammingError:  # extension not created yet (migrations not run): plain SQL still works
        conn.rollback()
    # A session setting (not SET LOCAL): it holds for every transaction on this connection.
    conn.execute("SELECT set_config('statement_timeout', %s, false)", (str(statement_timeout_ms),))
    conn.commit()


class Database:
    """A small wrapper over ``psycopg_pool.ConnectionPool`` whose calls run in a worker thread."""

    def __init__(self, url: str, max_size: int = 4, statement_timeout_ms: int = 0, pool_timeout_s: float = 2.0) -> None:
        self.statement_timeout_ms = statement_timeout_ms
        self.pool = ConnectionPool(
            url,
            min_size=1,
            max_size=max_size,
            configure=partial(_configure, statement_timeout_ms=statement_timeout_ms),
            open=False,
            # How long a call waits for a connection (TANDEM_DB_POOL_TIMEOUT_S). With Postgres down every call
            # waits this long before PoolTimeout: short, so a request fails in seconds rather than piling up.
            timeout=pool_timeout_s,
            name="tandem",
        )
        # Threads for DB calls are limited to the pool size; waiting for a connection happens in the loop.
        self.limiter = anyio.CapacityLimiter(max_size)

    def open(self) -> None:
        self.pool.open(wait=False)

    def close(self) -> None:
        self.pool.close()

    async def run(self, fn: Callable[..., T], *args: Any, timeout: float | None = None, **kwargs: Any) -> T:
        """``fn(conn, *args, **kwargs)`` on a pooled connection in a worker thread; committed when it returns.

        ``timeout``: seconds to wait for a connection (default: the pool's ``pool_timeout_s``); past it
        ``PoolTimeout``.
        """

        def call() -> T:
            with self.pool.connection(timeout=timeout) as conn:
                return fn(conn, *args, **kwargs)

        return await anyio.to_thread.run_sync(call, limiter=self.limiter)

    def reachable(self, timeout: float) -> bool:
        """True when a pooled connection answers ``SELECT 1`` within about ``timeout`` seconds (blocking)."""
        try:
            with self.pool.connection(timeout=timeout) as conn:
                conn.execute("SELECT set_config('statement_timeout', %s, true)", (str(max(int(timeout * 1000), 1)),))
                conn.execute("SELECT 1")
                conn.rollback()
            return True
        except (psycopg.Error, OSError):
            return False
