-- The files the intake DAG found in each alias's landing location (TANDEM_DOMAIN_DATA_URL), remembered by content
-- hash so a file is read once: an imported file is not added again (its examples would only be duplicates), and a
-- refused one (a bad line: nothing of it was stored) is not retried until its content changes.
CREATE TABLE domain_landing_files (
    alias         text NOT NULL CHECK (alias ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    content_hash  text NOT NULL,             -- sha256 of the file's bytes
    url           text NOT NULL,             -- where it was found (first seen)
    status        text NOT NULL CHECK (status IN ('imported', 'refused')),
    added         integer NOT NULL DEFAULT 0 CHECK (added >= 0),
    skipped       integer NOT NULL DEFAULT 0 CHECK (skipped >= 0),
    error         text,                      -- why it was refused: "url:line: what was expected"
    imported_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (alias, content_hash)
);
