-- Reconciliation runs and discrepancies (crates/reconcile/README.md).
-- Instants are microseconds since the Unix epoch.

-- One row per run: (settlement date, SHA-256 of the file) makes the run id,
-- so re-running the same file finds its row. state: 'recorded' (matched and
-- written; events not all appended yet) or 'published' (all appended).
CREATE TABLE reconcile_runs (
    run_id          TEXT   PRIMARY KEY,
    settlement_date TEXT   NOT NULL,
    source          TEXT   NOT NULL,
    file_sha256     TEXT   NOT NULL,
    row_count       BIGINT NOT NULL,
    matched         BIGINT NOT NULL,
    report          TEXT   NOT NULL,
    state           TEXT   NOT NULL CHECK (state IN ('recorded', 'published')),
    created_at      BIGINT NOT NULL,
    published_at    BIGINT
);
CREATE INDEX reconcile_runs_date ON reconcile_runs (settlement_date);

-- One row per difference. The id derives from (settlement date, class,
-- reference), so a second file for the same day finding the same
-- difference finds this row instead of counting it twice.
CREATE TABLE reconcile_discrepancies (
    discrepancy_id       TEXT   PRIMARY KEY,
    settlement_date      TEXT   NOT NULL,
    run_id               TEXT   NOT NULL,
    class                TEXT   NOT NULL,
    psp_reference        TEXT   NOT NULL,
    order_ids            TEXT   NOT NULL,
    payment_id           TEXT,
    ours_currency        TEXT,
    ours_minor           BIGINT,
    theirs_currency      TEXT,
    theirs_minor         BIGINT,
    detail               TEXT   NOT NULL,
    line                 BIGINT,
    found_event_id       TEXT   NOT NULL,
    found_published      BIGINT NOT NULL DEFAULT 0,
    state                TEXT   NOT NULL CHECK (state IN ('open', 'resolved', 'expected', 'escalated')),
    action               TEXT,
    reason               TEXT,
    resolved_by          TEXT,
    adjustment_currency  TEXT,
    adjustment_minor     BIGINT,
    resolved_at          BIGINT,
    resolution_event_id  TEXT,
    resolution_published BIGINT NOT NULL DEFAULT 0,
    created_at           BIGINT NOT NULL
);
CREATE INDEX reconcile_discrepancies_date ON reconcile_discrepancies (settlement_date, state);
CREATE INDEX reconcile_discrepancies_run ON reconcile_discrepancies (run_id);
