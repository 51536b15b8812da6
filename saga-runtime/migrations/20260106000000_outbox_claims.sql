-- The relay no longer sets rows aside: a row the broker refuses (wrong
-- ACLs, a missing topic) stays and is retried until someone fixes the
-- broker. Rows earlier versions parked go back into the queue here.
-- Published rows are deleted, so `published_at` has no use either.
DROP INDEX IF EXISTS outbox_unpublished;
ALTER TABLE outbox DROP COLUMN IF EXISTS parked_at;
ALTER TABLE outbox DROP COLUMN IF EXISTS published_at;
-- A sweep claims its rows until this time instead of holding row locks
-- across its network send; a crashed sweeper's claim runs out by itself.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS claimed_until TIMESTAMPTZ;
