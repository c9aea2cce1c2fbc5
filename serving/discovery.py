"""Which vLLM replicas exist: static URLs, and `dns+http://NAME:PORT` names resolved every few seconds.

The ``dns+`` prefix is the convention of Prometheus and Thanos: each A/AAAA address of NAME is one replica at
PORT (a Kubernetes headless Service scales without a config edit). Resolution runs in a worker thread with
dnspython, against the system resolver or ``TANDEM_DISCOVERY_NAMESERVER``. A name that does not resolve keeps
its last known addresses (one log line and ``tandem_discovery_errors_total``). A new replica joins the pool out
of rotation and is admitted only once it holds the champions; a replica that leaves the answer leaves the pool
at once, and requests already sent to it finish there.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import anyio
import dns.exception
import dns.resolver

from components.errors import ConfigError
from components.settings import Settings
from serving import metrics as m
from serving.replicas import Replica, ReplicaPool

log = logging.getLogger(__name__)

DNS_PREFIX = "dns+"
_LOOKUP_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Entry:
    """One TANDEM_VLLM_URLS item: a URL as it is, or a DNS name whose addresses are the replicas."""

    raw: str
    scheme: str
    host: str
    port: int | None
    dns: bool

    def url(self, address: str) -> str:
        host = f"[{address}]" if ":" in address else address
        return f"{self.scheme}://{host}" + (f":{self.port}" if self.port else "")


def parse_entry(raw: str) -> Entry:
    """An Entry from ``http://host:port`` or ``dns+http://NAME:PORT``; ConfigError says what was expected."""
    text = raw.strip().rstrip("/")
    dns_entry = text.startswith(DNS_PREFIX)
    parts = urlsplit(text.removeprefix(DNS_PREFIX))
    try:
        port = parts.port
    except ValueError:
        port = None
        parts = parts._replace(netloc="")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise ConfigError(f"TANDEM_VLLM_URLS entry {raw!r}: expected http(s)://HOST:PORT or dns+http(s)://NAME:PORT")
    if dns_entry and port is None:
        raise ConfigError(f"TANDEM_VLLM_URLS entry {raw!r}: a dns+ entry needs a port (dns+http://NAME:PORT)")
    return Entry(text, parts.scheme, parts.hostname, port, dns_entry)


def make_resolver(nameserver: str) -> dns.resolver.Resolver:
    """dnspython's resolver: the system's (resolv.conf, its search list), or one that asks HOST:PORT only."""
    if not nameserver:
        resolver = dns.resolver.Resolver()
    else:
        host, _, port = nameserver.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"TANDEM_DISCOVERY_NAMESERVER {nameserver!r}: expected HOST:PORT, e.g. 10.0.0.10:53")
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [host.strip("[]")]
        resolver.port = int(port)
    resolver.lifetime = _LOOKUP_TIMEOUT_S
    resolver.cache = None  # every round asks again: a scaled Service must show within one interval
    return resolver


def addresses(resolver: dns.resolver.Resolver, name: str) -> list[str]:
    """The A and AAAA addresses of ``name`` (an IP literal is its own address). Raises LookupError with one line
    when neither family has an address."""
    try:
        return [str(ipaddress.ip_address(name))]
    except ValueError:
        pass
    found: list[str] = []
    problems: list[str] = []
    for rdtype in ("A", "AAAA"):
        try:
            answer = resolver.resolve(name, rdtype, search=True)
        except dns.resolver.NoAnswer:
            continue
        except (dns.exception.DNSException, OSError) as exc:
            problems.append(f"{rdtype}: {type(exc).__name__}")
            continue
        found.extend(sorted(rr.to_text() for rr in answer))
    if not found:
        raise LookupError(f"{name} has no A/AAAA address" + (f" ({', '.join(problems)})" if problems else ""))
    return found


class Discovery:
    """Keeps the pool's replicas equal to what the entries name, admitting new ones only once they are warm."""

    def __init__(
        self,
        settings: Settings,
        pool: ReplicaPool | None = None,
        warm: Callable[[Replica], Awaitable[bool]] | None = None,
    ) -> None:
        """``pool``: may be set later (the first ``resolve`` gives the URLs the pool starts with)."""
        self.settings = settings
        self.pool = pool or ReplicaPool([], allow_empty=True)
        self.warm = warm
        self.entries = [parse_entry(u) for u in settings.vllm_endpoints]
        self.resolver = make_resolver(settings.discovery_nameserver) if self.dynamic else None
        self.last_known: dict[str, list[str]] = {}  # dns entry -> the replica URLs it last resolved to

    @property
    def dynamic(self) -> bool:
        return any(e.dns for e in self.entries)

    def resolve(self) -> list[str]:
        """Every replica URL, in entry order (blocking: run it in a thread)."""
        urls: list[str] = []
        for entry in self.entries:
            if not entry.dns:
                urls.append(entry.raw)
                continue
            assert self.resolver is not None
            try:
                found = [entry.url(a) for a in addresses(self.resolver, entry.host)]
            except LookupError as exc:
                m.DISCOVERY_ERRORS.labels(name=entry.host).inc()
                kept = self.last_known.get(entry.raw, [])
                log.warning("discovery: %s; keeping the last known %d replica(s)", exc, len(kept))
                found = kept
            self.last_known[entry.raw] = found
            m.DISCOVERY_REPLICAS.labels(name=entry.host).set(len(found))
            urls.extend(found)
        return list(dict.fromkeys(urls))

    async def refresh_once(self) -> None:
        """Resolve (off the event loop), apply to the pool, and try to admit every replica still waiting."""
        urls = await anyio.to_thread.run_sync(self.resolve)
        added, removed = self.pool.sync(urls)
        for replica in removed:
            log.info(
                "discovery: %s left; out of rotation (%d request(s) finish there)", replica.url, replica.outstanding
            )
        for replica in added:
            log.info("discovery: %s joined; admitted once it holds the champions", replica.url)
        for replica in [r for r in self.pool.replicas if not r.admitted]:
            await self._admit(replica)

    async def _admit(self, replica: Replica) -> None:
        try:
            ready = True if self.warm is None else await self.warm(replica)
        except Exception as exc:  # vLLM still starting, a load refused: the next round tries again
            log.warning("discovery: %s not admitted yet: %s", replica.url, f"{type(exc).__name__}: {exc}"[:200])
            return
        if ready and replica in self.pool.replicas:
            self.pool.admit(replica)
            m.DISCOVERY_ADMITTED.inc()
            log.info("discovery: %s admitted to traffic", replica.url)

    async def run(self) -> None:
        """Refresh every ``discovery_interval_s`` until cancelled; one failed round never ends the loop."""
        while True:
            await asyncio.sleep(self.settings.discovery_interval_s)
            try:
                await self.refresh_once()
            except Exception:
                log.exception("discovery round failed")


def warm_callback(adapters: Any) -> Callable[[Replica], Awaitable[bool]]:
    """Loads the champions onto a replica and says whether it now holds every one that loads anywhere.

    Uses the adapter manager's ``warm_replica(replica)``; a manager without it runs a reconcile round instead.
    """

    async def warm(replica: Replica) -> bool:
        warm_replica = getattr(adapters, "warm_replica", None)
        if warm_replica is not None:
            await warm_replica(replica)
        else:
            await adapters.reconcile_once()
        broken = set(getattr(adapters, "failed", {}))  # champions no replica could load: nothing to wait for
        wanted = [c.served_name for alias, c in adapters.champions.items() if alias not in broken]
        return replica.healthy and all(name in replica.loaded for name in wanted)

    return warm
