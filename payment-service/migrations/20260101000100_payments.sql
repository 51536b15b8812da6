CREATE TABLE payments (
    order_id       UUID PRIMARY KEY,
    payment_id     UUID        NOT NULL UNIQUE,
    amount_minor   BIGINT      NOT NULL CHECK (amount_minor > 0),
    status         TEXT        NOT NULL CHECK (status IN ('CHARGED', 'DECLINED', 'REFUNDED')),
    decline_reason TEXT,
    correlation_id TEXT        NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
