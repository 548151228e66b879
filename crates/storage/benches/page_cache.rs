//! Rows per second written into growing SQLite tables keyed by random ids
//! (as the projections' are: event ids, order ids), batches of 1000 rows per
//! transaction, with SQLite's default page cache (2 MB) next to the one
//! `storage::Db` sets (`storage::SQLITE_CACHE_KIB`), in the same run;
//! printed per tenth of the rows, so a decline as the tables outgrow the
//! cache shows, and whether the larger cache removes it.
//!
//! `cargo bench -p storage --bench page_cache`. PAYSTREAM_BENCH_ROWS sets
//! the size (default 200,000). Prints figures; asserts nothing about time.

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use std::str::FromStr;
use std::time::{Duration, Instant};
use storage::BeginWrite;

const BATCH: usize = 1000;
/// The larger cache, KiB.
const LARGE_CACHE_KIB: u32 = storage::SQLITE_CACHE_KIB;

/// A pool as `storage::Db::connect` makes one, with `cache_kib` of page
/// cache per connection (None: SQLite's default).
async fn pool(url: &str, cache_kib: Option<u32>) -> SqlitePool {
    let mut opts = SqliteConnectOptions::from_str(url)
        .expect("url")
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(10));
    if let Some(kib) = cache_kib {
        opts = opts.pragma("cache_size", format!("-{kib}"));
    }
    SqlitePoolOptions::new()
        .max_connections(storage::SQLITE_CONNECTIONS_MAX)
        .connect_with(opts)
        .await
        .expect("pool")
}

/// Writes `rows` rows; returns the time of each tenth.
async fn fill(pool: &SqlitePool, rows: usize) -> Vec<Duration> {
    for ddl in [
        "CREATE TABLE events (event_id TEXT NOT NULL, projection TEXT NOT NULL, \
         at BIGINT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (projection, event_id))",
        "CREATE TABLE orders (order_id TEXT PRIMARY KEY, payment_id TEXT NOT NULL, \
         amount BIGINT NOT NULL)",
        "CREATE INDEX orders_payment ON orders (payment_id)",
    ] {
        sqlx::query(ddl).execute(pool).await.expect("ddl");
    }
    let tenth = (rows / 10).max(BATCH);
    let mut marks = Vec::new();
    let t = Instant::now();
    let mut done = 0;
    while done < rows {
        let mut tx = pool.begin_write().await.expect("begin");
        for _ in 0..BATCH {
            let id = uuid::Uuid::new_v4().to_string();
            let payment = uuid::Uuid::new_v4().to_string();
            // Look up before writing, as the projections' dedup does.
            let seen: Option<i64> = sqlx::query_scalar(
                "SELECT at FROM events WHERE projection = 'ledger' AND event_id = $1",
            )
            .bind(&id)
            .fetch_optional(&mut *tx)
            .await
            .expect("select");
            assert!(seen.is_none());
            sqlx::query(
                "INSERT INTO events (event_id, projection, at, body) VALUES ($1, 'ledger', $2, $3)",
            )
            .bind(&id)
            .bind(i64::try_from(done).expect("small"))
            .bind("x".repeat(80))
            .execute(&mut *tx)
            .await
            .expect("insert");
            sqlx::query("INSERT INTO orders (order_id, payment_id, amount) VALUES ($1, $2, 1000)")
                .bind(&id)
                .bind(&payment)
                .execute(&mut *tx)
                .await
                .expect("insert");
        }
        tx.commit().await.expect("commit");
        done += BATCH;
        if done % tenth == 0 {
            marks.push(t.elapsed());
        }
    }
    marks
}

fn slices(rows: usize, marks: &[Duration]) -> String {
    let tenth = u128::try_from((rows / 10).max(BATCH)).expect("small");
    let mut prev = Duration::ZERO;
    let mut rates = Vec::new();
    for m in marks {
        rates.push(tenth * 1_000_000 / (*m - prev).as_micros().max(1));
        prev = *m;
    }
    let first = rates.first().copied().unwrap_or(1).max(1);
    let lowest = rates.iter().copied().min().unwrap_or(0);
    format!(
        "{} rows/s per tenth; lowest {}% of the first",
        rates
            .iter()
            .map(u128::to_string)
            .collect::<Vec<_>>()
            .join(" "),
        lowest * 100 / first
    )
}

#[tokio::main]
async fn main() {
    let rows: usize = std::env::var("PAYSTREAM_BENCH_ROWS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000);
    println!(
        "{rows} rows with random keys in batches of {BATCH} (a lookup and two inserts each), \
         SQLite WAL synchronous=FULL:"
    );
    for round in 0..2 {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("a.db").display());
        let p = pool(&url, None).await;
        let d = fill(&p, rows).await;
        p.close().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("b.db").display());
        let p = pool(&url, Some(LARGE_CACHE_KIB)).await;
        let s = fill(&p, rows).await;
        p.close().await;
        let total = |m: &[Duration]| {
            u128::try_from(rows).expect("small") * 1_000_000
                / m.last().copied().unwrap_or_default().as_micros().max(1)
        };
        println!(
            "  round {round}: default cache (2 MB) {:>6} rows/s: {}",
            total(&d),
            slices(rows, &d)
        );
        println!(
            "  round {round}: cache {} MiB        {:>6} rows/s: {}",
            LARGE_CACHE_KIB / 1024,
            total(&s),
            slices(rows, &s)
        );
    }
}
