//! Issue 12 at the executor's intake: a payment it already knows never gets
//! more orders (H1), a payment without a card token is dead-lettered and
//! never charged with a default (L4), amounts above `Money::MAX_MINOR` are
//! dead-lettered (M1).

use crate::harness::*;
use events::{
    BuyerId, ClientId, Event, EventType, Money, OrderId, PaymentId, PaymentOrder, PaymentRequested,
    RiskApproved, SellerId, TopicKind,
};
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use std::collections::BTreeMap;
use std::time::Duration;

fn succeeded(evs: &[events::Envelope], order: OrderId) -> bool {
    evs.iter()
        .any(|e| matches!(&e.event, Event::OrderSucceeded(s) if s.order_id == order))
}

/// An approved payment with the given metadata and amounts.
async fn pay_with(
    env: &Env,
    metadata: BTreeMap<String, String>,
    amounts: &[i64],
) -> (PaymentId, Vec<OrderId>) {
    let payment = PaymentId::new_random();
    let orders: Vec<PaymentOrder> = amounts
        .iter()
        .enumerate()
        .map(|(i, a)| PaymentOrder {
            order_id: OrderId::derive(payment, i),
            seller_id: SellerId::parse("seller-x").unwrap(),
            amount: eur(*a),
        })
        .collect();
    let ids = orders.iter().map(|o| o.order_id).collect();
    let requested = envelope(
        payment,
        "requested",
        PaymentRequested {
            client_id: ClientId::parse("shop").unwrap(),
            idempotency_key: None,
            buyer_id: BuyerId::parse("buyer-1").unwrap(),
            orders,
            metadata,
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
    env.producer.append(&requested).await.unwrap();
    env.producer.append(&approved).await.unwrap();
    (payment, ids)
}

/// (error kind, reason) of every dead letter, once the topic is quiet.
async fn dead_letters(env: &Env) -> Vec<(String, String)> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", format!("reader-{}", uuid::Uuid::now_v7()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer
        .subscribe(&[&env.producer.topology().name(TopicKind::DeadLetter)])
        .unwrap();
    let mut out = Vec::new();
    let mut wait = Duration::from_secs(15);
    while let Ok(Ok(m)) = tokio::time::timeout(wait, consumer.recv()).await {
        let hs = streaming::dlq::owned_headers(m.headers());
        out.push((
            streaming::dlq::header_str(&hs, "dlq.error_kind")
                .unwrap_or_default()
                .to_owned(),
            streaming::dlq::header_str(&hs, "dlq.reason")
                .unwrap_or_default()
                .to_owned(),
        ));
        wait = Duration::from_secs(2);
    }
    out.sort();
    out
}

async fn intake_refuses_what_it_must_never_charge(backend: Backend) {
    let env = start(Setup {
        backend,
        ..Setup::default()
    })
    .await;

    // H1: a payment charged with one order, then the same ids again with
    // three orders (a key reused after the handler's retention, before the
    // handler refused that): the two new orders are never charged.
    let payment = PaymentId::new_random();
    let (_, first) = env.pay_as(payment, "tok_visa", &[1000]).await;
    env.wait_for(60, "the first order charged", |evs| {
        succeeded(evs, first[0])
    })
    .await;
    let (_, again) = env.pay_as(payment, "tok_visa", &[1000, 2000, 3000]).await;

    // L4: no card token; M1: amounts above the shared bound.
    let (_, no_card) = pay_with(&env, BTreeMap::new(), &[500]).await;
    let card = || BTreeMap::from([("card_token".to_owned(), "tok_visa".to_owned())]);
    let (_, too_big) = pay_with(&env, card(), &[Money::MAX_MINOR + 1]).await;
    let (_, total_too_big) = pay_with(&env, card(), &[Money::MAX_MINOR, 1]).await;
    let nul = BTreeMap::from([("card_token".to_owned(), "tok\u{0}visa".to_owned())]);
    let (_, nul_card) = pay_with(&env, nul, &[700]).await;

    // A valid payment after all of them is charged: the intake went on.
    let (_, marker) = pay_with(&env, card(), &[100]).await;
    let evs = env
        .wait_for(60, "the marker payment charged", |evs| {
            succeeded(evs, marker[0])
        })
        .await;

    assert_eq!(env.sim_stats(first[0]).await.0, 1, "{backend:?}");
    for o in [
        again[1],
        again[2],
        no_card[0],
        too_big[0],
        total_too_big[0],
        nul_card[0],
    ] {
        assert_eq!(
            env.sim_stats(o).await,
            (0, 0),
            "{backend:?}: order {o} must never reach the PSP"
        );
        assert!(
            of_order(&evs, o).is_empty(),
            "{backend:?}: order {o} was executed"
        );
    }
    assert_eq!(
        evs.iter()
            .filter(|e| e.event_type() == EventType::OrderSucceeded)
            .count(),
        2,
        "only the first order and the marker were charged"
    );
    let kinds: Vec<String> = dead_letters(&env)
        .await
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    // Each refused payment's PaymentRequested is dead-lettered; its
    // RiskApproved finds no order and is dead-lettered too.
    for want in [
        "missing_payment_method",
        "invalid_amount",
        "invalid_payment_method",
    ] {
        assert!(kinds.iter().any(|k| k == want), "{backend:?}: {kinds:?}");
    }
}

testkit::both!(
    intake_refuses_what_it_must_never_charge,
    intake_refuses_what_it_must_never_charge
);
