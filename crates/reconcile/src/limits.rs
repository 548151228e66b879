//! Every limit of reconciliation in one place (issue 17 item 4): how much
//! one run may fetch, parse, hold and write at a time, and the defaults of
//! the flags that bound its work. Each is named `*_MAX` (or `*_DEFAULT`
//! for a flag's default) with its unit, and the relations between them
//! are checked at compile time at the end of this file.

use std::time::Duration;

/// Default cap of a PSP's `Retry-After` between fetch attempts.
pub const RETRY_AFTER_MAX_DEFAULT: Duration = Duration::from_secs(60);
/// Default of `--psp-timeout-ms`: the timeout of one PSP request.
pub const PSP_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Default of `--fetch-attempts`: attempts to fetch a file before the run
/// is given up until the next day.
pub const FETCH_ATTEMPTS_MAX_DEFAULT: u32 = 8;
/// Default of `--retry-attempts`: retries of a failed scheduled run before
/// waiting for the next scheduled time.
pub const RUN_RETRIES_MAX_DEFAULT: u32 = 8;
/// Attempts of a run that collided with a concurrent one
/// (`run::retryable`).
pub const RUN_ATTEMPTS_MAX: u32 = 3;
/// Most days the schedule reconciles in one go (catching up after an
/// outage), counting the target day.
pub const CATCH_UP_DAYS_MAX: i64 = 31;

/// Rows `settlement::parse_with` hands its callback at a time (exactly
/// this many, but for the last chunk): what the parser holds before the
/// database sees it.
pub const PROGRESS_ROWS: usize = 20_000;
/// Messages of [`PROGRESS_ROWS`] references in flight from the parser:
/// enough that it seldom waits for the database.
pub const PARSER_MESSAGES_IN_FLIGHT_MAX: usize = 128;
/// Most problems listed in one settlement-file error (the total is always
/// given).
pub const PROBLEMS_SHOWN_MAX: usize = 50;
/// Discrepancy events sent before awaiting their acknowledgements.
pub const EVENTS_PER_PUBLISH_ROUND_MAX: usize = 10_000;

/// SQLite's bound-parameter limit before 3.32; the statements below keep
/// within it, whichever SQLite runs them.
pub const SQLITE_OLD_BIND_PARAMS_MAX: usize = 999;
/// Values per SQLite `IN (...)` list. PostgreSQL takes any number of
/// values in one array parameter (`= ANY($1)`, `UNNEST`), so it is never
/// chunked.
pub const SQLITE_IN_LIST_VALUES_MAX: usize = 900;
/// Rows per multi-row `VALUES` insert on SQLite (one transaction holds
/// them all; the chunk only bounds the statement's parameters); the
/// discrepancies, 15 parameters a row, go an eighth of this at a time.
pub const SQLITE_ROWS_PER_INSERT_MAX: usize = 400;
/// Claims per statement on SQLite (one JSON parameter).
pub const SQLITE_JSON_ROWS_MAX: usize = 50_000;

// An `IN (...)` list and the one parameter bound before it.
const _: () = assert!(SQLITE_IN_LIST_VALUES_MAX < SQLITE_OLD_BIND_PARAMS_MAX);
// A chunk of discrepancies and the parameter bound before its rows.
const _: () = assert!(
    (SQLITE_ROWS_PER_INSERT_MAX / 8) * crate::store::DISCREPANCY_ROW_PARAMS
        < SQLITE_OLD_BIND_PARAMS_MAX
);
