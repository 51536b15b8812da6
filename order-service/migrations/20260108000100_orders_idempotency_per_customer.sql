-- An Idempotency-Key belongs to the customer who sent it. Unique across all
-- customers, one customer's key answered another's retry with 422 (telling
-- that the key was in use), and a customer could take keys another would use.
ALTER TABLE orders DROP CONSTRAINT orders_idempotency_key_key;
ALTER TABLE orders ADD CONSTRAINT orders_customer_idempotency_key
    UNIQUE (customer_id, idempotency_key);
