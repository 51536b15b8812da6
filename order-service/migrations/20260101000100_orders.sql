CREATE TABLE orders (
    order_id            UUID PRIMARY KEY,
    customer_id         TEXT        NOT NULL,
    status              TEXT        NOT NULL CHECK (status IN ('PENDING', 'CONFIRMED', 'FAILED')),
    failure_reason      TEXT        CHECK (failure_reason IN ('payment_declined', 'out_of_stock')),
    -- [{ "sku", "quantity", "unit_price" }] exactly as accepted.
    items               JSONB       NOT NULL,
    total_minor         BIGINT      NOT NULL CHECK (total_minor > 0),
    correlation_id      TEXT        NOT NULL,
    trace_id            TEXT,
    refunded            BOOLEAN     NOT NULL DEFAULT false,
    idempotency_key     TEXT        UNIQUE,
    -- Normalised request body, compared when an Idempotency-Key is reused.
    request_fingerprint TEXT,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK ((status = 'FAILED') = (failure_reason IS NOT NULL))
);

CREATE INDEX orders_correlation_id ON orders (correlation_id);

-- Every event that touched an order, in the order it was recorded.
CREATE TABLE order_history (
    id          BIGSERIAL PRIMARY KEY,
    order_id    UUID        NOT NULL REFERENCES orders (order_id) ON DELETE CASCADE,
    event_id    UUID        NOT NULL,
    event_type  TEXT        NOT NULL,
    occurred_at TIMESTAMPTZ NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    data        JSONB       NOT NULL
);

CREATE INDEX order_history_by_order ON order_history (order_id, id);
