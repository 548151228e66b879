#![allow(dead_code)]

pub use testkit::{count, envelope, eur};

use events::{
    BuyerId, ClientId, Envelope, Money, OrderId, PaymentId, PaymentOrder, PaymentRequested,
    SellerId,
};
use projections::{Incoming, Projection, apply_batch};
use std::collections::BTreeMap;
use storage::Db;
use streaming::MessageMeta;
use testkit::TestKafka;

/// `both!(name, body)`: [`testkit::both!`] on databases migrated for
/// reconciliation (`name::postgres` and `name::sqlite`).
#[macro_export]
macro_rules! both {
    ($name:ident, $body:ident) => {
        testkit::both!($name, $body, reconcile::migrate);
    };
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

/// Decoded events of the test's reconciliation topic (exactly `n`).
pub async fn reconciliation_events(k: &TestKafka, n: usize) -> Vec<Envelope> {
    let recs = testkit::read_topic(&k.cfg, &k.topic(events::TopicKind::Reconciliation), n).await;
    recs.iter()
        .map(|r| events::avro::decode(&r.payload).expect("decodes"))
        .collect()
}

/// Runs one statement; panics on error.
pub async fn exec(db: &Db, sql: &str) {
    testkit::exec(db, sql).await.expect("statement")
}
