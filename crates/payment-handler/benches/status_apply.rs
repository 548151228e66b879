//! Executor events per second through the payment-status projection
//! (`store::apply_status`, what the status consumer runs per batch): the
//! set-based path (issue #13: a batch folded in memory, one statement per
//! table) next to the per-event statements it replaced
//! (`status_per_event::apply_status_per_event`), measured in the same run
//! on databases holding the same payments. Needs PostgreSQL
//! (PAYSTREAM_TEST_DATABASE_URL); no broker.
//!
//!     cargo bench -p payment-handler --bench status_apply [-- PAYMENTS BATCH]
//!
//! Each payment has two orders; each order gets what the executor appends
//! for it (started, succeeded; every third one a retryable failure and a
//! second start first), interleaved across payments as a partition of the
//! payments topic carries them, applied in batches of BATCH (the
//! consumer's default `batch_max` is 500). Prints figures and their ratio;
//! asserts only that both paths leave the same rows.

#![allow(clippy::float_arithmetic)] // rates, never money

use events::{
    BuyerId, ClientId, CorrelationId, Currency, Envelope, Event, EventId, Money, OrderId,
    PaymentId, PaymentOrder, SCHEMA_VERSION, SellerId, Timestamp,
};
use payment_handler::status_per_event::apply_status_per_event;
use payment_handler::store;
use std::collections::BTreeMap;
use std::time::Instant;
use storage::{Db, with_pool};

const ORDERS: usize = 2;

fn env(payment: PaymentId, id: EventId, at: i64, event: Event) -> Envelope {
    Envelope {
        event_id: id,
        occurred_at: Timestamp::from_micros(at),
        payment_id: Some(payment),
        correlation_id: CorrelationId::from_uuid(payment.as_uuid()),
        causation_id: None,
        producer: "bench".into(),
        schema_version: SCHEMA_VERSION,
        event,
    }
}

/// (each payment's requested + approved events, the executor's events).
fn workload(payments: usize) -> (Vec<Envelope>, Vec<Envelope>) {
    let client = ClientId::parse("bench").unwrap();
    let mut at = 1_760_000_000_000_000i64;
    let mut tick = || {
        at += 7;
        at
    };
    let mut decided = Vec::new();
    let mut per_payment: Vec<Vec<Envelope>> = Vec::new();
    for k in 0..payments {
        let pid = PaymentId::derive(&client, &format!("k{k}"));
        let orders: Vec<PaymentOrder> = (0..ORDERS)
            .map(|j| PaymentOrder {
                order_id: OrderId::derive(pid, j),
                seller_id: SellerId::parse(&format!("s{}", (k + j) % 50)).unwrap(),
                amount: Money::new(1_000 + k as i64, Currency::EUR),
            })
            .collect();
        decided.push(env(
            pid,
            EventId::derive(pid.as_uuid(), "requested"),
            tick(),
            events::PaymentRequested {
                client_id: client.clone(),
                idempotency_key: Some(format!("k{k}")),
                buyer_id: BuyerId::parse(&format!("b{k}")).unwrap(),
                orders: orders.clone(),
                metadata: BTreeMap::new(),
            }
            .into(),
        ));
        decided.push(env(
            pid,
            EventId::derive(pid.as_uuid(), "risk"),
            tick(),
            events::RiskApproved {
                rule_set: "bench".into(),
            }
            .into(),
        ));
        let mut evs = Vec::new();
        for (j, o) in orders.iter().enumerate() {
            let oid = o.order_id;
            let started = |a: i32| -> Event {
                events::OrderExecutionStarted {
                    order_id: oid,
                    attempt: a,
                }
                .into()
            };
            let mut attempt = 1;
            if (k + j) % 3 == 0 {
                evs.push(env(
                    pid,
                    EventId::derive(oid.as_uuid(), "s1"),
                    tick(),
                    started(1),
                ));
                evs.push(env(
                    pid,
                    EventId::derive(oid.as_uuid(), "f1"),
                    tick(),
                    events::OrderFailed {
                        order_id: oid,
                        retryable: true,
                        code: "psp_unavailable".into(),
                        reason: "503".into(),
                        attempt: 1,
                    }
                    .into(),
                ));
                attempt = 2;
            }
            evs.push(env(
                pid,
                EventId::derive(oid.as_uuid(), &format!("s{attempt}")),
                tick(),
                started(attempt),
            ));
            evs.push(env(
                pid,
                EventId::derive(oid.as_uuid(), "ok"),
                tick(),
                events::OrderSucceeded {
                    order_id: oid,
                    psp_reference: format!("ch_{k}_{j}"),
                    amount: o.amount,
                    fee: Money::new(10, Currency::EUR),
                }
                .into(),
            ));
        }
        per_payment.push(evs);
    }
    // Interleaved: the executor works on many payments at once.
    let mut executor = Vec::new();
    let longest = per_payment.iter().map(Vec::len).max().unwrap_or(0);
    for window in per_payment.chunks(64) {
        for i in 0..longest {
            for evs in window {
                if let Some(e) = evs.get(i) {
                    executor.push(e.clone());
                }
            }
        }
    }
    (decided, executor)
}

