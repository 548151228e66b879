-- Issue 12 (H1): a decided request's fingerprint is kept for as long as its
-- payment or refund exists, not only for the idempotency retention. Written
-- in the transaction that stores the decided events; never deleted. Reusing
-- a key after its idempotency row was reaped answers from here: the same
-- request gets the payment's (refund's) current view, a different one 422.
CREATE TABLE handler_request_fingerprints (
    client_id       TEXT NOT NULL,
    idem_key        TEXT NOT NULL,
    request_sha256  TEXT NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('payment', 'refund')),
    resource_id     TEXT NOT NULL,
    created_ms      BIGINT NOT NULL,
    PRIMARY KEY (client_id, idem_key)
);

-- Issue 12 (M2): velocity is counted per (client, buyer), so one client's
-- payments never count against another client's buyer of the same id. Rows
-- written before this migration belong to no client ('') and age out of the
-- window.
ALTER TABLE handler_risk_velocity ADD COLUMN client_id TEXT NOT NULL DEFAULT '';
DROP INDEX handler_risk_velocity_buyer;
CREATE INDEX handler_risk_velocity_client_buyer ON handler_risk_velocity (client_id, buyer_id, at_ms);
