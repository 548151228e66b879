-- Ledger and wallet projections (see crates/projections/README.md).
-- Amounts are signed minor units (debit positive, credit negative);
-- instants are microseconds since the Unix epoch.

-- Event ids each projection has applied: the exactly-once guard.
CREATE TABLE applied_events (
    projection      TEXT   NOT NULL,
    event_id        TEXT   NOT NULL,
    applied_at      BIGINT NOT NULL,
    topic           TEXT   NOT NULL,
    kafka_partition BIGINT NOT NULL,
    kafka_offset    BIGINT NOT NULL,
    PRIMARY KEY (projection, event_id)
);

-- Orders as each projection learnt them from PaymentRequested, with what
-- was captured and refunded so far (refunds never exceed captures).
CREATE TABLE projection_orders (
    projection     TEXT   NOT NULL,
    order_id       TEXT   NOT NULL,
    payment_id     TEXT   NOT NULL,
    buyer_id       TEXT   NOT NULL,
    seller_id      TEXT   NOT NULL,
    currency       TEXT   NOT NULL,
    amount_minor   BIGINT NOT NULL,
    captured_minor BIGINT NOT NULL,
    refunded_minor BIGINT NOT NULL,
    PRIMARY KEY (projection, order_id)
);

-- One row per business fact booked (capture:<order>, refund:<refund>,
-- adjustment:<discrepancy>): a capture is booked once even if both
-- OrderSucceeded and OrderSettledByWebhook arrive.
CREATE TABLE projection_bookings (
    projection  TEXT NOT NULL,
    booking_key TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    PRIMARY KEY (projection, booking_key)
);

CREATE TABLE ledger_transactions (
    seq         BIGINT PRIMARY KEY,
    id          TEXT   NOT NULL UNIQUE,
    booking_key TEXT   NOT NULL UNIQUE,
    event_id    TEXT   NOT NULL,
    payment_id  TEXT,
    kind        TEXT   NOT NULL,
    occurred_at BIGINT NOT NULL,
    booked_at   BIGINT NOT NULL,
    prev_hash   TEXT   NOT NULL,
    hash        TEXT   NOT NULL
);
CREATE INDEX ledger_transactions_payment ON ledger_transactions (payment_id);

CREATE TABLE ledger_entries (
    transaction_id TEXT   NOT NULL REFERENCES ledger_transactions (id),
    line           BIGINT NOT NULL,
    account        TEXT   NOT NULL,
    currency       TEXT   NOT NULL,
    amount_minor   BIGINT NOT NULL,
    occurred_at    BIGINT NOT NULL,
    seq            BIGINT NOT NULL,
    PRIMARY KEY (transaction_id, line)
);
CREATE INDEX ledger_entries_account ON ledger_entries (account, currency, occurred_at, seq);

-- The end of the hash chain; its row lock serialises ledger writers.
CREATE TABLE ledger_chain_head (
    id   BIGINT PRIMARY KEY CHECK (id = 1),
    seq  BIGINT NOT NULL,
    hash TEXT   NOT NULL
);
INSERT INTO ledger_chain_head (id, seq, hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

CREATE TABLE wallet_balances (
    seller_id     TEXT   NOT NULL,
    currency      TEXT   NOT NULL,
    balance_minor BIGINT NOT NULL,
    PRIMARY KEY (seller_id, currency)
);

CREATE TABLE buyer_totals (
    buyer_id       TEXT   NOT NULL,
    currency       TEXT   NOT NULL,
    paid_minor     BIGINT NOT NULL,
    refunded_minor BIGINT NOT NULL,
    PRIMARY KEY (buyer_id, currency)
);

-- Entries are immutable: corrections are new, reversing transactions.
CREATE FUNCTION ledger_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger rows are immutable: book a reversing transaction instead';
END
$$;
CREATE TRIGGER ledger_transactions_immutable BEFORE UPDATE OR DELETE ON ledger_transactions
    FOR EACH ROW EXECUTE FUNCTION ledger_immutable();
CREATE TRIGGER ledger_entries_immutable BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_immutable();
