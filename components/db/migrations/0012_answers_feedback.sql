-- Feedback from answers: the gateway records each answer it gives (TANDEM_RECORD_ANSWERS) under the response id
-- the client received, and POST /v1/feedback rates or corrects it; a correction becomes a 'pending' row of
-- domain_examples (0011) for the alias that answered. Answers older than TANDEM_ANSWER_RETENTION_DAYS are purged
-- by the gateway (one gateway at a time, under an advisory lock), their feedback with them.
CREATE TABLE answers (
    response_id     text PRIMARY KEY CHECK (length(response_id) BETWEEN 1 AND 200),
    alias           text,                    -- null: the base model answered, asked for by its own name
    adapter_version integer,                 -- null: no adapter (base model, or the alias fell back to it)
    served_model    text NOT NULL,
    question        text NOT NULL,           -- the last user message, as retrieval was asked
    chunk_ids       text[] NOT NULL DEFAULT '{}',  -- every retrieved chunk, in prompt order (source n = element n)
    sources         jsonb NOT NULL DEFAULT '[]',   -- [{"n", "path", "heading", "chunk_id"}], as numbered in the prompt
    cited           integer[] NOT NULL DEFAULT '{}',  -- the source numbers the answer cites
    answer          text NOT NULL,           -- the first choice's text
    key_name        text NOT NULL,           -- the client key the answer went to
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX answers_created ON answers (created_at);

-- Every post is kept (history); the latest row per (response_id, key_name) is that key's current opinion.
CREATE TABLE answer_feedback (
    id           bigserial PRIMARY KEY,
    response_id  text NOT NULL REFERENCES answers (response_id) ON DELETE CASCADE,
    rating       text NOT NULL CHECK (rating IN ('up', 'down')),
    correction   text CHECK (length(correction) BETWEEN 1 AND 32768),
    key_name     text NOT NULL,
    example_id   bigint REFERENCES domain_examples (id) ON DELETE SET NULL,  -- what the correction became
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX answer_feedback_response ON answer_feedback (response_id, created_at);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tandem_gateway') THEN
        GRANT SELECT, INSERT, DELETE ON answers TO tandem_gateway;
        GRANT SELECT, INSERT ON answer_feedback TO tandem_gateway;
        GRANT USAGE ON SEQUENCE answer_feedback_id_seq TO tandem_gateway;
        -- A correction is added as a pending example; reading back only what says whether it was new.
        GRANT INSERT ON domain_examples TO tandem_gateway;
        GRANT SELECT (id, alias, content_hash, status) ON domain_examples TO tandem_gateway;
        GRANT USAGE ON SEQUENCE domain_examples_id_seq TO tandem_gateway;
    END IF;
END
$$;
