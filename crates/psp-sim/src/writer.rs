//! Where the simulator's writes are committed. Every write is an [`Op`]: a
//! function of a connection and its arguments whose statements belong in
//! one transaction (a key claim, a charge with its stored answer, a refund,
//! ...). The SQL of each op is in `store.rs` and is the same in every mode;
//! the mode only decides how many ops one transaction carries:
//!
//! - [`Writer::Direct`] (`full`, `relaxed`): each op in a transaction of its
//!   own on the pool, as the simulator always did.
//! - [`Writer::Batched`] (`batched`): a group commit. Ops are queued to one
//!   committer task, which runs everything queued (up to [`WRITER_BATCH_OPS_MAX`]) in
//!   one `BEGIN IMMEDIATE` ... `COMMIT` on its own connection, in arrival
//!   order, and answers every op only after that commit. There is no timer:
//!   a batch is what arrived while the previous one was committing, so a
//!   lone request waits for nothing and a busy simulator shares each commit
//!   (and its fsync) among up to [`WRITER_BATCH_OPS_MAX`] writes. If an op fails, the
//!   whole transaction is rolled back and each op of the batch is run again
//!   in a transaction of its own, in the same order, so one failure is
//!   reported to its own request only and the others still commit, as if
//!   they had never shared a transaction.
//!
//! Ops of one batch run one after the other on one connection, so each
//! sees the writes of those before it, as consecutive transactions would:
//! the outcome is that of committing them one by one in arrival order.

use crate::limits::{WRITER_BATCH_OPS_MAX, WRITER_QUEUE_OPS_MAX};
use futures::future::BoxFuture;
use sqlx::pool::PoolConnection;
use sqlx::{Connection as _, Sqlite, SqliteConnection, SqlitePool};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use storage::BeginWrite as _;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// One write: its statements, run on the connection of a write
/// transaction. Ops must not commit or roll back themselves, and must be
/// repeatable: after a failed batch an op runs again.
pub(crate) type Op<A, T> =
    for<'c> fn(&'c mut SqliteConnection, &'c A) -> BoxFuture<'c, Result<T, sqlx::Error>>;

/// Group-commit counters (for tests and curiosity).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteBatches {
    /// Transactions the committer committed or tried to.
    pub batches: u64,
    /// Ops they carried.
    pub writes: u64,
    /// Most ops one transaction carried.
    pub largest: u64,
    /// Batches that failed and were run again op by op.
    pub retried_alone: u64,
}

#[derive(Debug, Default)]
pub(crate) struct BatchCounters {
    batches: AtomicU64,
    writes: AtomicU64,
    largest: AtomicU64,
    retried_alone: AtomicU64,
}

impl BatchCounters {
    pub(crate) fn snapshot(&self) -> WriteBatches {
        WriteBatches {
            batches: self.batches.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            largest: self.largest.load(Ordering::Relaxed),
            retried_alone: self.retried_alone.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug)]
pub(crate) enum Writer {
    /// One transaction per op, on the pool.
    Direct(SqlitePool),
    /// A group commit (see the module doc).
    Batched {
        queue: mpsc::Sender<Box<dyn Job>>,
        stop: CancellationToken,
        committer: Mutex<Option<tokio::task::JoinHandle<()>>>,
        counters: Arc<BatchCounters>,
    },
}

impl Writer {
    /// Starts the committer on `conn`, a connection of its own (the only
    /// one that writes).
    pub(crate) fn batched(conn: PoolConnection<Sqlite>) -> Writer {
        let (queue, rx) = mpsc::channel(WRITER_QUEUE_OPS_MAX);
        let stop = CancellationToken::new();
        let counters = Arc::new(BatchCounters::default());
        let committer = tokio::spawn(commit_loop(conn, rx, stop.clone(), counters.clone()));
        Writer::Batched {
            queue,
            stop,
            committer: Mutex::new(Some(committer)),
            counters,
        }
    }

