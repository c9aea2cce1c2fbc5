"""Postgres side of ingestion: generations, per-document atomic writes (binary COPY), deletions, failures.

A document is written whole in one transaction (document row, old chunks out, new chunks in, the
generation's record of what was indexed), together with the other documents of its window, so readers see
either the old or the new version, and a crash leaves each document either fully done or untouched for the
next run to finish.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from components.ingest.chunking import Chunk

_CHUNK_COLUMNS = (
    "chunk_id, document_id, generation_id, ordinal, heading, text, text_hash, "
    "char_start, char_end, token_count, dim, embedding"
)
_CHUNK_TYPES = ["text", "bigint", "integer", "integer", "text", "text", "text", "integer", "integer", "integer",
                "integer", "vector"]  # fmt: skip
_LOCK_NAMESPACE = 0x7A4D_0002


@dataclass(frozen=True)
class Generation:
    id: int
    model_id: str
    dim: int
    status: str


@dataclass(frozen=True)
class IndexedState:
    """What a generation holds for one document path (doc_id is None for a path with no document row)."""

    doc_id: int | None
    content_hash: str | None
    chunking: str | None


@dataclass
class DocumentWrite:
    """A document ready to store: its chunks and one embedding per chunk (rows aligned)."""

    path: str
    title: str
    content_hash: str
    size_bytes: int
    modified_at: datetime | None
    metadata: dict[str, Any]
    chunks: list[Chunk]
    embeddings: np.ndarray


def ensure_hnsw_index(conn: psycopg.Connection, dim: int) -> None:
    """A partial HNSW (cosine) index for embeddings of this dimension (one per dimension in use)."""
    conn.execute(
        sql.SQL(
            "CREATE INDEX IF NOT EXISTS {} ON chunks USING hnsw ((embedding::vector({})) vector_cosine_ops) "
            "WHERE dim = {}"
        ).format(sql.Identifier(_hnsw_name(dim)), sql.Literal(int(dim)), sql.Literal(int(dim)))
    )


def _hnsw_name(dim: int) -> str:
    return f"chunks_embedding_hnsw_{int(dim)}"


def prepare_hnsw_index(conn: psycopg.Connection, generation: Generation) -> bool:
    """Before a run writes into `generation`: make sure its dimension's HNSW index exists, unless the index
    would only cover this generation while it is still being built; then drop it and return True (deferred).

    A building generation is not read by anyone (retrieval reads the active one), and inserting thousands of
    vectors one transaction at a time into an HNSW graph costs several times the CPU of one bulk build. So a
    first fill (initial ingest, a model switch to a new dimension) writes without the index and the caller
    builds it once with build_hnsw_index; activate_if_complete builds it too if it is still missing, so no
    generation goes live without it. A crash in between only leaves the index for a later run to build.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_NAMESPACE,))
        row = conn.execute(
            """SELECT g.status = 'building' AND NOT EXISTS (
                   SELECT 1 FROM chunks c WHERE c.dim = g.dim AND c.generation_id <> g.id)
                 FROM embedding_generations g WHERE g.id = %s""",
            (generation.id,),
        ).fetchone()
        if not (row and row[0]):
            ensure_hnsw_index(conn, generation.dim)
            return False
    # CONCURRENTLY: a plain DROP INDEX would wait for, and then hold up, every query on `chunks`, including
    # retrieval from the active generation of another dimension during a model switch.
    conn.autocommit = True
    try:
        conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(_hnsw_name(generation.dim))))
    finally:
        conn.autocommit = False
    return True


def build_hnsw_index(conn: psycopg.Connection, dim: int) -> float:
    """Build the HNSW index of this dimension in one pass (after a deferred fill); returns the seconds taken."""
    started = time.perf_counter()
    with conn.transaction():
        _build_hnsw_index(conn, dim)
    return time.perf_counter() - started


def _build_hnsw_index(conn: psycopg.Connection, dim: int) -> None:
    # Two runs (of two sources) finishing the same first fill must not both create it: the second would fail
    # on the index name. The lock is the one prepare_hnsw_index takes, so a drop and a build never interleave.
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_NAMESPACE,))
    # Enough memory for the graph to be built in memory (pgvector slows down and warns otherwise).
    conn.execute("SELECT set_config('maintenance_work_mem', '256MB', true)")
    ensure_hnsw_index(conn, dim)


