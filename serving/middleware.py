"""Pure ASGI middleware (no per-request task overhead, streams pass through): body size limit and metrics."""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving import metrics as m
from serving.errors import error_body


class BodySizeLimit:
    """Answer 413 to bodies over ``max_bytes``, by Content-Length or while a chunked body streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._refuse(send)
                return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLargeError
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLargeError:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        m.REJECTED.labels(reason="body_too_large").inc()
        body = json.dumps(
            error_body(413, f"request body is larger than {self.max_bytes} bytes (TANDEM_MAX_BODY_BYTES)")
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLargeError(Exception):
    pass


_TRACKED = frozenset({"/v1/chat/completions", "/v1/retrieve", "/v1/models"})


class RequestMetrics:
    """Count and time every request until its last byte (streams included), by route template and status.

    Handlers put ``alias`` and ``adapter_version`` into ``request.state``; they become labels.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        path = scope.get("path", "")
        in_flight = m.IN_FLIGHT.labels(route=path if path in _TRACKED else "other")
        in_flight.inc()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            in_flight.dec()
            route: Any = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            state = scope.get("state") or {}
            labels = {
                "route": template,
                "method": scope.get("method", ""),
                "status": str(status),
                "alias": str(state.get("alias") or ""),
                "adapter_version": "" if state.get("adapter_version") is None else str(state["adapter_version"]),
            }
            m.REQUESTS.labels(**labels).inc()
            m.REQUEST_LATENCY.labels(**labels).observe(time.perf_counter() - started)
