//! Poison never stalls the executor's partition (issue 12, H2): events
//! produced straight onto the payments topic, bypassing the HTTP edge, that
//! the intake cannot store (a NUL byte PostgreSQL refuses in text: SQLSTATE
//! 22021, a deterministic failure) are dead-lettered with the reason, and a
//! valid payment behind them in the same partition is executed.

use crate::harness::*;
use events::{
    BuyerId, ClientId, Envelope, Event, OrderId, PaymentId, PaymentOrder, PaymentRequested,
    RefundId, RefundRequested, RiskApproved, SellerId, TopicKind,
};
use rdkafka::message::OwnedHeaders;
use std::collections::BTreeMap;
use std::time::Duration;
use streaming::reader::{End, Start, TopicReader};
use streaming::{KafkaConfig, dlq};

fn requested(payment: PaymentId, card_token: &str, amount: i64) -> (Envelope, Envelope) {
    let order = PaymentOrder {
        order_id: OrderId::derive(payment, 0),
        seller_id: SellerId::parse("seller-p").unwrap(),
        amount: eur(amount),
    };
    let req = envelope(
        payment,
        "requested",
        PaymentRequested {
            client_id: ClientId::parse("shop").unwrap(),
            idempotency_key: None,
            buyer_id: BuyerId::parse("buyer-p").unwrap(),
            orders: vec![order],
            metadata: BTreeMap::from([("card_token".to_owned(), card_token.to_owned())]),
        }
        .into(),
    );
    let approved = envelope(
        payment,
        "risk",
        RiskApproved {
            rule_set: "test".into(),
        }
        .into(),
    );
    (req, approved)
}

/// Sends `e` keyed by `key` (so it lands in `key`'s partition).
async fn send_keyed(env: &Env, key: &str, e: &Envelope) {
    let topic = env.producer.topology().name(TopicKind::Payments);
    let bytes = events::avro::encode(e).unwrap();
    env.producer
        .send_raw(
            &topic,
            Some(key.as_bytes()),
            Some(&bytes),
            OwnedHeaders::new(),
            None,
        )
        .await
        .unwrap();
}

/// The dead letter of event `id`, waiting up to 60 s for it.
async fn dead_letter_of(env: &Env, id: &str) -> streaming::reader::Record {
    let topic = env.producer.topology().name(TopicKind::DeadLetter);
    let cfg = KafkaConfig::local(&brokers(), "unused.", 2);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut r = TopicReader::open(
            &cfg,
            std::slice::from_ref(&topic),
            Start::Beginning,
            End::Latest,
            None,
        )
        .await
        .unwrap();
        while let Some(batch) = r.next_batch(100).await.unwrap() {
            for rec in batch {
                if let Ok(e) = events::avro::decode(&rec.payload)
                    && e.event_id.to_string() == id
                {
                    return rec;
                }
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no dead letter for {id}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_bytes_are_dead_lettered_and_the_payment_behind_them_executed_postgres() {
    let env = start(Setup::default()).await;
    // A payment the executor charges first, so a refund of it is valid
    // but for its reason.
    let (first, orders) = env.pay("tok_visa", &[1000]).await;
    env.wait_for(60, "the first payment charged", |evs| {
        evs.iter()
            .any(|e| matches!(&e.event, Event::OrderSucceeded(s) if s.order_id == orders[0]))
    })
    .await;
    let key = first.to_string();

    // 1. A refund whose free-text reason holds a NUL byte: the intake has
    //    no rule against it, PostgreSQL refuses it (22021).
    let refund = RefundId::new_random();
    let bad_refund = envelope(
        first,
        "refund-nul",
        RefundRequested {
            refund_id: refund,
            order_id: orders[0],
            amount: eur(100),
            reason: "customer\u{0}asked".into(),
        }
        .into(),
    );
    send_keyed(&env, &key, &bad_refund).await;
    // 2. A payment whose card token holds a NUL byte, same partition.
    let poison = PaymentId::new_random();
    let (poison_req, poison_ok) = requested(poison, "tok\u{0}visa", 700);
    send_keyed(&env, &key, &poison_req).await;
    send_keyed(&env, &key, &poison_ok).await;
    // 3. A valid payment behind them in the same partition.
    let valid = PaymentId::new_random();
    let (valid_req, valid_ok) = requested(valid, "tok_visa", 1500);
    send_keyed(&env, &key, &valid_req).await;
    send_keyed(&env, &key, &valid_ok).await;

    let valid_order = OrderId::derive(valid, 0);
    env.wait_for(60, "the valid payment behind the poison charged", |evs| {
        evs.iter()
            .any(|e| matches!(&e.event, Event::OrderSucceeded(s) if s.order_id == valid_order))
    })
    .await;
    let db = storage::Db::connect(&env.db_url).await.unwrap();
    let storage::Db::Postgres(p) = &db else {
        unreachable!()
    };
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM executor_orders WHERE payment_id = $1")
        .bind(valid.to_string())
        .fetch_one(p)
        .await
        .unwrap();
    assert_eq!(n, 1, "the valid payment's order is recorded");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM executor_orders WHERE payment_id = $1")
        .bind(poison.to_string())
        .fetch_one(p)
        .await
        .unwrap();
    assert_eq!(n, 0, "the poison payment has no orders");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM executor_refunds WHERE refund_id = $1")
        .bind(refund.to_string())
        .fetch_one(p)
        .await
        .unwrap();
    assert_eq!(n, 0);

    // The refund failed in the database: dead-lettered as a data exception.
    let d = dead_letter_of(&env, &bad_refund.event_id.to_string()).await;
    assert_eq!(d.header(dlq::H_ERROR_KIND), Some(storage::KIND_DATA));
    let reason = d.header(dlq::H_REASON).unwrap();
    assert!(reason.contains("0x00"), "{reason}");
    assert_eq!(
        d.header(dlq::H_CONSUMER_GROUP)
            .map(|g| g.ends_with("executor")),
        Some(true)
    );
    // The card token is refused (by the intake's rule, or else by the
    // database): dead-lettered with a reason, never charged.
    let d = dead_letter_of(&env, &poison_req.event_id.to_string()).await;
    assert!(d.header(dlq::H_ERROR_KIND).is_some_and(|k| !k.is_empty()));
    assert!(d.header(dlq::H_REASON).is_some_and(|r| !r.is_empty()));
    assert_eq!(env.sim_stats(OrderId::derive(poison, 0)).await, (0, 0));
}
