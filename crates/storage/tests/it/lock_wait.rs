//! Writers of one SQLite file in separate pools (as the components of
//! `paystream up` share one): they queue on SQLite's write lock, are woken
//! by each other's commits, and none fails with "database is locked"; a
//! writer whose lock never comes still gives up after its timeout; and
//! the WAL is still checkpointed (our WAL hook replaces SQLite's).
//! Timings are the bench's business (`cargo bench -p storage --bench
//! lock_wait`), not these tests'.

use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use std::str::FromStr;
use std::time::Duration;
use storage::{BeginWrite, Db, SqlErrorClass, sql_error_class};

async fn pool(url: &str) -> SqlitePool {
    match Db::connect(url).await.unwrap() {
        Db::Sqlite(p) => p,
        Db::Postgres(_) => unreachable!("sqlite URL"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_of_one_file_all_commit() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("w.db").display());
    let pools = [pool(&url).await, pool(&url).await, pool(&url).await];
    sqlx::query("CREATE TABLE t (k TEXT PRIMARY KEY, n BIGINT NOT NULL)")
        .execute(&pools[0])
        .await
        .unwrap();
    sqlx::query("CREATE TABLE total (id INT PRIMARY KEY, n BIGINT NOT NULL)")
        .execute(&pools[0])
        .await
        .unwrap();
    sqlx::query("INSERT INTO total VALUES (1, 0)")
        .execute(&pools[0])
        .await
        .unwrap();
    let before = storage::lock_wait::stats();
    const WRITERS_PER_POOL: usize = 4;
    const COMMITS: i64 = 25;
    let mut tasks = Vec::new();
    for (p, pool) in pools.iter().enumerate() {
        for w in 0..WRITERS_PER_POOL {
            let pool = pool.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..COMMITS {
                    // Read-modify-write inside the transaction: a lost
                    // update would show in the total.
                    let mut tx = pool.begin_write().await?;
                    let n: i64 = sqlx::query_scalar("SELECT n FROM total WHERE id = 1")
                        .fetch_one(&mut *tx)
                        .await?;
                    sqlx::query("UPDATE total SET n = $1 WHERE id = 1")
                        .bind(n + 1)
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query("INSERT INTO t (k, n) VALUES ($1, $2)")
                        .bind(format!("{p}-{w}-{i}"))
                        .bind(i)
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                }
                Ok::<_, sqlx::Error>(())
            }));
        }
    }
    for t in tasks {
        // No writer fails: not with "database is locked", not otherwise.
        t.await.unwrap().unwrap();
    }
    let expected = i64::try_from(pools.len() * WRITERS_PER_POOL).unwrap() * COMMITS;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
        .fetch_one(&pools[1])
        .await
        .unwrap();
    let total: i64 = sqlx::query_scalar("SELECT n FROM total WHERE id = 1")
        .fetch_one(&pools[2])
        .await
        .unwrap();
    assert_eq!((rows, total), (expected, expected));
    let after = storage::lock_wait::stats();
    // The writers did queue on the lock, and commits woke them (the
    // counters are process-wide: other tests only add to them).
    assert!(after.waits > before.waits, "{before:?} -> {after:?}");
    assert!(
        after.commits >= before.commits + u64::try_from(expected).unwrap(),
        "{before:?} -> {after:?}"
    );
}

