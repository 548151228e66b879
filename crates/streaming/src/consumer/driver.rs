//! The loop ([`run_consumer`]): the consumer's creation, the poll and
//! decode stage on its own thread, and the apply stage, which runs steps 1
//! to 4 of the module docs (`super`) on each batch.

use super::config::{ConsumerSettings, client_config};
use super::dead_letters::{Dead, send_dead_letters};
use super::offsets::{Generations, InFlight, commit_stored, last_offsets};
use super::rebalance::{LoopConsumer, LoopContext};
use super::retry::{Handled, handle_with_retry};
use super::{
    BatchHandler, ConsumerError, Delivered, LoopStats, MessageMeta, Outcome, message_span,
};
use crate::config::KafkaConfig;
use crate::dlq::{self, DeadLetter};
use crate::producer::EventProducer;
use events::avro;
use rdkafka::consumer::Consumer;
use rdkafka::message::{BorrowedMessage, Message};
use runtime::metrics::events::{BatchHandled, EventRejected, InternalEvent as _};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A polled and decoded batch on its way to the handler.
pub(super) struct Prepared {
    pub(super) decoded: Vec<Delivered>,
    pub(super) dead: Vec<Dead>,
}

/// Runs the loop until `shutdown` is cancelled, then commits what is done
/// and leaves the group.
pub async fn run_consumer<H: BatchHandler>(
    cfg: KafkaConfig,
    settings: ConsumerSettings,
    producer: EventProducer,
    mut handler: H,
    shutdown: CancellationToken,
) -> Result<LoopStats, ConsumerError> {
    assert!(settings.batch_max > 0, "batch_max must be positive");
    let consumer = Arc::new(create_consumer(&cfg, &settings)?);
    let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|error| ConsumerError::Subscribe {
            topics: settings.topics.clone(),
            error,
        })?;
    tracing::info!(group = %settings.group_id, topics = ?settings.topics, "consumer started");

    let (tx, mut rx) = mpsc::channel(settings.pipeline_depth.max(1));
    let stage_stop = CancellationToken::new();
    // Also stops the poll thread when this future is dropped (aborted).
    let _stop_stage = stage_stop.clone().drop_guard();
    let stage = {
        let (consumer, settings, stop) = (consumer.clone(), settings.clone(), stage_stop.clone());
        std::thread::Builder::new()
            .name("paystream-poll".into())
            .spawn(move || poll_stage(consumer, &settings, &tx, &stop))
            .map_err(ConsumerError::Thread)?
    };

    let mut stats = LoopStats::default();
    loop {
        let batch = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            b = rx.recv() => match b {
                Some(b) => b,
                None => break, // the poll thread ended
            },
        };
        if !apply(
            &consumer,
            &settings,
            &producer,
            &mut handler,
            &shutdown,
            batch,
            &mut stats,
        )
        .await
        {
            break;
        }
    }

    tracing::info!(group = %settings.group_id, ?stats, "consumer stopping; committing and leaving the group");
    // Batches still queued are not applied, hence not committed: the group
    // delivers them again. The poll thread commits the stored offsets
    // synchronously and, holding the last reference, closes the consumer.
    drop(rx);
    stage_stop.cancel();
    drop(consumer);
    match tokio::task::spawn_blocking(move || stage.join()).await {
        Ok(Ok(())) => {}
        _ => tracing::error!(group = %settings.group_id, "the consumer's poll thread panicked"),
    }
    Ok(stats)
}

fn create_consumer(
    cfg: &KafkaConfig,
    settings: &ConsumerSettings,
) -> Result<LoopConsumer, ConsumerError> {
    let ctx = LoopContext::new(settings.group_id.clone());
    client_config(cfg, settings)
        .create_with_context(ctx)
        .map_err(ConsumerError::Create)
}

/// The poll and decode stage: runs on its own thread until `stop` or until
/// the apply task is gone, then commits the stored offsets synchronously.
fn poll_stage(
    consumer: Arc<LoopConsumer>,
    settings: &ConsumerSettings,
    tx: &mpsc::Sender<Prepared>,
    stop: &CancellationToken,
) {
    let mut tags = Generations::default();
    while let Some(batch) = poll_batch(&consumer, settings, stop, tx, &mut tags) {
        if batch.is_empty() {
            continue;
        }
        let prepared = decode_batch(batch, &settings.group_id);
        // Waits while `pipeline_depth` batches are queued: back-pressure
        // on reading, while librdkafka keeps prefetching (bounded by
        // `queued.max.messages.kbytes`) and heartbeating.
        if tx.blocking_send(prepared).is_err() {
            break;
        }
    }
    commit_stored(&consumer, &settings.group_id, "shutdown");
}

struct RawMessage {
    meta: MessageMeta,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: Vec<(String, Option<Vec<u8>>)>,
    generation: u64,
}

fn to_raw(m: &BorrowedMessage<'_>, generation: u64) -> RawMessage {
    RawMessage {
        meta: MessageMeta {
            topic: m.topic().to_owned(),
            partition: m.partition(),
            offset: m.offset(),
            timestamp_ms: m.timestamp().to_millis(),
        },
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        headers: dlq::owned_headers(m.headers()),
        generation,
    }
}

/// How often the poll thread, while waiting for a first message, checks
/// for shutdown.
const POLL_TICK: Duration = Duration::from_millis(100);

