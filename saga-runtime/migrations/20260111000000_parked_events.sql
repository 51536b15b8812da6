-- Events a consumer acknowledged without handling them because its build
-- does not know their type (a newer producer's, during a rolling upgrade):
-- kept whole, and published again by the first replica whose build knows
-- the type (see saga-runtime/src/parked.rs). A redelivered message is
-- stored once (its topic, partition and offset).
CREATE TABLE IF NOT EXISTS parked_events (
    topic text NOT NULL,
    kafka_partition integer NOT NULL,
    kafka_offset bigint NOT NULL,
    event_type text NOT NULL,
    message_key bytea,
    payload bytea NOT NULL,
    header_names text[] NOT NULL,
    header_values bytea[] NOT NULL,
    parked_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, kafka_partition, kafka_offset)
);
CREATE INDEX IF NOT EXISTS parked_events_by_type ON parked_events (event_type, parked_at);
