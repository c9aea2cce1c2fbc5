-- Alerts Alertmanager sent to the gateway's webhook (serving/routers/dashboards.py), one row per alert per
-- notification, so every gateway replica shows the same list on the dashboards page. Pruned by the gateway
-- (rows older than 30 days) when it stores new ones.
CREATE TABLE alert_notifications (
    id           bigserial PRIMARY KEY,
    received_at  timestamptz NOT NULL DEFAULT now(),
    receiver     text NOT NULL,
    status       text NOT NULL CHECK (status IN ('firing', 'resolved')),
    alertname    text NOT NULL,
    severity     text NOT NULL DEFAULT '',
    fingerprint  text NOT NULL,
    starts_at    timestamptz,
    ends_at      timestamptz,
    labels       jsonb NOT NULL,
    annotations  jsonb NOT NULL
);
CREATE INDEX alert_notifications_received ON alert_notifications (received_at DESC);
CREATE INDEX alert_notifications_fingerprint ON alert_notifications (fingerprint, received_at DESC);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tandem_gateway') THEN
        GRANT SELECT, INSERT, DELETE ON alert_notifications TO tandem_gateway;
        GRANT USAGE ON SEQUENCE alert_notifications_id_seq TO tandem_gateway;
    END IF;
END
$$;
