-- Each event is recorded once in its order's history, even when the inbox
-- no longer remembers it (its row purged after the retention, then the
-- event redriven from a dead letter or read again after a group reset).
-- Earlier versions could record such an event twice: keep the first.
DELETE FROM order_history later
USING order_history first
WHERE later.order_id = first.order_id
  AND later.event_id = first.event_id
  AND later.id > first.id;
CREATE UNIQUE INDEX IF NOT EXISTS order_history_once ON order_history (order_id, event_id);
