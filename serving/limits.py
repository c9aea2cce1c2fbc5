"""Limits that hold: request shape, per-key rate limits shared through Postgres, a cap on requests to vLLM.

- ``check_filters`` / ``check_messages``: bounds from the settings, answered 400 naming the field.
- ``RateLimiter``: requests and completion tokens per minute for each key name, checked and charged by one atomic
  SQL statement (GCRA) on ``gateway_rate_limits`` (migration 0007), so every gateway of a fleet sees the same
  counters. No maintained limiter keeps its state in Postgres in a way that fits (docs/gateway.md, "Limits").
- ``UpstreamGate``: at most ``upstream_max_in_flight`` requests to vLLM from this process, a queue of
  ``upstream_max_queue`` waiting at most ``upstream_queue_timeout_s``; beyond that 503 at once. Per process on
  purpose: it protects this process and the replicas it talks to, and needs no shared state.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from components.settings import Settings
from serving import metrics as m
from serving.db import Database
from serving.errors import ApiError, error_body

log = logging.getLogger(__name__)

PERIOD = timedelta(minutes=1)


class LimitError(ApiError):
    """A refusal the client may retry later: answered with ``Retry-After`` (seconds) and ``retry-after-ms``."""

    def __init__(self, status: int, message: str, retry_after_s: float, code: str) -> None:
        super().__init__(status, message, code=code)
        self.retry_after_s = max(retry_after_s, 0.001)


def install(app: FastAPI) -> None:
    """Answer ``LimitError`` in the OpenAI error shape with its retry headers."""

    @app.exception_handler(LimitError)
    async def _limited(request: Request, exc: LimitError) -> JSONResponse:
        body = error_body(exc.status, exc.message, exc.param, exc.code)
        headers = {
            "Retry-After": str(math.ceil(exc.retry_after_s)),
            # the openai client reads this one first: it waits milliseconds, not whole seconds
            "retry-after-ms": str(math.ceil(exc.retry_after_s * 1000)),
        }
        return JSONResponse(body, status_code=exc.status, headers=headers)


# ---- request shape ----------------------------------------------------------------------------------------


def check_filters(filters: dict[str, Any] | None, settings: Settings) -> None:
    if not filters:
        return
    if len(filters) > settings.max_filters:
        m.REJECTED.labels(reason="too_many_filters").inc()
        raise ApiError(400, f"filters: at most {settings.max_filters} filters (got {len(filters)})", param="filters")
    for name, value in filters.items():
        if isinstance(value, list) and len(value) > settings.max_filter_values:
            m.REJECTED.labels(reason="too_many_filter_values").inc()
            raise ApiError(
                400,
                f"filters.{name}: at most {settings.max_filter_values} values (got {len(value)})",
                param=f"filters.{name}",
            )


def check_messages(messages: list[Any], settings: Settings) -> None:
    for i, message in enumerate(messages):
        content = message.content
        size = len(content) if isinstance(content, str) else sum(len(p.text) for p in content or [])
        if size > settings.max_message_chars:
            m.REJECTED.labels(reason="message_too_long").inc()
            raise ApiError(
                400,
                f"messages.{i}.content: at most {settings.max_message_chars} characters (got {size})",
                param=f"messages.{i}.content",
            )


# ---- rate limits ------------------------------------------------------------------------------------------

# GCRA (the generic cell rate algorithm) on two theoretical arrival times (TAT) in one row. A request that
# costs `step` of a budget refilled over PERIOD is admitted when max(tat, now) + step <= now + PERIOD; then
# tat = max(tat, now) + step. Both budgets are checked and charged together or not at all. The row lock of
# ON CONFLICT DO UPDATE serialises gateways racing on one key; `now()` is the database's clock.
_ADMIT = "(greatest(s.request_tat, now()) + %(req_step)s <= now() + %(period)s AND greatest(s.token_tat, now()) + %(tok_step)s <= now() + %(period)s)"  # noqa: E501
_GCRA = f"""
INSERT INTO gateway_rate_limits AS s (subject, request_tat, token_tat, allowed)
VALUES (%(subject)s, now() + %(req_step)s, now() + %(tok_step)s, true)
ON CONFLICT (subject) DO UPDATE SET
    allowed = {_ADMIT},
    request_tat = CASE WHEN {_ADMIT} THEN greatest(s.request_tat, now()) + %(req_step)s ELSE s.request_tat END,
    token_tat = CASE WHEN {_ADMIT} THEN greatest(s.token_tat, now()) + %(tok_step)s ELSE s.token_tat END,
    updated_at = now()
RETURNING allowed,
    extract(epoch FROM greatest(request_tat, now()) + %(req_step)s - %(period)s - now())::float8,
    extract(epoch FROM greatest(token_tat, now()) + %(tok_step)s - %(period)s - now())::float8
"""


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after_s: float = 0.0
    limit: str = ""  # "requests" or "tokens": the budget that refused


def subject_of(request: Request) -> str:
    """Whom a request is counted against: its API key's name, else its client address."""
    name = getattr(request.state, "key_name", None)
    if name:
        return str(name)
    host = request.client.host if request.client else "unknown"
    return f"addr:{host}"


