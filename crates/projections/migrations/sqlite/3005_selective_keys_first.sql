-- Issue 14 item 1: the selective column first in every key the batch
-- lookups use (see the PostgreSQL migration of the same number for why).
-- SQLite cannot change a primary key: the tables are copied.
CREATE TABLE applied_events_3005 (
    projection      TEXT   NOT NULL,
    event_id        TEXT   NOT NULL,
    applied_at      BIGINT NOT NULL,
    topic           TEXT   NOT NULL,
    kafka_partition BIGINT NOT NULL,
    kafka_offset    BIGINT NOT NULL,
    outcome         TEXT   NOT NULL DEFAULT 'applied' CHECK (outcome IN ('applied', 'rejected')),
    error_kind      TEXT,
    reason          TEXT,
    PRIMARY KEY (event_id, projection)
);
INSERT INTO applied_events_3005
    (projection, event_id, applied_at, topic, kafka_partition, kafka_offset, outcome, error_kind, reason)
SELECT projection, event_id, applied_at, topic, kafka_partition, kafka_offset, outcome, error_kind, reason
FROM applied_events;
DROP TABLE applied_events;
ALTER TABLE applied_events_3005 RENAME TO applied_events;

CREATE TABLE projection_orders_3005 (
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
    PRIMARY KEY (order_id, projection)
);
INSERT INTO projection_orders_3005
    (projection, order_id, payment_id, buyer_id, seller_id, currency, amount_minor,
     captured_minor, refunded_minor, client_id)
SELECT projection, order_id, payment_id, buyer_id, seller_id, currency, amount_minor,
     captured_minor, refunded_minor, client_id
FROM projection_orders;
DROP TABLE projection_orders;
ALTER TABLE projection_orders_3005 RENAME TO projection_orders;
CREATE INDEX projection_orders_payment ON projection_orders (payment_id);

CREATE TABLE projection_bookings_3005 (
    projection  TEXT NOT NULL,
    booking_key TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    PRIMARY KEY (booking_key, projection)
);
INSERT INTO projection_bookings_3005 (projection, booking_key, event_id)
SELECT projection, booking_key, event_id FROM projection_bookings;
DROP TABLE projection_bookings;
ALTER TABLE projection_bookings_3005 RENAME TO projection_bookings;

CREATE TABLE projection_totals_3005 (
    projection  TEXT   NOT NULL,
    party_id    TEXT   NOT NULL,
    client_id   TEXT   NOT NULL,
    kind        TEXT   NOT NULL CHECK (kind IN ('seller_balance', 'buyer_paid', 'buyer_refunded')),
    currency    TEXT   NOT NULL,
    total_minor BIGINT NOT NULL,
    PRIMARY KEY (party_id, projection, client_id, kind, currency)
);
INSERT INTO projection_totals_3005 (projection, party_id, client_id, kind, currency, total_minor)
SELECT projection, party_id, client_id, kind, currency, total_minor FROM projection_totals;
DROP TABLE projection_totals;
ALTER TABLE projection_totals_3005 RENAME TO projection_totals;

-- Statistics for the tables this migration (and the earlier ones) filled.
ANALYZE;
