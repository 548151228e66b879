//! Every limit of the projections in one place (issue 17 item 4): the
//! bounds on amounts and totals, on the sizes of statements and pages,
//! and the defaults of the flags that bound the work. Each is named
//! `*_MAX` (or `*_DEFAULT` for a default) with its unit, and the relations
//! between them are checked at compile time at the end of this file.

use events::Money;

/// Largest amount booked, in minor units: 10^15, ten trillion in a
/// two-decimal currency. Far above any real payment, and far enough below
/// `i64::MAX` (~9.2 * 10^18) that running totals (wallets, buyer totals,
/// ledger sums) of thousands of maximal events still fit (checked below).
/// Larger amounts are rejected as `overflow` in the pure decision, so a
/// data problem never becomes a database error that blocks the partition
/// (PostgreSQL `bigint out of range`) or a silent REAL (SQLite).
pub const AMOUNT_MINOR_MAX: i64 = Money::MAX_MINOR;
/// Largest magnitude a running total (wallet balance, buyer total, hence
/// a merchant account's balance) may reach: `i64::MAX`. An event that
/// would take one beyond it is rejected as `total_overflow`
/// (dead-lettered) instead of failing in the database and stalling the
/// partition.
pub const TOTAL_MINOR_MAX: i64 = i64::MAX;
/// Longest PSP reference booked, in characters (the simulator's and real
/// PSPs' ids are far shorter).
pub const PSP_REFERENCE_LEN_MAX: usize = 255;

/// Default of `--batch-size` (`PAYSTREAM_PROJECTIONS_BATCH`): most events
/// applied per database transaction.
pub const BATCH_EVENTS_DEFAULT: u32 = 1_000;
/// Largest `--batch-size` accepted.
pub const BATCH_EVENTS_MAX: u32 = 10_000;

/// Most rows per multi-row statement on SQLite (PostgreSQL binds one
/// array per column, whatever the row count).
pub const ROWS_PER_STATEMENT_MAX: usize = 1000;
/// Most columns of a table written with `sql::insert_many` (the widest,
/// `ledger_transactions`, has 11).
pub const INSERT_COLUMNS_MAX: usize = 16;
/// Most parameters one SQLite statement may bind: `SQLITE_MAX_VARIABLE_NUMBER`
/// of SQLite 3.32 and later (what sqlx's bundled SQLite is).
pub const SQLITE_BIND_PARAMS_MAX: usize = 32_766;
/// Bytes per COPY message when rebuilding (PostgreSQL accepts any split).
pub const COPY_MESSAGE_BYTES_MAX: usize = 1 << 20;

/// Connections of the query API's own pool: queries can never take the
/// consumers' connections, however many arrive.
pub const QUERY_CONNECTIONS_MAX: u32 = 4;
/// Default of `QueryLimits::max_in_flight`: requests the query API serves
/// at once; more get 503 with `Retry-After`.
pub const QUERIES_IN_FLIGHT_MAX_DEFAULT: usize = 32;
/// Most rows one history page returns.
pub const HISTORY_LIMIT_MAX: i64 = 1000;
/// Rows of a history page when the request does not say.
pub const HISTORY_LIMIT_DEFAULT: i64 = 100;
/// Most violations `ledger verify` lists per check; the count is always
/// complete.
pub const VIOLATIONS_LISTED_MAX: usize = 50;
/// Ledger transactions `ledger verify` reads per round trip while walking
/// the hash chain.
pub const CHAIN_PAGE_ROWS_MAX: i64 = 5000;
/// Most events a rebuild's in-memory replay sizes its maps for up front
/// (`bulk::Replay::with_capacity`); beyond, they grow as needed.
pub const REPLAY_PRESIZED_EVENTS_MAX: usize = 4_000_000;

// Thousands of maximal amounts fit in a running total.
const _: () = assert!(AMOUNT_MINOR_MAX as i128 * 1000 <= TOTAL_MINOR_MAX as i128);
// A batch's default size is one it accepts.
const _: () = assert!(1 <= BATCH_EVENTS_DEFAULT && BATCH_EVENTS_DEFAULT <= BATCH_EVENTS_MAX);
// A multi-row statement of the widest table binds within SQLite's limit
// (`sql::insert_many` debug-asserts the width).
const _: () = assert!(ROWS_PER_STATEMENT_MAX * INSERT_COLUMNS_MAX <= SQLITE_BIND_PARAMS_MAX);
// `IN (...)` lists are chunked by the same row count, one parameter each.
const _: () = assert!(ROWS_PER_STATEMENT_MAX <= SQLITE_BIND_PARAMS_MAX);
// The default history page is a valid one.
const _: () = assert!(1 <= HISTORY_LIMIT_DEFAULT && HISTORY_LIMIT_DEFAULT <= HISTORY_LIMIT_MAX);
// More requests may wait for the query pool than it has connections, so
// every connection is used before requests are turned away.
const _: () = assert!(QUERIES_IN_FLIGHT_MAX_DEFAULT >= QUERY_CONNECTIONS_MAX as usize);
