"""The vLLM replicas behind the gateway: health, outstanding requests, and least-outstanding routing."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

from serving import metrics as m

# A replica whose process answers a check late or wrongly (read timeout, 5xx) stays in rotation for this many
# more checks in a row: one slow listing on a busy host must not take the only replica out. A refused
# connection means the process is gone, and takes it out at once.
FAILED_CHECKS_TOLERATED = 2


@dataclass
class Replica:
    """One vLLM server as the gateway sees it."""

    url: str
    healthy: bool = False
    outstanding: int = 0
    loaded: set[str] = field(default_factory=set)  # adapter names vLLM listed (or we loaded) last
    warmed: set[str] = field(default_factory=set)  # of those, the ones this gateway loaded and saw answer
    last_error: str | None = None
    failed_checks: int = 0  # checks failed in a row
    admitted: bool = True  # False while a replica found by discovery waits for its champions (no traffic)

    def mark(self, healthy: bool, error: str | None = None) -> None:
        self.healthy = healthy
        self.last_error = error
        if healthy:
            self.failed_checks = 0
        m.REPLICA_HEALTHY.labels(replica=self.url).set(1 if healthy else 0)

    def check_failed(self, error: str, refused: bool) -> bool:
        """Record a failed check; True if the replica is now out of rotation (see FAILED_CHECKS_TOLERATED)."""
        self.failed_checks += 1
        self.last_error = error
        if refused or self.failed_checks > FAILED_CHECKS_TOLERATED:
            self.mark(False, error)
        return not self.healthy

    def set_loaded(self, names: Iterable[str]) -> None:
        self.loaded = set(names)
        self.warmed &= self.loaded  # a restarted replica forgot them: they need loading and warming again
        m.REPLICA_ADAPTERS.labels(replica=self.url).set(len(self.loaded))


class NoReplicaError(Exception):
    """No healthy replica can serve the request."""


class ReplicaPool:
    """Picks the healthy replica with the fewest outstanding requests (ties go round-robin)."""

    def __init__(self, urls: Iterable[str], allow_empty: bool = False) -> None:
        """``allow_empty``: discovery may find the replicas later (a DNS name that does not resolve yet)."""
        self.replicas = [Replica(u.rstrip("/")) for u in urls]
        if not self.replicas and not allow_empty:
            raise ValueError("at least one vLLM URL is needed (TANDEM_VLLM_URLS)")
        self._tiebreak = itertools.count()
        for r in self.replicas:
            m.REPLICA_HEALTHY.labels(replica=r.url).set(0)
            m.REPLICA_OUTSTANDING.labels(replica=r.url).set(0)

    @property
    def healthy(self) -> list[Replica]:
        """The replicas in rotation: healthy and admitted."""
        return [r for r in self.replicas if r.healthy and r.admitted]

    def sync(self, urls: Iterable[str]) -> tuple[list[Replica], list[Replica]]:
        """Make the pool hold exactly ``urls``; returns (added, removed).

        Added replicas wait out of rotation until ``admit``. Removed ones leave at once: a new list is assigned,
        so a loop already walking the old one is not disturbed, and requests holding a removed replica finish.
        """
        wanted = [u.rstrip("/") for u in urls]
        current = {r.url: r for r in self.replicas}
        added = [Replica(u, admitted=False) for u in wanted if u not in current]
        removed = [r for r in self.replicas if r.url not in set(wanted)]
        if not added and not removed:
            return [], []
        fresh = {r.url: r for r in added}
        self.replicas = [current.get(u) or fresh[u] for u in dict.fromkeys(wanted)]
        for r in added:
            m.REPLICA_HEALTHY.labels(replica=r.url).set(0)
            m.REPLICA_OUTSTANDING.labels(replica=r.url).set(0)
        for r in removed:
            r.admitted = False
            for gauge in (m.REPLICA_HEALTHY, m.REPLICA_OUTSTANDING, m.REPLICA_ADAPTERS):
                with suppress(KeyError):
                    gauge.remove(r.url)
        return added, removed

    def admit(self, replica: Replica) -> None:
        """Put a replica found by discovery into rotation (after it received the champions)."""
        replica.admitted = True

    def pick(self, adapter: str | None = None, exclude: Iterable[Replica] = ()) -> Replica:
        """The least-loaded healthy replica (holding ``adapter`` when one is named).

        Synchronous on purpose: callers pick and ``track`` without an ``await`` in between, so two
        concurrent requests always see each other's outstanding counts.
        """
        skip = {id(r) for r in exclude}
        candidates = [r for r in self.healthy if id(r) not in skip]
        if adapter is not None:
            candidates = [r for r in candidates if adapter in r.loaded]
        if not candidates:
            raise NoReplicaError(adapter or "base model")
        turn = next(self._tiebreak)
        n = len(candidates)
        # Rotate before min() so equal counts spread over replicas instead of always hitting the first.
        return min((candidates[(i + turn) % n] for i in range(n)), key=lambda r: r.outstanding)

    def holding(self, adapter: str) -> list[Replica]:
        return [r for r in self.healthy if adapter in r.loaded]

    @contextmanager
    def track(self, replica: Replica) -> Iterator[Replica]:
        """Count a request as outstanding on ``replica`` for the duration of the block."""
        replica.outstanding += 1
        m.REPLICA_OUTSTANDING.labels(replica=replica.url).set(replica.outstanding)
        try:
            yield replica
        finally:
            replica.outstanding -= 1
            m.REPLICA_OUTSTANDING.labels(replica=replica.url).set(replica.outstanding)
