-- A reservation can be given back: its payment was refunded (the order was
-- cancelled or expired) after the stock was taken. 'VOID' marks a refund
-- heard before any reservation (its PaymentSucceeded was dead-lettered,
-- say): a PaymentSucceeded seen later reserves nothing.
ALTER TABLE reservations DROP CONSTRAINT IF EXISTS reservations_status_check;
ALTER TABLE reservations
    ADD CONSTRAINT reservations_status_check
        CHECK (status IN ('RESERVED', 'REJECTED', 'RELEASED', 'VOID')),
    ADD COLUMN updated_at TIMESTAMPTZ NOT NULL DEFAULT now();
