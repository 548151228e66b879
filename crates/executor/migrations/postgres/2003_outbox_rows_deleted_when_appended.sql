-- Appended outbox rows are deleted instead of marked (appended_ms stays,
-- unused): marked rows stayed in the table for ever, and on PostgreSQL
-- without vacuum their dead entries in the partial index were visited by
-- every scan of it. The outbox now only holds events still to append; the
-- per-payment read uses (payment_id, seq), the sweep the primary key.
DELETE FROM executor_outbox WHERE appended_ms IS NOT NULL;
DROP INDEX executor_outbox_unappended;
CREATE INDEX executor_outbox_payment ON executor_outbox (payment_id, seq);
