-- Staleness checks (components/evaluation/staleness.py): after the document index changes, the champion of an
-- alias is asked the questions whose documents changed since it was trained, through the hybrid arm, the adapter
-- alone and the base model with retrieval. One row per check; the gateway exports the latest verdict of each
-- alias's champion as tandem_adapter_stale{alias} and `tandem adapters` prints it.
CREATE TABLE staleness_checks (
    id                    bigserial PRIMARY KEY,
    alias                 text NOT NULL,
    adapter_version       integer NOT NULL,
    checked_at            timestamptz NOT NULL DEFAULT now(),
    trigger               text NOT NULL,               -- "cli", "dag:asset_triggered", ...
    basis                 text NOT NULL CHECK (basis IN ('grounding', 'qa')),  -- where the questions came from
    trained_index         jsonb,                       -- the index state the adapter was trained against
    changed_documents     jsonb NOT NULL,              -- [{source, path, change}] since that state
    documents_fingerprint text NOT NULL,               -- of the changed documents' current hashes: reruns skip
    questions             integer NOT NULL CHECK (questions >= 0),
    hybrid_accuracy       double precision,
    adapter_accuracy      double precision,
    base_rag_accuracy     double precision,
    p_value               double precision,
    stale                 boolean NOT NULL,
    reason                text NOT NULL,
    rolled_back_to        integer,                     -- the version TANDEM_AUTO_ROLLBACK returned the alias to
    rollback_error        text,
    outcomes              jsonb NOT NULL DEFAULT '[]'::jsonb  -- per question: text, document, answers, verdicts
);
CREATE INDEX staleness_checks_alias ON staleness_checks (alias, adapter_version, checked_at DESC, id DESC);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tandem_gateway') THEN
        GRANT SELECT ON staleness_checks TO tandem_gateway;
    END IF;
END
$$;
