-- Lets the retention task find old processed-event ids without reading the
-- whole table. Rows are inserted in time order, so a BRIN index stays a few
-- pages and costs inserts next to nothing (a B-tree would add an entry per
-- event).
CREATE INDEX IF NOT EXISTS processed_events_processed_at_brin
    ON processed_events USING brin (processed_at);
