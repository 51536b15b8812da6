-- Orders cancelled before payment-service charged them (their OrderCreated
-- was dead-lettered, say): an OrderCreated seen later is never charged.
CREATE TABLE cancellations (
    order_id    UUID PRIMARY KEY,
    -- 'customer' or 'deadline', as in OrderCancelled.
    reason      TEXT        NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Why a REFUNDED payment was refunded ('out of stock', 'order cancelled').
ALTER TABLE payments ADD COLUMN refund_reason TEXT;
