//! Orders executed per second against the PSP simulator at 0 ms and at
//! 50 ms latency (the second shows the concurrency: one order at a time
//! would manage 20/s), next to raw limits measured in the same run: the
//! broker's raw consume rate, the simulator's own charge rate, and the raw
//! limit of the executor's own writes: the same rows written with
//! set-based SQL (payments and orders inserted, intents, outcomes, outbox
//! rows inserted and deleted, a transaction per step of 256 orders) and the
//! same events (started + succeeded per order) produced with acks, all
//! sent then all awaited. The simulator runs with `durability: batched`
//! (a group commit without fsyncs: concurrent charges share one
//! transaction), so it is not what is measured; its own rate is printed
//! for each durability. Needs the broker
//! at PAYSTREAM_TEST_BROKERS (default 127.0.0.1:9092) and PostgreSQL
//! (testkit).
//!
//! `cargo bench -p executor --bench execute [-- <orders> [<max in flight>]]`
//! (max in flight defaults to the executor's own default)

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
async fn executor_rate(n: usize, latency_ms: u64, in_flight: usize) -> f64 {
    let sim_dir = tempfile::tempdir().expect("tempdir");
    let behaviour: psp_sim::Behaviour = serde_json::from_value(serde_json::json!({
        "latency_ms": {"min": latency_ms, "max": latency_ms},
        "durability": "batched"
    }))
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
    let db = testkit::fresh_postgres_url().await.expect("db");
    let stop = CancellationToken::new();
    let mut args = executor::ExecutorArgs::for_tests(
        &sim.base_url(),
        sim.api_key.clone(),
        sim.webhook_secret.clone(),
    );
    args.max_in_flight = in_flight;
    let running = executor::start(kafka.clone(), &db, args, stop.clone())
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

/// Charges the "simulator alone" lines measure at least: at several
/// thousand charges per second, fewer would be over in a fraction of a
/// second, mostly connection set-up and noise from the other processes.
const SIM_CHARGES_MIN: usize = 5000;

/// Charges per second the simulator alone creates for 64 concurrent
/// clients at 0 ms latency: the ceiling the executor runs against; and,
/// with `batched`, its writes per commit.
async fn sim_rate(n: usize, durability: psp_sim::Durability) -> (f64, Option<f64>) {
    use futures::StreamExt;
    let sim_dir = tempfile::tempdir().expect("tempdir");
    let sim = psp_sim::spawn(psp_sim::SimConfig {
        behaviour: psp_sim::Behaviour {
            durability,
            ..psp_sim::Behaviour::default()
        },
        ..psp_sim::SimConfig::for_tests(format!(
            "sqlite://{}",
            sim_dir.path().join("sim.db").display()
        ))
    })
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
    #[allow(clippy::float_arithmetic, clippy::cast_precision_loss)]
    let per_commit = sim
        .write_batches()
        .map(|b| b.writes as f64 / b.batches.max(1) as f64);
    let _ = sim.stop().await;
    (rate, per_commit)
}

/// Orders per second of the executor's own rows written set-based: per
/// step of `STEP` orders one transaction each for the intake (payment and
/// order rows), the intents (order update + started outbox rows), the
/// outcomes (order update + succeeded outbox rows) and the appended rows'
/// deletion. The same rows and statements per order as the executor, none
/// of its round trips per order.
async fn raw_sql_rate(n: usize) -> f64 {
    const STEP: i64 = 256;
    let url = testkit::fresh_postgres_url().await.expect("db");
    let db = storage::Db::connect(&url).await.expect("connect");
    executor::store::migrate(&db).await.expect("migrate");
    let storage::Db::Postgres(pool) = &db else {
        panic!("PostgreSQL expected");
    };
    let body = events::avro::encode(&payment(0)[1]).expect("encode");
    let total = i64::try_from(n).expect("small");
    let start = Instant::now();
    let mut from = 0i64;
    while from < total {
        let to = (from + STEP).min(total);
        let run = |sql: &'static str| sqlx::query(sql).bind(from).bind(to - 1).bind(body.clone());
        let mut tx = pool.begin().await.expect("begin");
        run("INSERT INTO executor_payments (payment_id, correlation_id, card_token, created_ms) \
             SELECT 'p' || g, 'c' || g, 'tok_visa', 0 FROM generate_series($1::bigint, $2::bigint) g WHERE $3::bytea IS NOT NULL")
        .execute(&mut *tx).await.expect("payments");
        run("INSERT INTO executor_orders (order_id, payment_id, seq, seller_id, amount_minor, currency, state, next_attempt_ms, created_ms, updated_ms) \
             SELECT 'o' || g, 'p' || g, 0, 'seller', 1000 + g, 'EUR', 'ready', 0, 0, 0 FROM generate_series($1::bigint, $2::bigint) g WHERE $3::bytea IS NOT NULL")
        .execute(&mut *tx).await.expect("orders");
        tx.commit().await.expect("commit");
        let mut tx = pool.begin().await.expect("begin");
        run("UPDATE executor_orders SET state = 'executing', attempts = 1, next_attempt_ms = 60000, deadline_ms = 600000, updated_ms = 1 \
             WHERE order_id IN (SELECT 'o' || g FROM generate_series($1::bigint, $2::bigint) g) AND $3::bytea IS NOT NULL")
        .execute(&mut *tx).await.expect("intents");
        run(
            "INSERT INTO executor_outbox (event_id, payment_id, body, created_ms) \
             SELECT 's' || g, 'p' || g, $3, 1 FROM generate_series($1::bigint, $2::bigint) g",
        )
        .execute(&mut *tx)
        .await
        .expect("started rows");
        tx.commit().await.expect("commit");
        let mut tx = pool.begin().await.expect("begin");
        run("UPDATE executor_orders SET state = 'succeeded', next_attempt_ms = NULL, psp_charge_id = 'ch_' || order_id, fee_minor = 59, updated_ms = 2 \
             WHERE order_id IN (SELECT 'o' || g FROM generate_series($1::bigint, $2::bigint) g) AND $3::bytea IS NOT NULL")
        .execute(&mut *tx).await.expect("outcomes");
        run(
            "INSERT INTO executor_outbox (event_id, payment_id, body, created_ms) \
             SELECT 'd' || g, 'p' || g, $3, 2 FROM generate_series($1::bigint, $2::bigint) g",
        )
        .execute(&mut *tx)
        .await
        .expect("outcome rows");
        tx.commit().await.expect("commit");
        run("DELETE FROM executor_outbox WHERE payment_id IN (SELECT 'p' || g FROM generate_series($1::bigint, $2::bigint) g) AND $3::bytea IS NOT NULL")
            .execute(pool).await.expect("delete");
        from = to;
    }
    let rate = per_second(n, start.elapsed());
    db.close().await;
    rate
}

/// Orders per second of the executor's events alone: two per order
/// (started, succeeded) produced with acks, all sent then all awaited.
async fn raw_produce_rate(n: usize) -> f64 {
    let kafka = kafka();
    streaming::admin::ensure_topics(&kafka, &kafka.topology().specs())
        .await
        .expect("topics");
    let producer = EventProducer::new(&kafka, "bench").expect("producer");
    let evs: Vec<Envelope> = (0..n)
        .flat_map(|i| {
            let p = payment(i);
            let order_id = OrderId::derive(p[0].payment_id.expect("payment"), 0);
            let base = |d: &str, event: Event| Envelope {
                event_id: EventId::derive(order_id.as_uuid(), d),
                event,
                ..p[0].clone()
            };
            [
                base(
                    "attempt-1-started",
                    events::OrderExecutionStarted {
                        order_id,
                        attempt: 1,
                    }
                    .into(),
                ),
                base(
                    "succeeded",
                    events::OrderSucceeded {
                        order_id,
                        psp_reference: format!("ch_{i}"),
                        amount: Money::new(1000, Currency::from_code("EUR").expect("EUR")),
                        fee: Money::new(59, Currency::from_code("EUR").expect("EUR")),
                    }
                    .into(),
                ),
            ]
        })
        .collect();
    let start = Instant::now();
    for r in futures::future::join_all(evs.iter().map(|e| producer.append(e))).await {
        r.expect("append");
    }
    per_second(n, start.elapsed())
}

#[tokio::main]
async fn main() {
    let mut nums = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse::<usize>().ok());
    let n = nums.next().unwrap_or(1000);
    let in_flight = nums.next().unwrap_or(executor::DEFAULT_MAX_IN_FLIGHT);
    let (steady, with_join) = raw_consume_rate(20_000).await;
    println!(
        "broker raw consume: {steady:>10.0} msg/s after the first message, {with_join:.0} msg/s including the group join (20000 messages)"
    );
    for (durability, name) in [
        (psp_sim::Durability::Full, "full"),
        (psp_sim::Durability::Relaxed, "relaxed"),
        (psp_sim::Durability::Batched, "batched"),
    ] {
        let (sim, per_commit) = sim_rate(n.max(SIM_CHARGES_MIN), durability).await;
        let per_commit = per_commit
            .map(|w| format!(", {w:.0} writes per commit"))
            .unwrap_or_default();
        println!(
            "simulator alone:    {sim:>10.0} charges/s ({} charges, 64 concurrent clients, 0 ms latency, durability {name}{per_commit})",
            n.max(SIM_CHARGES_MIN)
        );
    }
    let sql = raw_sql_rate(n).await;
    println!("raw SQL (PostgreSQL, set-based, the executor's rows): {sql:>8.0} orders/s");
    let produce = raw_produce_rate(n).await;
    println!("raw acked produce (2 events per order):               {produce:>8.0} orders/s");
    let raw = sql.min(produce);
    println!("raw limit of the executor's rows and events:          {raw:>8.0} orders/s");
    for latency in [0, 50] {
        let rate = executor_rate(n, latency, in_flight).await;
        #[allow(clippy::float_arithmetic)]
        let share = 100.0 * rate / raw;
        println!(
            "executor, PSP latency {latency:>2} ms: {rate:>8.0} orders/s ({n} orders, max_in_flight {in_flight}) = {share:.0} % of the raw limit"
        );
    }
}
