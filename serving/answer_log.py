"""Answers recorded for feedback, off the request's critical path, and purged after the retention period.

The chat route hands each finished answer to ``AnswerLog.record`` (``remember`` below), which only puts it on a
bounded queue: a full queue drops the record (``tandem_feedback_answers_dropped_total{reason="queue_full"}``)
and never waits. One task writes what is queued in batches (a failed write is dropped and counted, the answers
themselves have long gone out); another deletes answers older than ``answer_retention_days`` every
``answer_purge_interval_s``, under a Postgres advisory try-lock so that of several gateways one does the work.
Table ``answers`` and ``answer_feedback``: migration 0012.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg
from fastapi import Request
from psycopg.types.json import Jsonb

from components.prompting import query_text
from components.settings import Settings
from serving import metrics as m
from serving.db import Database

log = logging.getLogger("serving")

PURGE_LOCK_ID = 0x7A4D_0012  # advisory lock: one gateway purges at a time (the migrations use 0x7A4D_0001)
PURGE_BATCH = 5_000  # rows per DELETE, each its own transaction, so none runs into statement_timeout
WRITE_BATCH = 200
_WARN_EVERY_S = 60.0


class RouteLike(Protocol):
    """What is recorded of a request's route (serving.adapters.Route)."""

    @property
    def alias(self) -> str | None: ...
    @property
    def adapter_version(self) -> int | None: ...
    @property
    def served_model(self) -> str: ...


@dataclass(frozen=True)
class AnswerRecord:
    response_id: str
    alias: str | None
    adapter_version: int | None
    served_model: str
    question: str
    answer: str
    key_name: str
    sources: list[dict[str, Any]] = field(default_factory=list)  # {"n", "path", "heading", "chunk_id"}
    cited: list[int] = field(default_factory=list)

    def params(self) -> dict[str, Any]:
        return {
            "response_id": self.response_id,
            "alias": self.alias,
            "adapter_version": self.adapter_version,
            "served_model": self.served_model,
            "question": self.question.replace("\x00", ""),
            "chunk_ids": [str(s["chunk_id"]) for s in self.sources],
            "sources": Jsonb(self.sources),
            "cited": self.cited,
            "answer": self.answer.replace("\x00", ""),
            "key_name": self.key_name,
        }


def new_response_id() -> str:
    """The id of one answer, made by the gateway (never by a client or a replica): the response's ``id``."""
    return f"chatcmpl-{uuid.uuid4().hex}"


def sources_of(retrieved: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The response's ``retrieved`` entries as recorded: number in the prompt, document path, heading, chunk."""
    return [
        {"n": int(r["index"]), "path": r.get("document_path"), "heading": r.get("heading"), "chunk_id": r["chunk_id"]}
        for r in retrieved
    ]


_INSERT = """
INSERT INTO answers (response_id, alias, adapter_version, served_model, question, chunk_ids, sources, cited,
                     answer, key_name)
VALUES (%(response_id)s, %(alias)s, %(adapter_version)s, %(served_model)s, %(question)s, %(chunk_ids)s,
        %(sources)s, %(cited)s, %(answer)s, %(key_name)s)
ON CONFLICT (response_id) DO NOTHING
"""


def insert_answers(conn: psycopg.Connection, records: Sequence[AnswerRecord]) -> None:
    with conn.cursor() as cur:
        cur.executemany(_INSERT, [r.params() for r in records])


def purge_expired(conn: psycopg.Connection, retention_days: int, batch: int = PURGE_BATCH) -> int | None:
    """Delete answers (and, by cascade, their feedback) older than ``retention_days``; the number deleted, or
    None when another gateway holds the purge lock."""
    total = 0
    while True:
        row = conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (PURGE_LOCK_ID,)).fetchone()
        if not (row and row[0]):
            conn.rollback()
            return total or None
        deleted = conn.execute(
            "DELETE FROM answers WHERE response_id IN (SELECT response_id FROM answers"
            " WHERE created_at < now() - make_interval(days => %s) LIMIT %s)",
            (retention_days, batch),
        ).rowcount
        conn.commit()  # also releases the lock: another gateway may take the next batch
        total += deleted
        if deleted < batch:
            return total


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


