//! Rebuild rate of the ledger projection against the raw consume rate of
//! the same topics, in the same run, on PostgreSQL and SQLite.
//!
//! Produces N events (default 1,000,000) into fresh topics (payments with
//! 12 partitions): per payment `PaymentRequested` + `OrderSucceeded`, and
//! every tenth payment a partial `RefundSucceeded`. Then measures
//! - raw: `TopicReader` over payments + reconciliation from the beginning
//!   to the end, decoding every event and nothing else;
//! - rebuild: `ops::projection::execute_rebuild` of the ledger (read,
//!   decode, decide in memory in batches of 1000 while a second task
//!   bulk-loads the shadow, swap, commit offsets), on a fresh PostgreSQL
//!   database and a fresh SQLite file;
//!
//! and prints events/s of each and the ratio rebuild/raw; each backend's
//! rebuild runs twice, into an empty live projection and then over the
//! full one it made (the swap then replaces every row). Asserts nothing
//! about time.
//!
//! Also prints the rate per slice (a tenth of the events) of the apply
//! phase: flat with size means no slice more than 20 % below the first.
//!
//! Last, the live rate before and after a rebuild (see
//! `live_after_rebuild`); `-- live` runs only that.
//!
//! `cargo bench -p ops` (full size) or `cargo bench -p ops -- 50000` (or
//! PAYSTREAM_BENCH_EVENTS=50000; a quick run). Needs the broker on 127.0.0.1:9092 and PostgreSQL on
//! 127.0.0.1:5432 (or PAYSTREAM_TEST_BROKERS / PAYSTREAM_TEST_DATABASE_URL).

use events::{
    BuyerId, ClientId, Currency, Envelope, Money, OrderId, OrderSucceeded, PaymentId, PaymentOrder,
    PaymentRequested, RefundId, RefundSucceeded, SellerId,
};
use projections::Projection;
use std::time::Instant;
use storage::Db;
use streaming::reader::{End, Start, TopicReader};
use testkit::TestKafka;

fn payment_events(unique: &str, i: usize) -> Vec<Envelope> {
    let client = ClientId::parse("bench").expect("valid");
    let key = format!("{unique}-{i}");
    let payment = PaymentId::derive(&client, &key);
    let order = OrderId::derive(payment, 0);
    let n = i64::try_from(i).expect("small");
    let at = 1_700_000_000_000_000 + n * 1000;
    let amount = 1_000 + n % 997;
    let eur = |m| Money::new(m, Currency::EUR);
    let env = |tag: &str, dt: i64, event: events::Event| {
        testkit::envelope(Some(payment), tag, at + dt, event)
    };
    let mut out = vec![
        env(
            "requested",
            0,
            PaymentRequested {
                client_id: client.clone(),
                idempotency_key: Some(key.clone()),
                buyer_id: BuyerId::parse(&format!("buyer-{}", i % 5000)).expect("valid"),
                orders: vec![PaymentOrder {
                    order_id: order,
                    seller_id: SellerId::parse(&format!("seller-{}", i % 200)).expect("valid"),
                    amount: eur(amount),
                }],
                metadata: Default::default(),
            }
            .into(),
        ),
        env(
            "succeeded",
            100,
            OrderSucceeded {
                order_id: order,
                psp_reference: format!("psp-{order}"),
                amount: eur(amount),
                fee: eur(amount / 40),
            }
            .into(),
        ),
    ];
    if i.is_multiple_of(10) {
        out.push(env(
            "refund",
            200,
            RefundSucceeded {
                refund_id: RefundId::derive(&client, &format!("{key}-r")),
                order_id: order,
                psp_reference: format!("psp-r-{order}"),
                amount: eur(amount / 2),
            }
            .into(),
        ));
    }
    out
}

fn rate(events: u64, millis: u128) -> u64 {
    u64::try_from(u128::from(events) * 1000 / millis.max(1)).unwrap_or(u64::MAX)
}

