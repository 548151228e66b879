-- payment-handler: API clients, idempotency keys, the payment-status
-- projection and the risk velocity window. Times are integer milliseconds
-- (or microseconds where named _us) since the Unix epoch, UTC.

CREATE TABLE handler_clients (
    client_id   TEXT PRIMARY KEY,
    created_ms  BIGINT NOT NULL
);

CREATE TABLE handler_api_keys (
    key_id         TEXT PRIMARY KEY,
    client_id      TEXT NOT NULL REFERENCES handler_clients (client_id),
    secret_sha256  TEXT NOT NULL,
    created_ms     BIGINT NOT NULL,
    revoked_ms     BIGINT
);

-- One row per (client, Idempotency-Key). The primary key makes a second
-- concurrent insert impossible: exactly one request owns a key.
CREATE TABLE handler_idempotency_keys (
    client_id        TEXT NOT NULL,
    idem_key         TEXT NOT NULL,
    request_sha256   TEXT NOT NULL,
    state            TEXT NOT NULL CHECK (state IN ('in_flight', 'done')),
    lease_until_ms   BIGINT NOT NULL,
    response_status  INTEGER,
    response_body    TEXT,
    created_ms       BIGINT NOT NULL,
    expires_ms       BIGINT NOT NULL,
    PRIMARY KEY (client_id, idem_key)
);
CREATE INDEX handler_idempotency_keys_expiry ON handler_idempotency_keys (expires_ms);

-- Projection of the payments topic: current status of each payment/order.
CREATE TABLE handler_payments (
    payment_id        TEXT PRIMARY KEY,
    client_id         TEXT NOT NULL,
    buyer_id          TEXT NOT NULL,
    status            TEXT NOT NULL,
    currency          TEXT NOT NULL,
    total_minor       BIGINT NOT NULL,
    rejection_rule    TEXT,
    rejection_reason  TEXT,
    created_us        BIGINT NOT NULL,
    updated_us        BIGINT NOT NULL
);

CREATE TABLE handler_payment_orders (
    order_id        TEXT PRIMARY KEY,
    payment_id      TEXT NOT NULL REFERENCES handler_payments (payment_id),
    position        INTEGER NOT NULL,
    seller_id       TEXT NOT NULL,
    amount_minor    BIGINT NOT NULL,
    currency        TEXT NOT NULL,
    status          TEXT NOT NULL,
    psp_reference   TEXT,
    failure_reason  TEXT,
    refunded_minor  BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX handler_payment_orders_payment ON handler_payment_orders (payment_id);

CREATE TABLE handler_applied_events (
    event_id    TEXT PRIMARY KEY,
    applied_ms  BIGINT NOT NULL
);

-- Recent payments per buyer for the velocity rules.
CREATE TABLE handler_risk_velocity (
    payment_id    TEXT PRIMARY KEY,
    buyer_id      TEXT NOT NULL,
    currency      TEXT NOT NULL,
    amount_minor  BIGINT NOT NULL,
    at_ms         BIGINT NOT NULL
);
CREATE INDEX handler_risk_velocity_buyer ON handler_risk_velocity (buyer_id, at_ms);
