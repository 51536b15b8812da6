CREATE TABLE products (
    sku        TEXT PRIMARY KEY,
    name       TEXT        NOT NULL,
    -- Never below zero: concurrent reservations cannot oversell.
    available  BIGINT      NOT NULL CHECK (available >= 0),
    reserved   BIGINT      NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One row per order that reached inventory: what was reserved, or that it
-- was refused. Guards against reserving an order twice.
CREATE TABLE reservations (
    order_id       UUID PRIMARY KEY,
    status         TEXT        NOT NULL CHECK (status IN ('RESERVED', 'REJECTED')),
    items          JSONB       NOT NULL,
    correlation_id TEXT        NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
