#![allow(dead_code)]

pub use testkit::{count, envelope, eur};

use events::{Envelope, Money, OrderId, PaymentId};
use projections::{Incoming, Projection, apply_batch};
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
    testkit::one_order_payment("recon-client", key, "buyer-1", "seller-1", amount, at)
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
