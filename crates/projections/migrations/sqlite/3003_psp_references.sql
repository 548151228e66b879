-- The PSP references the ledger projection has seen, for reconciliation
-- (crates/reconcile) to match the PSP's settlement files against. Written
-- by the LEDGER projection in the same transaction as its bookings, so a
-- rebuild of the ledger reproduces it. One row per PSP reference: a charge
-- (OrderPending / OrderSucceeded / OrderSettledByWebhook) or a refund
-- (RefundSucceeded). Status moves forward only: pending -> succeeded or
-- failed; a final status is never overwritten (redelivery, reordering).
-- Amounts are signed as in the settlement file: refunds negative.
-- fee_minor is 0 while pending, for failed charges and for refunds.
-- occurred_at: microseconds since the Unix epoch of the event that set the
-- current status. Not immutable (no trigger): it is a derived index, and a
-- rebuild clears it.
CREATE TABLE ledger_psp_references (
    psp_reference TEXT   PRIMARY KEY,
    kind          TEXT   NOT NULL CHECK (kind IN ('charge', 'refund')),
    order_id      TEXT   NOT NULL,
    refund_id     TEXT,
    status        TEXT   NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed', 'refunded')),
    currency      TEXT   NOT NULL,
    amount_minor  BIGINT NOT NULL,
    fee_minor     BIGINT NOT NULL,
    occurred_at   BIGINT NOT NULL,
    event_id      TEXT   NOT NULL
);
CREATE INDEX ledger_psp_references_occurred ON ledger_psp_references (occurred_at);
CREATE INDEX ledger_psp_references_order ON ledger_psp_references (order_id);
