//! Orders executed per second against the PSP simulator at 0 ms and at
//! 50 ms latency (the second shows the concurrency: one order at a time
//! would manage 20/s), next to the broker's raw consume rate measured in
//! the same run. Needs the broker at PAYSTREAM_TEST_BROKERS (default
//! 127.0.0.1:9092) and PostgreSQL (storage::testing).
//!
//! `cargo bench -p executor --bench execute [-- <orders>]`

use events::{
    BuyerId, ClientId, CorrelationId, Currency, Envelope, Event, EventId, Money, OrderId,
    PaymentId, PaymentOrder, PaymentRequested, RiskApproved, SCHEMA_VERSION, SellerId, Timestamp,
    TopicKind,
};
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use streaming::{EventProducer, KafkaConfig};
use tokio_util::sync::CancellationToken;

fn brokers() -> String {
    std::env::var("PAYSTREAM_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

fn kafka() -> KafkaConfig {
    KafkaConfig::local(
        &brokers(),
        &format!("b{}.", uuid::Uuid::now_v7().simple()),
        4,
    )
}

fn reader(kafka: &KafkaConfig) -> StreamConsumer {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", format!("bench-{}", uuid::Uuid::now_v7()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    c.subscribe(&[&kafka.topology().name(TopicKind::Payments)])
        .expect("subscribe");
    c
}

fn payment(i: usize) -> Vec<Envelope> {
    let p = PaymentId::new_random();
    let base = |d: &str, event: Event| Envelope {
        event_id: EventId::derive(p.as_uuid(), d),
        occurred_at: Timestamp::now(),
        payment_id: Some(p),
        correlation_id: CorrelationId::from_uuid(p.as_uuid()),
        causation_id: None,
        producer: "bench".into(),
        schema_version: SCHEMA_VERSION,
        event,
    };
    vec![
        base(
            "requested",
            PaymentRequested {
                client_id: ClientId::parse("bench").expect("id"),
                idempotency_key: None,
                buyer_id: BuyerId::parse("buyer").expect("id"),
                orders: vec![PaymentOrder {
                    order_id: OrderId::derive(p, 0),
                    seller_id: SellerId::parse("seller").expect("id"),
                    amount: Money::new(
                        1000 + i64::try_from(i).expect("small"),
                        Currency::from_code("EUR").expect("EUR"),
                    ),
                }],
                metadata: BTreeMap::from([("card_token".to_owned(), "tok_visa".to_owned())]),
            }
            .into(),
        ),
        base(
            "risk",
            RiskApproved {
                rule_set: "bench".into(),
            }
            .into(),
        ),
    ]
}

/// Messages per second a plain consumer reads from the broker.
async fn raw_consume_rate(n: usize) -> (f64, f64) {
    let kafka = kafka();
    streaming::admin::ensure_topics(&kafka, &kafka.topology().specs())
        .await
        .expect("topics");
    let producer = EventProducer::new(&kafka, "bench").expect("producer");
    let evs: Vec<Envelope> = (0..n / 2).flat_map(payment).collect();
    let sends = evs.iter().map(|e| producer.append(e));
    for r in futures_join(sends).await {
        r.expect("append");
    }
    let joined = Instant::now();
    let c = reader(&kafka);
    // The first message includes the group join; the steady rate is timed
    // from it, the other from subscribing.
    let _ = c.recv().await.expect("first message");
    let start = Instant::now();
    for _ in 1..evs.len() {
        let _ = c.recv().await.expect("message");
    }
    (
        per_second(evs.len() - 1, start.elapsed()),
        per_second(evs.len(), joined.elapsed()),
    )
}

/// Runs futures concurrently, at most 1000 at a time.
async fn futures_join<F: std::future::Future>(it: impl Iterator<Item = F>) -> Vec<F::Output> {
    use futures::StreamExt;
    futures::stream::iter(it)
        .buffer_unordered(1000)
        .collect()
        .await
}

#[allow(clippy::float_arithmetic, clippy::cast_precision_loss)]
fn per_second(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

/// Orders per second the executor completes with the simulator answering
/// after `latency_ms`.
async fn executor_rate(n: usize, latency_ms: u64) -> f64 {
    let sim_dir = tempfile::tempdir().expect("tempdir");
    let behaviour: psp_sim::Behaviour = serde_json::from_value(
        serde_json::json!({"latency_ms": {"min": latency_ms, "max": latency_ms}}),
    )
    .expect("behaviour");
    let sim = psp_sim::spawn(psp_sim::SimConfig {
        behaviour,
        ..psp_sim::SimConfig::for_tests(format!(
            "sqlite://{}",
            sim_dir.path().join("sim.db").display()
        ))
    })
    .await
    .expect("sim");
    let kafka = kafka();
    let db = storage::testing::fresh_postgres_url().await.expect("db");
    let stop = CancellationToken::new();
    let running = executor::start(
        kafka.clone(),
        &db,
        executor::ExecutorArgs::for_tests(
            &sim.base_url(),
            sim.api_key.clone(),
            sim.webhook_secret.clone(),
        ),
        stop.clone(),
    )
    .await
    .expect("executor");
    let producer = EventProducer::new(&kafka, "bench").expect("producer");
    let c = reader(&kafka);
    let evs: Vec<Envelope> = (0..n).flat_map(payment).collect();
    let start = Instant::now();
    for r in futures_join(evs.iter().map(|e| producer.append(e))).await {
        r.expect("append");
    }
    let mut done = 0usize;
    while done < n {
        let m = tokio::time::timeout(Duration::from_secs(120), c.recv())
            .await
            .expect("orders keep completing")
            .expect("message");
        if let Some(Ok(env)) = m.payload().map(events::avro::decode)
            && matches!(env.event, Event::OrderSucceeded(_) | Event::OrderFailed(_))
        {
            done += 1;
        }
    }
    let rate = per_second(n, start.elapsed());
    stop.cancel();
    let _ = running.wait().await;
    let _ = sim.stop().await;
    rate
}

/// Charges per second the simulator alone creates for 64 concurrent
/// clients at 0 ms latency: the ceiling the executor runs against.
async fn sim_rate(n: usize) -> f64 {
    use futures::StreamExt;
    let sim_dir = tempfile::tempdir().expect("tempdir");
    let sim = psp_sim::spawn(psp_sim::SimConfig::for_tests(format!(
        "sqlite://{}",
        sim_dir.path().join("sim.db").display()
    )))
    .await
    .expect("sim");
    let http = reqwest::Client::new();
    let base = sim.base_url();
    let key = sim.api_key.clone();
    let start = Instant::now();
    let ok = futures::stream::iter(0..n)
        .map(|i| {
            let (http, base, api_key) = (http.clone(), base.clone(), key.clone());
            async move {
                let key = uuid::Uuid::now_v7().to_string();
                http.post(format!("{base}/v1/charges"))
                    .bearer_auth(api_key.expose())
                    .header("Idempotency-Key", &key)
                    .json(
                        &serde_json::json!({"amount_minor": 1000 + i, "currency": "EUR",
                        "card_token": "tok_visa", "reference": key}),
                    )
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        })
        .buffer_unordered(64)
        .filter(|ok| std::future::ready(*ok))
        .count()
        .await;
    let rate = per_second(ok, start.elapsed());
    let _ = sim.stop().await;
    rate
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1000);
    let (steady, with_join) = raw_consume_rate(20_000).await;
    println!(
        "broker raw consume: {steady:>10.0} msg/s after the first message, {with_join:.0} msg/s including the group join (20000 messages)"
    );
    let sim = sim_rate(n).await;
    println!("simulator alone:    {sim:>10.0} charges/s (64 concurrent clients, 0 ms latency)");
    for latency in [0, 50] {
        let rate = executor_rate(n, latency).await;
        println!(
            "executor, PSP latency {latency:>2} ms: {rate:>8.0} orders/s ({n} orders, max_in_flight 64)"
        );
    }
}
