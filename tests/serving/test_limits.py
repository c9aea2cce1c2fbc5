"""serving/limits.py, serving/db.py and the metrics snapshot against the real session Postgres (no vLLM needed)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest

from components.settings import Settings
from serving import metrics as m
from serving.db import Database
from serving.errors import ApiError
from serving.limits import LimitError, RateLimiter, UpstreamGate
from serving.pipeline_metrics import PipelineCollector
from serving.scrape_snapshot import Snapshot

DEAD_URL = "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1"


@pytest.fixture
def database(pg_url: str) -> Iterator[Database]:
    db = Database(pg_url, max_size=8, statement_timeout_ms=1500)
    db.open()
    db.pool.wait(10)
    yield db
    db.close()


def _limiter(db: Database, rpm: int = 0, tpm: int = 0) -> RateLimiter:
    return RateLimiter(Settings(rate_limit_requests_per_minute=rpm, rate_limit_tokens_per_minute=tpm), db)


def test_statement_timeout_holds_on_every_pooled_connection(database: Database) -> None:
    async def main() -> None:
        shown = await database.run(lambda conn: conn.execute("SHOW statement_timeout").fetchone()[0])
        assert shown == "1500ms"
        with pytest.raises(psycopg.errors.QueryCanceled):
            await database.run(lambda conn: conn.execute("SELECT pg_sleep(5)"))
        # the connection that was cancelled went back to the pool still limited
        assert await database.run(lambda conn: conn.execute("SHOW statement_timeout").fetchone()[0]) == "1500ms"

    asyncio.run(main())


def test_request_limit_is_shared_by_two_gateways_and_exact_under_a_race(pg_url: str, database: Database) -> None:
    other = Database(pg_url, max_size=8, statement_timeout_ms=1500)  # a second gateway: its own pool
    other.open()
    subject = f"key-{uuid.uuid4().hex[:8]}"

    refusals: list[LimitError] = []

    async def attempt(limiter: RateLimiter) -> bool:
        try:
            await limiter.check(subject)
        except LimitError as exc:
            refusals.append(exc)
            return False
        return True

    async def main() -> list[bool]:
        a, b = _limiter(database, rpm=5), _limiter(other, rpm=5)
        return await asyncio.gather(*(attempt(a if i % 2 else b) for i in range(16)))

    try:
        results = asyncio.run(main())
    finally:
        other.close()
    assert sum(results) == 5  # five a minute, however the 16 requests interleave across the two gateways
    assert len(refusals) == 11
    assert all(r.status == 429 and r.code == "rate_limit_requests" and 0 < r.retry_after_s <= 60 for r in refusals)
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT allowed FROM gateway_rate_limits WHERE subject = %s", (subject,)).fetchone()
    assert row == (False,)


def test_token_limit_charges_reserved_tokens_and_refuses_what_never_fits(database: Database) -> None:
    subject = f"key-{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        limiter = _limiter(database, rpm=0, tpm=100)
        await limiter.check(subject, tokens=60)
        with pytest.raises(LimitError) as refused:
            await limiter.check(subject, tokens=60)
        assert refused.value.code == "rate_limit_tokens"
        # 60 tokens of a 100-per-minute budget come back after about 12 s (60 - 40 = 20 tokens at 100/min)
        assert 5 < refused.value.retry_after_s <= 13
        await limiter.check(subject, tokens=40)  # what is left still goes through
        with pytest.raises(ApiError) as never:
            await limiter.check(subject, tokens=101)
        assert never.value.status == 400 and "more than the 100 per minute" in never.value.message
        await _limiter(database).check(subject, tokens=10**6)  # both limits off: nothing is counted

    asyncio.run(main())


def test_limiter_lets_requests_through_when_postgres_is_away() -> None:
    db = Database(DEAD_URL, max_size=1)
    db.open()
    before = m.RATE_LIMIT_ERRORS._value.get()
    settings = Settings(rate_limit_requests_per_minute=1, rate_limit_db_timeout_s=0.5)

    async def main() -> float:
        started = time.monotonic()
        await RateLimiter(settings, db).check("anyone")
        return time.monotonic() - started

    try:
        waited = asyncio.run(main())
    finally:
        db.close()
    assert m.RATE_LIMIT_ERRORS._value.get() == before + 1
    assert waited < 3.0  # the budget (0.5 s) holds, not the pool's 10 s


def test_upstream_gate_queues_briefly_then_refuses_at_once() -> None:
    async def main() -> None:
        gate = UpstreamGate(max_in_flight=2, max_queue=1, wait_s=0.3)
        first, second = await gate.acquire(), await gate.acquire()
        assert gate.in_flight == 2
        waiter = asyncio.create_task(gate.acquire())  # queued
        await asyncio.sleep(0.05)
        assert gate.waiting == 1
        with pytest.raises(LimitError) as full:  # the queue is full: refused without waiting
            await gate.acquire()
        assert full.value.status == 503 and full.value.code == "overloaded" and "1 already waiting" in str(full.value)
        first.release()
        third = await waiter  # the queued one got the place that was freed
        with pytest.raises(LimitError) as timed_out:  # queued, nobody releases: refused after wait_s
            await gate.acquire()
        assert "waited 0.3 s" in timed_out.value.message
        for slot in (second, third, third):  # releasing twice is harmless
            slot.release()
        assert gate.in_flight == 0 and gate.waiting == 0

    asyncio.run(main())


def _samples(snapshot: Snapshot) -> dict[str, float]:
    return {s.name: s.value for family in snapshot.collect() for s in family.samples}


def test_snapshot_serves_the_last_read_and_reports_postgres_down(pg_url: str) -> None:
    target = {"url": pg_url}

    @contextmanager
    def connection() -> Iterator[psycopg.Connection]:
        with psycopg.connect(target["url"], connect_timeout=1) as conn:
            yield conn

    source = PipelineCollector(connection, min_interval=0.0, statement_timeout_ms=1000)
    snap = Snapshot(source, "tandem_pipeline_metrics_up", "tandem_pipeline_metrics", stale_after=60.0)
    first = _samples(snap)  # nothing read yet: down, and no age
    assert first["tandem_pipeline_metrics_up"] == 0.0 and "tandem_pipeline_metrics_snapshot_age_seconds" not in first
    assert snap.refresh() is True
    good = _samples(snap)
    assert good["tandem_pipeline_metrics_up"] == 1.0 and "tandem_index_documents" in good
    assert 0 <= good["tandem_pipeline_metrics_snapshot_age_seconds"] < 60

    target["url"] = DEAD_URL  # Postgres goes away
    assert snap.refresh() is False
    down = _samples(snap)
    assert down["tandem_pipeline_metrics_up"] == 0.0 and "tandem_index_documents" not in down
    assert down["tandem_pipeline_metrics_snapshot_age_seconds"] >= good["tandem_pipeline_metrics_snapshot_age_seconds"]

    target["url"] = pg_url
    assert snap.refresh() is True
    snap.stale_after = 0.0  # a snapshot older than allowed no longer passes for current
    time.sleep(0.01)
    assert _samples(snap)["tandem_pipeline_metrics_up"] == 0.0
