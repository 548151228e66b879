//! The faults: what can go wrong around the system in production, injected
//! on a schedule drawn from the run's seed.

use crate::System;
use anyhow::Context;
use events::TopicKind;
use hmac::{Hmac, Mac};
use rand::Rng;
use rand::rngs::StdRng;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sha2::Sha256;
use std::time::Duration;

/// One kind of fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// kill -9 of a component's process, then a restart on the same state.
    Kill(&'static str),
    /// kill -9 of the broker, then a restart on the same storage.
    KillBroker,
    /// Every database connection of the system terminated by the server
    /// (`pg_terminate_backend`; PostgreSQL only).
    CutDatabase,
    /// A third executor joins the executor group while batches are in
    /// flight, then leaves.
    Rebalance,
    /// Bytes that are not an event, on a topic.
    Poison(TopicKind),
    /// A 1.5 MB message (lz4-compressed on the wire, so the broker takes
    /// it) that is not an event, on a topic.
    Oversized(TopicKind),
    /// A PSP webhook with a forged signature claiming a charge succeeded.
    ForgedWebhook,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Kill(c) => write!(f, "kill -9 {c}"),
            Fault::KillBroker => write!(f, "kill -9 broker"),
            Fault::CutDatabase => write!(f, "database connections cut"),
            Fault::Rebalance => write!(f, "rebalance (executor-3 joins, leaves)"),
            Fault::Poison(t) => write!(f, "poison message on {}", t.suffix()),
            Fault::Oversized(t) => write!(f, "oversized message on {}", t.suffix()),
            Fault::ForgedWebhook => write!(f, "forged webhook"),
        }
    }
}

/// Components whose processes are killed.
pub const KILLED: &[&str] = &[
    "handler",
    "executor-1",
    "executor-2",
    "projections",
    "reconciler",
    "psp-sim",
];

/// Topics that get poison and oversized messages (the dead-letter topic is
/// read by no consumer, so nothing there can stall).
pub const POISONED: &[TopicKind] = &[
    TopicKind::Inbound,
    TopicKind::Payments,
    TopicKind::Reconciliation,
];

/// Every fault kind at least once (each kill twice), in an order drawn from
/// the seed.
pub fn schedule(rng: &mut StdRng, postgres: bool) -> Vec<Fault> {
    let mut all: Vec<Fault> = Vec::new();
    for _ in 0..2 {
        all.extend(KILLED.iter().map(|c| Fault::Kill(c)));
    }
    all.push(Fault::KillBroker);
    if postgres {
        all.push(Fault::CutDatabase);
    }
    all.push(Fault::Rebalance);
    all.extend(POISONED.iter().map(|t| Fault::Poison(*t)));
    all.extend(POISONED.iter().map(|t| Fault::Oversized(*t)));
    all.push(Fault::ForgedWebhook);
    // Fisher-Yates with the run's generator: the same seed, the same order.
    for i in (1..all.len()).rev() {
        let j = rng.random_range(0..=i);
        all.swap(i, j);
    }
    all
}

/// One more fault for a soak, drawn from the seed.
pub fn random(rng: &mut StdRng, postgres: bool) -> Fault {
    loop {
        let f = match rng.random_range(0..10) {
            0..=4 => Fault::Kill(KILLED[rng.random_range(0..KILLED.len())]),
            5 => Fault::KillBroker,
            6 => Fault::CutDatabase,
            7 => Fault::Rebalance,
            8 => {
                let topic = POISONED[rng.random_range(0..POISONED.len())];
                if rng.random_range(0..2) == 0 {
                    Fault::Poison(topic)
                } else {
                    Fault::Oversized(topic)
                }
            }
            _ => Fault::ForgedWebhook,
        };
        if f != Fault::CutDatabase || postgres {
            return f;
        }
    }
}

/// A message we put on a topic that every consumer of it must dead-letter.
#[derive(Debug, Clone)]
pub struct Planted {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub what: &'static str,
}

