-- A parked event is published again only after every earlier parked event
-- of its key (its order): the replay looks those up by key.
CREATE INDEX IF NOT EXISTS parked_events_by_key ON parked_events (message_key, parked_at);
