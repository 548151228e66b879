-- Issue 14 item 2: no foreign key check on the hot insert path. Every
-- ledger entry row cost a referential-integrity trigger and an index probe
-- of ledger_transactions (measured: more than the row itself). Entries
-- are only ever written in the same transaction as their transaction, and
-- `ledger verify` (hash_chain) proves what the key proved: every entry
-- belongs to a hashed transaction, with its seq.
ALTER TABLE ledger_entries DROP CONSTRAINT IF EXISTS ledger_entries_transaction_id_fkey;
