#![allow(dead_code)]

pub use testkit::{Backend, brokers, envelope, eur, exec, produce_all, strings, wait_caught_up};

use events::{Envelope, Money, OrderId, OrderSucceeded, PaymentId, Timestamp};
use projections::{Incoming, Projection, apply_batch};
use std::collections::BTreeMap;
use storage::Db;
use streaming::{KafkaConfig, MessageMeta, Outcome};

/// `both!(name, body)`: [`testkit::both!`] on databases migrated for the
/// projections (`name::postgres` and `name::sqlite`).
#[macro_export]
macro_rules! both {
    ($name:ident, $body:ident) => {
        testkit::both!($name, $body, projections::migrate);
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
pub use testkit::one_order_payment as request_for;

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

// ---- Kafka ----

/// Fresh topics under a unique prefix: (their configuration, the unique
/// part of the prefix).
pub async fn test_kafka(partitions: i32) -> (KafkaConfig, String) {
    let k = testkit::TestKafka::new(partitions).await;
    (k.cfg, k.unique)
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

/// Sessions of this PostgreSQL database waiting for a lock.
pub async fn lock_waiters(db: &Db) -> i64 {
    testkit::count(
        db,
        "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .await
}
