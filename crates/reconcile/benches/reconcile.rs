//! Seconds to reconcile a settlement file of N rows (default 1,000,000)
//! against a ledger holding those references, on PostgreSQL and SQLite,
//! next to the seconds to merely read and parse the same file in the same
//! run. Prints figures; asserts nothing about time.
//!
//! `cargo bench -p reconcile [-- ROWS]` (or RECONCILE_BENCH_ROWS); needs
//! PostgreSQL on 127.0.0.1:5432 (`PAYSTREAM_TEST_DATABASE_URL`) and a
//! broker on 127.0.0.1:9092 (`PAYSTREAM_TEST_BROKERS`; the run event is
//! published). Use a fresh broker: one holding thousands of topics is
//! slower.
//!
//! The ledger side is bulk-loaded straight into `ledger_psp_references`
//! (not built through `apply_batch`, which would take far longer than the
//! thing measured): the reconcile path reads only that table (plus
//! `projection_orders` for the payment ids of discrepancies, none here).

use reconcile::matching::Tolerance;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

fn secs(d: Duration) -> String {
    format!("{}.{:03}", d.as_secs(), d.subsec_millis())
}
use storage::Db;

const DAY: &str = "2026-02-03";
const CHUNK: usize = 5_000;

fn row(i: usize) -> (String, String, i64, i64) {
    let n = i64::try_from(i).expect("fits");
    let amount = 500 + (n * 7919) % 100_000;
    let fee = amount * 29 / 1000 + 30;
    (
        format!("ch_bench_{i:09}"),
        uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, format!("o{i}").as_bytes()).to_string(),
        amount,
        fee,
    )
}

async fn load(db: &Db, n: usize, day_us: i64) {
    let step = 86_400_000_000 / i64::try_from(n.max(1)).expect("fits");
    let mut i = 0;
    while i < n {
        let end = (i + CHUNK).min(n);
        match db {
            Db::Postgres(p) => {
                let (mut r, mut o, mut a, mut f, mut t) = (vec![], vec![], vec![], vec![], vec![]);
                for j in i..end {
                    let (rf, or, am, fe) = row(j);
                    r.push(rf);
                    o.push(or);
                    a.push(am);
                    f.push(fe);
                    t.push(day_us + i64::try_from(j).expect("fits") * step);
                }
                sqlx::query(
                    "INSERT INTO ledger_psp_references (psp_reference, kind, order_id, refund_id, status, currency, amount_minor, fee_minor, occurred_at, event_id) \
                     SELECT r, 'charge', o, NULL, 'succeeded', 'EUR', a, f, t, 'bench' FROM UNNEST($1::TEXT[], $2::TEXT[], $3::BIGINT[], $4::BIGINT[], $5::BIGINT[]) AS x(r, o, a, f, t)",
                )
                .bind(&r)
                .bind(&o)
                .bind(&a)
                .bind(&f)
                .bind(&t)
                .execute(p)
                .await
                .expect("bulk load");
            }
            Db::Sqlite(p) => {
                let mut tx = p.begin().await.expect("tx");
                for part in (i..end).collect::<Vec<_>>().chunks(500) {
                    let vals = vec![
                        "(?, 'charge', ?, NULL, 'succeeded', 'EUR', ?, ?, ?, 'bench')";
                        part.len()
                    ]
                    .join(",");
                    let sql = format!(
                        "INSERT INTO ledger_psp_references (psp_reference, kind, order_id, refund_id, status, currency, amount_minor, fee_minor, occurred_at, event_id) VALUES {vals}"
                    );
                    let mut q = sqlx::query(&sql);
                    for &j in part {
                        let (rf, or, am, fe) = row(j);
                        q = q
                            .bind(rf)
                            .bind(or)
                            .bind(am)
                            .bind(fe)
                            .bind(day_us + i64::try_from(j).expect("fits") * step);
                    }
                    q.execute(&mut *tx).await.expect("bulk load");
                }
                tx.commit().await.expect("commit");
            }
        }
        i = end;
    }
    // Statistics, as the ledger projection's own bulk writes take them.
    match db {
        Db::Postgres(p) => sqlx::raw_sql("ANALYZE ledger_psp_references")
            .execute(p)
            .await
            .map(drop),
        Db::Sqlite(p) => {
            sqlx::raw_sql("PRAGMA analysis_limit = 1000; ANALYZE ledger_psp_references")
                .execute(p)
                .await
                .map(drop)
        }
    }
    .expect("analyze");
}

