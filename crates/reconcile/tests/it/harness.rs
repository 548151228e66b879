#![allow(dead_code)]

use events::{
    BuyerId, ClientId, CorrelationId, Currency, Envelope, Event, EventId, Money, OrderId,
    PaymentId, PaymentOrder, PaymentRequested, SellerId, Timestamp,
};
use projections::{Incoming, Projection, apply_batch};
use std::collections::BTreeMap;
use storage::Db;
use streaming::MessageMeta;

/// `both!(name, body)`: `name::postgres` and `name::sqlite`, each on a
/// fresh, migrated database.
#[macro_export]
macro_rules! both {
    ($name:ident, $body:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let db = storage::testing::fresh_postgres()
                    .await
                    .expect("fresh postgres");
                reconcile::migrate(&db).await.expect("migrate");
                super::$body(db).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let (db, _dir) = storage::testing::fresh_sqlite()
                    .await
                    .expect("fresh sqlite");
                reconcile::migrate(&db).await.expect("migrate");
                super::$body(db).await;
            }
        }
    };
}

pub fn envelope(payment: Option<PaymentId>, tag: &str, at: i64, event: Event) -> Envelope {
    let parent = payment.map(|p| p.as_uuid()).unwrap_or(uuid::Uuid::nil());
    Envelope {
        event_id: EventId::derive(parent, tag),
        occurred_at: Timestamp::from_micros(at),
        payment_id: payment,
        correlation_id: CorrelationId::from_uuid(parent),
        causation_id: None,
        producer: "reconcile-test".into(),
        schema_version: events::SCHEMA_VERSION,
        event,
    }
}

/// A one-order payment: (its PaymentRequested, payment id, order id).
pub fn request(key: &str, amount: Money, at: i64) -> (Envelope, PaymentId, OrderId) {
    let client = ClientId::parse("recon-client").unwrap();
    let payment = PaymentId::derive(&client, key);
    let order = OrderId::derive(payment, 0);
    let env = envelope(
        Some(payment),
        "requested",
        at,
        PaymentRequested {
            client_id: client,
            idempotency_key: Some(key.into()),
            buyer_id: BuyerId::parse("buyer-1").unwrap(),
            orders: vec![PaymentOrder {
                order_id: order,
                seller_id: SellerId::parse("seller-1").unwrap(),
                amount,
            }],
            metadata: BTreeMap::new(),
        }
        .into(),
    );
    (env, payment, order)
}

pub fn eur(m: i64) -> Money {
    Money::new(m, Currency::EUR)
}

/// Applies `envs` to both projections with the real projection code, in
/// batches of `batch`; panics on any rejection.
pub async fn apply(db: &Db, envs: &[Envelope], batch: usize, projections: &[Projection]) {
    let metas: Vec<MessageMeta> = (0..envs.len())
        .map(|i| MessageMeta {
            topic: "test".into(),
            partition: 0,
            offset: i64::try_from(i).unwrap(),
            timestamp_ms: None,
        })
        .collect();
    for p in projections {
        for (chunk, metas) in envs.chunks(batch).zip(metas.chunks(batch)) {
            let inc: Vec<Incoming<'_>> = chunk
                .iter()
                .zip(metas)
                .map(|(envelope, meta)| Incoming { envelope, meta })
                .collect();
            let out = apply_batch(db, *p, &inc).await.expect("apply");
            for (o, e) in out.iter().zip(chunk) {
                assert!(
                    !matches!(o, streaming::Outcome::Rejected { .. }),
                    "{} rejected: {o:?}",
                    e.event_type()
                );
            }
        }
    }
}

pub async fn count(db: &Db, sql: &str) -> i64 {
    match db {
        Db::Postgres(p) => sqlx::query_scalar::<_, i64>(sql).fetch_one(p).await,
        Db::Sqlite(p) => sqlx::query_scalar::<_, i64>(sql).fetch_one(p).await,
    }
    .expect("count query")
}

/// Decoded events of the test's reconciliation topic (exactly `n`).
pub async fn reconciliation_events(k: &streaming::testing::TestKafka, n: usize) -> Vec<Envelope> {
    let recs =
        streaming::testing::read_topic(&k.cfg, &k.topic(events::TopicKind::Reconciliation), n)
            .await;
    recs.iter()
        .map(|r| events::avro::decode(&r.payload).expect("decodes"))
        .collect()
}

pub async fn exec(db: &Db, sql: &str) {
    match db {
        Db::Postgres(p) => sqlx::query(sql).execute(p).await.map(drop),
        Db::Sqlite(p) => sqlx::query(sql).execute(p).await.map(drop),
    }
    .expect("statement")
}
