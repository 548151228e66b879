-- The PSP simulator's own state. It runs against its own SQLite file, but
-- keeps the 9xxx version range so it never collides with paystream's
-- components (1xxx handler, 2xxx executor, 3xxx projections).

-- One row per (account, Idempotency-Key): the in-flight lock, the attempt
-- counter behind `times: N` rules, and the stored first answer.
CREATE TABLE psp_idempotency (
    account          TEXT    NOT NULL,
    idempotency_key  TEXT    NOT NULL,
    request_hash     TEXT    NOT NULL,
    -- 'open' (no final answer, nobody working on it), 'in_flight', 'done'
    state            TEXT    NOT NULL CHECK (state IN ('open', 'in_flight', 'done')),
    owner            TEXT    NOT NULL,
    attempts         INTEGER NOT NULL,
    response_status  INTEGER,
    response_body    TEXT,
    created_at_ms    INTEGER NOT NULL,
    PRIMARY KEY (account, idempotency_key)
);

-- Every charge ever created. The unique key is the hard guarantee that a
-- repeated Idempotency-Key can never create a second charge.
CREATE TABLE psp_charges (
    id               TEXT    PRIMARY KEY,
    account          TEXT    NOT NULL,
    idempotency_key  TEXT    NOT NULL,
    reference        TEXT    NOT NULL,
    amount_minor     INTEGER NOT NULL CHECK (amount_minor > 0),
    currency         TEXT    NOT NULL,
    card_token       TEXT    NOT NULL,
    description      TEXT,
    status           TEXT    NOT NULL CHECK (status IN ('succeeded', 'pending', 'declined')),
    fee_minor        INTEGER NOT NULL CHECK (fee_minor >= 0),
    decline_code     TEXT,
    created_at_ms    INTEGER NOT NULL,
    settled_at_ms    INTEGER,
    resolve_at_ms    INTEGER,
    resolve_to       TEXT    CHECK (resolve_to IN ('succeed', 'fail')),
    refunded_minor   INTEGER NOT NULL DEFAULT 0 CHECK (refunded_minor >= 0 AND refunded_minor <= amount_minor),
    UNIQUE (account, idempotency_key)
);
CREATE INDEX psp_charges_reference ON psp_charges (reference);
CREATE INDEX psp_charges_pending ON psp_charges (resolve_at_ms) WHERE status = 'pending';
CREATE INDEX psp_charges_settled ON psp_charges (account, settled_at_ms) WHERE status = 'succeeded';

CREATE TABLE psp_refunds (
    id               TEXT    PRIMARY KEY,
    account          TEXT    NOT NULL,
    idempotency_key  TEXT    NOT NULL,
    charge_id        TEXT    NOT NULL REFERENCES psp_charges (id),
    amount_minor     INTEGER NOT NULL CHECK (amount_minor > 0),
    currency         TEXT    NOT NULL,
    status           TEXT    NOT NULL CHECK (status IN ('succeeded')),
    created_at_ms    INTEGER NOT NULL,
    UNIQUE (account, idempotency_key)
);
CREATE INDEX psp_refunds_created ON psp_refunds (account, created_at_ms);

-- POST /v1/charges requests received per reference (test introspection).
CREATE TABLE psp_create_requests (
    reference        TEXT    PRIMARY KEY,
    requests         INTEGER NOT NULL
);

-- Webhook deliveries: durable, retried until a 2xx. A duplicate delivery is
-- a second row with the same event id and body.
CREATE TABLE psp_webhook_deliveries (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id         TEXT    NOT NULL,
    account          TEXT    NOT NULL,
    url              TEXT    NOT NULL,
    body             TEXT    NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at_ms INTEGER NOT NULL,
    delivered_at_ms  INTEGER,
    last_error       TEXT
);
CREATE INDEX psp_webhook_due ON psp_webhook_deliveries (next_attempt_at_ms) WHERE delivered_at_ms IS NULL;