def _admit(conn: psycopg.Connection, params: dict[str, Any], budget_ms: int) -> Verdict:
    conn.execute("SELECT set_config('statement_timeout', %s, true)", (str(budget_ms),))
    row = conn.execute(_GCRA, params).fetchone()
    assert row is not None
    allowed, wait_requests, wait_tokens = row
    if allowed:
        return Verdict(True)
    limit = "requests" if wait_requests >= wait_tokens else "tokens"
    return Verdict(False, max(wait_requests, wait_tokens), limit)


class RateLimiter:
    """Requests and completion tokens per minute for each subject, counted in Postgres (shared by all gateways).

    When Postgres cannot answer within ``rate_limit_db_timeout_s`` the request goes through (counted in
    ``tandem_gateway_rate_limit_errors_total``): an outage of the counters must not become an outage of the API.
    """

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db

    @property
    def enabled(self) -> bool:
        return bool(self.settings.rate_limit_requests_per_minute or self.settings.rate_limit_tokens_per_minute)

    async def check(self, subject: str, tokens: int = 0) -> None:
        """Charge one request and ``tokens`` completion tokens to ``subject``, or raise LimitError (429)."""
        s = self.settings
        rpm, tpm = s.rate_limit_requests_per_minute, s.rate_limit_tokens_per_minute
        if not (rpm or tpm):
            return
        if tpm and tokens > tpm:
            m.REJECTED.labels(reason="tokens_over_rate_limit").inc()
            raise ApiError(
                400,
                f"this request reserves {tokens} completion tokens (max_tokens x n), more than the "
                f"{tpm} per minute this key may use (TANDEM_RATE_LIMIT_TOKENS_PER_MINUTE)",
                param="max_tokens",
                code="tokens_over_rate_limit",
            )
        params = {
            "subject": subject[:200],
            "period": PERIOD,
            "req_step": PERIOD / rpm if rpm else timedelta(0),
            "tok_step": PERIOD * tokens / tpm if tpm else timedelta(0),
        }
        budget = s.rate_limit_db_timeout_s
        try:
            verdict = await self.db.run(_admit, params, max(int(budget * 1000), 1), timeout=budget)
        except (psycopg.Error, OSError) as exc:
            m.RATE_LIMIT_ERRORS.inc()
            log.warning("rate limit not checked (Postgres did not answer): %s", str(exc).splitlines()[0][:200])
            return
        if verdict.allowed:
            return
        m.REJECTED.labels(reason=f"rate_limit_{verdict.limit}").inc()
        per_minute = rpm if verdict.limit == "requests" else tpm
        what = "requests" if verdict.limit == "requests" else "completion tokens"
        raise LimitError(
            429,
            f"rate limit: {per_minute} {what} per minute for '{subject}'; retry in {verdict.retry_after_s:.2f} s",
            verdict.retry_after_s,
            code=f"rate_limit_{verdict.limit}",
        )


# ---- the cap on requests to vLLM --------------------------------------------------------------------------


class Slot:
    """One place among the requests in flight to vLLM; ``release()`` may be called more than once."""

    def __init__(self, gate: UpstreamGate) -> None:
        self._gate: UpstreamGate | None = gate

    def release(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate._release()

    def __del__(self) -> None:  # a stream dropped before its first byte never runs its finally: free it here
        self.release()


class UpstreamGate:
    """At most ``max_in_flight`` requests to vLLM from this process; ``max_queue`` more wait up to ``wait_s``."""

    def __init__(self, max_in_flight: int, max_queue: int, wait_s: float) -> None:
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.wait_s = wait_s
        self._sem = asyncio.Semaphore(max_in_flight)
        self.in_flight = 0
        self.waiting = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> UpstreamGate:
        return cls(settings.upstream_max_in_flight, settings.upstream_max_queue, settings.upstream_queue_timeout_s)

    def _refuse(self, why: str) -> LimitError:
        m.REJECTED.labels(reason="overloaded").inc()
        return LimitError(
            503,
            f"the gateway is at its limit of {self.max_in_flight} requests to vLLM ({why}); retry shortly",
            max(self.wait_s, 0.5),
            code="overloaded",
        )

    async def acquire(self) -> Slot:
        if not self._sem.locked():
            await self._sem.acquire()  # free: returns without suspending
            return self._taken()
        if self.waiting >= self.max_queue:
            raise self._refuse(f"{self.waiting} already waiting")
        self.waiting += 1
        m.UPSTREAM_WAITING.set(self.waiting)
        try:
            async with asyncio.timeout(self.wait_s):
                await self._sem.acquire()
        except TimeoutError:
            raise self._refuse(f"waited {self.wait_s:g} s") from None
        finally:
            self.waiting -= 1
            m.UPSTREAM_WAITING.set(self.waiting)
        return self._taken()

    def _taken(self) -> Slot:
        self.in_flight += 1
        m.UPSTREAM_IN_FLIGHT.set(self.in_flight)
        return Slot(self)

    def _release(self) -> None:
        self.in_flight -= 1
        m.UPSTREAM_IN_FLIGHT.set(self.in_flight)
        self._sem.release()


@dataclass
class Limits:
    """The app's limiters, kept in ``app.state.limits`` by the lifespan."""

    rate: RateLimiter
    upstream: UpstreamGate


def get_limits(request: Request) -> Limits:
    limits: Limits = request.app.state.limits
    return limits


async def release_after(stream: AsyncIterator[str], slot: Slot) -> AsyncGenerator[str, None]:
    """``stream``'s items; the slot is released when it ends, fails or the client goes away."""
    try:
        async for item in stream:
            yield item
    finally:
        try:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            slot.release()
