"""Sending one request to vLLM: resolve the alias, pick the least-busy healthy replica, fail over if needed."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import httpx

from serving import metrics as m
from serving.adapters import AdapterManager, Route
from serving.errors import ApiError
from serving.replicas import NoReplicaError, Replica, ReplicaPool

log = logging.getLogger(__name__)


@dataclass
class Upstream:
    """An open response from a replica; ``close()`` releases it and its in-flight counts.

    ``open_chat`` has already read the start of the answer (the first data line of a stream, or a whole
    non-streamed body), so a replica that failed before answering was retried before anything reached the client.
    """

    response: httpx.Response
    replica: Replica
    route: Route
    _stack: ExitStack
    _head: list[str] = field(default_factory=list)
    _lines: AsyncIterator[str] | None = None
    _body: bytes | None = None

    async def _prime(self, stream: bool) -> None:
        if not stream:
            self._body = await self.response.aread()
            return
        self._lines = self.response.aiter_lines()
        async for line in self._lines:
            self._head.append(line)
            if line.startswith("data:"):
                return

    async def lines(self) -> AsyncIterator[str]:
        """The streamed answer's lines, the ones read ahead first."""
        for line in self._head:
            yield line
        lines = self._lines if self._lines is not None else self.response.aiter_lines()
        async for line in lines:
            yield line

    async def read(self) -> bytes:
        """The whole (non-streamed) answer."""
        return self._body if self._body is not None else await self.response.aread()

    async def close(self) -> None:
        try:
            await self.response.aclose()
        finally:
            self._stack.close()


def _failed_before_answer(exc: httpx.HTTPError) -> bool:
    """A transport failure from a replica that gave no answer yet: refused, reset, closed. A read timeout is not
    one (the replica is busy, not gone, and a second try would double the wait)."""
    return isinstance(exc, httpx.TransportError) and (
        isinstance(exc, httpx.ConnectTimeout) or not isinstance(exc, httpx.TimeoutException)
    )


async def open_chat(
    http: httpx.AsyncClient,
    pool: ReplicaPool,
    adapters: AdapterManager,
    model: str,
    body: dict[str, Any],
    stream: bool = True,
) -> Upstream:
    """POST /v1/chat/completions to a replica and read the start of its answer; the route is resolved at send time.

    Resolving and counting happen with no ``await`` in between, so a promotion either happened before this
    request (it gets the new version) or waits for it (the old version is not unloaded under it).
    Failover: a replica that refuses the connection, breaks it, or answers 5xx before the first data line (the
    whole body when not streaming) is retried once on another replica, with the route resolved again; nothing has
    reached the client by then. A replica that lost the adapter (404) sends the request to one that has it, or to
    the base model.
    """
    tried: list[Replica] = []
    retries = 1
    for _ in range(len(pool.replicas) + 3):
        route = adapters.resolve(model)
        try:
            replica = pool.pick(route.adapter, exclude=tried)
        except NoReplicaError:
            if route.adapter and pool.healthy:  # nobody holds it any more: the base model answers instead
                adapters.failed.setdefault(route.alias or model, "adapter not loaded on any healthy replica")
                adapters.wake.set()
                route = Route(route.alias, None, adapters.base_model, fallback=True)
                try:
                    replica = pool.pick(None, exclude=tried)
                except NoReplicaError:
                    break
            else:
                break
        stack = ExitStack()
        stack.enter_context(pool.track(replica))
        stack.enter_context(adapters.track(route))
        request = http.build_request(
            "POST", f"{replica.url}/v1/chat/completions", json={**body, "model": route.served_model}
        )
        up: Upstream | None = None
        try:
            up = Upstream(await http.send(request, stream=True), replica, route, stack)
            if up.response.status_code < 400:
                await up._prime(stream)
        except httpx.HTTPError as exc:
            if up is not None:
                await up.close()
            else:
                stack.close()
            refused = isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))
            kind = "connect" if refused else type(exc).__name__
            m.UPSTREAM_ERRORS.labels(replica=replica.url, kind=kind).inc()
            error = f"{type(exc).__name__}: {exc}"[:200]
            if refused:
                replica.mark(False, error)
            else:
                replica.check_failed(error, refused=False)
            adapters.wake.set()
            tried.append(replica)
            if retries and _failed_before_answer(exc):
                retries -= 1
                m.UPSTREAM_RETRIES.labels(replica=replica.url, reason=kind).inc()
                log.warning("replica %s failed before answering (%s); trying another", replica.url, kind)
                continue
            if refused:
                break
            raise ApiError(502, f"vLLM at {replica.url} failed: {type(exc).__name__}", code="upstream_error") from exc
        response = up.response
        if response.status_code == 404 and route.adapter:
            await up.close()
            log.warning("replica %s does not know %s; rerouting", replica.url, route.adapter)
            adapters.forget(replica, route.adapter)
            continue
        if response.status_code >= 500 and retries and any(r not in tried and r is not replica for r in pool.healthy):
            await up.close()
            retries -= 1
            tried.append(replica)
            m.UPSTREAM_ERRORS.labels(replica=replica.url, kind="status").inc()
            m.UPSTREAM_RETRIES.labels(replica=replica.url, reason=f"status {response.status_code}").inc()
            log.warning("replica %s answered %d; trying another", replica.url, response.status_code)
            continue
        if route.fallback:
            m.FALLBACK_REQUESTS.labels(alias=route.alias or model).inc()
        return up
    raise ApiError(503, "no healthy vLLM replica can serve this request; check `tandem status`", code="no_replica")
