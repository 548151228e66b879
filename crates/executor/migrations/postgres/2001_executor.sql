-- executor: durable work of the payment executor. Times are integer
-- milliseconds since the Unix epoch, UTC. `next_attempt_ms` is when a row
-- next needs the dispatcher (NULL: nothing to do, e.g. final or awaiting
-- the risk decision).

-- One row per payment: the lease makes one executor task at a time work on
-- a payment, so one payment's events stay in order.
CREATE TABLE executor_payments (
    payment_id      TEXT PRIMARY KEY,
    correlation_id  TEXT NOT NULL,
    card_token      TEXT NOT NULL,
    lease_until_ms  BIGINT NOT NULL DEFAULT 0,
    created_ms      BIGINT NOT NULL
);

-- One row per payment order; the primary key is the intent's uniqueness:
-- an order is recorded (and so charged) once.
CREATE TABLE executor_orders (
    order_id         TEXT PRIMARY KEY,
    payment_id       TEXT NOT NULL REFERENCES executor_payments (payment_id),
    seq              INTEGER NOT NULL,
    seller_id        TEXT NOT NULL,
    amount_minor     BIGINT NOT NULL CHECK (amount_minor > 0),
    currency         TEXT NOT NULL,
    state            TEXT NOT NULL CHECK (state IN ('awaiting_risk', 'ready', 'executing', 'retry_wait', 'pending', 'succeeded', 'failed', 'cancelled')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms  BIGINT,
    deadline_ms      BIGINT,
    pending_since_ms BIGINT,
    psp_charge_id    TEXT,
    fee_minor        BIGINT,
    last_error       TEXT,
    created_ms       BIGINT NOT NULL,
    updated_ms       BIGINT NOT NULL
);
CREATE INDEX executor_orders_due ON executor_orders (next_attempt_ms) WHERE next_attempt_ms IS NOT NULL;
CREATE INDEX executor_orders_payment ON executor_orders (payment_id, seq);

CREATE TABLE executor_refunds (
    refund_id        TEXT PRIMARY KEY,
    order_id         TEXT NOT NULL REFERENCES executor_orders (order_id),
    payment_id       TEXT NOT NULL REFERENCES executor_payments (payment_id),
    amount_minor     BIGINT NOT NULL,
    currency         TEXT NOT NULL,
    reason           TEXT NOT NULL,
    state            TEXT NOT NULL CHECK (state IN ('ready', 'executing', 'retry_wait', 'succeeded', 'failed')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms  BIGINT,
    deadline_ms      BIGINT,
    psp_refund_id    TEXT,
    last_error       TEXT,
    created_ms       BIGINT NOT NULL,
    updated_ms       BIGINT NOT NULL
);
CREATE INDEX executor_refunds_due ON executor_refunds (next_attempt_ms) WHERE next_attempt_ms IS NOT NULL;
CREATE INDEX executor_refunds_order ON executor_refunds (order_id);

-- Outbox: every event is first recorded here in the transaction that
-- records the state change, then appended, then marked. A crash in between
-- re-appends it (same event id: consumers drop the duplicate).
CREATE TABLE executor_outbox (
    seq          BIGSERIAL PRIMARY KEY,
    event_id     TEXT NOT NULL UNIQUE,
    payment_id   TEXT NOT NULL,
    body         BYTEA NOT NULL,
    created_ms   BIGINT NOT NULL,
    appended_ms  BIGINT
);
CREATE INDEX executor_outbox_unappended ON executor_outbox (payment_id, seq) WHERE appended_ms IS NULL;

-- PSP webhook deliveries already processed, by the PSP's event id.
CREATE TABLE executor_webhook_events (
    psp_event_id  TEXT PRIMARY KEY,
    event_type    TEXT NOT NULL,
    received_ms   BIGINT NOT NULL
);
