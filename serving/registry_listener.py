"""LISTEN tandem_registry: every gateway hears a registry switch (promote, rollback, stage) when it commits.

One dedicated autocommit connection per gateway. When it drops (Postgres restarted, the backend terminated), the
gateway keeps serving its last known routes, reconnects with backoff, and refreshes once reconnected (what it
missed meanwhile is read from the registry, not replayed). The reconcile round stays the safety net.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

import psycopg

from components import registry
from serving import metrics as m

log = logging.getLogger(__name__)

KEEPALIVE_S = 5.0  # a silent connection is checked this often (a dead one raises on the check)
BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class RegistryListener:
    """Runs ``on_change`` (coalesced: one refresh at a time, one more if something arrived meanwhile)."""

    def __init__(self, conninfo: str, on_change: Callable[[], Awaitable[None]]) -> None:
        self.conninfo = conninfo
        self.on_change = on_change
        self.connected = False
        self.notifications = 0
        self.reconnects = 0
        self.last_error: str | None = None
        self.backend_pid: int | None = None
        self._dirty = asyncio.Event()

    async def run(self) -> None:
        """Listen (and refresh on each notification) until cancelled."""
        refresher = asyncio.create_task(self._refresh_forever(), name="tandem-registry-refresh")
        try:
            await self._listen_forever()
        finally:
            refresher.cancel()
            await asyncio.gather(refresher, return_exceptions=True)
            m.REGISTRY_LISTENER_UP.set(0)

    async def _listen_forever(self) -> None:
        attempt = 0
        opened_before = False
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.conninfo, autocommit=True, connect_timeout=5, application_name="tandem-registry-listener"
                ) as conn:
                    await conn.execute(f"LISTEN {registry.NOTIFY_CHANNEL}")
                    self.backend_pid = conn.info.backend_pid
                    self.connected, self.last_error, attempt = True, None, 0
                    m.REGISTRY_LISTENER_UP.set(1)
                    if opened_before:
                        self.reconnects += 1
                        m.REGISTRY_LISTENER_RECONNECTS.inc()
                        log.info("registry listener reconnected; refreshing what may have been missed")
                        self._dirty.set()
                    opened_before = True
                    while True:
                        async for notify in conn.notifies(timeout=KEEPALIVE_S):
                            self._heard(notify.payload)
                        await conn.execute("SELECT 1")
            except (psycopg.Error, OSError) as exc:
                self.connected = False
                m.REGISTRY_LISTENER_UP.set(0)
                delay = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
                attempt += 1
                error = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
                if error != self.last_error:
                    log.warning(
                        "registry listener down (%s); retrying in %.1f s, serving the last known routes", error, delay
                    )
                self.last_error = error
                await asyncio.sleep(delay)

    def _heard(self, payload: str) -> None:
        try:
            event = str(json.loads(payload).get("event", "unknown"))
        except (ValueError, AttributeError):
            event = "unknown"
        self.notifications += 1
        m.REGISTRY_NOTIFICATIONS.labels(event=event if event in ("promote", "rollback", "stage") else "unknown").inc()
        self._dirty.set()

    async def _refresh_forever(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self.on_change()
            except Exception as exc:  # the registry or a replica is away: the reconcile round catches up
                log.warning("refresh after a registry notification failed: %s", f"{type(exc).__name__}: {exc}"[:200])

    def state(self) -> dict[str, object]:
        return {
            "connected": self.connected,
            "notifications": self.notifications,
            "reconnects": self.reconnects,
            "error": self.last_error,
        }
