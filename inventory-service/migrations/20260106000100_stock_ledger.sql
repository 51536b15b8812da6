-- Every catalog write, as the change it made to the units put in: the
-- books check (`saga-admin audit`) compares its sum per SKU with
-- available + reserved, which reservations only move between.
CREATE TABLE stock_ledger (
    id         BIGSERIAL PRIMARY KEY,
    sku        TEXT        NOT NULL REFERENCES products (sku),
    delta      BIGINT      NOT NULL,
    -- 'seed', 'put', 'restock' or 'opening' (stock present before the ledger).
    reason     TEXT        NOT NULL,
    at         TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX stock_ledger_by_sku ON stock_ledger (sku);

INSERT INTO stock_ledger (sku, delta, reason)
SELECT sku, available + reserved, 'opening' FROM products;

-- Optimistic concurrency for catalog writes: every change of a product
-- (a write, a restock, a reservation) bumps it; `PUT` with a stale
-- `If-Match` or `version` is refused.
ALTER TABLE products ADD COLUMN version BIGINT NOT NULL DEFAULT 1;
