"""The gateway's adapters, assembled: route table, reconciler, lifecycle and registry listener, under one name.

Every version is loaded into vLLM under its own name (``registry.served_name``), never reloaded in place, so no
stale prefix cache is ever served. The desired state is the registry; the pieces live in their own modules:

- ``serving.routes``: alias -> served name per request, with the base-model fallback (``RouteTable``);
- ``components.vllm_client``: the one vLLM LoRA client, shared with the training gate;
- ``serving.reconciler``: loads champions and staged versions on every replica, drains retired ones;
- ``serving.lifecycle``: stage / promote / rollback under the alias's fleet-wide advisory lock;
- ``serving.registry_listener``: LISTEN for switches made by any gateway, the CLI or the DAG;
- ``components.adapter_rules``: what may be served (rank, safetensors, gate-rejected needs force).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from components.adapter_rules import AdapterError, check_artifact, local_folder
from components.keys import bearer, vllm_secret
from components.settings import Settings
from serving import metrics as m
from serving.db import Database
from serving.fleet_locks import FleetLocks
from serving.lifecycle import Lifecycle
from serving.reconciler import Reconciler
from serving.registry_listener import RegistryListener
from serving.replicas import Replica, ReplicaPool
from serving.routes import Champion, Route, RouteTable

__all__ = ["AdapterError", "AdapterManager", "Champion", "Route", "artifact_path", "check_artifact"]

artifact_path = local_folder  # the name this module used to export


class AdapterManager:
    """What routers, the upstream path and discovery use: resolve, track, promote, warm a replica."""

    def __init__(self, settings: Settings, pool: ReplicaPool, http: httpx.AsyncClient, db: Database) -> None:
        self.settings = settings
        self.pool = pool
        self.http = http
        self.db = db
        self.base_model = settings.served_model_name
        conninfo = db.pool.conninfo
        assert isinstance(conninfo, str), "the gateway's pool is built from a URL"
        # lifecycle calls to vLLM run in worker threads, on their own client that carries vLLM's key
        self._sync_http = httpx.Client(headers=bearer(vllm_secret(settings)), timeout=httpx.Timeout(60.0, connect=3.0))
        self.locks = FleetLocks(conninfo)
        self.routes = RouteTable(self.base_model, settings.default_alias, pool)
        self.reconciler = Reconciler(settings, pool, self.routes, db, self._sync_http, self.locks)
        self.lifecycle = Lifecycle(settings, pool, self.routes, self.reconciler, conninfo)
        self.listener = RegistryListener(conninfo, self.reconciler.refresh) if settings.registry_notify else None
        self._tasks: set[asyncio.Task[None]] = set()
        m.REGISTRY_LISTENER_UP.set(0)

    # ---- the route table ----------------------------------------------------------------------------------
    @property
    def champions(self) -> dict[str, Champion]:
        return self.routes.champions

    @property
    def failed(self) -> dict[str, str]:
        return self.routes.failed

    @property
    def known_aliases(self) -> set[str]:
        return self.routes.known_aliases

    @property
    def in_flight(self) -> Any:
        return self.routes.in_flight

    def resolve(self, model: str) -> Route:
        return self.routes.resolve(model)

    @contextmanager
    def track(self, route: Route) -> Iterator[None]:
        with self.routes.track(route):
            yield

    # ---- the reconciler -----------------------------------------------------------------------------------
    @property
    def wake(self) -> asyncio.Event:
        return self.reconciler.wake

    @property
    def first_round(self) -> asyncio.Event:
        return self.reconciler.first_round

    def forget(self, replica: Replica, name: str) -> None:
        """A replica said it does not know ``name`` (restarted?): stop routing there and reconcile now."""
        replica.loaded.discard(name)
        replica.warmed.discard(name)
        self.wake.set()

    async def reconcile_once(self) -> None:
        await self.reconciler.reconcile_once()

    async def warm_replica(self, replica: Replica) -> None:
        """Load every current champion and staged version of every alias onto ``replica`` (raises on failure);
        discovery calls it before a new replica gets traffic."""
        await self.reconciler.warm_replica(replica)

    async def run_reconciler(self) -> None:
        """The reconcile loop, plus the registry listener when TANDEM_REGISTRY_NOTIFY is on (the lifespan runs
        this as one task)."""
        if self.listener is not None:
            self._spawn(self.listener.run())
        await self.reconciler.run()

    # ---- admin --------------------------------------------------------------------------------------------
    async def stage(self, alias: str, version: int, force: bool = False) -> dict[str, Any]:
        return await self.lifecycle.stage(alias, version, force)

    async def promote(
        self,
        alias: str,
        version: int,
        reason: str = "promoted via the gateway",
        force: bool = False,
        actor: str | None = None,
        rollback: bool = False,
    ) -> dict[str, Any]:
        return await self.lifecycle.promote(alias, version, reason, force, actor, rollback)

    async def rollback(self, alias: str, actor: str | None = None) -> dict[str, Any]:
        return await self.lifecycle.rollback(alias, actor)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.locks.close()
        self._sync_http.close()

    def snapshot(self) -> dict[str, Any]:
        """Aliases, champion versions, each replica's load state and the listener, for ``GET /v1/admin/adapters``."""
        aliases = []
        for alias in sorted(self.known_aliases | set(self.champions)):
            champ = self.champions.get(alias)
            aliases.append(
                {
                    "alias": alias,
                    "champion_version": champ.version if champ else None,
                    "served_name": champ.served_name if champ else None,
                    "fallback": champ is None or not self.pool.holding(champ.served_name),
                    "error": self.failed.get(alias),
                    "in_flight": self.in_flight.get(champ.served_name, 0) if champ else 0,
                    "replicas": {
                        r.url: ("loaded" if champ and champ.served_name in r.loaded else "missing")
                        for r in self.pool.replicas
                    },
                }
            )
        replicas = [
            {
                "url": r.url,
                "healthy": r.healthy,
                "outstanding": r.outstanding,
                "loaded": sorted(r.loaded),
                "error": r.last_error,
            }
            for r in self.pool.replicas
        ]
        listener = {"enabled": False} if self.listener is None else {"enabled": True, **self.listener.state()}
        return {"base_model": self.base_model, "aliases": aliases, "replicas": replicas, "listener": listener}
