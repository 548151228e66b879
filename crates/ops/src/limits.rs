//! Every limit of the operator tools in one place (issue 17 item 4), named
//! `*_MAX` with their unit; their relations are checked at compile time at
//! the end of this file.

use std::time::Duration;

/// Longest a PostgreSQL swap waits for transactions whose snapshot is
/// older than the rebuilt tables (they could not see the rebuilt rows) to
/// end before it gives up; the rebuild is then abandoned, the live
/// projection unchanged.
pub const SWAP_OLD_SNAPSHOTS_WAIT_MAX: Duration = Duration::from_secs(600);
/// Longest a PostgreSQL swap keeps trying to take its locks on the live
/// tables (readers and the other projection's writer hold them briefly).
pub const SWAP_LOCKS_WAIT_MAX: Duration = Duration::from_secs(120);
/// Longest one attempt waits for one lock before it lets go of every lock
/// it holds and tries again: below PostgreSQL's default
/// `deadlock_timeout` (1 s), so a reader that waits for a table the swap
/// holds is never the one a deadlock aborts.
pub const SWAP_LOCK_ATTEMPT_MAX: Duration = Duration::from_millis(400);
/// Longest pause between two attempts to take the swap's locks.
pub const SWAP_LOCK_BACKOFF_MAX: Duration = Duration::from_millis(500);
/// How often a waiting swap says what it waits for.
pub const SWAP_WAIT_LOG_EVERY_MAX: Duration = Duration::from_secs(5);

/// Index builds (and `ANALYZE`s) of a shadow running at once, each on its
/// own connection: one per core of the machine this was tuned on.
pub const SHADOW_INDEX_BUILDS_MAX: usize = 2;
/// `maintenance_work_mem` of one shadow index build, in MiB (PostgreSQL's
/// default, 64, makes the larger key sorts spill to disk).
pub const SHADOW_INDEX_BUILD_MEMORY_MB_MAX: usize = 256;

/// SQLite page cache of the swap's connection, in KiB: the copy inserts
/// into the live tables' key B-trees in random key order (a table has one
/// row order but can have several unique keys), which stays in memory
/// instead of re-reading pages when the cache holds those B-trees.
pub const SQLITE_SWAP_CACHE_KIB_MAX: u32 = 512 * 1024;

const _: () = {
    assert!(SQLITE_SWAP_CACHE_KIB_MAX >= storage::SQLITE_CACHE_KIB);
    assert!(SHADOW_INDEX_BUILDS_MAX >= 1);
    assert!(SHADOW_INDEX_BUILD_MEMORY_MB_MAX >= 64);
    assert!(SWAP_LOCK_ATTEMPT_MAX.as_millis() < 1_000);
    assert!(SWAP_LOCK_BACKOFF_MAX.as_millis() < SWAP_LOCKS_WAIT_MAX.as_millis());
    assert!(SWAP_WAIT_LOG_EVERY_MAX.as_millis() < SWAP_OLD_SNAPSHOTS_WAIT_MAX.as_millis());
};