/// A reader of the projection's topics from their beginning to their
/// current end.
async fn reader(k: &TestKafka) -> TopicReader {
    TopicReader::open(
        &k.cfg,
        &ops::projection::projection_topics(&k.cfg),
        Start::Beginning,
        End::Latest,
        None,
    )
    .await
    .expect("reader")
}

async fn raw_read(k: &TestKafka) -> (u64, u128) {
    let started = Instant::now();
    let mut reader = reader(k).await;
    let mut n = 0u64;
    while let Some(batch) = reader.next_batch(1000).await.expect("read") {
        for r in &batch {
            events::avro::decode(&r.payload).expect("decodable");
        }
        n += u64::try_from(batch.len()).expect("fits");
    }
    (n, started.elapsed().as_millis())
}

/// Prints the rate of each slice (a tenth of the events) of the apply
/// phase and whether every slice stays within 20 % of the first.
fn print_slices(label: &str, s: &ops::projection::RebuildSummary) {
    let mut prev = 0u64;
    let mut rates = Vec::new();
    for ms in &s.slice_millis {
        rates.push(rate(s.slice_events, u128::from(ms - prev)));
        prev = *ms;
    }
    let first = rates.first().copied().unwrap_or(0);
    let worst = rates.iter().copied().min().unwrap_or(0);
    // The first slice also pays for the start (the replay's maps are
    // allocated for the whole run up front), so the spread of the later
    // ones is printed too: a rate that falls with size shows there.
    let later = rates.get(1..).unwrap_or_default();
    let (later_min, later_max) = (
        later.iter().copied().min().unwrap_or(0),
        later.iter().copied().max().unwrap_or(0),
    );
    let line: Vec<String> = rates.iter().map(|r| format!("{}k", r / 1000)).collect();
    println!(
        "  {label} per slice of {} events (read + decode + decide + written to the shadow): {} -> lowest {}% of the first: {}; slices 2..: lowest {}% of the fastest",
        s.slice_events,
        line.join(" "),
        worst * 100 / first.max(1),
        if worst * 100 >= first * 80 {
            "flat within 20%"
        } else {
            "NOT flat"
        },
        later_min * 100 / later_max.max(1)
    );
    println!(
        "  {label} apply phase (into the shadow, before the swap) {} ms; whole rebuild incl. swap and offsets below",
        s.millis
    );
}

/// `paystream projection rebuild ledger --execute`, batches of 1000.
async fn rebuild_ledger(
    k: &TestKafka,
    db: &Db,
    url: &str,
    group: &str,
) -> ops::projection::RebuildSummary {
    ops::projection::execute_rebuild(
        &k.cfg,
        url,
        db,
        Projection::Ledger,
        group,
        1000,
        ops::projection::RunOptions::default(),
    )
    .await
    .expect("rebuild")
}

async fn rebuild(k: &TestKafka, db: &Db, url: &str, label: &str) -> (u64, u128) {
    projections::migrate(db).await.expect("migrate");
    let group = format!("{}-{label}", k.cfg.topology().group("ledger"));
    let started = Instant::now();
    let s = rebuild_ledger(k, db, url, &group).await;
    let millis = started.elapsed().as_millis();
    print_slices(label, &s);
    // Only the ledger is rebuilt here: the wallets are empty on purpose.
    let report = projections::verify(db).await;
    assert!(report.error.is_none(), "{report}");
    for c in report
        .checks
        .iter()
        .filter(|c| c.name != "wallets_match_ledger")
    {
        assert_eq!(c.violations, 0, "{report}");
    }
    (s.events.read, millis)
}

/// Rebuilds the ledger twice, into an empty projection and then over the
/// full one the first run made (the swap then replaces every row, as an
/// operator's rebuild does), and prints each rate against `raw`.
async fn rebuild_twice(k: &TestKafka, db: &Db, url: &str, label: &str, name: &str, raw: u64) {
    for over in ["", " (over a full live projection)"] {
        let (n, ms) = rebuild(k, db, url, label).await;
        let r = rate(n, ms);
        println!(
            "rebuild {name}{n:>9} events in {ms:>7} ms = {r:>7} events/s = {}.{}% of raw{over}",
            r * 100 / raw.max(1),
            r * 1000 / raw.max(1) % 10
        );
    }
}

