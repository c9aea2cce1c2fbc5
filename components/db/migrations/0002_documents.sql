-- Ingestion: documents, their chunks per embedding generation, and the documents that failed to load.
--
-- An embedding generation is one embedding model (model_id such as 'all-MiniLM-L6-v2:384'). Exactly one is
-- 'active' (what retrieval reads); a new model is built as a 'building' generation beside it and becomes
-- active in one transaction when every document has chunks in it.
CREATE TABLE embedding_generations (
    id           serial PRIMARY KEY,
    model_id     text NOT NULL UNIQUE,
    dim          integer NOT NULL CHECK (dim > 0),
    status       text NOT NULL DEFAULT 'building' CHECK (status IN ('building', 'active', 'retired')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    activated_at timestamptz
);
CREATE UNIQUE INDEX embedding_generations_one_active ON embedding_generations ((true)) WHERE status = 'active';

-- One row per document of a source; key (source, path) with path relative to the source root.
CREATE TABLE documents (
    id           bigserial PRIMARY KEY,
    source       text NOT NULL,
    path         text NOT NULL,
    title        text NOT NULL DEFAULT '',
    content_hash text NOT NULL,
    size_bytes   bigint NOT NULL,
    modified_at  timestamptz,
    metadata     jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (source, path)
);

-- Which content (hash + chunking settings) each generation has indexed for a document: the change detector.
-- Written in the same transaction as the document's chunks, so it never claims chunks that are not there.
CREATE TABLE document_generations (
    document_id   bigint NOT NULL REFERENCES documents (id) ON DELETE CASCADE,
    generation_id integer NOT NULL REFERENCES embedding_generations (id) ON DELETE CASCADE,
    content_hash  text NOT NULL,
    chunking      text NOT NULL,
    chunk_count   integer NOT NULL,
    indexed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (document_id, generation_id)
);

-- Chunks carry their generation; `embedding` is dimension-free so generations of different models can
-- coexist, and each dimension gets its own partial HNSW index (created by components/ingest/store.py).
CREATE TABLE chunks (
    id            bigserial PRIMARY KEY,
    chunk_id      text NOT NULL UNIQUE,
    document_id   bigint NOT NULL REFERENCES documents (id) ON DELETE CASCADE,
    generation_id integer NOT NULL REFERENCES embedding_generations (id) ON DELETE CASCADE,
    ordinal       integer NOT NULL,
    heading       text NOT NULL DEFAULT '',  -- heading path joined with ' > '
    text          text NOT NULL,
    text_hash     text NOT NULL,
    char_start    integer NOT NULL,
    char_end      integer NOT NULL,
    token_count   integer NOT NULL,
    dim           integer NOT NULL,
    embedding     vector NOT NULL,
    tsv           tsvector GENERATED ALWAYS AS (to_tsvector('english', heading || ' ' || text)) STORED,
    UNIQUE (document_id, generation_id, ordinal)
);
CREATE INDEX chunks_generation_text_hash ON chunks (generation_id, text_hash);
CREATE INDEX chunks_tsv ON chunks USING gin (tsv);
CREATE INDEX chunks_embedding_hnsw_384 ON chunks USING hnsw ((embedding::vector(384)) vector_cosine_ops)
    WHERE dim = 384;

-- Documents that could not be loaded (unreadable, empty, undecodable, too large): retried on every run,
-- removed when they load again or disappear from the source.
CREATE TABLE ingest_failures (
    source     text NOT NULL,
    path       text NOT NULL,
    reason     text NOT NULL,
    attempts   integer NOT NULL DEFAULT 1,
    first_seen timestamptz NOT NULL DEFAULT now(),
    last_seen  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, path)
);

-- One row per sync run, with its report.
CREATE TABLE ingest_runs (
    id          bigserial PRIMARY KEY,
    source      text NOT NULL,
    model_id    text NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    report      jsonb
);