async fn prepared(url: &str, decided: &[Envelope]) -> Db {
    let db = Db::connect(url).await.unwrap();
    store::migrate(&db).await.unwrap();
    for chunk in decided.chunks(512) {
        let refs: Vec<&Envelope> = chunk.iter().collect();
        store::apply_status(&db, &refs).await.unwrap();
    }
    // Autovacuum is off on the test server: statistics by hand.
    if let Db::Postgres(p) = &db {
        sqlx::query("ANALYZE").execute(p).await.unwrap();
    }
    db
}

/// Events per second applying `events` in batches of `batch`.
async fn run(db: &Db, events: &[Envelope], batch: usize, per_event: bool) -> f64 {
    let started = Instant::now();
    for chunk in events.chunks(batch) {
        let refs: Vec<&Envelope> = chunk.iter().collect();
        if per_event {
            apply_status_per_event(db, &refs).await.unwrap();
        } else {
            store::apply_status(db, &refs).await.unwrap();
        }
    }
    events.len() as f64 / started.elapsed().as_secs_f64()
}

async fn statuses(db: &Db) -> Vec<String> {
    with_pool!(db, p => sqlx::query_scalar(
        "SELECT o.order_id || o.status || COALESCE(o.psp_reference, '-') || COALESCE(o.failure_reason, '-') || p.status || CAST(p.updated_us AS TEXT) \
         FROM handler_payment_orders o JOIN handler_payments p ON p.payment_id = o.payment_id ORDER BY o.order_id",
    ).fetch_all(p).await.unwrap())
}

async fn compare(backend: &str, urls: [String; 2], payments: usize, batch: usize) {
    let (decided, executor) = workload(payments);
    let per_event_db = prepared(&urls[0], &decided).await;
    let set_db = prepared(&urls[1], &decided).await;
    // Half the events each way round, so neither path always runs first.
    let half = executor.len() / 2;
    let (first, second) = executor.split_at(half);
    let mut per_event = [0.0; 2];
    let mut set_based = [0.0; 2];
    per_event[0] = run(&per_event_db, first, batch, true).await;
    set_based[0] = run(&set_db, first, batch, false).await;
    set_based[1] = run(&set_db, second, batch, false).await;
    per_event[1] = run(&per_event_db, second, batch, true).await;
    assert_eq!(
        statuses(&per_event_db).await,
        statuses(&set_db).await,
        "both paths leave the same rows"
    );
    // Harmonic mean of the halves = the rate over the whole stream.
    let whole = |r: [f64; 2]| {
        let secs = first.len() as f64 / r[0] + second.len() as f64 / r[1];
        executor.len() as f64 / secs
    };
    let (pe, sb) = (whole(per_event), whole(set_based));
    println!(
        "status consumer ({backend:<8}): {} executor events ({payments} payments x {ORDERS} orders), batches of {batch}: \
         per-event {pe:>8.0} events/s ({:.0} / {:.0}), set-based {sb:>8.0} events/s ({:.0} / {:.0}); set-based / per-event = {:.2}",
        executor.len(),
        per_event[0],
        per_event[1],
        set_based[0],
        set_based[1],
        sb / pe
    );
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let payments = args.first().copied().unwrap_or(2_000);
    let batch = args.get(1).copied().unwrap_or(500);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        compare(
            "postgres",
            [
                testkit::fresh_postgres_url().await.unwrap(),
                testkit::fresh_postgres_url().await.unwrap(),
            ],
            payments,
            batch,
        )
        .await;
        let dir = tempfile::tempdir().unwrap();
        let lite = |n: &str| format!("sqlite://{}", dir.path().join(n).display());
        compare("sqlite", [lite("a.db"), lite("b.db")], payments, batch).await;
    });
}
