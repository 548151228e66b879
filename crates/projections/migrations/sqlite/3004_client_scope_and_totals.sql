-- Issue 12 (M2, M4): sellers and buyers are scoped by client, and every
-- running total is checked in Rust before it is written.
--
-- Orders record the client that requested them (from PaymentRequested).
-- Orders learnt before this migration keep client_id '' (unknown): their
-- bookings stay on the unscoped account merchant_payable:<seller> and
-- their wallet rows on client '', so wallet = ledger still holds; a
-- rebuild from the topics (`paystream projection rebuild`) scopes them.
ALTER TABLE projection_orders ADD COLUMN client_id TEXT NOT NULL DEFAULT '';
CREATE INDEX projection_orders_payment ON projection_orders (payment_id);

-- SQLite cannot change a primary key: the tables are copied.
CREATE TABLE wallet_balances_3004 (
    seller_id     TEXT   NOT NULL,
    currency      TEXT   NOT NULL,
    balance_minor BIGINT NOT NULL,
    client_id     TEXT   NOT NULL DEFAULT '',
    PRIMARY KEY (client_id, seller_id, currency)
);
INSERT INTO wallet_balances_3004 (seller_id, currency, balance_minor, client_id)
SELECT seller_id, currency, balance_minor, '' FROM wallet_balances;
DROP TABLE wallet_balances;
ALTER TABLE wallet_balances_3004 RENAME TO wallet_balances;

CREATE TABLE buyer_totals_3004 (
    buyer_id       TEXT   NOT NULL,
    currency       TEXT   NOT NULL,
    paid_minor     BIGINT NOT NULL,
    refunded_minor BIGINT NOT NULL,
    client_id      TEXT   NOT NULL DEFAULT '',
    PRIMARY KEY (client_id, buyer_id, currency)
);
INSERT INTO buyer_totals_3004 (buyer_id, currency, paid_minor, refunded_minor, client_id)
SELECT buyer_id, currency, paid_minor, refunded_minor, '' FROM buyer_totals;
DROP TABLE buyer_totals;
ALTER TABLE buyer_totals_3004 RENAME TO buyer_totals;

-- Running totals per projection: a seller's balance (= its wallet, = the
-- credit balance of its merchant_payable account) and a buyer's paid and
-- refunded totals, per client and currency. Both projections keep them,
-- so both refuse alike an event that would take one beyond i64
-- (`total_overflow`, dead-lettered) instead of failing in the database.
CREATE TABLE projection_totals (
    projection  TEXT   NOT NULL,
    party_id    TEXT   NOT NULL,
    client_id   TEXT   NOT NULL,
    kind        TEXT   NOT NULL CHECK (kind IN ('seller_balance', 'buyer_paid', 'buyer_refunded')),
    currency    TEXT   NOT NULL,
    total_minor BIGINT NOT NULL,
    PRIMARY KEY (projection, party_id, client_id, kind, currency)
);
-- Existing totals, from what each projection recorded per order: a
-- seller's balance is what was captured minus what was refunded.
INSERT INTO projection_totals (projection, party_id, client_id, kind, currency, total_minor)
SELECT projection, seller_id, client_id, 'seller_balance', currency, SUM(captured_minor - refunded_minor)
FROM projection_orders GROUP BY projection, seller_id, client_id, currency
HAVING SUM(captured_minor - refunded_minor) <> 0;
INSERT INTO projection_totals (projection, party_id, client_id, kind, currency, total_minor)
SELECT projection, buyer_id, client_id, 'buyer_paid', currency, SUM(captured_minor)
FROM projection_orders GROUP BY projection, buyer_id, client_id, currency
HAVING SUM(captured_minor) <> 0;
INSERT INTO projection_totals (projection, party_id, client_id, kind, currency, total_minor)
SELECT projection, buyer_id, client_id, 'buyer_refunded', currency, SUM(refunded_minor)
FROM projection_orders GROUP BY projection, buyer_id, client_id, currency
HAVING SUM(refunded_minor) <> 0;
