//! Issue 12: input validation at the edge (HTTP and inbound alike), an
//! Idempotency-Key that never buys a second decision, signed inbound
//! messages, velocity per (client, buyer).

use crate::harness::*;
use crate::inbound::with_card;
use events::{EventType, Money, TopicKind};
use payment_handler::HandlerArgs;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;
use streaming::EventProducer;

fn body_with(metadata: Value, amounts: &[i64]) -> String {
    let orders: Vec<_> = amounts
        .iter()
        .map(|a| json!({"seller_id": "s1", "amount_minor": a, "currency": "EUR"}))
        .collect();
    json!({"buyer_id": "b1", "orders": orders, "metadata": metadata}).to_string()
}

fn field(body: &str) -> (String, String) {
    let v: Value = serde_json::from_str(body).unwrap();
    (
        v["error"]["field"].as_str().unwrap_or_default().to_owned(),
        v["error"]["code"].as_str().unwrap_or_default().to_owned(),
    )
}

async fn control_characters_bad_amounts_and_missing_card_tokens_are_refused_at_http(
    backend: Backend,
) {
    let h = start(backend).await;
    let key = h.client("shop-edge").await;
    let mut n = 0;
    let mut post = async |body: String| {
        n += 1;
        h.post(Some(&key), Some(&format!("edge-{n}")), &body).await
    };
    // A NUL (and other controls) in every free-text field of a payment.
    let cases = [
        (json!({"card_token": "tok\u{0}visa"}), "metadata.card_token"),
        (
            json!({"card_token": "tok_visa", "note": "a\u{0}b"}),
            "metadata.note",
        ),
        (
            json!({"card_token": "tok_visa", "note": "bell\u{7}"}),
            "metadata.note",
        ),
        (
            json!({"card_token": "tok_visa", "note": "del\u{7f}"}),
            "metadata.note",
        ),
        (
            json!({"card_token": "tok_visa", "note": "c1\u{85}"}),
            "metadata.note",
        ),
        (
            json!({"card_token": "tok_visa", "k\u{0}": "v"}),
            "metadata.k\\0",
        ),
    ];
    for (metadata, want) in cases {
        let (s, _, b) = post(body_with(metadata, &[1050])).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{backend:?} {b}");
        assert_eq!(
            field(&b),
            (want.to_owned(), "control_character".into()),
            "{b}"
        );
    }
    // Ids: buyer and seller.
    let (s, _, b) = post(
        json!({"buyer_id": "b\u{0}", "orders": [{"seller_id": "s1", "amount_minor": 1, "currency": "EUR"}], "metadata": {"card_token": "t"}}).to_string(),
    )
    .await;
    assert_eq!(
        (s, field(&b).0.as_str()),
        (StatusCode::BAD_REQUEST, "buyer_id"),
        "{b}"
    );
    let (s, _, b) = post(
        json!({"buyer_id": "b", "orders": [{"seller_id": "s\u{0}", "amount_minor": 1, "currency": "EUR"}], "metadata": {"card_token": "t"}}).to_string(),
    )
    .await;
    assert_eq!(
        (s, field(&b).0.as_str()),
        (StatusCode::BAD_REQUEST, "orders[0].seller_id"),
        "{b}"
    );
    // The amount bound `Money` owns, per order and per payment.
    let card = || json!({"card_token": "tok_visa"});
    let (s, _, b) = post(body_with(card(), &[Money::MAX_MINOR + 1])).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert_eq!(
        field(&b),
        ("orders[0].amount_minor".into(), "invalid_amount".into())
    );
    let (s, _, b) = post(body_with(card(), &[Money::MAX_MINOR, 1])).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert_eq!(field(&b), ("orders".into(), "invalid_amount".into()));
    // No payment method: refused, the field named.
    let (s, _, b) = post(body_with(json!({"cart": "c1"}), &[1050])).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert_eq!(
        field(&b),
        (
            "metadata.card_token".into(),
            "missing_payment_method".into()
        )
    );
    // A refund reason with a NUL: refused before anything is looked up.
    let pid = events::PaymentId::new_random();
    let r = h
        .http
        .post(format!("{}/v1/payments/{pid}/refunds", h.base))
        .bearer_auth(&key)
        .header("Idempotency-Key", "edge-refund")
        .body(json!({"order_id": uuid::Uuid::now_v7().to_string(), "reason": "r\u{0}"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        field(&r.text().await.unwrap()),
        ("reason".into(), "control_character".into())
    );
    // Nothing of it reached the payments topic; a valid payment does.
    let (s, _, b) = post(body_with(card(), &[1050])).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let evs = h.payment_events().await;
    assert_eq!(count_type(&evs, EventType::PaymentRequested), 1);
}
testkit::both!(
    control_characters_bad_amounts_and_missing_card_tokens_are_refused_at_http,
    control_characters_bad_amounts_and_missing_card_tokens_are_refused_at_http
);

/// The inbound consumer's dead-letter kinds, sorted.
async fn dead_letter_kinds(h: &Handler) -> Vec<(String, String)> {
    let dlq = h.dead_letters().await;
    let mut kinds: Vec<(String, String)> = dlq
        .iter()
        .map(|r| {
            (
                streaming::dlq::header_str(&r.headers, "dlq.error_kind")
                    .unwrap()
                    .to_owned(),
                streaming::dlq::header_str(&r.headers, "dlq.reason")
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect();
    kinds.sort();
    kinds
}

async fn wait_payment(h: &Handler, key: &str, client: &str, idem: &str) -> Value {
    let client = events::ClientId::parse(client).unwrap();
    let id = events::PaymentId::derive(&client, idem).to_string();
    for _ in 0..150 {
        let (s, v) = h.get_payment(key, &id).await;
        if s == StatusCode::OK {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("payment {idem} did not appear");
}

async fn inbound_messages_must_be_signed_by_the_paying_client_and_validated_like_http(
    backend: Backend,
) {
    let h = start(backend).await;
    let key = h.client("shop-sig").await;
    let other = h.client("shop-other").await;
    let producer = EventProducer::new(&h.kafka, "upstream").unwrap();
    let inbound = h.kafka.topology().name(TopicKind::Inbound);
    let request = |idem: &str| {
        with_card(
            events::samples::one_of_each("shop-sig", idem, events::Timestamp::now()).remove(0),
        )
    };
    // All on one partition key order: the poison goes first, the valid
    // message behind it must still be processed.
    // 1. Unsigned.
    producer
        .append_to(&inbound, &request("sig-unsigned"))
        .await
        .unwrap();
    // 2. Signed with another client's key.
    payment_handler::inbound::append_signed(&producer, &inbound, &request("sig-other"), &other)
        .await
        .unwrap();
    // 3. A signature of another message (replayed onto this one).
    let env = request("sig-replayed");
    let payload = events::avro::encode(&env).unwrap();
    let wrong = payment_handler::inbound::sign(&key, Some(b"another key"), &payload).unwrap();
    let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
        key: payment_handler::inbound::SIGNATURE_HEADER,
        value: Some(wrong.as_str()),
    });
    producer
        .send_raw(
            &inbound,
            Some(env.partition_key().as_bytes()),
            Some(&payload),
            headers,
            None,
        )
        .await
        .unwrap();
    // 4. Signed, but a NUL in each free-text field.
    for (i, (k, v)) in [
        ("card_token", "tok\u{0}"),
        ("note", "x\u{0}y"),
        ("k\u{0}", "v"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut env = request(&format!("sig-nul-{i}"));
        if let events::Event::PaymentRequested(p) = &mut env.event {
            p.metadata.insert(k.to_owned(), v.to_owned());
        }
        payment_handler::inbound::append_signed(&producer, &inbound, &env, &key)
            .await
            .unwrap();
    }
    // 5. Signed, without a card token.
    let mut env = request("sig-no-card");
    if let events::Event::PaymentRequested(p) = &mut env.event {
        p.metadata.remove("card_token");
    }
    payment_handler::inbound::append_signed(&producer, &inbound, &env, &key)
        .await
        .unwrap();
    // 6. Signed and valid.
    payment_handler::inbound::append_signed(&producer, &inbound, &request("sig-ok"), &key)
        .await
        .unwrap();

    let v = wait_payment(&h, &key, "shop-sig", "sig-ok").await;
    assert_eq!(v["status"], "processing", "{backend:?}");
    let kinds: Vec<String> = dead_letter_kinds(&h)
        .await
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        kinds,
        [
            "control_character",
            "control_character",
            "control_character",
            "missing_payment_method",
            "unauthenticated",
            "unauthenticated",
            "unauthenticated",
        ],
        "{backend:?}"
    );
    let evs = h.payment_events().await;
    assert_eq!(
        count_type(&evs, EventType::PaymentRequested),
        1,
        "only the signed valid request became a payment"
    );
}
testkit::both!(
    inbound_messages_must_be_signed_by_the_paying_client_and_validated_like_http,
    inbound_messages_must_be_signed_by_the_paying_client_and_validated_like_http
);

async fn a_key_reused_after_the_retention_never_decides_again(backend: Backend) {
    let mut args = HandlerArgs::for_tests();
    args.idempotency_retention_secs = Some(1);
    let h = start_with(backend, args).await;
    let key = h.client("shop-reuse").await;
    let first = payment("b-reuse", &[("s1", 1000, "EUR")]);
    let (s, _, b) = h.post(Some(&key), Some("order-4711"), &first).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let created: Value = serde_json::from_str(&b).unwrap();

    // Past the retention: the idempotency row is expired (and reaped).
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let db = storage::Db::connect(&h.db_url).await.unwrap();
    payment_handler::store::idem_reap(&db).await.unwrap();

    // The same key with more orders: refused, nothing decided.
    let more = payment(
        "b-other",
        &[
            ("s1", 1000, "EUR"),
            ("s2", 2000, "EUR"),
            ("s3", 3000, "EUR"),
        ],
    );
    let (s, _, b) = h.post(Some(&key), Some("order-4711"), &more).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{backend:?} {b}");
    assert_eq!(field(&b).1, "idempotency_key_reused");
    // Again (the 422 is not a decision either).
    let (s, _, _) = h.post(Some(&key), Some("order-4711"), &more).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);

    // The same request: the payment's current view, as a replay.
    let (s, hs, b) = h.post(Some(&key), Some("order-4711"), &first).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(hs.get("idempotent-replayed").unwrap(), "true");
    let replayed: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(replayed["payment_id"], created["payment_id"]);
    assert_eq!(replayed["orders"].as_array().unwrap().len(), 1);

    // Exactly one decision on the topic.
    let evs = h.payment_events().await;
    assert_eq!(count_type(&evs, EventType::PaymentRequested), 1);
    assert_eq!(count_type(&evs, EventType::RiskApproved), 1);
    let orders: usize = evs
        .iter()
        .filter_map(|e| match &e.event {
            events::Event::PaymentRequested(p) => Some(p.orders.len()),
            _ => None,
        })
        .sum();
    assert_eq!(orders, 1, "no second PaymentRequested with more orders");
}
testkit::both!(
    a_key_reused_after_the_retention_never_decides_again,
    a_key_reused_after_the_retention_never_decides_again
);

async fn one_clients_velocity_does_not_reject_another_clients_buyer_of_the_same_id(
    backend: Backend,
) {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        "name = \"t@1\"\nallowed_currencies = [\"EUR\"]\n[max_order_minor]\nEUR = 1000000000000000\n\
         [max_payment_minor]\nEUR = 1000000000000000\n[velocity]\nwindow_secs = 3600\nmax_count = 2\n\
         [velocity.max_amount_minor]\nEUR = 1000000000000000\n",
    )
    .unwrap();
    let mut args = HandlerArgs::for_tests();
    args.risk_rules = Some(rules);
    let h = start_with(backend, args).await;
    let a = h.client("shop-a").await;
    let b = h.client("shop-b").await;
    // Client A: alice at the bound twice (the second over the velocity
    // amount, whose sum must not overflow), then once more: over the count.
    let big = payment("alice", &[("s1", Money::MAX_MINOR, "EUR")]);
    let mut statuses = Vec::new();
    for i in 0..3 {
        let (s, _, body) = h.post(Some(&a), Some(&format!("a-{i}")), &big).await;
        assert_eq!(s, StatusCode::CREATED, "{backend:?} {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        statuses.push((
            v["status"].as_str().unwrap().to_owned(),
            v["rejection"]["rule"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        ));
    }
    assert_eq!(
        statuses,
        [
            ("processing".to_owned(), String::new()),
            ("rejected".to_owned(), "velocity_amount".to_owned()),
            ("rejected".to_owned(), "velocity_count".to_owned()),
        ],
        "{backend:?}"
    );
    // Client B's alice is another buyer: approved.
    let (s, _, body) = h
        .post(
            Some(&b),
            Some("b-0"),
            &payment("alice", &[("s1", 100, "EUR")]),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "processing", "{backend:?} {body}");
}
testkit::both!(
    one_clients_velocity_does_not_reject_another_clients_buyer_of_the_same_id,
    one_clients_velocity_does_not_reject_another_clients_buyer_of_the_same_id
);

async fn a_velocity_window_whose_sum_exceeds_64_bits_still_gets_an_answer(backend: Backend) {
    let h = start(backend).await;
    let key = h.client("shop-huge").await;
    // Two amounts a buyer's window may hold from before the bound (or a
    // rule file without one): their SUM does not fit in 64 bits.
    let db = storage::Db::connect(&h.db_url).await.unwrap();
    let client = events::ClientId::parse("shop-huge").unwrap();
    for _ in 0..2 {
        payment_handler::store::note_velocity(
            &db,
            &client,
            events::PaymentId::new_random(),
            "whale",
            "EUR",
            i64::MAX - 1,
        )
        .await
        .unwrap();
    }
    // A decision (the default rules' velocity amount rejects it), not a
    // 503 for as long as the window lasts.
    let (s, _, b) = h
        .post(
            Some(&key),
            Some("huge-1"),
            &payment("whale", &[("s1", 100, "EUR")]),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{backend:?} {b}");
    let v: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["status"], "rejected", "{b}");
    assert_eq!(v["rejection"]["rule"], "velocity_amount", "{b}");
}
testkit::both!(
    a_velocity_window_whose_sum_exceeds_64_bits_still_gets_an_answer,
    a_velocity_window_whose_sum_exceeds_64_bits_still_gets_an_answer
);

async fn a_takeover_never_acts_on_a_stale_read_of_the_key(backend: Backend) {
    use payment_handler::store::{
        Begin, IdempotencyPolicy, idem_begin, idem_seen, idem_store_pending, idem_take_over,
    };
    let h = start(backend).await;
    let db = storage::Db::connect(&h.db_url).await.unwrap();
    let client = events::ClientId::parse("shop-l1").unwrap();
    let policy = IdempotencyPolicy {
        lease_ms: 0,
        retention_ms: 60_000,
    };
    let Begin::Owned {
        token: old,
        pending: None,
    } = idem_begin(&db, &client, "k", "fp", policy).await.unwrap()
    else {
        panic!("a new key is owned");
    };
    tokio::time::sleep(Duration::from_millis(20)).await; // its lease ran out
    let stale = idem_seen(&db, &client, "k").await.unwrap().unwrap();
    assert_eq!(stale.pending, None);
    // The old holder stores its decision between that read and the
    // takeover: the takeover must not happen on the stale read.
    let payment = events::PaymentId::derive(&client, "k");
    idem_store_pending(&db, &client, "k", &old, "decided", payment)
        .await
        .unwrap();
    assert_eq!(
        idem_take_over(&db, &client, "k", policy, &stale)
            .await
            .unwrap(),
        None,
        "{backend:?}: a takeover on a stale read would decide again"
    );
    // A fresh read takes it over, with the decided events to re-append.
    let fresh = idem_seen(&db, &client, "k").await.unwrap().unwrap();
    assert_eq!(fresh.pending.as_deref(), Some("decided"));
    assert!(
        idem_take_over(&db, &client, "k", policy, &fresh)
            .await
            .unwrap()
            .is_some()
    );
}
testkit::both!(
    a_takeover_never_acts_on_a_stale_read_of_the_key,
    a_takeover_never_acts_on_a_stale_read_of_the_key
);
