"""Hybrid retrieval over the document index: HNSW cosine + full text, fused by Reciprocal Rank Fusion.

One statement, one round trip: each side takes `candidates` chunks of the ACTIVE embedding generation (so a
model switch in progress never mixes vectors of two models), and the two rankings are fused with
score = sum(1 / (60 + rank)). Filters are bind parameters only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from components.errors import ConfigError
from components.settings import Settings, get_settings

RRF_K = 60
_FILTER_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass
class RetrievedChunk:
    chunk_id: str
    document_path: str
    source: str
    title: str
    heading: str  # heading path joined with " > "
    text: str
    score: float
    char_start: int
    char_end: int
    metadata: dict[str, Any] = field(default_factory=dict)


def _filter_sql(filters: dict[str, str] | None) -> tuple[sql.Composable, list[Any]]:
    """AND-ed conditions on documents `d` for the allowed filter keys, with their bind values."""
    if filters is None:
        return sql.SQL(""), []
    if not isinstance(filters, dict):
        raise ConfigError("filters must be a mapping of key to value, e.g. {'source': 'docs', 'owner': 'Ops'}")
    parts: list[sql.Composable] = []
    params: list[Any] = []
    for key, value in filters.items():
        if not isinstance(key, str) or not _FILTER_KEY.match(key):
            raise ConfigError(f"filter key {key!r} must be 1-64 letters, digits, '_', '.' or '-'")
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, int | float):
            value = str(value)
        if not isinstance(value, str):
            raise ConfigError(f"filter {key!r} needs a text value, got {type(value).__name__}")
        if key == "source":
            parts.append(sql.SQL(" AND d.source = %s"))
            params.append(value)
        elif key == "path_prefix":
            parts.append(sql.SQL(" AND starts_with(d.path, %s)"))
            params.append(value)
        else:
            parts.append(sql.SQL(" AND d.metadata ->> %s = %s"))
            params.extend([key, value])
    return sql.Composed(parts), params


_QUERY = """
WITH active AS (SELECT id FROM embedding_generations WHERE status = 'active'),
vec AS (
    SELECT id, row_number() OVER (ORDER BY dist) AS rank FROM (
        SELECT c.id, c.embedding::vector({dim}) <=> %s::vector({dim}) AS dist
          FROM chunks c JOIN documents d ON d.id = c.document_id
         WHERE c.dim = {dim} AND c.generation_id = (SELECT id FROM active){filters}
         ORDER BY c.embedding::vector({dim}) <=> %s::vector({dim})
         LIMIT %s) v
),
fts AS (
    SELECT id, row_number() OVER (ORDER BY rank_cd DESC, id) AS rank FROM (
        SELECT c.id, ts_rank_cd(c.tsv, q) AS rank_cd
          FROM chunks c JOIN documents d ON d.id = c.document_id,
               websearch_to_tsquery('english', %s) q
         WHERE c.tsv @@ q AND c.generation_id = (SELECT id FROM active){filters}
         ORDER BY rank_cd DESC, c.id
         LIMIT %s) t
),
fused AS (
    SELECT id, sum(1.0 / ({rrf} + rank)) AS score
      FROM (SELECT * FROM vec UNION ALL SELECT * FROM fts) ranks
     GROUP BY id
)
SELECT c.chunk_id, d.path, d.source, d.title, c.heading, c.text, f.score::float8, c.char_start, c.char_end,
       d.metadata
  FROM fused f JOIN chunks c ON c.id = f.id JOIN documents d ON d.id = c.document_id
 ORDER BY f.score DESC, c.id
 LIMIT %s
