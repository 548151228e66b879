-- Issue 14 item 2: no duplicate index. The ledger's booking keys were
-- kept twice: in projection_bookings and in ledger_transactions
-- (booking_key UNIQUE), one row and one random-key index entry more per
-- booking. The ledger now reads its booking keys from its transactions;
-- the wallet keeps projection_bookings.
DELETE FROM projection_bookings WHERE projection = 'ledger';
ANALYZE projection_bookings;
