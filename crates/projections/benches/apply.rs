//! Events applied per second by the ledger projection, on PostgreSQL and
//! SQLite: through Kafka (`run_consumer` + the projection handler, batches
//! of 1000) next to the raw rate of the same SQL writes without Kafka
//! (`apply_batch` called directly with the same events and batching), in
//! the same run. Prints figures; asserts nothing about time.
//!
//! `cargo bench -p projections` (needs PostgreSQL on 127.0.0.1:5432 and a
//! broker on 127.0.0.1:9092, or PAYSTREAM_TEST_DATABASE_URL /
//! PAYSTREAM_TEST_BROKERS). PAYSTREAM_BENCH_PAYMENTS sets the size
//! (default 10,000 payments = 20,000 events; 500,000 for the 1M-event
//! flatness check). Also prints the raw rate per tenth of the events:
//! flat with size means no slice more than 20 % below the first.

use events::{
    BuyerId, ClientId, Currency, Envelope, Money, OrderId, OrderSucceeded, PaymentId, PaymentOrder,
    PaymentRequested, SellerId,
};
use projections::{Incoming, Projection, ProjectionHandler, apply_batch};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use storage::Db;
use streaming::{
    BatchHandler, Delivered, EventProducer, HandlerError, KafkaConfig, MessageMeta, Outcome,
};
use tokio_util::sync::CancellationToken;

const BATCH: usize = 1000;

fn events(unique: &str, payments: usize) -> Vec<Envelope> {
    let client = ClientId::parse("bench").expect("valid");
    let mut out = Vec::with_capacity(payments * 2);
    for i in 0..payments {
        let payment = PaymentId::derive(&client, &format!("{unique}-{i}"));
        let order = OrderId::derive(payment, 0);
        let at = 1_700_000_000_000_000 + i64::try_from(i).expect("small");
        let amount = Money::new(
            1_000 + i64::try_from(i % 997).expect("small"),
            Currency::EUR,
        );
        let env =
            |tag: &str, event: events::Event| testkit::envelope(Some(payment), tag, at, event);
        out.push(env(
            "requested",
            PaymentRequested {
                client_id: client.clone(),
                idempotency_key: None,
                buyer_id: BuyerId::parse(&format!("buyer-{}", i % 5000)).expect("valid"),
                orders: vec![PaymentOrder {
                    order_id: order,
                    seller_id: SellerId::parse(&format!("seller-{}", i % 200)).expect("valid"),
                    amount,
                }],
                metadata: Default::default(),
            }
            .into(),
        ));
        out.push(env(
            "succeeded",
            OrderSucceeded {
                order_id: order,
                psp_reference: format!("psp-{i}"),
                amount,
                fee: Money::new(30, Currency::EUR),
            }
            .into(),
        ));
    }
    out
}

fn rate(n: usize, d: Duration) -> u128 {
    let micros = d.as_micros().max(1);
    (n as u128) * 1_000_000 / micros
}

/// The ledger's own invariants hold (wallets are not projected here).
async fn check_ledger(db: &Db) {
    let report = projections::verify(db).await;
    assert!(
        report
            .checks
            .iter()
            .filter(|c| c.name != "wallets_match_ledger")
            .all(|c| c.violations == 0)
            && report.error.is_none(),
        "{report}"
    );
}

async fn fresh(postgres: bool) -> (Db, Option<tempfile::TempDir>) {
    let (db, dir) = if postgres {
        (testkit::fresh_postgres().await.expect("postgres"), None)
    } else {
        let (db, dir) = testkit::fresh_sqlite().await.expect("sqlite");
        (db, Some(dir))
    };
    projections::migrate(&db).await.expect("migrate");
    (db, dir)
}

/// Rates of each tenth of the events, and whether the lowest stays
/// within 20 % of the first (flat with size).
fn slices_line(n: usize, marks: &[Duration]) -> String {
    let slice = (n / 10).max(1);
    let mut prev = Duration::ZERO;
    let mut rates = Vec::new();
    for m in marks {
        rates.push(rate(slice, *m - prev));
        prev = *m;
    }
    let first = rates.first().copied().unwrap_or(0);
    let worst = rates.iter().copied().min().unwrap_or(0);
    format!(
        "per slice of {slice} events: {} events/s; lowest {}% of the first: {}",
        rates
            .iter()
            .map(u128::to_string)
            .collect::<Vec<_>>()
            .join(" "),
        worst * 100 / first.max(1),
        if worst * 100 >= first * 80 {
            "flat within 20%"
        } else {
            "NOT flat"
        }
    )
}

/// The same writes without Kafka: `apply_batch` on batches of `BATCH`.
async fn raw(postgres: bool, evs: &[Envelope]) -> Duration {
    raw_sliced(postgres, evs).await.0
}

/// `raw`, with the time from the start at the end of each tenth of the
/// events.
async fn raw_sliced(postgres: bool, evs: &[Envelope]) -> (Duration, Vec<Duration>) {
    let (db, _dir) = fresh(postgres).await;
    let metas: Vec<MessageMeta> = (0..evs.len())
        .map(|i| MessageMeta {
            topic: "bench".into(),
            partition: 0,
            offset: i64::try_from(i).expect("small"),
            timestamp_ms: None,
        })
        .collect();
    let slice = (evs.len() / 10).max(1);
    let mut marks = Vec::new();
    let mut done = 0usize;
    let start = Instant::now();
    for (chunk, metas) in evs.chunks(BATCH).zip(metas.chunks(BATCH)) {
        let inc: Vec<Incoming<'_>> = chunk
            .iter()
            .zip(metas)
            .map(|(envelope, meta)| Incoming { envelope, meta })
            .collect();
        let out = apply_batch(&db, Projection::Ledger, &inc)
            .await
            .expect("apply");
        assert!(out.iter().all(|o| *o == Outcome::Applied));
        done += chunk.len();
        if done / slice > marks.len() {
            marks.push(start.elapsed());
        }
    }
    let d = start.elapsed();
    check_ledger(&db).await;
    (d, marks)
}

