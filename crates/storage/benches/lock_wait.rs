//! Write transactions per second on one SQLite file shared by several pools
//! (as the components of `paystream up` share one), with SQLite's default
//! busy handler (sleeps 1, 2, 5, ... 100 ms between tries) next to the
//! commit-woken one `storage::Db::connect` installs, in the same run; and one
//! writer alone, the ceiling (every commit syncs: synchronous=FULL in both).
//!
//! `cargo bench -p storage --bench lock_wait`. Env: PAYSTREAM_BENCH_POOLS
//! (default 4), PAYSTREAM_BENCH_WRITERS per pool (default 4),
//! PAYSTREAM_BENCH_COMMITS per writer (default 100). Prints figures;
//! asserts only that every transaction committed.

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use std::str::FromStr;
use std::time::{Duration, Instant};
use storage::{BeginWrite, Db};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A pool as `Db::connect` made one before the commit-woken handler.
async fn default_handler_pool(url: &str) -> SqlitePool {
    let opts = SqliteConnectOptions::from_str(url)
        .expect("url")
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(10));
    SqlitePoolOptions::new()
        .max_connections(storage::SQLITE_CONNECTIONS_MAX)
        .connect_with(opts)
        .await
        .expect("pool")
}

async fn storage_pool(url: &str) -> SqlitePool {
    match Db::connect(url).await.expect("connect") {
        Db::Sqlite(p) => p,
        Db::Postgres(_) => unreachable!("sqlite URL"),
    }
}

/// Commits per second, and the 50th and 99th percentile of a
/// transaction's time from `begin_write` to its commit, ms.
#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    rate: u128,
    p50_ms: u128,
    p99_ms: u128,
}

/// Every writer of every pool commits `commits` one-row transactions.
async fn run(pools: &[SqlitePool], writers: usize, commits: usize, tag: &str) -> Figures {
    let t = Instant::now();
    let mut tasks = Vec::new();
    for (p, pool) in pools.iter().enumerate() {
        for w in 0..writers {
            let pool = pool.clone();
            let tag = format!("{tag}-{p}-{w}");
            tasks.push(tokio::spawn(async move {
                let mut took = Vec::with_capacity(commits);
                for i in 0..commits {
                    let began = Instant::now();
                    let mut tx = pool
                        .begin_write()
                        .await
                        .unwrap_or_else(|e| panic!("begin ({tag}): {e}"));
                    sqlx::query("INSERT INTO t (k, v) VALUES ($1, $2)")
                        .bind(format!("{tag}-{i}"))
                        .bind(i64::try_from(i).expect("small"))
                        .execute(&mut *tx)
                        .await
                        .expect("insert");
                    tx.commit().await.expect("commit");
                    took.push(began.elapsed());
                }
                took
            }));
        }
    }
    let mut took = Vec::new();
    for t in tasks {
        took.extend(t.await.expect("writer"));
    }
    let d = t.elapsed();
    took.sort();
    let at = |q: usize| took[(took.len() * q / 100).min(took.len() - 1)].as_millis();
    Figures {
        rate: u128::try_from(took.len()).expect("small") * 1_000_000 / d.as_micros().max(1),
        p50_ms: at(50),
        p99_ms: at(99),
    }
}

#[tokio::main]
async fn main() {
    let (pools_n, writers, commits) = (
        env("PAYSTREAM_BENCH_POOLS", 4),
        env("PAYSTREAM_BENCH_WRITERS", 4),
        env("PAYSTREAM_BENCH_COMMITS", 100),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let setup = storage_pool(&url).await;
    sqlx::query("CREATE TABLE t (k TEXT PRIMARY KEY, v BIGINT NOT NULL)")
        .execute(&setup)
        .await
        .expect("table");
    println!(
        "{pools_n} pools x {writers} writers x {commits} one-row write transactions on one SQLite file (WAL, synchronous=FULL):"
    );
    // Alternating rounds, so drift of a shared machine shows.
    let mut best = [0u128; 3];
    for round in 0..env("PAYSTREAM_BENCH_ROUNDS", 3) {
        let alone = run(
            std::slice::from_ref(&setup),
            1,
            commits * 2,
            &format!("a{round}"),
        )
        .await;
        let mut default = Vec::new();
        for _ in 0..pools_n {
            default.push(default_handler_pool(&url).await);
        }
        let d = run(&default, writers, commits, &format!("d{round}")).await;
        for p in default {
            p.close().await;
        }
        let mut woken = Vec::new();
        for _ in 0..pools_n {
            woken.push(storage_pool(&url).await);
        }
        let w = run(&woken, writers, commits, &format!("w{round}")).await;
        for p in woken {
            p.close().await;
        }
        println!(
            "  round {round}: one writer alone {:>5} commits/s | default busy handler {:>5} commits/s, p50 {:>4} ms, p99 {:>5} ms | commit-woken {:>5} commits/s, p50 {:>4} ms, p99 {:>5} ms",
            alone.rate, d.rate, d.p50_ms, d.p99_ms, w.rate, w.p50_ms, w.p99_ms
        );
        best = [
            best[0].max(alone.rate),
            best[1].max(d.rate),
            best[2].max(w.rate),
        ];
    }
    let stats = storage::lock_wait::stats();
    println!(
        "  best: alone {} | default {} ({}% of alone) | commit-woken {} ({}% of alone, {}% of default)",
        best[0],
        best[1],
        best[1] * 100 / best[0].max(1),
        best[2],
        best[2] * 100 / best[0].max(1),
        best[2] * 100 / best[1].max(1)
    );
    println!("  commit-woken: {stats:?}");
}
