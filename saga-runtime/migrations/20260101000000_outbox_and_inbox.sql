-- Shared by every service: the transactional outbox and the processed-event
-- inbox that makes consumers idempotent.

CREATE TABLE IF NOT EXISTS outbox (
    id            BIGSERIAL PRIMARY KEY,
    event_id      UUID        NOT NULL UNIQUE,
    topic         TEXT        NOT NULL,
    message_key   TEXT        NOT NULL,
    event_type    TEXT        NOT NULL,
    correlation_id TEXT       NOT NULL,
    -- W3C trace context of the span that wrote the row, sent as the
    -- `traceparent` header so the next service continues the same trace.
    traceparent   TEXT,
    payload       BYTEA       NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at  TIMESTAMPTZ,
    -- Set when the broker refuses the row for good (e.g. too large): the row
    -- stops blocking the relay and waits for an operator.
    parked_at     TIMESTAMPTZ,
    last_error    TEXT
);

-- The relay only ever looks for unpublished rows, oldest first.
CREATE INDEX IF NOT EXISTS outbox_unpublished ON outbox (id) WHERE published_at IS NULL AND parked_at IS NULL;

-- Wake relays in every process sharing this database when rows commit.
CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('outbox', '');
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS outbox_notify ON outbox;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

CREATE TABLE IF NOT EXISTS processed_events (
    consumer     TEXT        NOT NULL,
    event_id     UUID        NOT NULL,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
