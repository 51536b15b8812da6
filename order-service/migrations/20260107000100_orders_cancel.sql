-- Cancellation and deadlines: an order can end CANCELLED (by its customer)
-- or FAILED with `deadline_exceeded` (still PENDING at its deadline); the
-- compensation's outcome shows as `refunded` and `stock_released`.
ALTER TABLE orders DROP CONSTRAINT IF EXISTS orders_status_check;
ALTER TABLE orders DROP CONSTRAINT IF EXISTS orders_failure_reason_check;
ALTER TABLE orders DROP CONSTRAINT IF EXISTS orders_check;
ALTER TABLE orders
    ADD CONSTRAINT orders_status_check
        CHECK (status IN ('PENDING', 'CONFIRMED', 'FAILED', 'CANCELLED')),
    ADD CONSTRAINT orders_failure_reason_check
        CHECK (failure_reason IN ('payment_declined', 'out_of_stock', 'deadline_exceeded', 'cancelled')),
    ADD CONSTRAINT orders_reason_when_ended
        CHECK ((status IN ('FAILED', 'CANCELLED')) = (failure_reason IS NOT NULL)),
    ADD COLUMN stock_released BOOLEAN NOT NULL DEFAULT false;

-- Deadlines are found here, not in timers: PENDING orders oldest first. The
-- index holds only the orders in flight, so it stays small. (Its predicate
-- makes the status change a non-HOT update: one index entry per index.)
CREATE INDEX orders_pending_by_age ON orders (created_at) WHERE status = 'PENDING';
