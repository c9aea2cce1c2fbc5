-- Evaluations: RAG vs fine-tune vs hybrid, measured through the gateway on a held-out QA set.
-- A run records what it was measured on (adapter version, index state, QA set) so scores stay comparable;
-- serving/eval_metrics.py exports the latest run per alias as Prometheus gauges.
CREATE TABLE evaluation_runs (
    id                     bigserial PRIMARY KEY,
    alias                  text NOT NULL,
    adapter_version        integer,            -- NULL: the alias had no champion (adapter arms not run)
    served_model           text NOT NULL,
    trigger                text NOT NULL DEFAULT 'cli',
    qa_path                text NOT NULL,
    qa_fingerprint         text NOT NULL,
    questions              integer NOT NULL CHECK (questions > 0),
    max_tokens             integer NOT NULL,
    top_k                  integer NOT NULL,
    concurrency            integer NOT NULL,
    gateway_url            text NOT NULL,
    index_documents        integer,
    index_chunks           integer,
    index_embedding_model  text,
    index_last_ingest_at   timestamptz,
    retrieval_k            integer,
    retrieval_recall_at_k  double precision,
    retrieval_mrr          double precision,
    retrieval_latency_p50_s double precision,
    recommendation         text NOT NULL DEFAULT '',
    report_dir             text,
    started_at             timestamptz NOT NULL,
    finished_at            timestamptz NOT NULL
);
CREATE INDEX evaluation_runs_alias_finished ON evaluation_runs (alias, finished_at DESC);

-- One row per arm of a run.
CREATE TABLE evaluation_scores (
    run_id                 bigint NOT NULL REFERENCES evaluation_runs (id) ON DELETE CASCADE,
    arm                    text NOT NULL CHECK (arm IN ('base', 'base_rag', 'adapter', 'adapter_rag')),
    model                  text NOT NULL,
    rag                    boolean NOT NULL,
    status                 text NOT NULL CHECK (status IN ('ok', 'no adapter')),
    adapter_version        integer,
    questions              integer NOT NULL DEFAULT 0,
    correct                integer NOT NULL DEFAULT 0,
    accuracy               double precision,
    accuracy_low           double precision,
    accuracy_high          double precision,
    source_hit_rate        double precision,
    latency_p50_s          double precision,
    latency_p95_s          double precision,
    prompt_tokens_mean     double precision,
    completion_tokens_mean double precision,
    prompt_tokens_total    bigint NOT NULL DEFAULT 0,
    completion_tokens_total bigint NOT NULL DEFAULT 0,
    errors                 integer NOT NULL DEFAULT 0,
    fallbacks              integer NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, arm)
);

-- Every answer, so a score can be traced back to the questions behind it.
CREATE TABLE evaluation_answers (
    run_id            bigint NOT NULL,
    arm               text NOT NULL,
    qa_id             text NOT NULL,
    text              text NOT NULL,
    correct           boolean NOT NULL,
    source_hit        boolean,
    cited_sources     text[] NOT NULL DEFAULT '{}',
    latency_s         double precision NOT NULL,
    prompt_tokens     integer NOT NULL DEFAULT 0,
    completion_tokens integer NOT NULL DEFAULT 0,
    fallback          boolean NOT NULL DEFAULT false,
    error             text,
    PRIMARY KEY (run_id, arm, qa_id),
    FOREIGN KEY (run_id, arm) REFERENCES evaluation_scores (run_id, arm) ON DELETE CASCADE
);
