//! Every limit of the executor in one place (issue 17 item 4): the sizes
//! and counts that bound its work, and the defaults of the flags that do.
//! Each is named `*_MAX` (or `*_DEFAULT` for a flag's default) with its
//! unit, and the relations between them are checked at compile time at
//! the end of this file.

/// Most payments leased and worked as one batch. On PostgreSQL a batch's
/// statements bind one array per column, whatever the batch size; on
/// SQLite they are cut into statements of [`SQLITE_ROWS_PER_STATEMENT_MAX`]
/// rows. Either way they stay below the bind-parameter limits.
pub const PAYMENTS_PER_BATCH_MAX: usize = 256;
/// Most outbox rows the sweeper re-appends per pass.
pub const OUTBOX_ROWS_PER_PASS_MAX: i64 = 1_000;
/// Rows per multi-row statement on SQLite: its round trips are
/// in-process, so a batch is simply cut into multi-row statements inside
/// one transaction.
pub const SQLITE_ROWS_PER_STATEMENT_MAX: usize = 100;
/// Most parameters one SQLite statement may bind: `SQLITE_MAX_VARIABLE_NUMBER`
/// of SQLite 3.32 and later (what sqlx's bundled SQLite is).
pub const SQLITE_BIND_PARAMS_MAX: usize = 32_766;
/// Largest PSP answer read; a longer one is not read further and counts
/// as unreadable (a PSP's JSON answers are a few KiB).
pub const PSP_ANSWER_BYTES_MAX: usize = 1024 * 1024;
/// Largest accepted webhook body.
pub const WEBHOOK_BODY_BYTES_MAX: usize = 256 * 1024;
/// Longest card token the PSP takes, in bytes.
pub const CARD_TOKEN_LEN_MAX: usize = 255;

/// Default of `--max-in-flight`: most payments executed at once (see
/// `ExecutorArgs::max_in_flight` why).
pub const PAYMENTS_IN_FLIGHT_MAX_DEFAULT: usize = 512;
/// Default of `--psp-timeout-ms`: the timeout of one PSP request.
pub const PSP_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Default of `--max-attempts`: most PSP attempts per order or refund.
pub const ATTEMPTS_MAX_DEFAULT: u32 = 8;
/// Default of `--max-retry-secs`: most time from the first attempt after
/// which transient errors are no longer retried.
pub const RETRY_SECS_MAX_DEFAULT: u64 = 600;
/// Default of `--backoff-base-ms`: the first retry delay.
pub const BACKOFF_BASE_MS_DEFAULT: u64 = 200;
/// Default of `--backoff-cap-ms`: the largest retry delay.
pub const BACKOFF_CAP_MS_DEFAULT: u64 = 30_000;
/// Default of `--lease-secs`: how long a claimed payment is reserved to
/// its executor.
pub const LEASE_SECS_DEFAULT: u64 = 60;

/// The shortest safe payment lease for a PSP timeout: a few PSP calls
/// plus slack (the lease is renewed during calls, but a stalled database
/// or scheduler can delay that). A shorter `--lease-secs` is warned about
/// at start.
pub const fn lease_floor_ms(psp_timeout_ms: u64) -> u64 {
    psp_timeout_ms.saturating_mul(3).saturating_add(30_000)
}

// The default lease outlasts a few default PSP calls.
const _: () = assert!(LEASE_SECS_DEFAULT * 1000 >= lease_floor_ms(PSP_TIMEOUT_MS_DEFAULT));
// The widest SQLite multi-row statement (the outcomes of a chunk) stays
// within SQLite's bind-parameter limit.
const _: () = assert!(
    crate::store::OUTCOME_LEADING_PARAMS
        + SQLITE_ROWS_PER_STATEMENT_MAX * crate::store::OUTCOME_ROW_PARAMS
        <= SQLITE_BIND_PARAMS_MAX
);
// Back-off: the first delay is at most the largest, which is well within
// the time transient errors are retried for.
const _: () = assert!(BACKOFF_BASE_MS_DEFAULT <= BACKOFF_CAP_MS_DEFAULT);
const _: () = assert!(BACKOFF_CAP_MS_DEFAULT < RETRY_SECS_MAX_DEFAULT * 1000);
// A PSP request ends (times out) well before the retry window does.
const _: () = assert!(PSP_TIMEOUT_MS_DEFAULT < RETRY_SECS_MAX_DEFAULT * 1000);
// Two full batches in flight, so one batch's commits and appends overlap
// the other's PSP calls (see `ExecutorArgs::max_in_flight`).
const _: () = assert!(PAYMENTS_IN_FLIGHT_MAX_DEFAULT >= 2 * PAYMENTS_PER_BATCH_MAX);
