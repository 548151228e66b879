use crate::harness::*;
use events::{EventType, TopicKind};
use rdkafka::message::OwnedHeaders;
use reqwest::StatusCode;
use streaming::EventProducer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_requests_are_validated_risk_checked_and_deduplicated() {
    let h = start(Backend::Postgres).await;
    let key = h.client("shop-in").await;
    let producer = EventProducer::new(&h.kafka, "upstream").unwrap();
    let inbound = h.kafka.topology().name(TopicKind::Inbound);

    // A valid request, signed, produced twice (upstream retry).
    let mut env = with_card(
        events::samples::one_of_each("shop-in", "in-1", events::Timestamp::now()).remove(0),
    );
    let signed = |env: events::Envelope| {
        let (producer, inbound, key) = (producer.clone(), inbound.clone(), key.clone());
        async move {
            payment_handler::inbound::append_signed(&producer, &inbound, &env, &key)
                .await
                .unwrap();
        }
    };
    signed(env.clone()).await;
    signed(env.clone()).await;
    // Poison: a client the key does not belong to, a zero amount, a wrong
    // event type, garbage.
    let mut unknown = with_card(
        events::samples::one_of_each("shop-nobody", "in-2", events::Timestamp::now()).remove(0),
    );
    unknown.event_id = events::EventId::new_random();
    signed(unknown).await;
    if let events::Event::PaymentRequested(p) = &mut env.event {
        p.idempotency_key = Some("in-3".into());
        p.orders[0].amount = events::Money::new(0, events::Currency::EUR);
    }
    signed(env.clone()).await;
    let wrong_type =
        events::samples::one_of_each("shop-in", "in-4", events::Timestamp::now()).remove(1);
    signed(wrong_type).await;
    producer
        .send_raw(
            &inbound,
            Some(b"k"),
            Some(b"garbage"),
            OwnedHeaders::new(),
            None,
        )
        .await
        .unwrap();

    // The valid one becomes a payment, readable over HTTP with the id an
    // HTTP request with the same key would have had.
    let client = events::ClientId::parse("shop-in").unwrap();
    let id = events::PaymentId::derive(&client, "in-1").to_string();
    let mut found = None;
    for _ in 0..100 {
        let (s, v) = h.get_payment(&key, &id).await;
        if s == StatusCode::OK {
            found = Some(v);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let v = found.expect("the inbound payment appeared");
    assert_eq!(v["status"], "processing");

    let dlq = h.dead_letters().await;
    let mut kinds: Vec<String> = dlq
        .iter()
        .map(|r| {
            streaming::dlq::header_str(&r.headers, "dlq.error_kind")
                .unwrap()
                .to_owned()
        })
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "invalid_amount",
            "not_single_object",
            "unauthenticated",
            "unexpected_event_type",
        ]
    );

    let evs = h.payment_events().await;
    assert_eq!(
        count_type(&evs, EventType::PaymentRequested),
        1,
        "the duplicate inbound request made no second payment"
    );
    assert_eq!(count_type(&evs, EventType::RiskApproved), 1);
}

/// The sample request with a payment method, as every payment needs.
pub fn with_card(mut env: events::Envelope) -> events::Envelope {
    if let events::Event::PaymentRequested(p) = &mut env.event {
        p.metadata
            .insert("card_token".to_owned(), "tok_visa".to_owned());
    }
    env
}
