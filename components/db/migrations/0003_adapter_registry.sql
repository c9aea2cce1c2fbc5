-- Adapter registry: every trained LoRA version with its lineage; at most one champion per alias.
-- The gateway's reconciler reads its desired state (the champion of each alias) from here.
CREATE TABLE adapter_versions (
    id              bigserial PRIMARY KEY,
    alias           text NOT NULL CHECK (alias ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    version         integer NOT NULL CHECK (version > 0),
    base_model      text NOT NULL,
    dataset_version text NOT NULL,
    dataset_size    integer NOT NULL,
    hyperparameters jsonb NOT NULL DEFAULT '{}'::jsonb,
    metrics         jsonb NOT NULL DEFAULT '{}'::jsonb,
    artifact_uri    text NOT NULL,
    lora_rank       integer NOT NULL,
    status          text NOT NULL DEFAULT 'candidate'
                    CHECK (status IN ('candidate', 'champion', 'rejected', 'retired', 'failed')),
    reason          text,
    parent_version  integer,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    promoted_at     timestamptz,
    UNIQUE (alias, version)
);
CREATE UNIQUE INDEX adapter_versions_one_champion ON adapter_versions (alias) WHERE status = 'champion';
CREATE INDEX adapter_versions_alias_status ON adapter_versions (alias, status);
