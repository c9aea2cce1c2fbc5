"""Sending one request to vLLM: resolve the alias, pick the least-busy healthy replica, fail over if needed."""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx

from serving import metrics as m
from serving.adapters import AdapterManager, Route
from serving.errors import ApiError
from serving.replicas import NoReplicaError, Replica, ReplicaPool

log = logging.getLogger(__name__)


@dataclass
class Upstream:
    """An open response from a replica; ``close()`` releases it and its in-flight counts."""

    response: httpx.Response
    replica: Replica
    route: Route
    _stack: ExitStack

    async def close(self) -> None:
        try:
            await self.response.aclose()
        finally:
            self._stack.close()


async def open_chat(
    http: httpx.AsyncClient, pool: ReplicaPool, adapters: AdapterManager, model: str, body: dict[str, Any]
) -> Upstream:
    """POST /v1/chat/completions to a replica (streamed response); the route is resolved at send time.

    Resolving and counting happen with no ``await`` in between, so a promotion either happened before this
    request (it gets the new version) or waits for it (the old version is not unloaded under it).
    Connection failures try the next replica; a replica that lost the adapter (404) sends the request to one
    that has it, or to the base model.
    """
    tried: list[Replica] = []
    for _ in range(len(pool.replicas) + 2):
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
        try:
            response = await http.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            stack.close()
            m.UPSTREAM_ERRORS.labels(replica=replica.url, kind="connect").inc()
            replica.mark(False, f"{type(exc).__name__}: {exc}"[:200])
            adapters.wake.set()
            tried.append(replica)
            continue
        except httpx.HTTPError as exc:
            stack.close()
            m.UPSTREAM_ERRORS.labels(replica=replica.url, kind=type(exc).__name__).inc()
            raise ApiError(502, f"vLLM at {replica.url} failed: {type(exc).__name__}", code="upstream_error") from exc
        if response.status_code == 404 and route.adapter:
            await response.aclose()
            stack.close()
            log.warning("replica %s does not know %s; rerouting", replica.url, route.adapter)
            adapters.forget(replica, route.adapter)
            continue
        if route.fallback:
            m.FALLBACK_REQUESTS.labels(alias=route.alias or model).inc()
        return Upstream(response, replica, route, stack)
    raise ApiError(503, "no healthy vLLM replica can serve this request; check `tandem status`", code="no_replica")
