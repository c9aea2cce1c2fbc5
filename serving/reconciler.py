"""The reconciler: every replica holds each alias's champion and staged version, and nothing retired for long.

Desired state is the registry (champions and staged candidates). Each round, per replica, the gateway that wins
the replica's advisory lock (``FleetLocks.replica``) loads what is missing and unloads retired versions that
have drained; every other gateway only lists the replica to refresh its own route table. So N gateways make
one set of load/unload calls per replica, never a fight.

A retired version drains fleet-wide: it leaves a replica only when (1) the grace period since its switch has
passed (by the database's clock), so every gateway has stopped routing to it, (2) vLLM reports no request
running or waiting on it (``vllm:lora_requests_info``, which counts every gateway's and client's requests),
(3) this gateway has none in flight on it, and (4) no promotion of its alias holds the alias lock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

import anyio
import httpx

from components import registry
from components.adapter_rules import AdapterError, check_artifact
from components.settings import Settings
from components.vllm_client import VllmClient, VllmError
from serving import metrics as m
from serving.db import Database
from serving.fleet_locks import FleetLocks
from serving.replicas import Replica, ReplicaPool
from serving.routes import RouteTable

log = logging.getLogger(__name__)
T = TypeVar("T")

# Versions in these states are unloaded once drained; candidates are left alone (evaluation may use them).
UNWANTED = ("retired", "rejected", "failed", "rolled_back")
# While a wanted version is missing on a healthy replica (another gateway holds the replica's lock and is loading
# it), look again after this long, doubling up to the reconcile interval, rather than keep the old route a whole
# interval: a gateway that reconciles rarely still switches as soon as the version is loaded.
CATCH_UP_FIRST_S = 0.25


@dataclass
class Desired:
    """What the registry says, read once: champions, staged candidates, every version, and the database's now."""

    generation: int
    champions: dict[str, registry.AdapterVersion]
    staged: dict[str, registry.AdapterVersion]
    versions: list[registry.AdapterVersion]
    now: datetime

    @property
    def wanted(self) -> list[registry.AdapterVersion]:
        return [*self.champions.values(), *self.staged.values()]

    @property
    def aliases(self) -> set[str]:
        return {v.alias for v in self.versions}


def _read_registry(
    conn: object,
) -> tuple[
    dict[str, registry.AdapterVersion], dict[str, registry.AdapterVersion], list[registry.AdapterVersion], datetime
]:
    return registry.champions(conn), registry.staged(conn), registry.list_versions(conn), registry.db_now(conn)  # type: ignore[arg-type]


