-- An order whose PSP call may have created a charge we never heard about
-- (timeout, connection error, 409 key in use, unreadable answer) must not
-- be failed until the PSP says there is no charge. last_unknown_ms: when the
-- last such attempt ended (the grace period runs from there);
-- lookup_since_ms: set once attempts are used up and the order is being
-- resolved by looking up the PSP's charges (state stays 'retry_wait').
ALTER TABLE executor_orders ADD COLUMN last_unknown_ms BIGINT;
ALTER TABLE executor_orders ADD COLUMN lookup_since_ms BIGINT;

-- The lease's fencing token: a fresh value each time a dispatcher leases a
-- payment. Renewing, releasing and recording attempts require it, so a
-- dispatcher whose lease ran out and was retaken can no longer act.
ALTER TABLE executor_payments ADD COLUMN lease_owner TEXT;

-- A refund whose PSP call may have made the refund (timeout, 409, an
-- unreadable or non-final answer): when the last such attempt ended. Such a
-- refund is never given up on before the PSP shows no refund unaccounted
-- for, and it keeps counting as taken meanwhile.
ALTER TABLE executor_refunds ADD COLUMN last_unknown_ms BIGINT;

-- Where the RefundRequested came from (Kafka partition and offset): the
-- refunds of one payment share a partition, so this is their request
-- order, which created_ms (equal within a batch) and the random refund ids
-- are not.
ALTER TABLE executor_refunds ADD COLUMN source_partition INTEGER;
ALTER TABLE executor_refunds ADD COLUMN source_offset BIGINT;
