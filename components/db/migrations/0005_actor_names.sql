-- Who changed an adapter version: the name of the admin key that called the gateway ("key:<name>"), or the
-- OS user for a CLI action that went straight to the registry ("cli:<user>").
-- promoted_by: who last made the version champion (kept when it is later retired);
-- changed_by: who made its last status change (promotion, retirement, rollback, the gate's verdict).
ALTER TABLE adapter_versions ADD COLUMN promoted_by text, ADD COLUMN changed_by text;

-- The gateway writes both when it promotes or rolls back. Table-wide grants cover new columns; a column-level
-- grant does not, so give these two explicitly when the gateway's role exists (helper migration 0006 makes it).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tandem_gateway') THEN
        GRANT SELECT (promoted_by, changed_by), UPDATE (promoted_by, changed_by) ON adapter_versions TO tandem_gateway;
    END IF;
END
$$;