/// Counts handled events and notes when the first batch arrived.
struct Counting {
    inner: ProjectionHandler,
    handled: Arc<AtomicUsize>,
    batches: Arc<AtomicUsize>,
    /// Microseconds spent inside the projection handler.
    in_handler: Arc<AtomicUsize>,
    first: Arc<std::sync::Mutex<Option<Instant>>>,
}

impl BatchHandler for Counting {
    async fn handle(&mut self, batch: &[Delivered]) -> Result<Vec<Outcome>, HandlerError> {
        self.first
            .lock()
            .expect("not poisoned")
            .get_or_insert_with(Instant::now);
        let t = Instant::now();
        let out = self.inner.handle(batch).await?;
        self.in_handler.fetch_add(
            usize::try_from(t.elapsed().as_micros()).unwrap_or(usize::MAX),
            Ordering::SeqCst,
        );
        self.handled.fetch_add(batch.len(), Ordering::SeqCst);
        self.batches.fetch_add(1, Ordering::SeqCst);
        Ok(out)
    }
}

/// Through the broker: the consumer loop plus the projection handler.
async fn via_kafka(
    postgres: bool,
    cfg: &KafkaConfig,
    n: usize,
) -> (Duration, Duration, usize, Duration) {
    let (db, _dir) = fresh(postgres).await;
    let handled = Arc::new(AtomicUsize::new(0));
    let batches = Arc::new(AtomicUsize::new(0));
    let in_handler = Arc::new(AtomicUsize::new(0));
    let first = Arc::new(std::sync::Mutex::new(None));
    let group = format!("bench-{}", uuid::Uuid::now_v7().simple());
    let settings = projections::cli::consumer_settings(cfg, &group, 1000);
    let stop = CancellationToken::new();
    let producer = EventProducer::new(cfg, "bench").expect("producer");
    let start = Instant::now();
    let task = tokio::spawn(streaming::run_consumer(
        cfg.clone(),
        settings,
        producer,
        Counting {
            inner: ProjectionHandler::new(db.clone(), Projection::Ledger),
            handled: handled.clone(),
            batches: batches.clone(),
            in_handler: in_handler.clone(),
            first: first.clone(),
        },
        stop.clone(),
    ));
    while handled.load(Ordering::SeqCst) < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let end = Instant::now();
    stop.cancel();
    task.await.expect("join").expect("consumer");
    let first = first
        .lock()
        .expect("not poisoned")
        .expect("a batch arrived");
    check_ledger(&db).await;
    let in_handler =
        Duration::from_micros(u64::try_from(in_handler.load(Ordering::SeqCst)).unwrap_or(u64::MAX));
    (
        end - first,
        end - start,
        batches.load(Ordering::SeqCst),
        in_handler,
    )
}

#[tokio::main]
async fn main() {
    let payments: usize = std::env::var("PAYSTREAM_BENCH_PAYMENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let brokers =
        std::env::var("PAYSTREAM_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let unique = uuid::Uuid::now_v7().simple().to_string();
    let cfg = KafkaConfig::local(&brokers, &format!("bench{unique}."), 4);
    streaming::admin::ensure_topics(&cfg, &cfg.topology().specs())
        .await
        .expect("topics");
    let evs = events(&unique, payments);
    let n = evs.len();
    let producer = EventProducer::new(&cfg, "bench").expect("producer");
    let t = Instant::now();
    for chunk in evs.chunks(2000) {
        for r in futures::future::join_all(chunk.iter().map(|e| producer.append(e))).await {
            r.expect("append");
        }
    }
    println!(
        "produced {n} events in {} ms (untimed setup)",
        t.elapsed().as_millis()
    );
    println!("ledger projection, {n} events, batches of {BATCH}:");
    for (name, postgres) in [("PostgreSQL", true), ("SQLite", false)] {
        // Raw before and after the Kafka run, so drift of a shared
        // machine (neighbours' load, checkpoints) shows up as a spread.
        let (raw_before, marks) = raw_sliced(postgres, &evs).await;
        println!("  {name:<10} raw SQL {}", slices_line(n, &marks));
        let (kafka_d, wall_d, batches, in_handler) = via_kafka(postgres, &cfg, n).await;
        let raw_after = raw(postgres, &evs).await;
        let raw_d = raw_before.min(raw_after);
        println!(
            "  {name:<10} raw SQL before the Kafka run {} events/s, after it {} events/s",
            rate(n, raw_before),
            rate(n, raw_after)
        );
        let (r, k) = (rate(n, raw_d), rate(n, kafka_d)); // best raw
        println!(
            "  {name:<10} raw SQL {r:>7} events/s | via Kafka {k:>7} events/s ({}% of raw; {} events/s including group join; {} events per batch on average)",
            k * 100 / r.max(1),
            rate(n, wall_d),
            n / batches.max(1)
        );
        println!(
            "  {:<10} time: raw {} ms; via Kafka {} ms, of which {} ms in the projection handler",
            "",
            raw_d.as_millis(),
            kafka_d.as_millis(),
            in_handler.as_millis()
        );
    }
}
