-- Refund requests and their outcomes, per order (payment-status projection).
CREATE TABLE handler_refunds (
    refund_id     TEXT PRIMARY KEY,
    order_id      TEXT NOT NULL REFERENCES handler_payment_orders (order_id),
    payment_id    TEXT NOT NULL,
    amount_minor  BIGINT NOT NULL,
    currency      TEXT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('requested', 'succeeded', 'failed')),
    reason        TEXT NOT NULL,
    failure       TEXT,
    created_us    BIGINT NOT NULL,
    updated_us    BIGINT NOT NULL
);
CREATE INDEX handler_refunds_order ON handler_refunds (order_id);
