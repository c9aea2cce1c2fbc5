"""Advisory locks several gateways share through Postgres, on one dedicated connection per gateway.

- The replica lock (session-scoped, ``pg_try_advisory_lock``): the one gateway whose reconciler loads and
  unloads on a replica this round. Losing the connection releases it, so a gateway that dies never blocks one.
- The alias lock, tried without waiting before a retired version is unloaded: a promotion, rollback or stage of
  that alias (which hold it for their whole transaction, ``registry.lock_alias``) is never undercut.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import psycopg

from components import registry

log = logging.getLogger(__name__)


class FleetLocks:
    """Try-locks on one autocommit connection, reopened when it breaks (locks held on it are then gone)."""

    def __init__(self, conninfo: str) -> None:
        self.conninfo = conninfo
        self._conn: psycopg.AsyncConnection | None = None
        self._open_lock = asyncio.Lock()

    async def _connection(self) -> psycopg.AsyncConnection:
        async with self._open_lock:
            if self._conn is None or self._conn.closed:
                self._conn = await psycopg.AsyncConnection.connect(
                    self.conninfo, autocommit=True, connect_timeout=5, application_name="tandem-reconciler"
                )
            return self._conn

    async def _try(self, sql: str, klass: int, key: str) -> bool:
        try:
            conn = await self._connection()
            row = await (await conn.execute(sql, (klass, key))).fetchone()
        except (psycopg.Error, OSError) as exc:
            log.warning(
                "fleet lock unavailable (%s): acting on nothing this round", f"{type(exc).__name__}: {exc}"[:200]
            )
            await self.close()
            return False
        return bool(row and row[0])

    async def _unlock(self, klass: int, key: str) -> None:
        conn = self._conn
        if conn is None or conn.closed:
            return  # the connection went away, and its session locks with it
        try:
            await conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", (klass, key))
        except (psycopg.Error, OSError):
            await self.close()

    @asynccontextmanager
    async def replica(self, url: str, wait_s: float = 0.0) -> AsyncIterator[bool]:
        """Hold ``url``'s reconcile lock for the block when it can be had within ``wait_s``; yields whether it was."""
        deadline = time.monotonic() + wait_s
        held = await self._try("SELECT pg_try_advisory_lock(%s, hashtext(%s))", registry.REPLICA_LOCK, url)
        while not held and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            held = await self._try("SELECT pg_try_advisory_lock(%s, hashtext(%s))", registry.REPLICA_LOCK, url)
        try:
            yield held
        finally:
            if held:
                await self._unlock(registry.REPLICA_LOCK, url)

    @asynccontextmanager
    async def alias(self, alias: str) -> AsyncIterator[bool]:
        """Hold ``alias``'s lock for the block if no promotion, rollback or stage holds it; yields whether it was."""
        held = await self._try("SELECT pg_try_advisory_lock(%s, hashtext(%s))", registry.ALIAS_LOCK, alias)
        try:
            yield held
        finally:
            if held:
                await self._unlock(registry.ALIAS_LOCK, alias)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            with suppress(psycopg.Error, OSError):
                await conn.close()