/// Injects one fault; a line saying what was done.
pub async fn inject(sys: &mut System, fault: &Fault, rng: &mut StdRng) -> anyhow::Result<String> {
    let pause = Duration::from_millis(rng.random_range(200..1500));
    match fault {
        Fault::Kill(name) => {
            let p = sys.proc(name)?;
            p.crash_and_restart(pause).await?;
            Ok(format!("{fault}: restarted after {} ms", pause.as_millis()))
        }
        Fault::KillBroker => {
            let p = sys.proc("broker")?;
            p.crash_and_restart(pause).await?;
            Ok(format!(
                "{fault}: restarted on its storage after {} ms",
                pause.as_millis()
            ))
        }
        Fault::CutDatabase => {
            let Some((admin, name)) = sys.postgres.clone() else {
                return Ok(format!("{fault}: skipped (SQLite)"));
            };
            let db = storage::Db::connect(&admin).await?;
            let n = match &db {
                storage::Db::Postgres(p) => sqlx::query_scalar::<_, i64>(
                    "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = $1 AND pid <> pg_backend_pid()) t",
                )
                .bind(&name)
                .fetch_one(p)
                .await?,
                storage::Db::Sqlite(_) => 0,
            };
            db.close().await;
            Ok(format!("{fault}: {n} connections terminated"))
        }
        Fault::Rebalance => {
            let p = sys.proc("executor-3")?;
            p.start().await?;
            tokio::time::sleep(Duration::from_secs(4)).await;
            let clean = p.terminate(Duration::from_secs(20)).await;
            Ok(format!(
                "{fault}: joined for 4 s, left {}",
                if clean {
                    "cleanly"
                } else {
                    "by SIGKILL after 20 s"
                }
            ))
        }
        Fault::Poison(kind) | Fault::Oversized(kind) => {
            let oversized = matches!(fault, Fault::Oversized(_));
            let topic = sys.kafka.topology().name(*kind);
            let mut payload = b"\x00\x01 chaos: this is not an event ".to_vec();
            if oversized {
                payload.resize(1_500_000, b'x');
            }
            let producer: FutureProducer = ClientConfig::new()
                .set("bootstrap.servers", &sys.kafka.brokers)
                .set("acks", "all")
                .set("compression.type", "lz4")
                .set("message.max.bytes", "4000000")
                .create()
                .context("creating the poison producer")?;
            let key = format!("chaos-poison-{}", rng.random_range(0..u32::MAX));
            let (partition, offset) = producer
                .send(
                    FutureRecord::to(&topic).key(&key).payload(&payload),
                    Duration::from_secs(30),
                )
                .await
                .map(|d| (d.partition, d.offset))
                .map_err(|(e, _)| anyhow::anyhow!("producing to {topic}: {e}"))?;
            sys.planted.push(Planted {
                topic: topic.clone(),
                partition,
                offset,
                what: if oversized { "oversized" } else { "poison" },
            });
            Ok(format!(
                "{fault}: {topic} partition {partition} offset {offset}"
            ))
        }
        Fault::ForgedWebhook => {
            let order = sys.some_order_id();
            let body = serde_json::json!({
                "id": format!("evt_forged_{}", rng.random_range(0..u32::MAX)),
                "type": "charge.succeeded",
                "created": time::OffsetDateTime::now_utc().unix_timestamp(),
                "data": {"id": "ch_forged", "status": "succeeded", "amount_minor": 1,
                         "currency": "EUR", "fee_minor": 0, "reference": order,
                         "card_token": "tok_visa", "decline_code": null, "refunded_minor": 0},
            })
            .to_string();
            let t = time::OffsetDateTime::now_utc().unix_timestamp();
            let mut mac = Hmac::<Sha256>::new_from_slice(b"not-the-webhook-secret-of-this-psp")
                .expect("any key length");
            mac.update(format!("{t}.{body}").as_bytes());
            let sig = hex::encode(mac.finalize().into_bytes());
            let url = format!("http://127.0.0.1:{}/v1/psp/webhooks", sys.executor_port);
            let status = reqwest::Client::new()
                .post(&url)
                .header("Psp-Signature", format!("t={t},v1={sig}"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0);
            sys.forged_answers.push(status);
            Ok(format!("{fault}: answered {status} (order {order})"))
        }
    }
}
