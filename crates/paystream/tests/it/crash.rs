//! "Never charge twice" starts at the handler: a handler killed after it
//! appended a payment's events but before it stored the response must not
//! create a second payment when the client retries.

use crate::support::{free_port, handler, wait_healthy};
use events::{EventType, TopicKind, avro};
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_killed_after_appending_makes_no_second_payment_on_retry() {
    let brokers = testkit::brokers();
    let prefix = format!("t{}.", uuid::Uuid::now_v7().simple());
    let db = testkit::fresh_postgres_url().await.unwrap();
    let env = vec![
        ("PAYSTREAM_BROKERS", brokers.clone()),
        ("PAYSTREAM_TOPIC_PREFIX", prefix.clone()),
        ("PAYSTREAM_PARTITIONS", "2".to_owned()),
        ("PAYSTREAM_DATABASE_URL", db.clone()),
        ("PAYSTREAM_IDEMPOTENCY_LEASE_SECS", "1".to_owned()),
    ];
    let out = Command::new(env!("CARGO_BIN_EXE_paystream"))
        .args(["clients", "create", "shop-crash"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let api_key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(api_key.starts_with("psk_"));

    let http = reqwest::Client::new();
    let body = r#"{"buyer_id":"b-crash","orders":[{"seller_id":"s1","amount_minor":4200,"currency":"EUR"}],"metadata":{"card_token":"tok_visa"}}"#;
    let post = |base: String| {
        let (http, key) = (http.clone(), api_key.clone());
        async move {
            http.post(format!("{base}/v1/payments"))
                .bearer_auth(key)
                .header("Idempotency-Key", "crash-key")
                .body(body)
                .send()
                .await
        }
    };

    // 1. The handler appends the events, then dies before answering.
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut crashing = handler(&env, port, true);
    wait_healthy(&http, &base).await;
    assert!(
        post(base.clone()).await.is_err(),
        "the crashing handler must not answer"
    );
    let status = crashing.0.wait().unwrap();
    assert!(
        !status.success(),
        "the handler was killed at the fault point"
    );

    // 2. A restarted handler; the client retries with the same key.
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let _healthy = handler(&env, port, false);
    wait_healthy(&http, &base).await;
    let mut answer = None;
    for _ in 0..50 {
        let r = post(base.clone()).await.unwrap();
        match r.status().as_u16() {
            201 => {
                answer = Some(r.json::<serde_json::Value>().await.unwrap());
                break;
            }
            429 => tokio::time::sleep(Duration::from_millis(300)).await, // the dead holder's lease
            other => panic!("unexpected {other}: {}", r.text().await.unwrap()),
        }
    }
    let answer = answer.expect("the retry succeeded");
    let payment_id = answer["payment_id"].as_str().unwrap().to_owned();

    // 3. The topic may hold the appended events twice (before and after the
    //    crash), but under one event id each: consumers see one payment.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", format!("reader-{}", uuid::Uuid::now_v7()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer
        .subscribe(&[&format!("{prefix}{}", TopicKind::Payments.suffix())])
        .unwrap();
    let mut requested = Vec::new();
    let mut wait = Duration::from_secs(15);
    while let Ok(Ok(m)) = tokio::time::timeout(wait, consumer.recv()).await {
        let env = avro::decode(m.payload().unwrap()).unwrap();
        if env.event_type() == EventType::PaymentRequested {
            requested.push(env);
        }
        wait = Duration::from_secs(2);
    }
    // Before the crash, then again by the sweeper and/or the retry: the
    // first handler did append before it died.
    assert!(
        requested.len() >= 2,
        "appended before the crash and again after it, got {}",
        requested.len()
    );
    let event_ids: BTreeSet<_> = requested.iter().map(|e| e.event_id).collect();
    let payments: BTreeSet<_> = requested
        .iter()
        .map(|e| e.payment_id.unwrap().to_string())
        .collect();
    assert_eq!(
        event_ids.len(),
        1,
        "one PaymentRequested event id, however often appended"
    );
    assert_eq!(payments, BTreeSet::from([payment_id.clone()]));

    // 4. And the status projection shows one payment with one order.
    let got: serde_json::Value = http
        .get(format!("{base}/v1/payments/{payment_id}"))
        .bearer_auth(&api_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["orders"].as_array().unwrap().len(), 1);
    assert_eq!(got["total_minor"], 4200);
}
