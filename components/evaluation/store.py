"""Evaluation scores in Postgres (migration 0004), and the state of the document index they were measured on."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg.rows import dict_row

from components.evaluation.results import EvalReport, IndexState


def index_state(conn: psycopg.Connection) -> IndexState:
    """Documents, chunks of the active embedding generation and the last ingest time (None where no index)."""
    has = conn.execute(
        "SELECT to_regclass('documents') IS NOT NULL, to_regclass('chunks') IS NOT NULL, "
        "to_regclass('embedding_generations') IS NOT NULL, to_regclass('ingest_runs') IS NOT NULL"
    ).fetchone()
    if not has or not has[0]:
        return IndexState()
    documents = conn.execute("SELECT count(*) FROM documents").fetchone()
    state = IndexState(documents=int(documents[0]) if documents else 0)
    if has[1] and has[2]:
        row = conn.execute(
            """SELECT g.model_id, (SELECT count(*) FROM chunks c WHERE c.generation_id = g.id)
               FROM embedding_generations g WHERE g.status = 'active'"""
        ).fetchone()
        state.embedding_model, state.chunks = (row[0], int(row[1])) if row else (None, 0)
    if has[3]:
        row = conn.execute("SELECT max(finished_at) FROM ingest_runs").fetchone()
        state.last_ingest_at = row[0] if row else None
    return state


# Columns filled from the ArmScores and Answer fields of the same names.
_SCORE_COLUMNS = (
    "arm", "model", "rag", "status", "adapter_version", "questions", "correct", "accuracy", "accuracy_low",
    "accuracy_high", "source_hit_rate", "source_attributed_rate", "latency_p50_s", "latency_p95_s",
    "prompt_tokens_mean", "completion_tokens_mean", "prompt_tokens_total", "completion_tokens_total", "errors",
    "fallbacks",
)  # fmt: skip
_ANSWER_COLUMNS = (
    "qa_id", "text", "correct", "source_hit", "source_attributed", "cited_sources", "latency_s", "prompt_tokens",
    "completion_tokens", "fallback", "error",
)  # fmt: skip


def save_report(conn: psycopg.Connection, report: EvalReport) -> int:
    """Store a run, its per-arm scores and every answer in one transaction; sets and returns ``report.run_id``."""
    r, ix = report.retrieval, report.index
    with conn.transaction():
        row = conn.execute(
            """INSERT INTO evaluation_runs (alias, adapter_version, served_model, trigger, qa_path, qa_fingerprint,
                   questions, max_tokens, top_k, concurrency, gateway_url, index_documents, index_chunks,
                   index_embedding_model, index_last_ingest_at, retrieval_k, retrieval_recall_at_k, retrieval_mrr,
                   retrieval_latency_p50_s, recommendation, report_dir, started_at, finished_at)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
               RETURNING id""",
            (
                report.alias,
                report.adapter_version,
                report.served_model,
                report.trigger,
                report.qa_path,
                report.qa_fingerprint,
                report.questions,
                report.max_tokens,
                report.top_k,
                report.concurrency,
                report.gateway_url,
                ix.documents,
                ix.chunks,
                ix.embedding_model,
                ix.last_ingest_at,
                r.k if r else None,
                r.recall_at_k if r else None,
                r.mrr if r else None,
                r.latency_p50_s if r else None,
                report.recommendation,
                report.out_dir,
                report.started_at,
                report.finished_at,
            ),
        ).fetchone()
        assert row is not None
        run_id = int(row[0])
        with conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO evaluation_scores (run_id, {', '.join(_SCORE_COLUMNS)}) "
                f"VALUES (%s{', %s' * len(_SCORE_COLUMNS)})",
                [(run_id, *(getattr(a, c) for c in _SCORE_COLUMNS)) for a in report.arms],
            )
            cur.executemany(
                f"INSERT INTO evaluation_answers (run_id, arm, {', '.join(_ANSWER_COLUMNS)}) "
                f"VALUES (%s, %s{', %s' * len(_ANSWER_COLUMNS)})",
                [(run_id, a.arm, *(getattr(x, c) for c in _ANSWER_COLUMNS)) for a in report.arms for x in a.answers],
            )
    report.run_id = run_id
    return run_id


@dataclass
class StoredScore:
    """One arm's scores from the latest run of an alias (what the Prometheus collector exports)."""

    run_id: int
    alias: str
    arm: str
    status: str
    adapter_version: int | None
    questions: int
    accuracy: float | None
    source_hit_rate: float | None
    source_attributed_rate: float | None
    latency_p50_s: float | None
    latency_p95_s: float | None
    prompt_tokens_mean: float | None
    completion_tokens_mean: float | None
    retrieval_k: int | None
    retrieval_recall_at_k: float | None
    retrieval_mrr: float | None
    finished_at: datetime


def latest_scores(conn: psycopg.Connection) -> list[StoredScore]:
    """Per-arm scores of the most recent run of each alias."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """SELECT DISTINCT ON (r.alias, s.arm) r.id AS run_id, r.alias, s.arm, s.status, s.adapter_version,
                   s.questions, s.accuracy, s.source_hit_rate, s.source_attributed_rate, s.latency_p50_s,
                   s.latency_p95_s, s.prompt_tokens_mean, s.completion_tokens_mean, r.retrieval_k,
                   r.retrieval_recall_at_k, r.retrieval_mrr, r.finished_at
               FROM evaluation_runs r JOIN evaluation_scores s ON s.run_id = r.id
               WHERE r.id IN (SELECT DISTINCT ON (alias) id FROM evaluation_runs
                              ORDER BY alias, finished_at DESC, id DESC)
               ORDER BY r.alias, s.arm"""
        )
        return [StoredScore(**row) for row in cur.fetchall()]
