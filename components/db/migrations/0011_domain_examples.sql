-- Domain data intake per alias: every training example that reaches Tandem (`tandem data add`, the landing
-- location, a correction posted as feedback) is a row here, deduplicated by content hash per alias, and trains a
-- model only once it is 'approved' (by a person, in Airflow's review task or `tandem data review`, or at intake
-- where the source is trusted). A training run reads an approved snapshot: the ids it trained on, versioned per
-- alias, recorded in the adapter's lineage. Rows are never deleted by the pipeline; a rejection is a status.
CREATE TABLE domain_examples (
    id            bigserial PRIMARY KEY,
    alias         text NOT NULL CHECK (alias ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    content_hash  text NOT NULL,
    example       jsonb NOT NULL,            -- {"messages": [...], optional "source", "rag"}: one training example
    origin        text NOT NULL,             -- "cli:<file>:<line>", "landing:<url>", "feedback:<response id>"
    status        text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'approved', 'rejected')),
    submitted_by  text,                      -- a key's name, a CLI user, a DAG
    reviewed_by   text,
    reviewed_at   timestamptz,
    review_note   text,
    context       jsonb,                     -- what a reviewer needs: the answer given, its cited sources, rating
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (alias, content_hash)
);
CREATE INDEX domain_examples_alias_status ON domain_examples (alias, status, id);

-- What one training run trained on: the approved ids at that moment, versioned per alias.
CREATE TABLE domain_snapshots (
    alias         text NOT NULL CHECK (alias ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    version       integer NOT NULL CHECK (version > 0),
    content_hash  text NOT NULL,             -- of the sorted example content hashes
    example_ids   bigint[] NOT NULL,
    size          integer NOT NULL CHECK (size >= 0),
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (alias, version)
);