#[tokio::test]
async fn a_writer_blocked_past_its_timeout_gets_a_transient_busy_error() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("b.db").display());
    let holder = pool(&url).await;
    sqlx::query("CREATE TABLE t (x INT)")
        .execute(&holder)
        .await
        .unwrap();
    // A pool with the same handler and a short timeout.
    let opts = SqliteConnectOptions::from_str(&url).unwrap();
    let waiter = SqlitePoolOptions::new()
        .max_connections(1)
        .after_connect(|conn, _| {
            Box::pin(storage::lock_wait::install(
                conn,
                Duration::from_millis(100),
            ))
        })
        .connect_with(opts)
        .await
        .unwrap();
    let mut tx = holder.begin_write().await.unwrap();
    sqlx::query("INSERT INTO t VALUES (1)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let before = storage::lock_wait::stats();
    let e = waiter.begin_write().await.unwrap_err();
    assert!(e.to_string().contains("database is locked"), "{e}");
    assert_eq!(sql_error_class(&e), SqlErrorClass::Transient);
    assert!(storage::lock_wait::stats().timeouts > before.timeouts);
    // Once the holder is done, the same waiter writes.
    tx.commit().await.unwrap();
    let mut tx = waiter.begin_write().await.unwrap();
    sqlx::query("INSERT INTO t VALUES (2)")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
        .fetch_one(&holder)
        .await
        .unwrap();
    assert_eq!(n, 2);
}

#[tokio::test]
async fn the_wal_is_still_checkpointed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.db");
    let p = pool(&format!("sqlite://{}", file.display())).await;
    sqlx::query("CREATE TABLE t (k INTEGER PRIMARY KEY, pad BLOB NOT NULL)")
        .execute(&p)
        .await
        .unwrap();
    // 12 commits of 300 rows of about a page each: without checkpoints
    // the log would hold 3,600+ frames; checkpointed after the commit that
    // passed 1,000 frames, it is reused from its start and stays near
    // 1,300.
    let pad = vec![7u8; 3000];
    for c in 0..12i64 {
        let mut tx = p.begin_write().await.unwrap();
        for k in 0..300 {
            sqlx::query("INSERT INTO t (k, pad) VALUES ($1, $2)")
                .bind(c * 300 + k)
                .bind(&pad)
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
    }
    let wal = std::fs::metadata(dir.path().join("c.db-wal"))
        .unwrap()
        .len();
    let page: i64 = sqlx::query_scalar("PRAGMA page_size")
        .fetch_one(&p)
        .await
        .unwrap();
    let frames = wal / (u64::try_from(page).unwrap() + 24);
    assert!(
        frames < 2500,
        "the WAL has {frames} frames: never checkpointed?"
    );
}

#[tokio::test]
async fn a_log_kept_long_by_a_reader_is_not_checkpointed_at_every_commit() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("r.db");
    let url = format!("sqlite://{}", file.display());
    let p = pool(&url).await;
    let reader = pool(&url).await;
    sqlx::query("CREATE TABLE t (k INTEGER PRIMARY KEY, pad BLOB NOT NULL)")
        .execute(&p)
        .await
        .unwrap();
    // A reader in a transaction from the start: the log cannot be started
    // over while it lasts, so it stays above the threshold.
    let mut snapshot = reader.begin().await.unwrap();
    let _: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
        .fetch_one(&mut *snapshot)
        .await
        .unwrap();
    let pad = vec![7u8; 3000];
    let insert = |k: i64| {
        let (p, pad) = (p.clone(), pad.clone());
        async move {
            let mut tx = p.begin_write().await.unwrap();
            sqlx::query("INSERT INTO t (k, pad) VALUES ($1, $2)")
                .bind(k)
                .bind(pad)
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
    };
    // Past the threshold in one transaction of 1,200 pages...
    let mut tx = p.begin_write().await.unwrap();
    for k in 0..1200 {
        sqlx::query("INSERT INTO t (k, pad) VALUES ($1, $2)")
            .bind(k)
            .bind(&pad)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    // ...then 100 small commits (a few frames each, far from 1,000 more).
    let before = storage::lock_wait::stats();
    for k in 2000..2100 {
        insert(k).await;
    }
    let after = storage::lock_wait::stats();
    // Other tests of this binary may checkpoint meanwhile (the counter is
    // process-wide), but not 100 times: SQLite's own hook would have
    // checkpointed after each of these commits.
    assert!(
        after.checkpoints - before.checkpoints < 50,
        "{before:?} -> {after:?}"
    );
    snapshot.rollback().await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
        .fetch_one(&p)
        .await
        .unwrap();
    assert_eq!(n, 1300);
}
