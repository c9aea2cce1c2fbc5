"""Aliases -> adapter versions: resolution per request, promotion, rollback and the reconciler.

Every version is loaded into vLLM under its own name (``registry.served_name``), never reloaded in place, so
no stale prefix cache is ever served. The desired state is the registry's champion per alias; the reconciler
makes every healthy replica hold it, so a restarted replica gets its adapters back with no human.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import httpx

from components import registry
from components.errors import ConfigError
from components.settings import Settings
from components.training.artifacts import weights_problem
from serving import metrics as m
from serving.db import Database
from serving.replicas import Replica, ReplicaPool

log = logging.getLogger(__name__)

# Versions in these states are unloaded by the reconciler; candidates are left alone (evaluation may use them).
_UNWANTED = ("retired", "rejected", "failed", "rolled_back")
_WARM_MESSAGES = [{"role": "user", "content": "Hi"}]


class AdapterError(Exception):
    """An adapter operation refused, with the HTTP status the admin API answers."""

    def __init__(self, status: int, message: str, code: str = "adapter_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


@dataclass(frozen=True)
class Champion:
    alias: str
    version: int
    served_name: str
    path: str


@dataclass(frozen=True)
class Route:
    """Where one request goes: the model name vLLM is asked for, and what to report about it."""

    alias: str | None
    adapter_version: int | None
    served_model: str
    fallback: bool = False

    @property
    def adapter(self) -> str | None:
        return None if self.adapter_version is None else self.served_model


def artifact_path(uri: str) -> Path:
    """A local folder from an ``artifact_uri`` (a path or a ``file://`` URL)."""
    if uri.startswith("file://"):
        return Path(unquote(urlparse(uri).path))
    if "://" in uri:
        raise AdapterError(422, f"artifact {uri!r} is not a local folder or file:// URL", "bad_artifact")
    return Path(uri)


def check_artifact(av: registry.AdapterVersion, max_rank: int) -> Path:
    """The adapter folder, after checking it is a peft adapter vLLM can load (rank within --max-lora-rank)."""
    folder = artifact_path(av.artifact_uri)
    config_file = folder / "adapter_config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(
            422, f"adapter {av.served_name}: cannot read {config_file.name} in {folder} ({exc})", "bad_artifact"
        ) from exc
    ranks = [int(config.get("r") or 0), *(int(v) for v in (config.get("rank_pattern") or {}).values())]
    rank = max(ranks)
    if rank > max_rank:
        raise AdapterError(
            422,
            f"adapter {av.served_name} has LoRA rank {rank} > max_lora_rank {max_rank}; retrain with r <= {max_rank}",
            "rank_too_high",
        )
    problem = weights_problem((f.name for f in folder.iterdir() if f.is_file()), av.served_name)
    if problem:  # the training side's rule: safetensors only, a pickle (adapter_model.bin) is refused
        raise AdapterError(422, problem, "bad_artifact")
    return folder


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
        msg = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else body.get("message")
        text = str(msg or body)
    except ValueError:
        text = response.text
    return " ".join(text.split())[:300] or f"HTTP {response.status_code}"


