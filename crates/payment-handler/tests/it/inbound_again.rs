//! An inbound message refused once is dead-lettered every time it is
//! delivered: when the consumer loop runs a batch again (after a failure
//! further on, or to narrow a deterministic failure down), the messages it
//! already refused must not turn into silent duplicates.

use crate::harness::*;
use crate::inbound::with_card;
use events::TopicKind;
use streaming::EventProducer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_inbound_message_delivered_again_is_dead_lettered_again() {
    let h = start(Backend::Postgres).await;
    let key = h.client("shop-again").await;
    let producer = EventProducer::new(&h.kafka, "upstream").unwrap();
    let inbound = h.kafka.topology().name(TopicKind::Inbound);
    let mut env = with_card(
        events::samples::one_of_each("shop-again", "again-1", events::Timestamp::now()).remove(0),
    );
    if let events::Event::PaymentRequested(p) = &mut env.event {
        p.orders[0].amount = events::Money::new(0, events::Currency::EUR);
    }
    // The same refused message twice (as a re-run batch delivers it).
    for _ in 0..2 {
        payment_handler::inbound::append_signed(&producer, &inbound, &env, &key)
            .await
            .unwrap();
    }
    let dlq = h.dead_letters().await;
    let kinds: Vec<&str> = dlq
        .iter()
        .map(|r| streaming::dlq::header_str(&r.headers, "dlq.error_kind").unwrap())
        .collect();
    assert_eq!(kinds.len(), 2, "{kinds:?}");
    assert_eq!(kinds[0], kinds[1], "{kinds:?}");
    assert_ne!(kinds[0], "unauthenticated");
}

/// A burst of inbound messages (the consumer hands them over in batches,
/// whose first message per key is submitted through the group commit all
/// at once): one payment per key, the redelivered ones duplicates, the
/// unsigned ones and a key reused for another request dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_inbound_messages_gets_one_answer_per_message() {
    const N: usize = 40;
    let h = start(Backend::Postgres).await;
    let key = h.client("shop-burst").await;
    let producer = EventProducer::new(&h.kafka, "upstream").unwrap();
    let inbound = h.kafka.topology().name(TopicKind::Inbound);
    let request = |i: usize| {
        with_card(
            events::samples::one_of_each(
                "shop-burst",
                &format!("burst-{i}"),
                events::Timestamp::now(),
            )
            .remove(0),
        )
    };
    let mut sends = Vec::new();
    for i in 0..N {
        sends.push(request(i));
        if i % 8 == 0 {
            // Upstream retried it.
            sends.push(request(i));
        }
    }
    // Key burst-1 again, for a different request.
    let mut reused = request(1);
    reused.event_id = events::EventId::new_random();
    if let events::Event::PaymentRequested(p) = &mut reused.event {
        p.orders[0].amount = events::Money::new(777, events::Currency::EUR);
    }
    sends.push(reused);
    for env in &sends {
        payment_handler::inbound::append_signed(&producer, &inbound, env, &key)
            .await
            .unwrap();
    }
    // Two unsigned.
    for i in [100, 101] {
        producer.append_to(&inbound, &request(i)).await.unwrap();
    }
    let dlq = h.dead_letters().await;
    let mut kinds: Vec<&str> = dlq
        .iter()
        .map(|r| streaming::dlq::header_str(&r.headers, "dlq.error_kind").unwrap())
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "idempotency_key_reused",
            "unauthenticated",
            "unauthenticated"
        ]
    );
    let evs = h.payment_events().await;
    assert_eq!(count_type(&evs, events::EventType::PaymentRequested), N);
    assert_eq!(
        count_type(&evs, events::EventType::RiskApproved)
            + count_type(&evs, events::EventType::RiskRejected),
        N
    );
}
