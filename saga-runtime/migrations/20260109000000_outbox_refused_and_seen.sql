-- Set when the broker refuses the row for good (too large, no ACL, no
-- topic). Its order's later rows wait behind it; every other order's rows
-- keep flowing: the in-memory relays leave that order to the sweep, which
-- retries it once a second until someone fixes the cause.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS refused_at TIMESTAMPTZ;
-- When a sweep first saw the row committed. A row's age for the sweep
-- starts here, not at `created_at` (its transaction's start): a
-- transaction that waited on a lock commits rows whose writer is about to
-- publish them, and a sweep must not take them at once.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS seen_at TIMESTAMPTZ;