/// Produces payments `from..to` (their events) into `k`'s topics.
async fn produce_payments(k: &TestKafka, from: usize, to: usize) -> usize {
    let mut produced = 0;
    let mut i = from;
    while i < to {
        let mut chunk = Vec::new();
        while chunk.len() < 20_000 && i < to {
            chunk.extend(payment_events(&k.unique, i));
            i += 1;
        }
        let results = futures::future::join_all(chunk.iter().map(|e| k.producer.append(e))).await;
        for r in results {
            r.expect("append");
        }
        produced += chunk.len();
    }
    produced
}

/// Every record of the projection's topics, in the order a reader from
/// the beginning returns them (each partition in its order).
async fn read_all(k: &TestKafka) -> Vec<streaming::reader::Record> {
    let mut reader = reader(k).await;
    let mut out = Vec::new();
    while let Some(batch) = reader.next_batch(1000).await.expect("read") {
        out.extend(batch);
    }
    out
}

/// Writes everything written so far out of the WAL (PostgreSQL
/// `CHECKPOINT`, SQLite `wal_checkpoint(TRUNCATE)`), so a measurement does
/// not pay for the writes of the step before it.
async fn checkpoint(db: &Db) {
    match db {
        Db::Postgres(p) => {
            sqlx::query("CHECKPOINT")
                .execute(p)
                .await
                .expect("checkpoint");
        }
        Db::Sqlite(p) => {
            sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(p)
                .await
                .expect("checkpoint");
        }
    }
}

/// Applies `records` to the live ledger the way its consumer does
/// (`apply_batch`, batches of 1000); events/s.
async fn live_apply(db: &Db, records: &[streaming::reader::Record]) -> u64 {
    checkpoint(db).await;
    let started = Instant::now();
    for chunk in records.chunks(1000) {
        let envs: Vec<Envelope> = chunk
            .iter()
            .map(|r| events::avro::decode(&r.payload).expect("decodable"))
            .collect();
        let metas: Vec<streaming::MessageMeta> = chunk.iter().map(|r| r.meta()).collect();
        let batch: Vec<projections::Incoming<'_>> = envs
            .iter()
            .zip(&metas)
            .map(|(envelope, meta)| projections::Incoming { envelope, meta })
            .collect();
        projections::apply_batch(db, Projection::Ledger, &batch)
            .await
            .expect("apply");
    }
    rate(
        u64::try_from(records.len()).expect("fits"),
        started.elapsed().as_millis(),
    )
}