    /// Runs `op` with `args` and returns its output once it is committed.
    pub(crate) async fn run<A, T>(&self, args: A, op: Op<A, T>) -> Result<T, sqlx::Error>
    where
        A: Send + Sync + 'static,
        T: Send + 'static,
    {
        match self {
            Writer::Direct(pool) => {
                let mut tx = pool.begin_write().await?;
                let out = op(&mut tx, &args).await?;
                tx.commit().await?;
                Ok(out)
            }
            Writer::Batched { queue, .. } => {
                let (reply, answer) = oneshot::channel();
                let job = Box::new(Queued {
                    args,
                    op,
                    out: None,
                    reply,
                });
                queue.send(job).await.map_err(|_| sqlx::Error::PoolClosed)?;
                answer.await.map_err(|_| sqlx::Error::PoolClosed)?
            }
        }
    }

    pub(crate) fn counters(&self) -> Option<Arc<BatchCounters>> {
        match self {
            Writer::Direct(_) => None,
            Writer::Batched { counters, .. } => Some(counters.clone()),
        }
    }

    /// Commits what is queued, then stops the committer (later ops fail)
    /// and closes its connection.
    pub(crate) async fn close(&self) {
        if let Writer::Batched {
            stop, committer, ..
        } = self
        {
            stop.cancel();
            if let Some(task) = committer.lock().await.take()
                && let Err(e) = task.await
            {
                tracing::error!(error = %e, "the simulator's committer panicked");
            }
        }
    }
}

/// A queued op, type-erased for the committer.
pub(crate) trait Job: Send {
    /// Runs the op on `conn` and keeps its output until [`Job::deliver`].
    fn run<'c>(
        &'c mut self,
        conn: &'c mut SqliteConnection,
    ) -> BoxFuture<'c, Result<(), sqlx::Error>>;
    /// Answers the waiting request: the kept output once committed, or
    /// the error.
    fn deliver(self: Box<Self>, committed: Result<(), sqlx::Error>);
}

impl std::fmt::Debug for dyn Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Job")
    }
}

struct Queued<A, T> {
    args: A,
    op: Op<A, T>,
    out: Option<T>,
    reply: oneshot::Sender<Result<T, sqlx::Error>>,
}

impl<A: Send + Sync + 'static, T: Send + 'static> Job for Queued<A, T> {
    fn run<'c>(
        &'c mut self,
        conn: &'c mut SqliteConnection,
    ) -> BoxFuture<'c, Result<(), sqlx::Error>> {
        let (op, args, out) = (self.op, &self.args, &mut self.out);
        // The output of a rolled-back run is forgotten.
        *out = None;
        Box::pin(async move {
            *out = Some(op(conn, args).await?);
            Ok(())
        })
    }

    fn deliver(self: Box<Self>, committed: Result<(), sqlx::Error>) {
        let Queued { out, reply, .. } = *self;
        let answer = committed.map(|()| out.expect("a committed op has run"));
        // The request may be gone (its task is not, but be lenient).
        let _ = reply.send(answer);
    }
}

async fn commit_loop(
    mut conn: PoolConnection<Sqlite>,
    mut rx: mpsc::Receiver<Box<dyn Job>>,
    stop: CancellationToken,
    counters: Arc<BatchCounters>,
) {
    let mut batch = Vec::with_capacity(WRITER_BATCH_OPS_MAX);
    loop {
        let n = tokio::select! {
            biased;
            n = rx.recv_many(&mut batch, WRITER_BATCH_OPS_MAX) => n,
            () = stop.cancelled() => {
                // No new ops; those already queued are still committed.
                rx.close();
                rx.recv_many(&mut batch, WRITER_BATCH_OPS_MAX).await
            }
        };
        if n == 0 {
            break;
        }
        commit(&mut conn, &mut batch, &counters).await;
    }
    if let Err(e) = conn.close().await {
        tracing::warn!(error = %e, "closing the committer's connection failed");
    }
}