class AdapterManager:
    """The gateway's view of adapters: champions per alias, what each replica holds, and what is in flight."""

    def __init__(self, settings: Settings, pool: ReplicaPool, http: httpx.AsyncClient, db: Database) -> None:
        self.settings = settings
        self.pool = pool
        self.http = http
        self.db = db
        self.base_model = settings.served_model_name
        self.champions: dict[str, Champion] = {}
        self.failed: dict[str, str] = {}  # alias -> why its champion is not loaded anywhere
        self.known_aliases: set[str] = {settings.default_alias}
        self.in_flight: Counter[str] = Counter()
        self.wake = asyncio.Event()
        self.first_round = asyncio.Event()  # set after the first reconcile round, ok or not
        self._lock = asyncio.Lock()  # promotion and reconciliation never interleave
        self._tasks: set[asyncio.Task[None]] = set()
        self._admin_timeout = httpx.Timeout(60.0, connect=3.0)

    # ---- per request --------------------------------------------------------------------------------------
    def resolve(self, model: str) -> Route:
        """The route for a request's ``model``: the base model, an alias's champion, or an explicit version."""
        if model == self.base_model:
            return Route(None, None, self.base_model)
        champ = self.champions.get(model)
        if champ is not None and self.pool.holding(champ.served_name):
            return Route(model, champ.version, champ.served_name)
        if champ is not None or model in self.known_aliases:
            return Route(model, None, self.base_model, fallback=True)
        alias, _, version = model.rpartition("-v")
        if alias and version.isdigit() and self.pool.holding(model):
            return Route(alias, int(version), model)
        raise AdapterError(
            404, f"model {model!r} not found; GET /v1/models lists the base model and the aliases", "model_not_found"
        )

    @contextmanager
    def track(self, route: Route) -> Iterator[None]:
        """Count a request against its adapter version, so the version is never unloaded under it."""
        name = route.adapter
        if name is None:
            yield
            return
        self.in_flight[name] += 1
        try:
            yield
        finally:
            self.in_flight[name] -= 1
            if self.in_flight[name] <= 0:
                del self.in_flight[name]

    def forget(self, replica: Replica, name: str) -> None:
        """A replica said it does not know ``name`` (restarted?): stop routing there and reconcile now."""
        replica.loaded.discard(name)
        replica.warmed.discard(name)
        self.wake.set()

    # ---- vLLM calls ---------------------------------------------------------------------------------------
    async def _list(self, replica: Replica) -> set[str] | None:
        try:
            r = await self.http.get(f"{replica.url}/v1/models", timeout=httpx.Timeout(5.0, connect=2.0))
            r.raise_for_status()
            names = {item["id"] for item in r.json().get("data", []) if item.get("id") != self.base_model}
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:200]
            refused = isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))
            was_healthy = replica.healthy
            out = replica.check_failed(error, refused)
            if was_healthy:
                state = "out of rotation" if out else f"still in rotation ({replica.failed_checks} in a row)"
                log.warning("listing adapters on %s failed, %s: %s", replica.url, state, error)
            return None
        replica.mark(True)
        replica.set_loaded(names)
        return names

    async def _load(self, replica: Replica, av: registry.AdapterVersion) -> tuple[float, float]:
        """Check, load and warm one version on one replica; AdapterError (nothing left loaded) if any step fails.

        Returns the seconds spent loading and warming."""
        name = av.served_name
        started = time.perf_counter()
        try:
            folder = check_artifact(av, self.settings.max_lora_rank)
            r = await self.http.post(
                f"{replica.url}/v1/load_lora_adapter",
                json={"lora_name": name, "lora_path": str(folder)},
                timeout=self._admin_timeout,
            )
            if r.status_code >= 400 and "already" not in r.text.lower():
                raise AdapterError(422, f"vLLM at {replica.url} refused adapter {name}: {_detail(r)}", "load_failed")
            replica.loaded.add(name)
            loaded_at = time.perf_counter()
            warm = await self.http.post(
                f"{replica.url}/v1/chat/completions",
                json={"model": name, "messages": _WARM_MESSAGES, "max_tokens": 1},
                timeout=self._admin_timeout,
            )
            if warm.status_code >= 400:
                await self._unload(replica, name)
                raise AdapterError(422, f"adapter {name} loaded but failed to answer: {_detail(warm)}", "warm_failed")
        except AdapterError as exc:
            m.ADAPTER_LOAD_FAILURES.labels(alias=av.alias, replica=replica.url, reason=exc.code).inc()
            raise
        except httpx.HTTPError as exc:
            m.ADAPTER_LOAD_FAILURES.labels(alias=av.alias, replica=replica.url, reason="unreachable").inc()
            replica.loaded.discard(name)
            raise AdapterError(
                503, f"vLLM at {replica.url} unreachable while loading {name}: {exc}", "unreachable"
            ) from exc
        m.ADAPTER_LOADS.labels(alias=av.alias, replica=replica.url).inc()
        m.ADAPTER_LOAD_LATENCY.labels(alias=av.alias).observe(time.perf_counter() - started)
        replica.set_loaded(replica.loaded)
        replica.warmed.add(name)
        log.info("loaded adapter %s on %s", name, replica.url)
        return loaded_at - started, time.perf_counter() - loaded_at

    async def _unload(self, replica: Replica, name: str) -> None:
        try:
            r = await self.http.post(
                f"{replica.url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=self._admin_timeout
            )
        except httpx.HTTPError as exc:
            log.warning("could not unload %s from %s: %s", name, replica.url, exc)
            return
        if r.status_code < 400 or r.status_code == 404:
            replica.loaded.discard(name)
            replica.set_loaded(replica.loaded)  # also drops it from replica.warmed
            m.ADAPTER_UNLOADS.labels(alias=name.rpartition("-v")[0], replica=replica.url).inc()
            log.info("unloaded adapter %s from %s", name, replica.url)

    # ---- reconciler ---------------------------------------------------------------------------------------
    async def reconcile_once(self) -> None:
        """Make every healthy replica hold each alias's champion, and drop versions no longer wanted."""
        async with self._lock:
            try:
                desired = await self.db.run(registry.champions)
                versions = await self.db.run(registry.list_versions)
            except Exception as exc:  # DB down: keep serving what we have, check replica health anyway
                m.RECONCILE_RUNS.labels(result="error").inc()
                log.warning("reconciler cannot read the adapter registry: %s", exc)
                for replica in self.pool.replicas:
                    await self._list(replica)
                return
            self.known_aliases = {v.alias for v in versions} | {self.settings.default_alias}
            unwanted = {v.served_name for v in versions if v.status in _UNWANTED}
            failures: dict[str, str] = {}
            for replica in self.pool.replicas:
                loaded = await self._list(replica)
                if loaded is None:
                    continue
                for alias, av in desired.items():
                    if av.served_name not in loaded:
                        try:
                            await self._load(replica, av)
                        except AdapterError as exc:
                            failures[alias] = exc.message
                for name in sorted(loaded & unwanted):
                    if not self.in_flight.get(name):
                        await self._unload(replica, name)
            self._set_champions(desired, failures)
            m.RECONCILE_RUNS.labels(result="ok").inc()

    def _set_champions(self, desired: dict[str, registry.AdapterVersion], failures: dict[str, str]) -> None:
        self.champions = {
            alias: Champion(alias, av.version, av.served_name, av.artifact_uri) for alias, av in desired.items()
        }
        self.failed = {a: why for a, why in failures.items() if not self.pool.holding(desired[a].served_name)}
        for alias, champ in self.champions.items():
            m.CHAMPION_VERSION.labels(alias=alias).set(champ.version)
            m.FALLBACK_ACTIVE.labels(alias=alias).set(1 if alias in self.failed else 0)
            for replica in self.pool.replicas:
                held = champ.served_name in replica.loaded
                m.CHAMPION_LOADED.labels(alias=alias, replica=replica.url).set(1 if held else 0)
            if alias in self.failed:
                log.error("alias %s is served by the base model: %s", alias, self.failed[alias])

    async def run_reconciler(self) -> None:
        """Reconcile now and every ``reconcile_interval_s`` (sooner when a replica reports a missing adapter)."""
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

    # ---- admin --------------------------------------------------------------------------------------------
    async def _promotable(self, alias: str, version: int, force: bool) -> registry.AdapterVersion:
        """The version, unless it may not be served: 404 unknown, 409 failed, 409 gate-rejected without force."""
        try:
            av = await self.db.run(registry.get_version, alias, version)
        except ConfigError as exc:
            raise AdapterError(404, str(exc), "version_not_found") from exc
        if av.status == "failed":
            raise AdapterError(409, f"adapter {av.served_name} is marked failed ({av.reason})", "version_failed")
        if av.status == "rejected" and not force:
            raise AdapterError(
                409,
                f"adapter {av.served_name} was rejected by the evaluation gate ({av.reason}); "
                "send force=true to promote it anyway",
                "version_rejected",
            )
        return av

    async def _healthy_targets(self) -> list[Replica]:
        targets = [r for r in self.pool.replicas if await self._list(r) is not None]
        if not targets:
            raise AdapterError(503, "no healthy vLLM replica to load the adapter on", "no_replica")
        return targets

    async def _load_where_cold(
        self, av: registry.AdapterVersion, targets: list[Replica], stages: dict[str, float]
    ) -> tuple[list[Replica], int]:
        """Load and warm ``av`` on each target that does not hold it warm already (staged, or loaded by us).

        Returns the replicas it was newly loaded on (to unload if the caller gives up) and how many were
        already warm. On failure, unloads what this call loaded and raises AdapterError.
        """
        fresh: list[Replica] = []
        warm = 0
        try:
            for replica in targets:
                if av.served_name in replica.warmed:
                    warm += 1
                    continue
                was_loaded = av.served_name in replica.loaded
                load_s, warm_s = await self._load(replica, av)
                stages["load"] += load_s
                stages["warm"] += warm_s
                if not was_loaded:
                    fresh.append(replica)
        except Exception:
            for replica in fresh:
                await self._unload(replica, av.served_name)
            raise
        return fresh, warm

    async def stage(self, alias: str, version: int, force: bool = False) -> dict[str, Any]:
        """Load and warm ``version`` on every healthy replica without switching anything (blue/green).

        A later promotion of a staged version only switches the alias: the slow part on a busy server (vLLM
        applies the load between engine steps, and the warm-up waits for a step) is done before it.
        """
        started = time.perf_counter()
        stages = {"lock": 0.0, "load": 0.0, "warm": 0.0}
        async with self._lock:
            stages["lock"] = time.perf_counter() - started
            av = await self._promotable(alias, version, force)
            targets = await self._healthy_targets()
            _, already = await self._load_where_cold(av, targets, stages)
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
        version: int,
        reason: str = "promoted via the gateway",
        force: bool = False,
        actor: str | None = None,
        rollback: bool = False,
    ) -> dict[str, Any]:
        """Load ``version`` on every healthy replica, warm it, switch the registry and the alias, retire the old.

        Replicas where the version is already loaded and warm (``stage``) are not loaded again. Refused (4xx)
        with nothing changed if the artifact is bad, its rank too high, any load fails, or the evaluation gate
        rejected the version and ``force`` is not set.
        """
        started = time.perf_counter()
        stages = {"lock": 0.0, "load": 0.0, "warm": 0.0, "registry": 0.0}
        async with self._lock:
            stages["lock"] = time.perf_counter() - started
            av = await self._promotable(alias, version, force)
            targets = await self._healthy_targets()
            name = av.served_name
            try:
                fresh, staged = await self._load_where_cold(av, targets, stages)
            except AdapterError:
                m.PROMOTIONS.labels(alias=alias, result="refused").inc()
                raise
            try:
                switched = time.perf_counter()
                await self.db.run(registry.set_champion, alias, version, reason, actor, rollback)
                stages["registry"] = time.perf_counter() - switched
            except Exception as exc:
                for replica in fresh:
                    await self._unload(replica, name)
                m.PROMOTIONS.labels(alias=alias, result="refused").inc()
                raise AdapterError(503, f"promotion of {name} failed: {exc}", "promotion_failed") from exc
            previous = self.champions.get(alias)
            # The switch: one dict assignment on the event loop, so every request after it sees the new version.
            self.champions = {**self.champions, alias: Champion(alias, version, name, av.artifact_uri)}
            self.known_aliases.add(alias)
            self.failed.pop(alias, None)
            m.CHAMPION_VERSION.labels(alias=alias).set(version)
            m.FALLBACK_ACTIVE.labels(alias=alias).set(0)
        seconds = time.perf_counter() - started
        m.PROMOTIONS.labels(alias=alias, result="ok").inc()
        m.PROMOTION_LATENCY.labels(alias=alias).observe(seconds)
        if previous is not None and previous.served_name != name:
            self._spawn(self._retire(previous.served_name))
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
        try:
            target = await self.db.run(registry.rollback_target, alias)
        except ConfigError as exc:
            raise AdapterError(409, str(exc), "no_rollback_target") from exc
        return await self.promote(alias, target.version, reason="rollback via the gateway", actor=actor, rollback=True)

    async def _retire(self, name: str) -> None:
        """Unload an old version once its in-flight requests have finished."""
        deadline = time.monotonic() + self.settings.upstream_timeout_s
        while self.in_flight.get(name) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        async with self._lock:
            if name in {c.served_name for c in self.champions.values()} or self.in_flight.get(name):
                return  # promoted back meanwhile, or still busy: the reconciler retries later
            for replica in self.pool.replicas:
                if name in replica.loaded:
                    await self._unload(replica, name)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def snapshot(self) -> dict[str, Any]:
        """Aliases, champion versions and each replica's load state, for ``GET /v1/admin/adapters``."""
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
        return {"base_model": self.base_model, "aliases": aliases, "replicas": replicas}
