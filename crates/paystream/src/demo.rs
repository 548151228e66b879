//! `paystream demo`: the event round trip. Appends one event of every type
//! to the broker, reads them back through a consumer group, and checks each
//! arrived identical. Later issues grow this into the full local demo.

use anyhow::{Context, bail};
use events::{Envelope, EventType, PaymentId, Timestamp, TopicKind};
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;
use streaming::{
    BatchHandler, ConsumerSettings, Delivered, EventProducer, HandlerError, KafkaConfig, Outcome,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Give up waiting for the events after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
}

/// Forwards the demo payment's events; everything else on the topics (other
/// runs) is ignored.
struct Collect {
    payment: PaymentId,
    tx: mpsc::UnboundedSender<Delivered>,
}

impl BatchHandler for Collect {
    async fn handle(&mut self, batch: &[Delivered]) -> Result<Vec<Outcome>, HandlerError> {
        Ok(batch
            .iter()
            .map(|d| {
                if d.envelope.payment_id == Some(self.payment) {
                    let _ = self.tx.send(d.clone());
                    Outcome::Applied
                } else {
                    Outcome::Ignored
                }
            })
            .collect())
    }
}

pub async fn run(kafka: &KafkaConfig, args: DemoArgs) -> anyhow::Result<ExitCode> {
    let topology = kafka.topology();
    streaming::admin::ensure_topics(kafka, &topology.specs())
        .await
        .context("creating topics")?;
    let producer = EventProducer::new(kafka, "paystream-demo")?;
    let run = uuid::Uuid::now_v7().to_string();
    let sent = events::samples::one_of_each("demo", &run, Timestamp::now());
    let payment = sent[0].payment_id.context("samples carry a payment id")?;
    println!(
        "appending {} events of payment {payment} to {}",
        sent.len(),
        kafka.brokers
    );
    for env in &sent {
        let at = producer.append(env).await?;
        println!(
            "  -> {:<34} {}[{}]@{}",
            env.event_type().as_str(),
            at.topic,
            at.partition,
            at.offset
        );
    }

    let (tx, mut rx) = mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let group = format!("paystream-demo-{run}");
    let settings = ConsumerSettings::new(
        group.clone(),
        vec![
            topology.name(TopicKind::Payments),
            topology.name(TopicKind::Reconciliation),
        ],
    );
    let loop_task = {
        let (kafka, producer, shutdown) = (kafka.clone(), producer.clone(), shutdown.clone());
        tokio::spawn(async move {
            streaming::run_consumer(kafka, settings, producer, Collect { payment, tx }, shutdown)
                .await
        })
    };

    let mut received: BTreeMap<String, Envelope> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
    while received.len() < sent.len() {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(d)) => {
                println!(
                    "  <- {:<34} {}[{}]@{} via group {group}",
                    d.envelope.event_type().as_str(),
                    d.meta.topic,
                    d.meta.partition,
                    d.meta.offset
                );
                received.insert(d.envelope.event_id.to_string(), d.envelope);
            }
            Ok(None) => break,
            Err(_) => break,
        }
    }
    shutdown.cancel();
    loop_task.await.context("consumer task")??;

    let mut identical = 0;
    for env in &sent {
        match received.get(&env.event_id.to_string()) {
            Some(got) if got == env => identical += 1,
            Some(_) => println!("  MISMATCH {}", env.event_type()),
            None => println!("  MISSING  {}", env.event_type()),
        }
    }
    println!(
        "{identical}/{} events ({} event types) came back identical through the broker",
        sent.len(),
        EventType::ALL.len()
    );
    if identical != sent.len() {
        bail!("round trip incomplete");
    }
    Ok(ExitCode::SUCCESS)
}
