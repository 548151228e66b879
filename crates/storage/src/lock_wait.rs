//! Waiting for SQLite's write lock without oversleeping.
//!
//! The components of `paystream up` / `paystream bench` share one SQLite
//! file, each with its own pool, and their write transactions queue on
//! SQLite's single write lock ([`crate::BeginWrite`]). SQLite's default busy
//! handler sleeps 1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50, 100, 100, ... ms
//! between tries whatever happens meanwhile: a waiting writer sleeps on for
//! up to 100 ms after the lock was freed, and whoever happens to try at the
//! right moment (usually the writer that just committed) takes it again,
//! so a few transactions wait for seconds.
//!
//! [`install`] replaces it on a connection with a handler woken by the
//! commits themselves: the connections this process opens on a file share
//! a gate (a commit counter and a condition variable); SQLite's WAL hook,
//! which runs after a commit has released the write lock, counts the commit
//! and wakes one waiter, which tries again at once (and, once it has
//! committed, wakes the next). A release that no WAL hook reports (a
//! rollback, a write transaction that wrote nothing, a commit by another
//! process) is found by polling, every [`POLL_MIN`] at first, doubling up
//! to [`POLL_MAX`] while no commit wakes the waiter. The timeout is kept:
//! after it the statement fails with `SQLITE_BUSY` ("database is locked")
//! as before. `cargo bench -p storage --bench lock_wait` compares both
//! handlers.
//!
//! Durability is untouched: `synchronous` and the journal mode are not
//! changed, and every commit still syncs. Installing the WAL hook replaces
//! SQLite's automatic checkpoint (itself a WAL hook), so ours checkpoints as
//! SQLite's does (passively, in the committing connection, once the log holds
//! [`AUTOCHECKPOINT_FRAMES`] frames), but once per that many new frames
//! instead of after every commit: while readers keep the log from being
//! started over it stays above the threshold, and SQLite's hook then made
//! every commit checkpoint, i.e. sync the log and the database file once more
//! each (`paystream bench` saw a checkpoint per 3-4 commits). A checkpoint
//! only copies committed pages from the log into the database file; how
//! often it runs bounds the log's size, not what survives a crash.
//!
//! A later `PRAGMA busy_timeout` or `PRAGMA wal_autocheckpoint` on the
//! connection would put SQLite's own handler or hook back (correct, only
//! slower again); nothing in paystream issues them.
//!
//! This is the workspace's only unsafe code: three FFI calls into the SQLite
//! library sqlx links (`libsqlite3-sys`, the version sqlx depends on), made
//! while sqlx's lock handle guarantees its worker thread is not using the
//! connection, and one checkpoint call from inside the WAL hook. The
//! callbacks get a plain number as their context (no pointer to free or to
//! outlive), and never unwind into C.

#![allow(unsafe_code)]

