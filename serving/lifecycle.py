"""Stage, promote, roll back: one alias at a time across the fleet, the registry commit as the switch.

Each operation opens its own connection, takes the alias's advisory lock for its transaction
(``registry.lock_alias``: a second one of the same alias, from any gateway, the CLI or the DAG, waits
``promotion_lock_wait_s`` and is then refused with 409), loads and warms the version on every healthy replica,
and commits the registry change with ``pg_notify``: every gateway hears it and switches within a second. The old
champion is not unloaded here: the reconcilers drain it (serving/reconciler.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any, TypeVar

import anyio
import psycopg

from components import adapter_rules, registry
from components.adapter_rules import AdapterError
from components.errors import ConfigError
from components.settings import Settings
from serving import metrics as m
from serving.reconciler import Reconciler
from serving.replicas import Replica, ReplicaPool
from serving.routes import RouteTable

log = logging.getLogger(__name__)
T = TypeVar("T")


class Lifecycle:
    """The admin operations on adapter versions (the admin API calls these through ``AdapterManager``)."""

    def __init__(
        self, settings: Settings, pool: ReplicaPool, routes: RouteTable, reconciler: Reconciler, conninfo: str
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.routes = routes
        self.reconciler = reconciler
        self.conninfo = conninfo

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(lambda: fn(*args))

    @asynccontextmanager
    async def _alias_locked(self, alias: str, stages: dict[str, float]) -> AsyncIterator[psycopg.Connection]:
        """A transaction holding ``alias``'s fleet-wide lock; committed by the caller, rolled back on error."""
        started = time.perf_counter()
        conn = await self._db(_connect, self.conninfo)  # Postgres down: 503 database_unavailable (errors.py)
        try:
            try:
                await self._db(registry.lock_alias, conn, alias, self.settings.promotion_lock_wait_s)
            except registry.AliasBusyError as exc:
                m.ALIAS_LOCK_BUSY.labels(alias=alias).inc()
                raise AdapterError(409, str(exc), "alias_busy") from exc
            stages["lock"] = time.perf_counter() - started
            m.ALIAS_LOCK_WAIT.observe(stages["lock"])
            yield conn
        finally:
            await self._db(_close, conn)

    async def _version(
        self, conn: psycopg.Connection, alias: str, version: int, force: bool
    ) -> registry.AdapterVersion:
        try:
            av = await self._db(registry.get_version, conn, alias, version)
        except ConfigError as exc:
            raise AdapterError(404, str(exc), "version_not_found") from exc
        adapter_rules.check_promotable(av, force)
        return av

    async def _targets(self) -> list[Replica]:
        """Every healthy replica, listed now (so what it holds is current under the lock)."""
        listed = [r for r in list(self.pool.replicas) if await self.reconciler.list(r) is not None]
        if not listed:
            raise AdapterError(503, "no healthy vLLM replica to load the adapter on", "no_replica")
        return listed

    async def _load_where_cold(
        self, av: registry.AdapterVersion, targets: list[Replica], stages: dict[str, float]
    ) -> tuple[list[Replica], int]:
        """Load and warm ``av`` on each target that does not hold it warm already (staged by this gateway).

        Returns the replicas it was newly loaded on (to unload if the caller gives up) and how many were warm.
        On failure, unloads what this call loaded and raises AdapterError."""
        fresh: list[Replica] = []
        warm = 0
        try:
            for replica in targets:
                if av.served_name in replica.warmed:
                    warm += 1
                    continue
                was_loaded = av.served_name in replica.loaded
                load_s, warm_s = await self.reconciler.load(replica, av)
                stages["load"] += load_s
                stages["warm"] += warm_s
                if not was_loaded:
                    fresh.append(replica)
        except Exception:
            for replica in fresh:
                await self.reconciler.unload(replica, av.served_name)
            raise
        return fresh, warm

    async def stage(self, alias: str, version: int, force: bool = False) -> dict[str, Any]:
        """Load and warm ``version`` on every healthy replica and record it as staged; switch nothing.

        A later promotion of a staged version only switches the alias: the slow part on a busy server is done
        before it. Replicas that join later get it too (``warm_replica``), from any gateway."""
        started = time.perf_counter()
        stages = {"lock": 0.0, "load": 0.0, "warm": 0.0}
        async with self._alias_locked(alias, stages) as conn:
            av = await self._version(conn, alias, version, force)
            targets = await self._targets()
            _, already = await self._load_where_cold(av, targets, stages)
            await self._db(registry.set_staged, conn, alias, version)
            await self._db(conn.commit)
        m.ADAPTER_STAGES.labels(alias=alias).inc()
        log.info("staged %s on %d replica(s)", av.served_name, len(targets))
        return {
            "alias": alias,
            "version": version,
            "served_name": av.served_name,
            "replicas": [r.url for r in targets],
            "already_staged": already,
            "seconds": round(time.perf_counter() - started, 4),
            "stages_s": {k: round(v, 4) for k, v in stages.items()},
        }

    async def promote(
        self,
        alias: str,
        version: int | None,
        reason: str = "promoted via the gateway",
        force: bool = False,
        actor: str | None = None,
        rollback: bool = False,
    ) -> dict[str, Any]:
        """Load ``version`` on every healthy replica, warm it, then commit the switch (with NOTIFY) and route to it.

        ``version`` None with ``rollback``: the alias's rollback target, read under the lock. Replicas where the
        version is already loaded and warm (``stage``) are not loaded again. Refused (4xx) with nothing changed
        if a rule refuses it (``adapter_rules``), any load fails, or another switch of the alias holds the lock
        past ``promotion_lock_wait_s`` (409)."""
        started = time.perf_counter()
        stages = {"lock": 0.0, "load": 0.0, "warm": 0.0, "registry": 0.0}
        async with self._alias_locked(alias, stages) as conn:
            if version is None:
                try:
                    target = await self._db(registry.rollback_target, conn, alias)
                except ConfigError as exc:
                    raise AdapterError(409, str(exc), "no_rollback_target") from exc
                version = target.version
            av = await self._version(conn, alias, version, force)
            previous = await self._db(registry.get_champion, conn, alias)
            targets = await self._targets()
            name = av.served_name
            try:
                fresh, staged = await self._load_where_cold(av, targets, stages)
            except AdapterError:
                m.PROMOTIONS.labels(alias=alias, result="refused").inc()
                raise
            generation = self.routes.next_generation()
            try:
                switched = time.perf_counter()
                await self._db(registry.set_champion, conn, alias, version, reason, actor, rollback)
                await self._db(conn.commit)  # the switch, fleet-wide: every gateway hears the NOTIFY
                stages["registry"] = time.perf_counter() - switched
            except Exception as exc:
                for replica in fresh:
                    await self.reconciler.unload(replica, name)
                m.PROMOTIONS.labels(alias=alias, result="refused").inc()
                raise AdapterError(503, f"promotion of {name} failed: {exc}"[:300], "promotion_failed") from exc
            self.routes.switch(generation, av)  # here at once; the NOTIFY may have done it already
        seconds = time.perf_counter() - started
        m.PROMOTIONS.labels(alias=alias, result="ok").inc()
        m.PROMOTION_LATENCY.labels(alias=alias).observe(seconds)
        if previous is not None and previous.served_name != name:
            # the reconcilers unload it once drained; a round just after the grace makes that prompt
            self.reconciler.wake_after(self.settings.adapter_drain_grace_s + 0.5)
        log.info("promoted %s to v%d in %.3f s", alias, version, seconds)
        return {
            "alias": alias,
            "version": version,
            "served_name": name,
            "previous_version": previous.version if previous else None,
            "replicas": [r.url for r in targets],
            "staged_replicas": staged,
            "seconds": round(seconds, 4),
            "stages_s": {k: round(v, 4) for k, v in stages.items()},
        }

    async def rollback(self, alias: str, actor: str | None = None) -> dict[str, Any]:
        """Promote the alias's previous champion again (the registry's rollback target)."""
        return await self.promote(alias, None, reason="rollback via the gateway", actor=actor, rollback=True)


def _connect(conninfo: str) -> psycopg.Connection:
    return psycopg.connect(conninfo, connect_timeout=5, application_name="tandem-lifecycle")


def _close(conn: psycopg.Connection) -> None:
    """Roll back whatever was not committed (a refusal, an error) and close."""
    with suppress(psycopg.Error):
        conn.rollback()
    conn.close()
