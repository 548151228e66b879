#![allow(dead_code)]

use events::{
    BuyerId, ClientId, CorrelationId, Currency, Envelope, Event, EventId, Money, OrderId,
    OrderSucceeded, PaymentId, PaymentOrder, PaymentRequested, SellerId, Timestamp,
};
use projections::{Incoming, Projection, apply_batch};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::time::Duration;
use storage::Db;
use streaming::{KafkaConfig, MessageMeta, Outcome};

/// Runs an async test body against a fresh PostgreSQL and a fresh SQLite
/// database: `both!(name, body_fn)` makes `name::postgres` and
/// `name::sqlite`.
#[macro_export]
macro_rules! both {
    ($name:ident, $body:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let db = storage::testing::fresh_postgres()
                    .await
                    .expect("fresh postgres");
                projections::migrate(&db).await.expect("migrate");
                super::$body(db).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let (db, _dir) = storage::testing::fresh_sqlite()
                    .await
                    .expect("fresh sqlite");
                projections::migrate(&db).await.expect("migrate");
                super::$body(db).await;
            }
        }
    };
}

pub fn meta(i: usize) -> MessageMeta {
    MessageMeta {
        topic: "test".into(),
        partition: 0,
        offset: i64::try_from(i).unwrap(),
        timestamp_ms: None,
    }
}

/// Applies `envs` to one projection in batches of `batch` events.
pub async fn apply(db: &Db, p: Projection, envs: &[Envelope], batch: usize) -> Vec<Outcome> {
    let metas: Vec<MessageMeta> = (0..envs.len()).map(meta).collect();
    let mut out = Vec::new();
    for (chunk, metas) in envs.chunks(batch).zip(metas.chunks(batch)) {
        let inc: Vec<Incoming<'_>> = chunk
            .iter()
            .zip(metas)
            .map(|(envelope, meta)| Incoming { envelope, meta })
            .collect();
        out.extend(apply_batch(db, p, &inc).await.expect("apply"));
    }
    out
}

/// Applies to both projections.
pub async fn apply_both(db: &Db, envs: &[Envelope], batch: usize) -> Vec<Outcome> {
    let l = apply(db, Projection::Ledger, envs, batch).await;
    let w = apply(db, Projection::Wallet, envs, batch).await;
    assert_eq!(l, w, "ledger and wallet must decide alike");
    l
}

/// What an event applied before gets when delivered again: `Duplicate`,
/// or `Ignored` for the types the booking rules never book (they leave no
/// `applied_events` row to recognise them by).
pub fn again(e: &Envelope) -> Outcome {
    if projections::booking::books_by_type(e.event_type()) {
        Outcome::Duplicate
    } else {
        Outcome::Ignored
    }
}

pub async fn strings(db: &Db, sql: &str) -> Vec<String> {
    let mut v = match db {
        Db::Postgres(p) => sqlx::query_scalar::<_, String>(sql).fetch_all(p).await,
        Db::Sqlite(p) => sqlx::query_scalar::<_, String>(sql).fetch_all(p).await,
    }
    .expect("snapshot query");
    v.sort();
    v
}

pub async fn exec(db: &Db, sql: &str) -> Result<(), sqlx::Error> {
    match db {
        Db::Postgres(p) => sqlx::query(sql).execute(p).await.map(drop),
        Db::Sqlite(p) => sqlx::query(sql).execute(p).await.map(drop),
    }
}

/// Every table's deterministic content (no wall-clock columns, no chain
/// positions, which depend on how partitions interleave), sorted.
pub async fn snapshot(db: &Db) -> BTreeMap<&'static str, Vec<String>> {
    let q: [(&str, &str); 7] = [
        (
            "applied_events",
            "SELECT projection || '|' || event_id || '|' || outcome || '|' || COALESCE(error_kind, '-') || '|' || COALESCE(reason, '-') FROM applied_events",
        ),
        (
            "projection_orders",
            "SELECT projection || '|' || order_id || '|' || payment_id || '|' || buyer_id || '|' || seller_id || '|' || currency || '|' || CAST(amount_minor AS TEXT) || '|' || CAST(captured_minor AS TEXT) || '|' || CAST(refunded_minor AS TEXT) FROM projection_orders",
        ),
        (
            "projection_bookings",
            "SELECT projection || '|' || booking_key || '|' || event_id FROM projection_bookings",
        ),
        (
            "ledger_transactions",
            "SELECT id || '|' || booking_key || '|' || event_id || '|' || COALESCE(payment_id, '-') || '|' || kind || '|' || CAST(occurred_at AS TEXT) FROM ledger_transactions",
        ),
        (
            "ledger_entries",
            "SELECT transaction_id || '|' || CAST(line AS TEXT) || '|' || account || '|' || currency || '|' || CAST(amount_minor AS TEXT) || '|' || CAST(occurred_at AS TEXT) FROM ledger_entries",
        ),
        (
            "wallet_balances",
            "SELECT seller_id || '|' || currency || '|' || CAST(balance_minor AS TEXT) FROM wallet_balances",
        ),
        (
            "buyer_totals",
            "SELECT buyer_id || '|' || currency || '|' || CAST(paid_minor AS TEXT) || '|' || CAST(refunded_minor AS TEXT) FROM buyer_totals",
        ),
    ];
    let mut m = BTreeMap::new();
    for (name, sql) in q {
        m.insert(name, strings(db, sql).await);
    }
    m
}

