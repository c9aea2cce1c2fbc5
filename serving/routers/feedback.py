"""POST /v1/feedback: rate a recorded answer, and optionally correct it; a correction becomes a pending example.

The answer is looked up by the response id the client received and the key it was answered to (another key's
answer is unknown to this one). Every post is kept in ``answer_feedback``. A correction of an alias's answer is
added to ``domain_examples`` as ``pending`` (user: the question, assistant: the correction) by the intake's own
``store`` (components/training/intake.py: the same validation, content hash and dedup per alias as `tandem data
add`), with what a reviewer needs in its ``context``; a person approves it before it trains anything.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import psycopg
from fastapi import APIRouter, Depends, Request
from psycopg.rows import dict_row
from pydantic import Field

from components.training import intake
from components.training.data import parse_record
from serving import metrics as m
from serving.answer_log import AnswerLog, get_answer_log
from serving.errors import ApiError
from serving.limits import get_limits, subject_of
from serving.schemas import Strict, Text
from serving.security import require_api_key

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["feedback"])
AnswerLogDep = Annotated[AnswerLog, Depends(get_answer_log)]
EXAMPLE_ALIAS = re.compile(intake.ALIAS_PATTERN)  # domain_examples.alias (migration 0011)
FLUSH_WAIT_S = 2.0


class FeedbackRequest(Strict):
    response_id: str = Field(
        min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$", description="the answer's `id`"
    )
    rating: Literal["up", "down"]
    correction: Text | None = Field(
        None,
        max_length=32_768,
        description="what the answer should have said (at most TANDEM_FEEDBACK_MAX_CORRECTION_CHARS)",
    )


def _find_answer(conn: psycopg.Connection, response_id: str, key_name: str) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT response_id, alias, adapter_version, question, answer, sources, cited FROM answers"
            " WHERE response_id = %s AND key_name = %s",
            (response_id, key_name),
        ).fetchone()


def _context(answer: dict[str, Any], correction: str, rating: str) -> dict[str, Any]:
    """What a reviewer sees: the question, the answer given, the correction and the sources the answer cited
    (every source it was given when it cited none)."""
    cited = set(answer["cited"] or [])
    sources = [s for s in answer["sources"] if s.get("n") in cited] or list(answer["sources"])
    return {
        "question": answer["question"],
        "answer_given": answer["answer"],
        "correction": correction,
        "sources": sources,
        "rating": rating,
        "alias": answer["alias"],
        "version": answer["adapter_version"],
    }


def _add_example(
    conn: psycopg.Connection, answer: dict[str, Any], correction: str, rating: str, by: str
) -> dict[str, Any]:
    """The correction as a pending example of the answer's alias, stored as the intake stores any example
    (same validation, content hash and dedup): {"id", "status", "duplicate"}."""
    origin = f"feedback:{answer['response_id']}"
    record = {
        "messages": [{"role": "user", "content": answer["question"]}, {"role": "assistant", "content": correction}]
    }
    try:
        line = intake.Line(origin, parse_record(record), source=None, plain=False)
    except ValueError as exc:
        raise ApiError(400, f"correction: {exc}", param="correction", code="invalid_value") from None
    context = _context(answer, correction, rating)
    added, _ = intake.store(conn, answer["alias"], [line], origin, submitted_by=by, context=context)
    if added:
        return {"id": added[0], "status": "pending", "duplicate": False}
    row = conn.execute(
        "SELECT id, status FROM domain_examples WHERE alias = %s AND content_hash = %s", (answer["alias"], line.digest)
    ).fetchone()
    assert row is not None  # store() skipped it because this row holds the same example
    return {"id": row[0], "status": row[1], "duplicate": True}


def _store(
    conn: psycopg.Connection, answer: dict[str, Any], rating: str, correction: str | None, by: str
) -> dict[str, Any]:
    example = None
    note = None
    with conn.transaction():  # the example and the feedback row together, or neither
        if correction is not None:
            if answer["alias"] is None:
                note = "the base model answered (no alias): the correction is kept with the feedback, not as an example"
            elif not EXAMPLE_ALIAS.match(answer["alias"]):
                note = (
                    f"alias {answer['alias']!r} cannot hold domain examples: the correction is kept with the feedback"
                )
            elif not answer["question"]:
                note = "the answer had no user question: the correction is kept with the feedback, not as an example"
            else:
                example = _add_example(conn, answer, correction, rating, by)
        row = conn.execute(
            "INSERT INTO answer_feedback (response_id, rating, correction, key_name, example_id)"
            " VALUES (%s, %s, %s, %s, %s) RETURNING id",
            (answer["response_id"], rating, correction, by, example["id"] if example else None),
        ).fetchone()
    assert row is not None
    return {"id": row[0], "example": example, "note": note}


@router.post("/v1/feedback", summary="Rate an answer by its response id; a correction becomes a pending example")
async def post_feedback(req: FeedbackRequest, request: Request, answers: AnswerLogDep) -> dict[str, Any]:
    settings = answers.settings
    correction = None
    if req.correction is not None:
        correction = req.correction.strip()
        if not correction:
            raise ApiError(400, "correction: must not be empty (leave it out to rate only)", param="correction")
        if len(correction) > settings.feedback_max_correction_chars:
            raise ApiError(
                400,
                f"correction: at most {settings.feedback_max_correction_chars} characters (got {len(correction)})",
                param="correction",
            )
    await get_limits(request).rate.check(subject_of(request))
    key_name = str(request.state.key_name)
    answer = await answers.db.run(_find_answer, req.response_id, key_name)
    if answer is None and answers.enabled:
        await answers.flush(FLUSH_WAIT_S)  # asked right after the answer: it may still be on its way to Postgres
        answer = await answers.db.run(_find_answer, req.response_id, key_name)
    if answer is None:
        why = (
            "this gateway does not record answers (TANDEM_RECORD_ANSWERS=false)"
            if not answers.enabled
            else f"unknown to this key, or purged after {settings.answer_retention_days} days"
        )
        raise ApiError(
            404,
            f"no recorded answer has response_id '{req.response_id}': {why}",
            param="response_id",
            code="answer_not_found",
        )
    try:
        stored = await answers.db.run(_store, answer, req.rating, correction, key_name)
    except psycopg.errors.ForeignKeyViolation:  # purged between the lookup and the write
        raise ApiError(
            404, f"the answer '{req.response_id}' was purged just now", param="response_id", code="answer_not_found"
        ) from None
    m.FEEDBACK.labels(rating=req.rating, correction="yes" if correction else "no").inc()
    return {
        "object": "tandem.feedback",
        "id": stored["id"],
        "response_id": req.response_id,
        "rating": req.rating,
        "example": stored["example"],
        "note": stored["note"],
    }
