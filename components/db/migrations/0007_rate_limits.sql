-- Per-key rate limits of the gateway (serving/limits.py), shared by every gateway of a fleet.
-- One row per subject (an API key's name, or "addr:<client address>" where a request carries no key name) holds
-- a theoretical arrival time (GCRA) for requests and one for completion tokens. A request is admitted, and both
-- times advanced, by one INSERT ... ON CONFLICT DO UPDATE: the row lock makes the check-and-charge atomic across
-- gateways, and the clock is the database's, so gateways with skewed clocks still agree.
CREATE TABLE gateway_rate_limits (
    subject      text PRIMARY KEY CHECK (length(subject) BETWEEN 1 AND 200),
    request_tat  timestamptz NOT NULL,
    token_tat    timestamptz NOT NULL,
    allowed      boolean NOT NULL,         -- the outcome of the last check (read back by the same statement)
    updated_at   timestamptz NOT NULL DEFAULT now()
);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tandem_gateway') THEN
        GRANT SELECT, INSERT, UPDATE, DELETE ON gateway_rate_limits TO tandem_gateway;
    END IF;
END
$$;
