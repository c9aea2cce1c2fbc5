-- A fleet of gateways agrees on which candidate each alias has staged (loaded and warmed on every replica ahead
-- of its promotion), so a replica that joins later, or restarts, gets it back from any gateway. One per alias:
-- staging another version of the alias clears it; promotion, rejection and retirement leave it set but only a
-- 'candidate' with staged_at counts as staged.
ALTER TABLE adapter_versions ADD COLUMN staged_at timestamptz;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tandem_gateway') THEN
        GRANT SELECT (staged_at), UPDATE (staged_at) ON adapter_versions TO tandem_gateway;
    END IF;
END
$$;
