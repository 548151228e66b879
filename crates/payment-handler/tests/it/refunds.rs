use crate::harness::*;
use events::{EventType, TopicKind};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;
use streaming::EventProducer;

/// Appends what the executor would after charging an order.
pub async fn succeed(h: &Handler, payment: &str, order: &str, amount: i64) {
    let producer = EventProducer::new(&h.kafka, "fake-psp-outcome").unwrap();
    let payment_id: events::PaymentId = payment.parse().unwrap();
    let order_id: events::OrderId = order.parse().unwrap();
    let env = events::Envelope {
        event_id: events::EventId::derive(order_id.as_uuid(), "succeeded"),
        occurred_at: events::Timestamp::now(),
        payment_id: Some(payment_id),
        correlation_id: events::CorrelationId::from_uuid(payment_id.as_uuid()),
        causation_id: None,
        producer: "test".into(),
        schema_version: events::SCHEMA_VERSION,
        event: events::OrderSucceeded {
            order_id,
            psp_reference: "ch_test".into(),
            amount: events::Money::new(amount, events::Currency::EUR),
            fee: events::Money::new(10, events::Currency::EUR),
        }
        .into(),
    };
    producer
        .append_to(&h.kafka.topology().name(TopicKind::Payments), &env)
        .await
        .unwrap();
}

pub async fn wait_succeeded(h: &Handler, key: &str, pid: &str) {
    for _ in 0..100 {
        if h.get_payment(key, pid).await.1["orders"][0]["status"] == "succeeded" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("order of {pid} never succeeded");
}

async fn refund(
    h: &Handler,
    key: &str,
    payment: &str,
    idem: &str,
    body: Value,
) -> (StatusCode, bool, Value) {
    let r = h
        .http
        .post(format!("{}/v1/payments/{payment}/refunds", h.base))
        .bearer_auth(key)
        .header("Idempotency-Key", idem)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let replay = r.headers().get("idempotent-replayed").is_some();
    (r.status(), replay, r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_are_idempotent_and_never_exceed_the_capture() {
    let h = start(Backend::Postgres).await;
    let key = h.client("shop-rf").await;
    let (_, _, body) = h
        .post(
            Some(&key),
            Some("p-1"),
            &payment("b", &[("s1", 1000, "EUR"), ("s2", 500, "EUR")]),
        )
        .await;
    let p: Value = serde_json::from_str(&body).unwrap();
    let pid = p["payment_id"].as_str().unwrap().to_owned();
    let o1 = p["orders"][0]["order_id"].as_str().unwrap().to_owned();
    let o2 = p["orders"][1]["order_id"].as_str().unwrap().to_owned();

    // Not captured yet: 409, not stored (it will change).
    let (s, _, e) = refund(
        &h,
        &key,
        &pid,
        "r-early",
        json!({"order_id": o1, "amount_minor": 100}),
    )
    .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("order_not_captured"))
    );

    succeed(&h, &pid, &o1, 1000).await;
    wait_succeeded(&h, &key, &pid).await;

    let (s, _, r1) = refund(
        &h,
        &key,
        &pid,
        "r-1",
        json!({"order_id": o1, "amount_minor": 300, "reason": "damaged"}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{r1}");
    assert_eq!(
        (r1["amount_minor"].as_i64(), r1["status"].as_str()),
        (Some(300), Some("requested"))
    );
    let (s, replay, again) = refund(
        &h,
        &key,
        &pid,
        "r-1",
        json!({"order_id": o1, "amount_minor": 300, "reason": "damaged"}),
    )
    .await;
    assert_eq!((s, replay), (StatusCode::CREATED, true));
    assert_eq!(again, r1);

    let (s, _, e) = refund(
        &h,
        &key,
        &pid,
        "r-2",
        json!({"order_id": o1, "amount_minor": 701}),
    )
    .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("amount_exceeds_refundable")
        )
    );
    // Omitted amount: all that is left.
    let (s, _, rest) = refund(&h, &key, &pid, "r-3", json!({"order_id": o1})).await;
    assert_eq!(
        (s, rest["amount_minor"].as_i64()),
        (StatusCode::CREATED, Some(700))
    );
    let (s, _, _) = refund(
        &h,
        &key,
        &pid,
        "r-4",
        json!({"order_id": o1, "amount_minor": 1}),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);

    // Field errors, foreign orders, other clients.
    let (s, _, e) = refund(&h, &key, &pid, "r-5", json!({"order_id": "nope"})).await;
    assert_eq!(
        (s, e["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("order_id"))
    );
    let (s, _, e) = refund(
        &h,
        &key,
        &pid,
        "r-6",
        json!({"order_id": uuid::Uuid::now_v7().to_string()}),
    )
    .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("order_not_in_payment"))
    );
    let other = h.client("shop-other").await;
    let (s, _, _) = refund(&h, &other, &pid, "r-7", json!({"order_id": o2})).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // The same key on another endpoint is a different request.
    let (s, _, _) = refund(&h, &key, &pid, "p-1", json!({"order_id": o1})).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);

    let evs = h.payment_events().await;
    let amounts: Vec<i64> = evs
        .iter()
        .filter_map(|e| match &e.event {
            events::Event::RefundRequested(r) => Some(r.amount.amount_minor()),
            _ => None,
        })
        .collect();
    assert_eq!(amounts, [300, 700]);
    assert_eq!(count_type(&evs, EventType::RefundRequested), 2);
}
