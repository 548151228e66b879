-- Idempotency: the request that owns a key (a random token, so a request
-- that lost its key to a takeover can neither finish nor release it), and
-- the events it decided on before appending them, so a retry re-appends
-- exactly those instead of deciding again.
ALTER TABLE handler_idempotency_keys ADD COLUMN owner TEXT;
ALTER TABLE handler_idempotency_keys ADD COLUMN pending_events TEXT;

-- Refunds reserve their amount atomically before they are appended, so
-- concurrent refunds can never add up to more than the capture. Equals the
-- sum of the order's refunds that have not failed.
ALTER TABLE handler_payment_orders ADD COLUMN reserved_minor BIGINT NOT NULL DEFAULT 0;