"""


def hybrid_search(
    conn: psycopg.Connection,
    query_text: str,
    query_embedding: Any,
    *,
    top_k: int = 5,
    filters: dict[str, str] | None = None,
    candidates: int = 40,
) -> list[RetrievedChunk]:
    """The top_k chunks for a query, vector and full-text rankings fused by RRF (k=60)."""
    if top_k < 1 or candidates < 1:
        raise ConfigError("top_k and candidates must be at least 1")
    vector = np.asarray(query_embedding, dtype=np.float32).ravel()
    dim = int(vector.shape[0])
    if dim == 0:
        raise ConfigError("query embedding is empty")
    candidates = max(candidates, top_k)
    where, params = _filter_sql(filters)
    query = sql.SQL(_QUERY).format(dim=sql.Literal(dim), filters=where, rrf=sql.Literal(RRF_K))
    args = [vector, *params, vector, candidates, query_text, *params, candidates, top_k]
    ef_search = max(get_settings().retrieval_ef_search, candidates)
    idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with conn.pipeline():
        # Session settings sent in the same round trip: a wider HNSW beam than LIMIT, and iterative scans so
        # filters and the generation condition never starve the vector side.
        conn.execute(
            "SELECT set_config('hnsw.ef_search', %s, false), set_config('hnsw.iterative_scan', 'strict_order', false)",
            (str(ef_search),),
        )
        cur = conn.execute(query, args)
    rows = cur.fetchall()
    if idle and not conn.autocommit:
        conn.commit()  # a read: leave no transaction open behind the caller
    return [
        RetrievedChunk(
            chunk_id=r[0], document_path=r[1], source=r[2], title=r[3], heading=r[4], text=r[5], score=float(r[6]),
            char_start=r[7], char_end=r[8], metadata=dict(r[9] or {}),
        )
        for r in rows
    ]  # fmt: skip


def retrieve(
    conn: psycopg.Connection,
    query: str,
    top_k: int = 5,
    filters: dict[str, str] | None = None,
    settings: Settings | None = None,
) -> list[RetrievedChunk]:
    """Embed the query with the configured model and run hybrid_search."""
    from components.embedding import get_embedder

    embedding = get_embedder(settings).encode_query(query)
    return hybrid_search(conn, query, embedding, top_k=top_k, filters=filters)


def serving_retriever(conn: psycopg.Connection, settings: Settings | None = None) -> Any:
    """``(query, top_k) -> chunks`` exactly as the gateway retrieves: the same query encoder (ONNX when it
    checks out, else torch), the same candidate count, no filters. Training data and the gate use it, so the
    prompts they build are the prompts the gateway sends."""
    from components.query_encoder import load_query_encoder

    settings = settings or get_settings()
    encoder = load_query_encoder(settings, limit_threads=False)  # the caller may train next, on every core

    def search(query: str, top_k: int) -> list[RetrievedChunk]:
        query = query.replace("\x00", " ").strip()
        if not query:
            return []
        vector = encoder.encode_query(query)
        return hybrid_search(conn, query, vector, top_k=top_k, candidates=settings.rag_candidates)

    return search


_DOCUMENT_CHUNKS = """
SELECT c.chunk_id, d.path, d.source, d.title, c.heading, c.text, 0.0::float8, c.char_start, c.char_end, d.metadata
  FROM chunks c JOIN documents d ON d.id = c.document_id
 WHERE c.generation_id = (SELECT id FROM embedding_generations WHERE status = 'active')
   AND (d.path = %(path)s OR right(d.path, length(%(path)s) + 1) = '/' || %(path)s)
 ORDER BY d.id, c.ordinal
"""


def document_chunks(conn: psycopg.Connection, document_path: str) -> list[RetrievedChunk]:
    """Every chunk of the active generation of the document(s) at ``document_path`` (relative to its source root,
    or its tail), in reading order."""
    rows = conn.execute(_DOCUMENT_CHUNKS, {"path": document_path.strip().removeprefix("./")}).fetchall()
    return [
        RetrievedChunk(
            chunk_id=r[0], document_path=r[1], source=r[2], title=r[3], heading=r[4], text=r[5], score=float(r[6]),
            char_start=r[7], char_end=r[8], metadata=dict(r[9] or {}),
        )
        for r in rows
    ]  # fmt: skip


def index_snapshot(conn: psycopg.Connection) -> dict[str, Any]:
    """The active generation, its chunk count and the last finished ingest: the index state a lineage records."""
    exists = conn.execute("SELECT to_regclass('embedding_generations') IS NOT NULL").fetchone()
    row = (
        exists
        and exists[0]
        and conn.execute(
            """SELECT g.id, g.model_id, (SELECT count(*) FROM chunks c WHERE c.generation_id = g.id),
                  (SELECT max(finished_at) FROM ingest_runs)
             FROM embedding_generations g WHERE g.status = 'active'"""
        ).fetchone()
    )
    if not row:
        return {"generation": None, "embedding_model": None, "chunks": 0, "last_ingest_at": None}
    return {
        "generation": int(row[0]),
        "embedding_model": row[1],
        "chunks": int(row[2]),
        "last_ingest_at": row[3].isoformat() if row[3] else None,
    }
