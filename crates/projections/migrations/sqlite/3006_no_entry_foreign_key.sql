-- Issue 14 item 2: no foreign key check on the hot insert path (see the
-- PostgreSQL migration of the same number). SQLite cannot drop a
-- constraint: the table is copied, its index and triggers re-created.
CREATE TABLE ledger_entries_3006 (
    transaction_id TEXT   NOT NULL,
    line           BIGINT NOT NULL,
    account        TEXT   NOT NULL,
    currency       TEXT   NOT NULL,
    amount_minor   BIGINT NOT NULL,
    occurred_at    BIGINT NOT NULL,
    seq            BIGINT NOT NULL,
    PRIMARY KEY (transaction_id, line)
);
INSERT INTO ledger_entries_3006
    (transaction_id, line, account, currency, amount_minor, occurred_at, seq)
SELECT transaction_id, line, account, currency, amount_minor, occurred_at, seq FROM ledger_entries;
DROP TABLE ledger_entries;
ALTER TABLE ledger_entries_3006 RENAME TO ledger_entries;
CREATE INDEX ledger_entries_account ON ledger_entries (account, currency, occurred_at, seq);
CREATE TRIGGER ledger_entries_no_update BEFORE UPDATE ON ledger_entries
BEGIN SELECT RAISE(ABORT, 'ledger rows are immutable: book a reversing transaction instead'); END;
CREATE TRIGGER ledger_entries_no_delete BEFORE DELETE ON ledger_entries
BEGIN SELECT RAISE(ABORT, 'ledger rows are immutable: book a reversing transaction instead'); END;
ANALYZE ledger_entries;