/// Commits `batch` in one transaction and answers every op (draining it).
async fn commit(
    conn: &mut SqliteConnection,
    batch: &mut Vec<Box<dyn Job>>,
    counters: &BatchCounters,
) {
    let n = u64::try_from(batch.len()).expect("bounded batch");
    counters.batches.fetch_add(1, Ordering::Relaxed);
    counters.writes.fetch_add(n, Ordering::Relaxed);
    counters.largest.fetch_max(n, Ordering::Relaxed);
    match run_together(conn, batch).await {
        Ok(()) => {
            for job in batch.drain(..) {
                job.deliver(Ok(()));
            }
        }
        Err(e) if batch.len() == 1 => {
            let job = batch.pop().expect("one op");
            job.deliver(Err(e));
        }
        Err(e) => {
            // Rolled back (the transaction was dropped): run each op alone,
            // so only the failing one fails.
            tracing::warn!(error = %e, writes = n, "a batched write failed; committing the batch op by op");
            counters.retried_alone.fetch_add(1, Ordering::Relaxed);
            for mut job in batch.drain(..) {
                let alone = run_together(conn, std::slice::from_mut(&mut job)).await;
                job.deliver(alone);
            }
        }
    }
}

/// Runs `jobs` in one write transaction; an error rolls all of them back.
async fn run_together(
    conn: &mut SqliteConnection,
    jobs: &mut [Box<dyn Job>],
) -> Result<(), sqlx::Error> {
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    for job in jobs.iter_mut() {
        job.run(&mut tx).await?;
    }
    tx.commit().await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pool() -> (SqlitePool, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("w.db").display());
        let storage::Db::Sqlite(pool) = storage::Db::connect(&url).await.unwrap() else {
            unreachable!("a sqlite URL")
        };
        sqlx::query("CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER NOT NULL)")
            .execute(&pool)
            .await
            .unwrap();
        (pool, dir)
    }

    /// Inserts two rows, `k` and `k2`; the second violates the key if `k2`
    /// is taken, after the first was written.
    fn insert_two<'c>(
        conn: &'c mut SqliteConnection,
        a: &'c (String, String, i64),
    ) -> BoxFuture<'c, Result<i64, sqlx::Error>> {
        Box::pin(async move {
            for k in [&a.0, &a.1] {
                sqlx::query("INSERT INTO t (k, v) VALUES (?, ?)")
                    .bind(k)
                    .bind(a.2)
                    .execute(&mut *conn)
                    .await?;
            }
            sqlx::query_scalar("SELECT COUNT(*) FROM t")
                .fetch_one(&mut *conn)
                .await
        })
    }

    /// Ops queued together share one transaction, each sees the ones
    /// before it, and a failing op fails alone: its own first row is rolled
    /// back, the others' rows are committed.
    #[tokio::test]
    async fn a_failing_op_fails_alone_and_the_batch_commits() {
        let (pool, _dir) = pool().await;
        let conn = pool.acquire().await.unwrap();
        let writer = Writer::batched(conn);
        let ops = [
            ("a", "a2", 1),
            ("b", "a2", 2), // a2 is taken by the first op
            ("c", "c2", 3),
        ];
        // Polled in order once each before the committer runs (a
        // current-thread runtime), so all three are queued, in this order,
        // when it takes its first batch.
        let answers = futures::future::join_all(
            ops.map(|(k, k2, v)| writer.run((k.to_owned(), k2.to_owned(), v), insert_two)),
        )
        .await;
        assert!(matches!(answers[0], Ok(2)), "{answers:?}");
        assert!(answers[1].is_err(), "{answers:?}");
        assert!(matches!(answers[2], Ok(4)), "{answers:?}");
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT k, v FROM t ORDER BY k")
            .fetch_all(&pool)
            .await
            .unwrap();
        let want: Vec<(String, i64)> = [("a", 1), ("a2", 1), ("c", 3), ("c2", 3)]
            .map(|(k, v)| (k.to_owned(), v))
            .into();
        assert_eq!(rows, want);
        let c = writer.counters().unwrap().snapshot();
        let want = WriteBatches {
            batches: 1,
            writes: 3,
            largest: 3,
            retried_alone: 1,
        };
        assert_eq!(c, want);
        writer.close().await;
        assert!(
            writer
                .run(("x".into(), "y".into(), 0), insert_two)
                .await
                .is_err()
        );
    }
}