/// Issue 14's last figure: the live projection applies as fast after a
/// rebuild as before it. A ledger grown live to `base` payments applies
/// `more` further payments (rate before); then it is rebuilt from the
/// topics, and applies `more` new payments (rate after). Its twin, grown
/// live with the same events and never rebuilt, applies the same new
/// payments (rate without rebuild): the ledger is larger by then, which
/// alone makes applying a little slower, so this is the like-for-like
/// comparison. Each measured apply starts after a checkpoint: the
/// rebuild's own writes (its WAL) are not billed to the rate after it.
async fn live_after_rebuild(label: &str, db: &Db, url: &str, twin: &Db, base: usize, more: usize) {
    let k = TestKafka::new(12).await;
    projections::migrate(db).await.expect("migrate");
    projections::migrate(twin).await.expect("migrate");
    produce_payments(&k, 0, base + more).await;
    let first = read_all(&k).await;
    let split = first.len() * base / (base + more);
    live_apply(db, &first[..split]).await;
    live_apply(twin, &first[..split]).await;
    let before = live_apply(db, &first[split..]).await;
    live_apply(twin, &first[split..]).await;
    let group = format!("{}-live-{label}", k.cfg.topology().group("ledger"));
    rebuild_ledger(&k, db, url, &group).await;
    let new_events = produce_payments(&k, base + more, base + 2 * more).await;
    let all = read_all(&k).await;
    let known: std::collections::HashSet<(i32, i64, String)> = first
        .iter()
        .map(|r| (r.partition, r.offset, r.topic.clone()))
        .collect();
    let fresh: Vec<_> = all
        .into_iter()
        .filter(|r| !known.contains(&(r.partition, r.offset, r.topic.clone())))
        .collect();
    assert_eq!(
        fresh.len(),
        new_events,
        "the new events are the ones read anew"
    );
    let after = live_apply(db, &fresh).await;
    let without = live_apply(twin, &fresh).await;
    for d in [db, twin] {
        let report = projections::verify(d).await;
        assert!(report.error.is_none(), "{report}");
    }
    println!(
        "live {label:<6} {} events at {before:>6} events/s before the rebuild; {} new ones at {after:>6} events/s after it = {}% of before, and at {without:>6} events/s on a twin never rebuilt: after = {}% of the twin",
        first.len() - split,
        fresh.len(),
        after * 100 / before.max(1),
        after * 100 / without.max(1)
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // RUST_LOG=info shows where a swap's time goes, step by step.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let target: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.replace('_', "").parse().ok())
        .or_else(|| {
            std::env::var("PAYSTREAM_BENCH_EVENTS")
                .ok()
                .and_then(|s| s.replace('_', "").parse().ok())
        })
        .unwrap_or(1_000_000);
    // 2.1 events per payment: a tenth of them are refunded.
    let i = target * 10 / 21;
    // `live`: only the live rate before and after a rebuild.
    if std::env::args().skip(1).all(|a| a != "live") {
        rebuilds(target, i).await;
    }
    // The live rate before and after a rebuild, a fifth of the size above
    // grown live (events ≈ 2.1 per payment), a tenth applied each time.
    let (base, more) = (i / 5, i / 10);
    let pg_url = testkit::fresh_postgres_url().await.expect("postgres");
    let pg = Db::connect(&pg_url).await.expect("connect");
    let pg_twin = testkit::fresh_postgres().await.expect("postgres");
    live_after_rebuild("PG", &pg, &pg_url, &pg_twin, base, more).await;
    pg.close().await;
    pg_twin.close().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("live.db").display());
    let lite = Db::connect(&url).await.expect("connect");
    let twin_url = format!("sqlite://{}", dir.path().join("twin.db").display());
    let lite_twin = Db::connect(&twin_url).await.expect("connect");
    live_after_rebuild("SQLite", &lite, &url, &lite_twin, base, more).await;
    lite.close().await;
    lite_twin.close().await;
}

/// The rebuild of `target` events (`i` payments) against the raw read,
/// on each backend, into an empty and over a full live projection.
async fn rebuilds(target: usize, i: usize) {
    let k = TestKafka::new(12).await;
    eprintln!("producing {target} events into {} ...", k.cfg.topic_prefix);
    let started = Instant::now();
    let produced = produce_payments(&k, 0, i).await;
    let produce_ms = started.elapsed().as_millis();
    let produced = u64::try_from(produced).expect("fits");
    println!(
        "produced      {produced:>9} events in {produce_ms:>7} ms = {:>7} events/s ({i} payments)",
        rate(produced, produce_ms)
    );

    let (raw_n, raw_ms) = raw_read(&k).await;
    assert_eq!(raw_n, produced);
    let raw = rate(raw_n, raw_ms);
    println!(
        "raw read      {raw_n:>9} events in {raw_ms:>7} ms = {raw:>7} events/s (TopicReader + decode)"
    );

    let pg_url = testkit::fresh_postgres_url().await.expect("postgres");
    let pg = Db::connect(&pg_url).await.expect("connect");
    rebuild_twice(&k, &pg, &pg_url, "pg", "PG    ", raw).await;
    pg.close().await;

    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let lite = Db::connect(&url).await.expect("connect");
    rebuild_twice(&k, &lite, &url, "sqlite", "SQLite", raw).await;
    lite.close().await;
}