fn file(n: usize, day_us: i64) -> Vec<u8> {
    let step = 86_400_000_000 / i64::try_from(n.max(1)).expect("fits");
    let mut s = String::with_capacity(n * 100);
    s.push_str("psp_reference,order_id,amount_minor,currency,status,fee_minor,settled_at\n");
    for j in 0..n {
        let (rf, or, am, fe) = row(j);
        let at =
            events::Timestamp::from_micros(day_us + i64::try_from(j).expect("fits") * step + 1_000);
        writeln!(s, "{rf},{or},{am},EUR,succeeded,{fe},{at}").expect("write");
    }
    s.into_bytes()
}

async fn bench(name: &str, db: Db, n: usize) {
    reconcile::migrate(&db).await.expect("migrate");
    let k = testkit::TestKafka::new(1).await;
    let date = reconcile::settlement::parse_date(DAY).expect("date");
    let day_us = reconcile::settlement::day_start_ms(date) * 1_000;
    let t = Instant::now();
    load(&db, n, day_us).await;
    let load_d = t.elapsed();
    let bytes = file(n, day_us);
    // Baseline: read and parse only.
    let t = Instant::now();
    let parsed = reconcile::settlement::parse(&bytes, Some(date)).expect("parses");
    let parse_d = t.elapsed();
    assert_eq!(parsed.rows.len(), n);
    drop(parsed);
    let t = Instant::now();
    let (report, timings) = reconcile::reconcile_bytes(
        &db,
        &k.producer,
        &bytes,
        "bench",
        Some(date),
        Tolerance::default(),
    )
    .await
    .expect("reconciles");
    let total_d = t.elapsed();
    assert_eq!(report.matched, i64::try_from(n).expect("fits"));
    assert!(report.discrepancies.is_empty());
    let ms = |d: Duration| d.as_millis().max(1);
    let ratio10 = ms(total_d) * 10 / ms(parse_d);
    let rows_per_s = u128::try_from(n).expect("fits") * 1000 / ms(total_d);
    // Lookups and (PostgreSQL) most of the claims overlap the parse.
    println!(
        "{name:<9}   phases: parse {} s | lookups {} s  claims {} s (both partly while parsing) | after the parse {} s: still reading/copying {} s  matching {} s  record {} s (discrepancies {} s)  publish {} s",
        secs(timings.parse),
        secs(timings.lookups),
        secs(timings.claims),
        secs(total_d.saturating_sub(timings.parse)),
        secs(timings.prepare_tail),
        secs(timings.matching),
        secs(timings.record),
        secs(timings.discrepancies),
        secs(timings.publish),
    );
    println!(
        "{name:<9} rows {n:>9}  file {:>5} MB  ledger bulk load {:>8} s  parse only {:>7} s  reconcile {:>8} s (its own parse {} s)  reconcile/parse {}.{}x  {rows_per_s:>8} rows/s",
        bytes.len() / 1_000_000,
        secs(load_d),
        secs(parse_d),
        secs(total_d),
        secs(timings.parse),
        ratio10 / 10,
        ratio10 % 10,
    );
    db.close().await;
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .or_else(|| {
            std::env::var("RECONCILE_BENCH_ROWS")
                .ok()
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(1_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let pg = testkit::fresh_postgres().await.expect("fresh postgres");
        bench("postgres", pg, n).await;
        let (lite, _dir) = testkit::fresh_sqlite().await.expect("fresh sqlite");
        bench("sqlite", lite, n).await;
    });
}
