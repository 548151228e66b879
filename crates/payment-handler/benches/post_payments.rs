//! Accepted payments per second and latency of `POST /v1/payments` with
//! unique keys, next to the raw produce rate of the same events measured in
//! the same run. Needs the broker (PAYSTREAM_TEST_BROKERS, default
//! 127.0.0.1:9092) and PostgreSQL (PAYSTREAM_TEST_DATABASE_URL).
//!
//!     cargo bench -p payment-handler --bench post_payments [-- REQUESTS CONCURRENCY]

#![allow(clippy::float_arithmetic)] // rates and latencies, never money

use events::{Envelope, Timestamp};
use std::time::{Duration, Instant};
use streaming::{EventProducer, KafkaConfig};
use tokio_util::sync::CancellationToken;

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

async fn run_http(
    backend: &str,
    db_url: String,
    kafka: KafkaConfig,
    requests: usize,
    concurrency: usize,
) -> f64 {
    let stop = CancellationToken::new();
    let running = payment_handler::start(
        kafka,
        &db_url,
        payment_handler::HandlerArgs::for_tests(),
        stop.clone(),
    )
    .await
    .expect("handler starts");
    let base = format!("http://{}", running.addr);
    let db = storage::Db::connect(&db_url).await.unwrap();
    let key =
        payment_handler::store::create_client(&db, &events::ClientId::parse("bench").unwrap())
            .await
            .unwrap();
    let http = reqwest::Client::new();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (http, base, key) = (http.clone(), base.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = w;
            while i < requests {
                // Distinct buyers keep the velocity rule out of the way.
                let body = format!(
                    r#"{{"buyer_id":"buyer-{i}","orders":[{{"seller_id":"seller-{}","amount_minor":{},"currency":"EUR"}}],"metadata":{{"card_token":"tok_visa"}}}}"#,
                    i % 50,
                    100 + i
                );
                let t = Instant::now();
                let r = http
                    .post(format!("{base}/v1/payments"))
                    .bearer_auth(&key)
                    .header("Idempotency-Key", format!("bench-{i}"))
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 201, "{}", r.text().await.unwrap());
                lat.push(t.elapsed());
                i += concurrency;
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort();
    let rate = requests as f64 / secs;
    println!(
        "POST /v1/payments ({backend:<8}): {requests} accepted in {secs:.2} s = {rate:>8.0} payments/s  p50 {:.1} ms  p99 {:.1} ms",
        percentile(&lat, 50).as_secs_f64() * 1e3,
        percentile(&lat, 99).as_secs_f64() * 1e3
    );
    stop.cancel();
    let _ = running.wait().await;
    rate
}

async fn run_raw(kafka: KafkaConfig, requests: usize, concurrency: usize) -> f64 {
    let producer = EventProducer::new(&kafka, "bench-raw").unwrap();
    // The same two events per payment the handler appends.
    let per_payment: Vec<Envelope> = events::samples::one_of_each("bench", "raw", Timestamp::now())
        .into_iter()
        .take(2)
        .collect();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (producer, evs) = (producer.clone(), per_payment.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while i < requests {
                for e in &evs {
                    let mut e = e.clone();
                    e.payment_id = Some(events::PaymentId::new_random());
                    producer.append(&e).await.unwrap();
                }
                i += concurrency;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let rate = requests as f64 / secs;
    println!(
        "raw produce (2 events/payment, acked): {requests} payments in {secs:.2} s = {rate:>8.0} payments/s"
    );
    rate
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let requests = args.first().copied().unwrap_or(3000);
    let concurrency = args.get(1).copied().unwrap_or(32);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let brokers = testkit::brokers();
        let kafka = |tag: &str| {
            KafkaConfig::local(
                &brokers,
                &format!("bench{}{tag}.", uuid::Uuid::now_v7().simple()),
                12,
            )
        };
        println!("{requests} requests, {concurrency} concurrent clients, 12 partitions");
        let raw_kafka = kafka("raw");
        streaming::admin::ensure_topics(&raw_kafka, &raw_kafka.topology().specs())
            .await
            .unwrap();
        let raw = run_raw(raw_kafka, requests, concurrency).await;
        let pg = run_http(
            "postgres",
            testkit::fresh_postgres_url().await.unwrap(),
            kafka("pg"),
            requests,
            concurrency,
        )
        .await;
        let dir = tempfile::tempdir().unwrap();
        let sqlite_url = format!("sqlite://{}", dir.path().join("bench.db").display());
        let lite = run_http("sqlite", sqlite_url, kafka("lite"), requests, concurrency).await;
        println!(
            "ratio to raw produce: postgres {:.2}, sqlite {:.2}",
            pg / raw,
            lite / raw
        );
    });
}
