-- The relay now deletes each row the broker acknowledges. Rows earlier
-- versions kept, marked published, are deleted once here instead of by a
-- purge that would run every minute for ever.
DELETE FROM outbox WHERE published_at IS NOT NULL;
