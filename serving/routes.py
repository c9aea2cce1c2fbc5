"""The route table: which adapter version each alias resolves to on this gateway, and what is in flight here.

Resolution runs per request on the event loop and never awaits. The table is replaced whole (one assignment) by
whoever read the registry last: a reconcile round, a NOTIFY refresh, or this gateway's own promotion; each
read takes a generation number first, so a slow round that read the registry before a switch can never put
the old champion back after a newer read applied the new one.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from components import registry
from components.adapter_rules import AdapterError
from serving import metrics as m
from serving.replicas import ReplicaPool

log = logging.getLogger(__name__)


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


class RouteTable:
    """Aliases -> champions as this gateway last read them, and requests in flight per adapter version."""

    def __init__(self, base_model: str, default_alias: str, pool: ReplicaPool) -> None:
        self.base_model = base_model
        self.pool = pool
        self.champions: dict[str, Champion] = {}
        self.failed: dict[str, str] = {}  # alias -> why its champion is not loaded anywhere
        self.known_aliases: set[str] = {default_alias}
        self.in_flight: Counter[str] = Counter()
        self._default_alias = default_alias
        self._generations = itertools.count(1)
        self._applied = 0

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
        """Count a request against its adapter version, so this gateway never unloads the version under it."""
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

    def next_generation(self) -> int:
        """Take before reading the registry; pass to ``apply``."""
        return next(self._generations)

    def apply(
        self,
        generation: int,
        desired: dict[str, registry.AdapterVersion],
        aliases: set[str],
        failures: dict[str, str] | None = None,
    ) -> bool:
        """Switch to the champions read at ``generation`` unless a newer read was applied already.

        ``failures``: aliases whose champion could not be loaded this round (None: keep what is known)."""
        if generation < self._applied:
            return False
        self._applied = generation
        champions = {}
        for alias, av in desired.items():
            current = self.champions.get(alias)
            pending = (
                current is not None
                and current.served_name != av.served_name
                and not self.pool.holding(av.served_name)
                and self.pool.holding(current.served_name)
                and alias not in (failures or {})
            )
            # A switch no replica can serve yet (made in the registry alone, or loading on another gateway's
            # round) keeps the previous champion until some replica holds the new one or its load failed.
            champions[alias] = (
                current if pending and current else Champion(alias, av.version, av.served_name, av.artifact_uri)
            )
        self.champions = champions
        self.known_aliases = aliases | set(desired) | {self._default_alias}
        known = self.failed if failures is None else failures
        self.failed = {
            a: why for a, why in known.items() if a in desired and not self.pool.holding(desired[a].served_name)
        }
        self.publish()
        return True

    def switch(self, generation: int, av: registry.AdapterVersion) -> Champion | None:
        """One alias to a new champion (this gateway's own promotion); returns the champion it replaced."""
        previous = self.champions.get(av.alias)
        self._applied = max(self._applied, generation)
        # One dict assignment on the event loop: every request resolved after it sees the new version.
        self.champions = {**self.champions, av.alias: Champion(av.alias, av.version, av.served_name, av.artifact_uri)}
        self.known_aliases.add(av.alias)
        self.failed.pop(av.alias, None)
        self.publish()
        return previous

    def publish(self) -> None:
        """The champion gauges, as this gateway sees them."""
        for alias, champ in self.champions.items():
            m.CHAMPION_VERSION.labels(alias=alias).set(champ.version)
            m.FALLBACK_ACTIVE.labels(alias=alias).set(1 if alias in self.failed else 0)
            for replica in self.pool.replicas:
                held = champ.served_name in replica.loaded
                m.CHAMPION_LOADED.labels(alias=alias, replica=replica.url).set(1 if held else 0)
            if alias in self.failed:
                log.error("alias %s is served by the base model: %s", alias, self.failed[alias])

    def names_in_use(self) -> set[str]:
        """Served names this gateway routes to or has requests on."""
        return {c.served_name for c in self.champions.values()} | set(self.in_flight)
