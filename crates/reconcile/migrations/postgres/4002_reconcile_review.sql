-- Review fixes (crates/reconcile/README.md).

-- Ledger references matched by a run (to a settlement row, with or without
-- differences). A reference is matched on one settlement day only: a run of
-- another day never matches it again (a second settlement of it is
-- missing_in_ledger) nor reports it missing_at_psp.
CREATE TABLE reconcile_matched_refs (
    psp_reference   TEXT   PRIMARY KEY,
    settlement_date TEXT   NOT NULL,
    run_id          TEXT   NOT NULL,
    row_reference   TEXT   NOT NULL,
    created_at      BIGINT NOT NULL
);

-- The PSP's fee of the row, kept with a status_mismatch so later runs can
-- close it when the ledger catches up with the same amount and fee.
ALTER TABLE reconcile_discrepancies ADD COLUMN theirs_fee_minor BIGINT;

-- The scheduled reconciler's watermark: the last day reconciled
-- successfully by the schedule.
CREATE TABLE reconcile_watermark (
    name       TEXT   PRIMARY KEY,
    last_day   TEXT   NOT NULL,
    updated_at BIGINT NOT NULL
);