class Reconciler:
    """Loads, warms and unloads adapters on replicas; keeps the route table in step with the registry."""

    def __init__(
        self,
        settings: Settings,
        pool: ReplicaPool,
        routes: RouteTable,
        db: Database,
        http: httpx.Client,
        locks: FleetLocks,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.routes = routes
        self.db = db
        self.http = http
        self.locks = locks
        self.wake = asyncio.Event()
        self.first_round = asyncio.Event()  # set after the first round, ok or not
        self._replica_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)  # one actor per replica here
        self._catch_up_s = CATCH_UP_FIRST_S
        self._missing: frozenset[str] = frozenset()

    # ---- vLLM, off the event loop -------------------------------------------------------------------------
    def client(self, replica: Replica) -> VllmClient:
        return VllmClient(replica.url, timeout_s=60.0, http=self.http, list_timeout_s=5.0)

    async def _call(self, fn: Callable[[], T]) -> T:
        return await anyio.to_thread.run_sync(fn, abandon_on_cancel=True)

    async def list(self, replica: Replica) -> set[str] | None:
        """The adapters ``replica`` holds (also its health check); None when it did not answer."""
        try:
            names = await self._call(self.client(replica).models)
        except VllmError as exc:
            error = str(exc)[:200]
            was_healthy = replica.healthy
            out = replica.check_failed(error, exc.kind == "connect")
            if was_healthy:
                state = "out of rotation" if out else f"still in rotation ({replica.failed_checks} in a row)"
                log.warning("listing adapters on %s failed, %s: %s", replica.url, state, error)
            return None
        names.discard(self.routes.base_model)
        replica.mark(True)
        replica.set_loaded(names)
        return names

    async def load(self, replica: Replica, av: registry.AdapterVersion) -> tuple[float, float]:
        """Check (``adapter_rules``), load and warm one version on one replica; AdapterError with nothing left
        loaded if a step fails. Returns the seconds spent loading and warming."""
        name = av.served_name
        client = self.client(replica)
        started = time.perf_counter()
        try:
            folder = check_artifact(av, self.settings.max_lora_rank)
            await self._call(lambda: client.load_adapter(name, str(folder)))
            replica.loaded.add(name)
            loaded_at = time.perf_counter()
            try:
                await self._call(lambda: client.warm(name))
            except VllmError as exc:
                await self.unload(replica, name)
                if exc.kind != "status":
                    raise
                raise AdapterError(422, str(exc), "warm_failed") from exc
        except AdapterError as exc:
            m.ADAPTER_LOAD_FAILURES.labels(alias=av.alias, replica=replica.url, reason=exc.code).inc()
            raise
        except VllmError as exc:
            if exc.kind == "status":
                m.ADAPTER_LOAD_FAILURES.labels(alias=av.alias, replica=replica.url, reason="load_failed").inc()
                raise AdapterError(422, str(exc), "load_failed") from exc
            m.ADAPTER_LOAD_FAILURES.labels(alias=av.alias, replica=replica.url, reason="unreachable").inc()
            replica.loaded.discard(name)
            raise AdapterError(503, f"while loading {name}: {exc}", "unreachable") from exc
        m.ADAPTER_LOADS.labels(alias=av.alias, replica=replica.url).inc()
        m.ADAPTER_LOAD_LATENCY.labels(alias=av.alias).observe(time.perf_counter() - started)
        replica.set_loaded(replica.loaded)
        replica.warmed.add(name)
        log.info("loaded adapter %s on %s", name, replica.url)
        return loaded_at - started, time.perf_counter() - loaded_at

    async def unload(self, replica: Replica, name: str) -> None:
        try:
            await self._call(lambda: self.client(replica).unload_adapter(name))
        except VllmError as exc:
            log.warning("could not unload %s from %s: %s", name, replica.url, exc)
            return
        replica.loaded.discard(name)
        replica.set_loaded(replica.loaded)  # also drops it from replica.warmed
        m.ADAPTER_UNLOADS.labels(alias=name.rpartition("-v")[0], replica=replica.url).inc()
        log.info("unloaded adapter %s from %s", name, replica.url)

    # ---- the registry -------------------------------------------------------------------------------------
    async def read(self) -> Desired:
        generation = self.routes.next_generation()
        champions, staged, versions, now = await self.db.run(_read_registry)
        return Desired(generation, champions, staged, versions, now)

    async def refresh(self) -> None:
        """Read-only: the registry and every replica's list, then the route table (a NOTIFY, or no lock)."""
        desired = await self.read()
        await asyncio.gather(*(self.list(r) for r in self.pool.replicas))
        self.routes.apply(desired.generation, desired.champions, desired.aliases)
        healthy = [r for r in self.pool.replicas if r.healthy]
        if any(av.served_name not in r.loaded for av in desired.wanted for r in healthy):
            self.wake.set()  # switched in the registry alone (the CLI without a gateway): a round loads it

    # ---- one replica --------------------------------------------------------------------------------------
    async def _ensure(self, replica: Replica, desired: Desired, failures: dict[str, str]) -> None:
        """Load every wanted version ``replica`` lacks; failures by alias (champions only)."""
        for av in desired.wanted:
            if av.served_name in replica.loaded:
                continue
            try:
                await self.load(replica, av)
            except AdapterError as exc:
                if desired.champions.get(av.alias) is av:
                    failures[av.alias] = exc.message
                else:
                    log.warning("staged %s not loaded on %s: %s", av.served_name, replica.url, exc.message)

    async def _drain(self, replica: Replica, desired: Desired) -> None:
        """Unload the retired versions ``replica`` holds that no gateway can still have a request on."""
        grace = self.settings.adapter_drain_grace_s
        retired = [v for v in desired.versions if v.status in UNWANTED and v.served_name in replica.loaded]
        busy: set[str] | None = None
        for av in retired:
            if (desired.now - av.updated_at).total_seconds() < grace:
                m.DRAIN_DEFERRED.labels(reason="grace").inc()
                continue
            if self.routes.in_flight.get(av.served_name):
                m.DRAIN_DEFERRED.labels(reason="in_flight").inc()
                continue
            if busy is None:
                try:
                    busy = await self._call(self.client(replica).busy_adapters)
                except VllmError as exc:  # no signal, no unload: the next round asks again
                    log.warning("cannot read running adapters on %s, unloading nothing: %s", replica.url, exc)
                    m.DRAIN_DEFERRED.labels(reason="no_signal").inc()
                    return
            if av.served_name in busy:
                m.DRAIN_DEFERRED.labels(reason="running").inc()
                continue
            async with self.locks.alias(av.alias) as free:
                if not free:
                    m.DRAIN_DEFERRED.labels(reason="alias_locked").inc()
                    continue
                if av.served_name in self.routes.names_in_use():
                    continue  # promoted back on this gateway since the registry was read
                await self.unload(replica, av.served_name)

    async def _act_on(self, replica: Replica, desired: Desired, failures: dict[str, str], wait_s: float = 0.0) -> bool:
        """List, load and drain ``replica`` under its fleet-wide lock; False when another gateway holds it."""
        async with self._replica_locks[replica.url], self.locks.replica(replica.url, wait_s) as held:
            loaded = await self.list(replica)
            if not held:
                return False
            if loaded is None:
                return True
            await self._ensure(replica, desired, failures)
            await self._drain(replica, desired)
            return True

    async def warm_replica(self, replica: Replica) -> None:
        """Load every champion and staged version onto ``replica`` (one that joins), before it gets traffic.

        Raises AdapterError when the replica does not answer or a champion cannot be loaded on it."""
        desired = await self.read()
        failures: dict[str, str] = {}
        await self._act_on(replica, desired, failures, wait_s=30.0)
        if not replica.healthy:
            raise AdapterError(503, f"vLLM at {replica.url} does not answer: {replica.last_error}", "unreachable")
        missing = [av.served_name for av in desired.champions.values() if av.served_name not in replica.loaded]
        if missing:
            why = "; ".join(failures.values()) or "another gateway is still loading them"
            raise AdapterError(503, f"{replica.url} lacks {', '.join(missing)}: {why}", "warm_failed")

    # ---- rounds -------------------------------------------------------------------------------------------
    async def reconcile_once(self) -> None:
        """One round over every replica; without the registry, only health checks."""
        try:
            desired = await self.read()
        except Exception as exc:  # DB down: keep serving what we have, check replica health anyway
            m.RECONCILE_RUNS.labels(result="error").inc()
            log.warning("reconciler cannot read the adapter registry: %s", exc)
            for replica in self.pool.replicas:
                await self.list(replica)
            return
        failures: dict[str, str] = {}
        for replica in list(self.pool.replicas):
            if not await self._act_on(replica, desired, failures):
                m.RECONCILE_REPLICA_SKIPPED.labels(replica=replica.url).inc()
        self.routes.apply(desired.generation, desired.champions, desired.aliases, failures)
        m.RECONCILE_RUNS.labels(result="ok").inc()
        self._catch_up(desired)

    def _catch_up(self, desired: Desired) -> None:
        """Schedule an early round while a wanted version is missing on a healthy replica (see CATCH_UP_FIRST_S)."""
        healthy = [r for r in self.pool.replicas if r.healthy]
        missing = frozenset(av.served_name for av in desired.wanted for r in healthy if av.served_name not in r.loaded)
        if missing != self._missing:  # something new is awaited (or nothing is): start the backoff again
            self._missing, self._catch_up_s = missing, CATCH_UP_FIRST_S
        if missing and self._catch_up_s < self.settings.reconcile_interval_s:
            self.wake_after(self._catch_up_s)
            self._catch_up_s *= 2

    async def run(self) -> None:
        """Reconcile now and every ``reconcile_interval_s`` (sooner when woken: a replica lost an adapter, a drain
        is due)."""
        while True:
            self.wake.clear()
            try:
                await self.reconcile_once()
            except Exception:  # never let the loop die; the next round retries
                m.RECONCILE_RUNS.labels(result="error").inc()
                log.exception("reconcile round failed")
            self.first_round.set()
            with suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=self.settings.reconcile_interval_s)

    def wake_after(self, seconds: float) -> None:
        """Run a round ``seconds`` from now (a retired version's grace ends)."""
        asyncio.get_running_loop().call_later(seconds, self.wake.set)
