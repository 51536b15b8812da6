-- Each order's events go out in commit order: before publishing a row the
-- relay looks for an earlier unpublished row of the same key, and a sweep
-- only takes a row together with every earlier row of its key.
CREATE INDEX IF NOT EXISTS outbox_by_key ON outbox (message_key, id);
