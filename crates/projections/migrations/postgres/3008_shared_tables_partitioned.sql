-- Issue 14 item 4: a rebuild swaps its tables in O(1). The tables both
-- projections share (rows keyed by a `projection` column) become LIST
-- partitioned by projection, one partition per projection
-- (`<table>_ledger`, `<table>_wallet`), so a rebuild can detach one
-- projection's partition and attach its freshly built shadow in its place
-- instead of deleting and copying rows. Queries keep naming the shared
-- table; `WHERE projection = $1` prunes to one partition. Each partition
-- carries a CHECK of its projection, so attaching a rebuilt one needs no
-- scan of its rows. The rows move once, here; the keys and indexes are
-- the same as before.

ALTER TABLE applied_events RENAME TO applied_events_3007;
ALTER TABLE applied_events_3007 RENAME CONSTRAINT applied_events_pkey TO applied_events_3007_pkey;
CREATE TABLE applied_events (
    projection      TEXT   NOT NULL,
    event_id        TEXT   NOT NULL,
    applied_at      BIGINT NOT NULL,
    topic           TEXT   NOT NULL,
    kafka_partition BIGINT NOT NULL,
    kafka_offset    BIGINT NOT NULL,
    outcome         TEXT   NOT NULL DEFAULT 'applied' CHECK (outcome IN ('applied', 'rejected')),
    error_kind      TEXT,
    reason          TEXT,
    CONSTRAINT applied_events_pkey PRIMARY KEY (event_id, projection)
) PARTITION BY LIST (projection);
CREATE TABLE applied_events_ledger PARTITION OF applied_events
    (CONSTRAINT applied_events_ledger_projection CHECK (projection = 'ledger'))
    FOR VALUES IN ('ledger');
CREATE TABLE applied_events_wallet PARTITION OF applied_events
    (CONSTRAINT applied_events_wallet_projection CHECK (projection = 'wallet'))
    FOR VALUES IN ('wallet');
INSERT INTO applied_events (projection, event_id, applied_at, topic, kafka_partition,
    kafka_offset, outcome, error_kind, reason)
SELECT projection, event_id, applied_at, topic, kafka_partition, kafka_offset, outcome,
    error_kind, reason
FROM applied_events_3007 ORDER BY event_id, projection;
DROP TABLE applied_events_3007;

ALTER TABLE projection_orders RENAME TO projection_orders_3007;
ALTER TABLE projection_orders_3007 RENAME CONSTRAINT projection_orders_pkey TO projection_orders_3007_pkey;
ALTER INDEX projection_orders_payment RENAME TO projection_orders_3007_payment;
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
    client_id      TEXT   NOT NULL DEFAULT '',
    CONSTRAINT projection_orders_pkey PRIMARY KEY (order_id, projection)
) PARTITION BY LIST (projection);
CREATE INDEX projection_orders_payment ON projection_orders (payment_id);
CREATE TABLE projection_orders_ledger PARTITION OF projection_orders
    (CONSTRAINT projection_orders_ledger_projection CHECK (projection = 'ledger'))
    FOR VALUES IN ('ledger');
CREATE TABLE projection_orders_wallet PARTITION OF projection_orders
    (CONSTRAINT projection_orders_wallet_projection CHECK (projection = 'wallet'))
    FOR VALUES IN ('wallet');
INSERT INTO projection_orders (projection, order_id, payment_id, buyer_id, seller_id, currency,
    amount_minor, captured_minor, refunded_minor, client_id)
SELECT projection, order_id, payment_id, buyer_id, seller_id, currency, amount_minor,
    captured_minor, refunded_minor, client_id
FROM projection_orders_3007 ORDER BY order_id, projection;
DROP TABLE projection_orders_3007;

ALTER TABLE projection_bookings RENAME TO projection_bookings_3007;
ALTER TABLE projection_bookings_3007 RENAME CONSTRAINT projection_bookings_pkey TO projection_bookings_3007_pkey;
CREATE TABLE projection_bookings (
    projection  TEXT NOT NULL,
    booking_key TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    CONSTRAINT projection_bookings_pkey PRIMARY KEY (booking_key, projection)
) PARTITION BY LIST (projection);
CREATE TABLE projection_bookings_ledger PARTITION OF projection_bookings
    (CONSTRAINT projection_bookings_ledger_projection CHECK (projection = 'ledger'))
    FOR VALUES IN ('ledger');
CREATE TABLE projection_bookings_wallet PARTITION OF projection_bookings
    (CONSTRAINT projection_bookings_wallet_projection CHECK (projection = 'wallet'))
    FOR VALUES IN ('wallet');
INSERT INTO projection_bookings (projection, booking_key, event_id)
SELECT projection, booking_key, event_id
FROM projection_bookings_3007 ORDER BY booking_key, projection;
DROP TABLE projection_bookings_3007;

ALTER TABLE projection_totals RENAME TO projection_totals_3007;
ALTER TABLE projection_totals_3007 RENAME CONSTRAINT projection_totals_pkey TO projection_totals_3007_pkey;
CREATE TABLE projection_totals (
    projection  TEXT   NOT NULL,
    party_id    TEXT   NOT NULL,
    client_id   TEXT   NOT NULL,
    kind        TEXT   NOT NULL CHECK (kind IN ('seller_balance', 'buyer_paid', 'buyer_refunded')),
    currency    TEXT   NOT NULL,
    total_minor BIGINT NOT NULL,
    CONSTRAINT projection_totals_pkey PRIMARY KEY (party_id, projection, client_id, kind, currency)
) PARTITION BY LIST (projection);
CREATE TABLE projection_totals_ledger PARTITION OF projection_totals
    (CONSTRAINT projection_totals_ledger_projection CHECK (projection = 'ledger'))
    FOR VALUES IN ('ledger');
CREATE TABLE projection_totals_wallet PARTITION OF projection_totals
    (CONSTRAINT projection_totals_wallet_projection CHECK (projection = 'wallet'))
    FOR VALUES IN ('wallet');
INSERT INTO projection_totals (projection, party_id, client_id, kind, currency, total_minor)
SELECT projection, party_id, client_id, kind, currency, total_minor
FROM projection_totals_3007 ORDER BY party_id, projection, client_id, kind, currency;
DROP TABLE projection_totals_3007;

ANALYZE applied_events, projection_orders, projection_bookings, projection_totals;