def ensure_generation(conn: psycopg.Connection, model_id: str, dim: int) -> Generation:
    """The generation of this model, created as 'building' (activate_if_complete makes it 'active').

    Its HNSW index is the caller's business: prepare_hnsw_index creates or defers it."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_NAMESPACE,))
        row = conn.execute(
            "SELECT id, model_id, dim, status FROM embedding_generations WHERE model_id = %s", (model_id,)
        ).fetchone()
        if row is None:
            row = conn.execute(
                "INSERT INTO embedding_generations (model_id, dim) VALUES (%s, %s) RETURNING id, model_id, dim, status",
                (model_id, dim),
            ).fetchone()
        elif row[3] == "retired":  # a model used before and switched away from: rebuild it beside the active one
            conn.execute("DELETE FROM chunks WHERE generation_id = %s", (row[0],))
            conn.execute("DELETE FROM document_generations WHERE generation_id = %s", (row[0],))
            row = conn.execute(
                "UPDATE embedding_generations SET status = 'building', activated_at = NULL WHERE id = %s "
                "RETURNING id, model_id, dim, status",
                (row[0],),
            ).fetchone()
    assert row is not None
    return Generation(*row)


def lock_source(conn: psycopg.Connection, source: str) -> bool:
    """Take the session lock that keeps two syncs of one source apart (False if another holds it)."""
    row = conn.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))", (_LOCK_NAMESPACE, source)).fetchone()
    conn.commit()
    return bool(row and row[0])


def unlock_source(conn: psycopg.Connection, source: str) -> None:
    conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", (_LOCK_NAMESPACE, source))
    conn.commit()


def indexed_state(conn: psycopg.Connection, source: str, generation_id: int) -> dict[str, IndexedState]:
    """Per path of the source: the document row and what this generation indexed of it."""
    rows = conn.execute(
        """SELECT d.path, d.id, g.content_hash, g.chunking
             FROM documents d
             LEFT JOIN document_generations g ON g.document_id = d.id AND g.generation_id = %s
            WHERE d.source = %s""",
        (generation_id, source),
    ).fetchall()
    conn.commit()
    return {path: IndexedState(doc_id, content_hash, chunking) for path, doc_id, content_hash, chunking in rows}


def document_paths(conn: psycopg.Connection, source: str) -> set[str]:
    """The paths the index holds for a source (what a run would delete is those its listing lacks)."""
    rows = conn.execute("SELECT path FROM documents WHERE source = %s", (source,)).fetchall()
    conn.commit()
    return {path for (path,) in rows}


def generation_has_chunks(conn: psycopg.Connection, generation_id: int) -> bool:
    row = conn.execute("SELECT EXISTS (SELECT 1 FROM chunks WHERE generation_id = %s)", (generation_id,)).fetchone()
    conn.commit()
    return bool(row and row[0])


def existing_embeddings(conn: psycopg.Connection, generation_id: int, hashes: Iterable[str]) -> dict[str, np.ndarray]:
    """Embeddings this generation already holds for chunk texts with these hashes (reused, not recomputed)."""
    wanted = list(set(hashes))
    if not wanted:
        return {}
    rows = conn.execute(
        """SELECT DISTINCT ON (text_hash) text_hash, embedding FROM chunks
            WHERE generation_id = %s AND text_hash = ANY(%s)""",
        (generation_id, wanted),
    ).fetchall()
    conn.commit()
    return {h: np.asarray(v.to_numpy() if hasattr(v, "to_numpy") else v, dtype=np.float32) for h, v in rows}


def chunk_id(source: str, path: str, generation_id: int, chunk: Chunk) -> str:
    key = f"{source}\0{path}\0{generation_id}\0{chunk.ordinal}\0{chunk.text_hash}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def write_documents(
    conn: psycopg.Connection, source: str, generation: Generation, docs: list[DocumentWrite], chunking: str
) -> None:
    """Replace these documents' chunks of this generation in one transaction: each document whole, or none.

    A fixed number of statements whatever the count (one binary COPY for all the chunks), so a window of
    hundreds of documents costs the server and the client a few round trips instead of six per document.
    """
    if not docs:
        return
    paths = [doc.path for doc in docs]
    with conn.transaction():
        rows = conn.execute(
            """INSERT INTO documents (source, path, title, content_hash, size_bytes, modified_at, metadata)
               SELECT %s, * FROM unnest(%s::text[], %s::text[], %s::text[], %s::bigint[], %s::timestamptz[],
                                        %s::jsonb[])
               ON CONFLICT (source, path) DO UPDATE SET title = EXCLUDED.title,
                   content_hash = EXCLUDED.content_hash, size_bytes = EXCLUDED.size_bytes,
                   modified_at = EXCLUDED.modified_at, metadata = EXCLUDED.metadata, updated_at = now()
               RETURNING path, id""",
            (source, paths, [d.title for d in docs], [d.content_hash for d in docs], [d.size_bytes for d in docs],
             [d.modified_at for d in docs], [json.dumps(d.metadata, default=str) for d in docs]),
        ).fetchall()  # fmt: skip
        doc_ids = {path: int(doc_id) for path, doc_id in rows}
        ids = [doc_ids[path] for path in paths]
        conn.execute("DELETE FROM chunks WHERE generation_id = %s AND document_id = ANY(%s)", (generation.id, ids))
        with conn.cursor() as cur, cur.copy(f"COPY chunks ({_CHUNK_COLUMNS}) FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(_CHUNK_TYPES)
            for doc, doc_id in zip(docs, ids, strict=True):
                for chunk, vector in zip(doc.chunks, doc.embeddings, strict=True):
                    copy.write_row(
                        (chunk_id(source, doc.path, generation.id, chunk), doc_id, generation.id, chunk.ordinal,
                         " > ".join(chunk.heading), chunk.text, chunk.text_hash, chunk.char_start, chunk.char_end,
                         chunk.token_count, generation.dim, vector)
                    )  # fmt: skip
        conn.execute(
            """INSERT INTO document_generations (document_id, generation_id, content_hash, chunking, chunk_count)
               SELECT doc_id, %s, content_hash, %s, chunk_count
                 FROM unnest(%s::bigint[], %s::text[], %s::integer[]) AS t(doc_id, content_hash, chunk_count)
               ON CONFLICT (document_id, generation_id) DO UPDATE SET content_hash = EXCLUDED.content_hash,
                   chunking = EXCLUDED.chunking, chunk_count = EXCLUDED.chunk_count, indexed_at = now()""",
            (generation.id, chunking, ids, [d.content_hash for d in docs], [len(d.chunks) for d in docs]),
        )
        conn.execute("DELETE FROM ingest_failures WHERE source = %s AND path = ANY(%s)", (source, paths))


def clear_failure(conn: psycopg.Connection, source: str, paths: list[str]) -> None:
    if paths:
        conn.execute("DELETE FROM ingest_failures WHERE source = %s AND path = ANY(%s)", (source, paths))
        conn.commit()


def record_failure(conn: psycopg.Connection, source: str, path: str, reason: str) -> None:
    """Remember a document that failed to load; kept (attempts counted) until it loads or disappears."""
    conn.execute(
        """INSERT INTO ingest_failures (source, path, reason) VALUES (%s, %s, %s)
           ON CONFLICT (source, path) DO UPDATE SET reason = EXCLUDED.reason,
               attempts = ingest_failures.attempts + 1, last_seen = now()""",
        (source, path, reason[:500]),
    )
    conn.commit()


def delete_missing(conn: psycopg.Connection, source: str, present: list[str]) -> list[str]:
    """Delete documents (and their chunks in every generation) whose path is gone from the source."""
    with conn.transaction():
        rows = conn.execute(
            "DELETE FROM documents WHERE source = %s AND NOT (path = ANY(%s)) RETURNING path", (source, present)
        ).fetchall()
        conn.execute("DELETE FROM ingest_failures WHERE source = %s AND NOT (path = ANY(%s))", (source, present))
    return sorted(r[0] for r in rows)


def failures(conn: psycopg.Connection, source: str | None = None) -> list[dict[str, Any]]:
    rows = conn.execute(
        """SELECT source, path, reason, attempts FROM ingest_failures
            WHERE %(source)s::text IS NULL OR source = %(source)s ORDER BY source, path""",
        {"source": source},
    ).fetchall()
    conn.commit()
    return [{"source": s, "path": p, "reason": r, "attempts": a} for s, p, r, a in rows]


def activate_if_complete(conn: psycopg.Connection, generation: Generation) -> bool:
    """Switch retrieval to this generation once every loadable document has chunks in it (one transaction).

    The old generation's chunks are deleted after the switch; returns True if a switch happened.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_NAMESPACE,))
        status = conn.execute("SELECT status FROM embedding_generations WHERE id = %s", (generation.id,)).fetchone()
        if status is None or status[0] != "building":
            return False
        missing = conn.execute(
            """SELECT count(*) FROM documents d
                WHERE NOT EXISTS (SELECT 1 FROM document_generations g
                                   WHERE g.document_id = d.id AND g.generation_id = %s)
                  AND NOT EXISTS (SELECT 1 FROM ingest_failures f WHERE f.source = d.source AND f.path = d.path)""",
            (generation.id,),
        ).fetchone()
        if missing and missing[0]:
            return False
        _build_hnsw_index(conn, generation.dim)  # a no-op unless a deferred build never happened
        conn.execute(
            "UPDATE embedding_generations SET status = 'retired' WHERE status = 'active'",
        )
        conn.execute(
            "UPDATE embedding_generations SET status = 'active', activated_at = now() WHERE id = %s", (generation.id,)
        )
    # Readers moved to the new generation at the commit above; the old chunks are garbage now.
    with conn.transaction():
        conn.execute(
            "DELETE FROM chunks WHERE generation_id IN (SELECT id FROM embedding_generations WHERE status = 'retired')"
        )
        conn.execute(
            """DELETE FROM document_generations
                WHERE generation_id IN (SELECT id FROM embedding_generations WHERE status = 'retired')"""
        )
    return True


def start_run(conn: psycopg.Connection, source: str, model_id: str) -> int:
    row = conn.execute(
        "INSERT INTO ingest_runs (source, model_id) VALUES (%s, %s) RETURNING id", (source, model_id)
    ).fetchone()
    conn.commit()
    assert row is not None
    return int(row[0])


def finish_run(conn: psycopg.Connection, run_id: int, report: dict[str, Any]) -> None:
    conn.execute("UPDATE ingest_runs SET finished_at = now(), report = %s WHERE id = %s", (json.dumps(report), run_id))
    conn.commit()
