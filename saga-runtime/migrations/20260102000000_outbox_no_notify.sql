-- Relays wake on their own process's commits and poll every second for
-- anything else (a crashed replica's rows), so the per-insert NOTIFY went:
-- every notification woke a relay for an empty SELECT, and NOTIFY takes a
-- database-wide lock at commit, serialising the writers.
DROP TRIGGER IF EXISTS outbox_notify ON outbox;
DROP FUNCTION IF EXISTS outbox_notify();