class AnswerLog:
    """A bounded queue of answers to record, its writer task and the retention purge (``app.state.answer_log``)."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.enabled = settings.record_answers
        self.queue: asyncio.Queue[AnswerRecord] = asyncio.Queue(maxsize=settings.answer_log_queue)
        self._tasks: list[asyncio.Task[None]] = []
        self._warned_at = 0.0

    def start(self) -> None:
        if self.enabled:
            self._tasks.append(asyncio.create_task(self._write_forever(), name="tandem-answer-log"))
        # purged also with recording off: rows recorded before it was turned off still expire
        self._tasks.append(asyncio.create_task(self._purge_forever(), name="tandem-answer-purge"))

    async def stop(self, flush_s: float = 2.0) -> None:
        """Write what is queued (for at most ``flush_s``), then stop both tasks."""
        if self.enabled:
            await self.flush(flush_s)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    def record(self, record: AnswerRecord) -> None:
        """Queue one answer; never waits (a full queue drops it and counts the drop)."""
        if not self.enabled:
            return
        try:
            self.queue.put_nowait(record)
        except asyncio.QueueFull:
            m.ANSWERS_DROPPED.labels(reason="queue_full").inc()

    async def flush(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) until the answers queued so far are written or dropped."""
        with suppress(TimeoutError):
            await asyncio.wait_for(self.queue.join(), timeout_s)

    async def purge(self) -> int | None:
        """One retention purge now (None: another gateway held the lock, or Postgres failed)."""
        try:
            deleted = await self.db.run(purge_expired, self.settings.answer_retention_days)
        except Exception as exc:  # the purge loop goes on: it is tried again next interval
            database = isinstance(exc, (psycopg.Error, OSError))
            self._warn("answer retention purge failed: %s", _first_line(exc), exc_info=not database)
            return None
        if deleted:
            m.ANSWERS_PURGED.inc(deleted)
            log.info("purged %d answer(s) older than %d days", deleted, self.settings.answer_retention_days)
        return deleted

    async def _write_forever(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while len(batch) < WRITE_BATCH and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            try:
                await self.db.run(insert_answers, batch)
                m.ANSWERS_RECORDED.inc(len(batch))
            except Exception as exc:  # whatever failed, the writer goes on with the next batch
                database = isinstance(exc, (psycopg.Error, OSError))
                m.ANSWERS_DROPPED.labels(reason="db_error" if database else "error").inc(len(batch))
                self._warn("%d answer(s) not recorded: %s", len(batch), _first_line(exc), exc_info=not database)
            finally:
                for _ in batch:
                    self.queue.task_done()

    async def _purge_forever(self) -> None:
        while True:
            await self.purge()
            await asyncio.sleep(self.settings.answer_purge_interval_s)

    def _warn(self, message: str, *args: Any, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_S:  # Postgres down: one line a minute, not one per answer
            self._warned_at = now
            log.warning(message, *args, exc_info=exc_info)


def get_answer_log(request: Request) -> AnswerLog:
    answer_log: AnswerLog = request.app.state.answer_log
    return answer_log


def remember(
    request: Request,
    response_id: str,
    route: RouteLike,
    messages: Sequence[dict[str, Any]],
    retrieved: Sequence[dict[str, Any]],
    answer: str,
    cited: Sequence[dict[str, Any]],
) -> None:
    """Hand one finished answer to the app's log (the chat route calls this; it returns at once)."""
    answer_log: AnswerLog | None = getattr(request.app.state, "answer_log", None)
    if answer_log is None or not answer_log.enabled:
        return
    answer_log.record(
        AnswerRecord(
            response_id=response_id,
            alias=route.alias,
            adapter_version=route.adapter_version,
            served_model=route.served_model,
            question=query_text(messages),
            answer=answer,
            key_name=str(getattr(request.state, "key_name", "") or ""),
            sources=sources_of(retrieved),
            cited=[int(c["index"]) for c in cited],
        )
    )