use libsqlite3_sys as ffi;
use sqlx::sqlite::SqliteConnection;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::ffi::{CStr, c_char, c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Gates, shared by files whose paths hash alike (two files on one gate
/// only wake each other's waiters for nothing).
const GATES: usize = 64;
static GATE: [Gate; GATES] = [const { Gate::new() }; GATES];

/// Log frames after which a commit checkpoints: SQLite's default
/// (`SQLITE_DEFAULT_WAL_AUTOCHECKPOINT`), whose hook ours replaces.
pub const AUTOCHECKPOINT_FRAMES: c_int = 1000;

/// Waits between two tries when no commit wakes the waiter (a rollback
/// or a write transaction that wrote nothing freed the lock, another
/// process holds it, or another waiter was woken): the first, doubling
/// while no commit wakes it, up to the last.
pub const POLL_MIN: Duration = Duration::from_millis(1);
pub const POLL_MAX: Duration = Duration::from_millis(8);

/// Commits on the gate's files by connections of this process.
#[derive(Debug)]
struct Gate {
    commits: Mutex<u64>,
    committed: Condvar,
}

impl Gate {
    const fn new() -> Gate {
        Gate {
            commits: Mutex::new(0),
            committed: Condvar::new(),
        }
    }

    fn commits(&self) -> u64 {
        *self.commits.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn commit(&self) {
        let mut n = self.commits.lock().unwrap_or_else(PoisonError::into_inner);
        *n = n.wrapping_add(1);
        drop(n);
        // One waiter per commit: it takes the lock and its own commit
        // wakes the next; waking them all would only have them fight for
        // it (on two cores, delaying the one that got it).
        self.committed.notify_one();
    }

    /// Waits until a commit wakes us or `at_most` passed; returns the
    /// count then and whether a commit woke us. Returns at once if the
    /// count differs from `seen` already (a commit since our last try).
    fn wait_past(&self, seen: u64, at_most: Duration) -> (u64, bool) {
        let n = self.commits.lock().unwrap_or_else(PoisonError::into_inner);
        if *n != seen {
            return (*n, true);
        }
        let (n, waited) = self
            .committed
            .wait_timeout(n, at_most)
            .unwrap_or_else(PoisonError::into_inner);
        (*n, !waited.timed_out())
    }
}

/// Counters of this process's lock waits (all files), for tests,
/// benchmarks and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Times a statement found a lock taken (the first call of a wait).
    pub waits: u64,
    /// Retries after a commit of this process was seen.
    pub woken: u64,
    /// Retries after a poll with no commit seen.
    pub polled: u64,
    /// Waits given up after the timeout (the statement failed with
    /// `SQLITE_BUSY`).
    pub timeouts: u64,
    /// Commits reported by the WAL hook.
    pub commits: u64,
    /// Checkpoints the WAL hook started.
    pub checkpoints: u64,
}

static WAITS: AtomicU64 = AtomicU64::new(0);
static WOKEN: AtomicU64 = AtomicU64::new(0);
static POLLED: AtomicU64 = AtomicU64::new(0);
static TIMEOUTS: AtomicU64 = AtomicU64::new(0);
static COMMITS: AtomicU64 = AtomicU64::new(0);
static CHECKPOINTS: AtomicU64 = AtomicU64::new(0);

/// This process's lock waits so far.
pub fn stats() -> Stats {
    Stats {
        waits: WAITS.load(Relaxed),
        woken: WOKEN.load(Relaxed),
        polled: POLLED.load(Relaxed),
        timeouts: TIMEOUTS.load(Relaxed),
        commits: COMMITS.load(Relaxed),
        checkpoints: CHECKPOINTS.load(Relaxed),
    }
}

/// A wait in progress: when it began, the gate's count at its last try
/// and how many polls in a row saw no commit.
#[derive(Debug, Clone, Copy)]
struct Wait {
    began: Instant,
    seen: u64,
    quiet: u32,
}

thread_local! {
    /// The wait in progress on this thread. SQLite calls a connection's
    /// busy handler on the thread running the statement, with `count` 0
    /// at the start of each wait.
    static WAIT: Cell<Option<Wait>> = const { Cell::new(None) };
}

/// What the callbacks get as their context: the gate and the timeout,
/// packed into the pointer's address (it is never dereferenced).
fn pack(gate: usize, timeout: Duration) -> *mut c_void {
    let ms = usize::try_from(timeout.as_millis())
        .unwrap_or(usize::MAX)
        .min(u32::MAX as usize);
    std::ptr::without_provenance_mut(ms * GATES + gate % GATES)
}

fn unpack(ctx: *mut c_void) -> (&'static Gate, Duration) {
    let v = ctx.addr();
    let ms = u64::try_from(v / GATES).unwrap_or(u64::MAX);
    (&GATE[v % GATES], Duration::from_millis(ms))
}

/// The gate of a database file, by its full path (FNV-1a).
fn gate_of(path: &[u8]) -> usize {
    usize::try_from(path_hash(path) % GATES as u64).unwrap_or(0)
}

/// FNV-1a of a database file's full path.
fn path_hash(path: &[u8]) -> u64 {
    path.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Frames in the log at the last checkpoint started, per database file
/// (by [`path_hash`] of its full path: unlike the gates, two files never
/// share this in practice, so one file's checkpoints cannot put off or
/// hurry another's).
static CHECKPOINTED_AT: Mutex<BTreeMap<u64, c_int>> = Mutex::new(BTreeMap::new());

/// The key of `db`'s `schema` file in [`CHECKPOINTED_AT`].
///
/// # Safety
/// `db` and `schema` as SQLite passes them to its WAL hook.
unsafe fn file_key(db: *mut ffi::sqlite3, schema: *const c_char) -> u64 {
    // SAFETY: per the function's contract; the returned name (NULL, or a
    // NUL-terminated string owned by the connection) is read at once.
    unsafe {
        let name = ffi::sqlite3_db_filename(db, schema);
        if name.is_null() {
            0
        } else {
            path_hash(CStr::from_ptr(name).to_bytes())
        }
    }
}

fn checkpointed_at() -> std::sync::MutexGuard<'static, BTreeMap<u64, c_int>> {
    CHECKPOINTED_AT
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// Puts the commit-woken busy handler (giving up after `timeout`) and the
/// WAL hook on `conn`. For a pool's `after_connect`.
pub async fn install(conn: &mut SqliteConnection, timeout: Duration) -> Result<(), sqlx::Error> {
    let mut handle = conn.lock_handle().await?;
    let db = handle.as_raw_handle().as_ptr();
    // SAFETY: `db` is the open connection; while `handle` lives, sqlx's
    // worker thread makes no call on it. The name is a NUL-terminated
    // literal. The returned file name (NULL, or a NUL-terminated string
    // owned by the connection, "" for a temporary or in-memory database)
    // is read here, before anything could change it.
    let gate = unsafe {
        let name = ffi::sqlite3_db_filename(db, c"main".as_ptr());
        if name.is_null() {
            0
        } else {
            gate_of(CStr::from_ptr(name).to_bytes())
        }
    };
    let ctx = pack(gate, timeout);
    // SAFETY: as above for `db`; the callbacks are `extern "C"` with the
    // signatures SQLite expects, never unwind, and treat `ctx` as a number.
    let rc = unsafe {
        let rc = ffi::sqlite3_busy_handler(db, Some(busy), ctx);
        ffi::sqlite3_wal_hook(db, Some(committed), ctx);
        rc
    };
    if rc != ffi::SQLITE_OK {
        return Err(sqlx::Error::Protocol(format!(
            "installing the SQLite busy handler failed ({rc})"
        )));
    }
    Ok(())
}

/// SQLite's busy handler: non-zero means "try again", zero "give up".
extern "C" fn busy(ctx: *mut c_void, count: c_int) -> c_int {
    catch_unwind(AssertUnwindSafe(|| busy_wait(ctx, count))).unwrap_or(0)
}

fn busy_wait(ctx: *mut c_void, count: c_int) -> c_int {
    let (gate, timeout) = unpack(ctx);
    let now = Instant::now();
    let Some(wait) = WAIT.get().filter(|_| count > 0) else {
        // The lock was taken a moment ago: note the commits so far and
        // try once more at once (it may be free already).
        WAITS.fetch_add(1, Relaxed);
        WAIT.set(Some(Wait {
            began: now,
            seen: gate.commits(),
            quiet: 0,
        }));
        return 1;
    };
    let left = timeout.saturating_sub(now.saturating_duration_since(wait.began));
    if left.is_zero() {
        WAIT.set(None);
        TIMEOUTS.fetch_add(1, Relaxed);
        return 0;
    }
    // Until a commit wakes us, or for a poll of POLL_MIN, doubling while
    // no commit comes, up to POLL_MAX. `seen` was read before the last
    // try, so a commit between that try and now is not missed: the wait
    // returns at once.
    let poll = (POLL_MIN * (1u32 << wait.quiet.min(16)))
        .min(POLL_MAX)
        .min(left);
    let (seen, woken) = gate.wait_past(wait.seen, poll);
    let quiet = if woken {
        WOKEN.fetch_add(1, Relaxed);
        0
    } else {
        POLLED.fetch_add(1, Relaxed);
        wait.quiet.saturating_add(1)
    };
    WAIT.set(Some(Wait {
        began: wait.began,
        seen,
        quiet,
    }));
    1
}

/// Whether a commit that left `frames` frames in the log of `schema`
/// checkpoints: the main database's once per [`AUTOCHECKPOINT_FRAMES`] new
/// frames (or when the log was started over since), an attached one's
/// every time (SQLite's rule; paystream's pools attach none).
fn due(key: u64, schema: *const c_char, frames: c_int) -> bool {
    // SAFETY: SQLite passes the schema name as a NUL-terminated string,
    // valid for the duration of the hook.
    let main = !schema.is_null() && unsafe { CStr::from_ptr(schema) } == c"main";
    if !main {
        return true;
    }
    // Of commits racing here, one checkpoints (under the lock).
    let mut files = checkpointed_at();
    let last = files.get(&key).copied().unwrap_or(0);
    let due = frames < last || frames - last >= AUTOCHECKPOINT_FRAMES;
    if due {
        files.insert(key, frames);
    }
    due
}

/// SQLite's WAL hook: called after a commit wrote `frames` frames in
/// total to the log of `schema` and released the write lock.
extern "C" fn committed(
    ctx: *mut c_void,
    db: *mut ffi::sqlite3,
    schema: *const c_char,
    frames: c_int,
) -> c_int {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        let (gate, _) = unpack(ctx);
        COMMITS.fetch_add(1, Relaxed);
        gate.commit();
    }));
    // SAFETY: `db` and `schema` are what SQLite passed to its WAL hook.
    let key = || unsafe { file_key(db, schema) };
    let checkpoint = frames >= AUTOCHECKPOINT_FRAMES
        && catch_unwind(AssertUnwindSafe(|| due(key(), schema, frames))).unwrap_or(false);
    if checkpoint {
        // SAFETY: `db` and `schema` are what SQLite passed to its WAL hook,
        // valid for this call; a checkpoint is what the hook is for (SQLite's
        // own auto-checkpoint hook makes this same call).
        CHECKPOINTS.fetch_add(1, Relaxed);
        let rc = unsafe { ffi::sqlite3_wal_checkpoint(db, schema) };
        if rc != ffi::SQLITE_OK {
            // Not done (busy, or failed): the next commit tries again, as
            // after SQLite's own hook.
            let _ = catch_unwind(AssertUnwindSafe(|| checkpointed_at().insert(key(), 0)));
        }
    }
    ffi::SQLITE_OK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_round_trips() {
        for (gate, ms) in [(0, 0), (63, 10_000), (5, 1), (17, u64::from(u32::MAX))] {
            let (g, t) = unpack(pack(gate, Duration::from_millis(ms)));
            assert!(std::ptr::eq(g, &GATE[gate]));
            assert_eq!(t, Duration::from_millis(ms));
        }
    }

    /// Two files (which may share a gate) each checkpoint once per
    /// AUTOCHECKPOINT_FRAMES of their own log: one's checkpoints neither
    /// put off nor hurry the other's.
    #[test]
    fn each_file_keeps_its_own_checkpoint_count() {
        let main = c"main".as_ptr();
        let (a, b) = (path_hash(b"/t/unit-a.db"), path_hash(b"/t/unit-b.db"));
        assert!(due(a, main, 1000));
        assert!(due(b, main, 1200), "b's first checkpoint, whatever a did");
        assert!(!due(a, main, 1500));
        assert!(due(a, main, 2000));
        assert!(
            !due(b, main, 1900),
            "b checkpointed at 1200, a's 2000 does not count"
        );
        assert!(due(b, main, 2200));
        assert!(due(b, main, 1000), "b's log was started over since");
    }

    #[test]
    fn files_spread_over_gates() {
        let a = gate_of(b"/tmp/a/paystream.db");
        let b = gate_of(b"/tmp/b/paystream.db");
        assert!(a < GATES && b < GATES);
        assert_eq!(a, gate_of(b"/tmp/a/paystream.db"));
    }
}