/// Waits for the first message (or shutdown), then gathers more for at most
/// `batch_linger`. `None` means stop.
fn poll_batch(
    consumer: &LoopConsumer,
    settings: &ConsumerSettings,
    stop: &CancellationToken,
    tx: &mpsc::Sender<Prepared>,
    tags: &mut Generations,
) -> Option<Vec<RawMessage>> {
    let mut batch = Vec::new();
    let mut raw = |m: &BorrowedMessage<'_>| {
        let g = tags.of(consumer.context(), m.topic(), m.partition());
        to_raw(m, g)
    };
    loop {
        if stop.is_cancelled() || tx.is_closed() {
            return None;
        }
        match consumer.poll(POLL_TICK) {
            Some(Ok(m)) => {
                batch.push(raw(&m));
                break;
            }
            Some(Err(e)) => {
                tracing::warn!(group = %settings.group_id, error = %e, "consumer error");
                std::thread::sleep(Duration::from_millis(100));
            }
            None => {}
        }
    }
    let deadline = std::time::Instant::now() + settings.batch_linger;
    while batch.len() < settings.batch_max {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        match consumer.poll(left) {
            Some(Ok(m)) => batch.push(raw(&m)),
            Some(Err(e)) => {
                tracing::warn!(group = %settings.group_id, error = %e, "consumer error");
                break;
            }
            // Nothing came, or poll served an event (a rebalance, a commit
            // result): the deadline decides.
            None => {}
        }
    }
    Some(batch)
}

/// Decodes a batch; undecodable messages become dead letters.
fn decode_batch(batch: Vec<RawMessage>, group: &str) -> Prepared {
    // Per-message spans cost more than the decode of a small event; only
    // when someone reads debug logs.
    let spans = tracing::enabled!(tracing::Level::DEBUG);
    let mut decoded = Vec::with_capacity(batch.len());
    let mut dead = Vec::new();
    for raw in batch {
        let _guard = spans.then(|| message_span(&raw.meta, None).entered());
        match avro::decode(&raw.payload) {
            Ok(envelope) => decoded.push(Delivered {
                envelope,
                meta: raw.meta,
                key: raw.key,
                payload: raw.payload,
                headers: raw.headers,
                generation: raw.generation,
            }),
            Err(e) => {
                tracing::warn!(
                    group,
                    topic = %raw.meta.topic,
                    partition = raw.meta.partition,
                    offset = raw.meta.offset,
                    error_kind = e.kind(),
                    error = %e,
                    "undecodable message; dead-lettering"
                );
                dead.push(Dead {
                    generation: raw.generation,
                    letter: DeadLetter {
                        error_kind: e.kind().to_owned(),
                        reason: e.to_string(),
                        origin: raw.meta,
                        consumer_group: group.to_owned(),
                        key: raw.key,
                        payload: Some(raw.payload),
                        headers: raw.headers,
                    },
                });
            }
        }
    }
    Prepared { decoded, dead }
}

/// Applies one batch: handler, dead letters, offsets. `false`: shut down
/// before the batch was done (nothing of it stored).
async fn apply<H: BatchHandler>(
    consumer: &LoopConsumer,
    settings: &ConsumerSettings,
    producer: &EventProducer,
    handler: &mut H,
    shutdown: &CancellationToken,
    mut batch: Prepared,
    stats: &mut LoopStats,
) -> bool {
    let ctx = consumer.context();
    let mut flight = InFlight::claim(ctx, &mut batch);
    let outcomes = loop {
        if batch.decoded.is_empty() && batch.dead.is_empty() {
            return true;
        }
        match handle_with_retry(handler, &batch.decoded, settings, shutdown, ctx).await {
            Handled::Done(outcomes) => break outcomes,
            Handled::Shutdown => return false, // commit nothing of this batch
            // Some partitions went away while the batch kept failing: go on
            // with the rest (what was applied comes back as duplicates).
            Handled::Revoked => flight.keep_owned(&mut batch),
        }
    };
    let Prepared { decoded, mut dead } = batch;
    let before = stats.clone();
    for (d, outcome) in decoded.iter().zip(outcomes) {
        match outcome {
            Outcome::Applied => stats.applied += 1,
            Outcome::Duplicate => stats.duplicates += 1,
            Outcome::Ignored => stats.ignored += 1,
            Outcome::Rejected { kind, reason } => {
                let _g = d.span().entered();
                EventRejected {
                    group: &settings.group_id,
                    kind: &kind,
                    reason: &reason,
                }
                .emit();
                dead.push(Dead {
                    generation: d.generation,
                    letter: DeadLetter {
                        error_kind: kind,
                        reason,
                        origin: d.meta.clone(),
                        consumer_group: settings.group_id.clone(),
                        key: d.key.clone(),
                        payload: Some(d.payload.clone()),
                        headers: d.headers.clone(),
                    },
                });
            }
        }
    }

    if !send_dead_letters(producer, &dead, settings, shutdown).await {
        return false; // shut down before the dead letters were safe: commit nothing
    }
    stats.dead_lettered += dead.len() as u64;
    stats.batches += 1;
    BatchHandled {
        group: &settings.group_id,
        applied: stats.applied - before.applied,
        duplicate: stats.duplicates - before.duplicates,
        ignored: stats.ignored - before.ignored,
        dead_lettered: stats.dead_lettered - before.dead_lettered,
    }
    .emit();

    // Every message of the batch is either applied (durable) or
    // dead-lettered (acknowledged): its partitions may move past it.
    flight.store(consumer, &last_offsets(&decoded, &dead));
    true
}
