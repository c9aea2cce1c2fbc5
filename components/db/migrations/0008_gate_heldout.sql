-- The evaluation gate's held-out questions per alias, fixed at the alias's first training and versioned:
-- a run's training data can add examples but never changes what the gate asks. A new version is only made by
-- an explicit admin action (`tandem train --new-heldout`); rows are never updated. The gateway never reads it.
CREATE TABLE gate_heldout_sets (
    alias        text NOT NULL CHECK (alias ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    version      integer NOT NULL CHECK (version > 0),
    content_hash text NOT NULL,
    examples     jsonb NOT NULL,
    size         integer NOT NULL CHECK (size >= 0),
    origin       text NOT NULL,
    reason       text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (alias, version)
);

-- Rollback walks back the lineage: the champion a rollback leaves is marked 'rolled_back', so no later
-- rollback returns to it (only an explicit promotion can).
ALTER TABLE adapter_versions DROP CONSTRAINT IF EXISTS adapter_versions_status_check;
ALTER TABLE adapter_versions ADD CONSTRAINT adapter_versions_status_check
    CHECK (status IN ('candidate', 'champion', 'rejected', 'retired', 'failed', 'rolled_back'));
