//! "No order is charged twice": `paystream serve executor` is killed with
//! SIGKILL again and again while a few hundred payments flow; afterwards
//! every order has reached a final state on the payments topic and the PSP
//! simulator made exactly one charge per order.

use crate::support::{Proc, free_port};
use events::{
    BuyerId, ClientId, CorrelationId, Currency, Envelope, Event, EventId, Money, OrderId,
    PaymentId, PaymentOrder, PaymentRequested, RiskApproved, SCHEMA_VERSION, SellerId, Timestamp,
    TopicKind,
};
use rdkafka::message::Message;
use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use streaming::{EventProducer, KafkaConfig};

const PAYMENTS: usize = 300;
const KILLS: usize = 4;

fn executor(env: &[(&str, String)]) -> Proc {
    let mut c = Command::new(env!("CARGO_BIN_EXE_paystream"));
    c.args([
        "serve",
        "executor",
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
        // A killed executor's payments are retaken after the lease.
        "--lease-secs",
        "2",
        "--backoff-base-ms",
        "50",
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    Proc(c.spawn().unwrap())
}

fn payment(i: usize) -> (Vec<Envelope>, OrderId) {
    let p = PaymentId::new_random();
    let order = OrderId::derive(p, 0);
    let card = match i {
        i if i % 25 == 0 => "tok_timeout",
        i if i % 10 == 0 => "tok_flaky_500",
        _ => "tok_visa",
    };
    let base = |d: &str, event: Event| Envelope {
        event_id: EventId::derive(p.as_uuid(), d),
        occurred_at: Timestamp::now(),
        payment_id: Some(p),
        correlation_id: CorrelationId::from_uuid(p.as_uuid()),
        causation_id: None,
        producer: "crash-test".into(),
        schema_version: SCHEMA_VERSION,
        event,
    };
    let requested = base(
        "requested",
        PaymentRequested {
            client_id: ClientId::parse("shop").unwrap(),
            idempotency_key: None,
            buyer_id: BuyerId::parse("buyer").unwrap(),
            orders: vec![PaymentOrder {
                order_id: order,
                seller_id: SellerId::parse("seller").unwrap(),
                amount: Money::new(
                    1000 + i64::try_from(i).unwrap(),
                    Currency::from_code("EUR").unwrap(),
                ),
            }],
            metadata: BTreeMap::from([("card_token".to_owned(), card.to_owned())]),
        }
        .into(),
    );
    let approved = base(
        "risk",
        RiskApproved {
            rule_set: "t".into(),
        }
        .into(),
    );
    (vec![requested, approved], order)
}

/// A final event seen on the topic: its id, and the PSP reference of a
/// success (None: a final failure).
type Final = (EventId, Option<String>);

/// Orders with a final outcome on the topic.
fn final_orders(seen: &Mutex<BTreeMap<OrderId, Vec<Final>>>) -> usize {
    seen.lock().unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executor_killed_repeatedly_charges_every_order_exactly_once() {
    let brokers = testkit::brokers();
    let prefix = format!("t{}.", uuid::Uuid::now_v7().simple());
    let kafka = KafkaConfig::local(&brokers, &prefix, 4);
    streaming::admin::ensure_topics(&kafka, &kafka.topology().specs())
        .await
        .unwrap();
    let producer = EventProducer::new(&kafka, "crash-test").unwrap();

    let sim_dir = tempfile::tempdir().unwrap();
    let behaviour: psp_sim::Behaviour =
        serde_json::from_value(serde_json::json!({"latency_ms": {"min": 5, "max": 40}})).unwrap();
    let sim = psp_sim::spawn(psp_sim::SimConfig {
        behaviour,
        ..psp_sim::SimConfig::for_tests(format!(
            "sqlite://{}",
            sim_dir.path().join("sim.db").display()
        ))
    })
    .await
    .unwrap();
    let db = testkit::fresh_postgres_url().await.unwrap();
    let env = vec![
        ("PAYSTREAM_BROKERS", brokers.clone()),
        ("PAYSTREAM_TOPIC_PREFIX", prefix.clone()),
        ("PAYSTREAM_PARTITIONS", "4".to_owned()),
        ("PAYSTREAM_DATABASE_URL", db.clone()),
        ("PAYSTREAM_PSP_URL", sim.base_url()),
        ("PAYSTREAM_PSP_API_KEY", sim.api_key.expose().to_owned()),
        (
            "PAYSTREAM_PSP_WEBHOOK_SECRET",
            sim.webhook_secret.expose().to_owned(),
        ),
    ];

    // Everything the executors append, read back as it comes.
    let done: Arc<Mutex<BTreeMap<OrderId, Vec<Final>>>> = Arc::default();
    let consumer = testkit::tail(&kafka, &[&kafka.topology().name(TopicKind::Payments)]);
    let reader = {
        let done = done.clone();
        tokio::spawn(async move {
            loop {
                let Ok(m) = consumer.recv().await else {
                    continue;
                };
                let Some(Ok(env)) = m.payload().map(events::avro::decode) else {
                    continue;
                };
                let finished = match env.event {
                    Event::OrderSucceeded(s) => Some((s.order_id, Some(s.psp_reference))),
                    Event::OrderFailed(f) if !f.retryable => Some((f.order_id, None)),
                    Event::OrderSettledByWebhook(s) => Some((s.order_id, None)),
                    _ => None,
                };
                if let Some((o, reference)) = finished {
                    done.lock()
                        .unwrap()
                        .entry(o)
                        .or_default()
                        .push((env.event_id, reference));
                }
            }
        })
    };

    // Half the payments before the first executor, half while they die.
    let payments: Vec<_> = (0..PAYMENTS).map(payment).collect();
    let orders: Vec<OrderId> = payments.iter().map(|(_, o)| *o).collect();
    for (evs, _) in &payments[..PAYMENTS / 2] {
        for e in evs {
            producer.append(e).await.unwrap();
        }
    }
    let late: Vec<Envelope> = payments[PAYMENTS / 2..]
        .iter()
        .flat_map(|(e, _)| e.clone())
        .collect();
    let feeder = {
        let producer = producer.clone();
        tokio::spawn(async move {
            for chunk in late.chunks(20) {
                for e in chunk {
                    producer.append(e).await.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };

    for round in 0..KILLS {
        let mut p = executor(&env);
        // Kill it at varying points: while starting, while executing.
        let ms = 1_500 + 700 * u64::try_from(round).unwrap();
        tokio::time::sleep(Duration::from_millis(ms)).await;
        p.0.kill().unwrap(); // SIGKILL
        p.0.wait().unwrap();
    }
    feeder.await.unwrap();
    let before_last = final_orders(&done);
    assert!(
        before_last < PAYMENTS,
        "the kills must interrupt the flow ({before_last} already final)"
    );

    let _last = executor(&env);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(150);
    while final_orders(&done) < PAYMENTS {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {PAYMENTS} orders reached a final state",
            final_orders(&done)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    reader.abort();

    let http = reqwest::Client::new();
    for o in &orders {
        let (charges, _) = testkit::sim_stats(&http, &sim.base_url(), &o.to_string()).await;
        assert_eq!(charges, 1, "order {o} charged {charges}");
        let listed: serde_json::Value = http
            .get(format!("{}/v1/charges", sim.base_url()))
            .query(&[("reference", o.to_string())])
            .bearer_auth(sim.api_key.expose())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let charge_id = listed["data"][0]["id"].as_str().expect("the charge");
        // Exactly one final event (a crash may re-append it: same event
        // id), and it is the success with the simulator's charge: every
        // token used here eventually succeeds.
        let finals = done.lock().unwrap().get(o).cloned().unwrap_or_default();
        let ids: BTreeSet<EventId> = finals.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids.len(), 1, "order {o}: final events {finals:?}");
        assert_eq!(
            finals[0].1.as_deref(),
            Some(charge_id),
            "order {o}: final events {finals:?}"
        );
    }
    assert!(done.lock().unwrap().keys().all(|o| orders.contains(o)));
}