pub fn envelope(payment: Option<PaymentId>, tag: &str, at: i64, event: Event) -> Envelope {
    let parent = payment.map(|p| p.as_uuid()).unwrap_or(uuid::Uuid::nil());
    Envelope {
        event_id: EventId::derive(parent, tag),
        occurred_at: Timestamp::from_micros(at),
        payment_id: payment,
        correlation_id: CorrelationId::from_uuid(parent),
        causation_id: None,
        producer: "projections-test".into(),
        schema_version: events::SCHEMA_VERSION,
        event,
    }
}

/// A one-order payment: (its PaymentRequested, payment id, order id).
pub fn request(
    key: &str,
    buyer: &str,
    seller: &str,
    amount: Money,
    at: i64,
) -> (Envelope, PaymentId, OrderId) {
    request_for("test-client", key, buyer, seller, amount, at)
}

/// [`request`] by another client.
pub fn request_for(
    client: &str,
    key: &str,
    buyer: &str,
    seller: &str,
    amount: Money,
    at: i64,
) -> (Envelope, PaymentId, OrderId) {
    let client = ClientId::parse(client).unwrap();
    let payment = PaymentId::derive(&client, key);
    let order = OrderId::derive(payment, 0);
    let env = envelope(
        Some(payment),
        "requested",
        at,
        PaymentRequested {
            client_id: client,
            idempotency_key: Some(key.into()),
            buyer_id: BuyerId::parse(buyer).unwrap(),
            orders: vec![PaymentOrder {
                order_id: order,
                seller_id: SellerId::parse(seller).unwrap(),
                amount,
            }],
            metadata: BTreeMap::new(),
        }
        .into(),
    );
    (env, payment, order)
}

pub fn succeeded(
    payment: PaymentId,
    order: OrderId,
    tag: &str,
    amount: Money,
    fee: Money,
    at: i64,
) -> Envelope {
    envelope(
        Some(payment),
        tag,
        at,
        OrderSucceeded {
            order_id: order,
            psp_reference: format!("psp-{order}"),
            amount,
            fee,
        }
        .into(),
    )
}

pub fn eur(m: i64) -> Money {
    Money::new(m, Currency::EUR)
}

// ---- Kafka ----

pub fn brokers() -> String {
    std::env::var("PAYSTREAM_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// Fresh topics under a unique prefix.
pub async fn test_kafka(partitions: i32) -> (KafkaConfig, String) {
    let unique = uuid::Uuid::now_v7().simple().to_string();
    let cfg = KafkaConfig::local(&brokers(), &format!("t{unique}."), partitions);
    streaming::admin::ensure_topics(&cfg, &cfg.topology().specs())
        .await
        .expect("creating test topics");
    (cfg, unique)
}

/// Waits until `group` has committed, on every partition of `topics`, the
/// end of the partition: everything produced so far is applied.
pub async fn wait_caught_up(cfg: &KafkaConfig, group: &str, topics: &[String]) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let mut ends = TopicPartitionList::new();
        let mut want = Vec::new();
        for t in topics {
            for p in 0..cfg.partitions {
                let (_, high) = consumer
                    .fetch_watermarks(t, p, Duration::from_secs(10))
                    .unwrap();
                ends.add_partition(t, p);
                want.push((t.clone(), p, high));
            }
        }
        let committed = consumer
            .committed_offsets(ends, Duration::from_secs(10))
            .unwrap();
        let done = want.iter().all(|(t, p, high)| {
            *high == 0
                || matches!(committed.find_partition(t, *p).map(|e| e.offset()), Some(Offset::Offset(o)) if o >= *high)
        });
        if done {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "group {group} did not catch up: want {want:?}, committed {committed:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Produces every envelope (concurrently, all acknowledged).
pub async fn produce_all(producer: &streaming::EventProducer, envs: &[Envelope]) {
    for chunk in envs.chunks(500) {
        let results = futures::future::join_all(chunk.iter().map(|e| producer.append(e))).await;
        for r in results {
            r.expect("append");
        }
    }
}

/// The events of `n` payments: sample stories (one event of each type).
pub fn stories(unique: &str, n: usize) -> Vec<Envelope> {
    (0..n)
        .flat_map(|i| {
            events::samples::one_of_each(
                "test-client",
                &format!("{unique}-{i}"),
                Timestamp::from_micros(
                    1_700_000_000_000_000 + i64::try_from(i).unwrap() * 60_000_000,
                ),
            )
        })
        .collect()
}
