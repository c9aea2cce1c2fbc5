-- The gateway's own role, so a request that reaches SQL cannot change the index or the schema: it reads the
-- index, the registry and the evaluation scores, and writes only the registry's champion switch (promote,
-- rollback). Later migrations grant their own tables to it where the role exists.
--
-- Roles belong to the server, not the database: a second database on the same server finds it made and only
-- gets the grants. A migrating user that may not create roles (some managed services) skips the creation
-- with a NOTICE and grants nothing (this and later migrations grant only to an existing role): there, create
-- the role by hand before the first migration (README, "Deploying").
-- The role has no password here: with password authentication it cannot log in until one is set
-- (`python -m components.db.gateway_role`, run by the compose and Kubernetes init step).
DO $$
DECLARE
    col text;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tandem_gateway') THEN
        IF NOT (SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user) THEN
            RAISE NOTICE 'role tandem_gateway not created: % may not create roles; no grants made (README: Deploying)',
                current_user;
            RETURN;
        END IF;
        CREATE ROLE tandem_gateway LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
    END IF;
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO tandem_gateway', current_database());
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO tandem_gateway', current_schema());
    GRANT SELECT ON embedding_generations, documents, document_generations, chunks, ingest_failures, ingest_runs,
        adapter_versions, evaluation_runs, evaluation_scores, evaluation_answers TO tandem_gateway;
    -- The champion switch (registry.set_champion) and nothing else: not artifact_uri, so a gateway cannot point a
    -- version at another file. Columns that an earlier migration added (0005: who promoted) only where they exist.
    FOR col IN
        SELECT column_name FROM information_schema.columns
         WHERE table_schema = current_schema() AND table_name = 'adapter_versions'
           AND column_name IN ('status', 'reason', 'promoted_at', 'updated_at', 'promoted_by', 'changed_by')
    LOOP
        EXECUTE format('GRANT UPDATE (%I) ON adapter_versions TO tandem_gateway', col);
    END LOOP;
END
$$;
