//! The at-least-once consumer-group loop.
//!
//! 1. Poll a batch (at most `batch_max` messages, waiting at most
//!    `batch_linger` after the first).
//! 2. Decode each message; undecodable ones become dead letters.
//! 3. Hand the decoded events to the [`BatchHandler`], which makes its
//!    effects durable (deduplicating by event id) before it returns. Events
//!    it rejects become dead letters. A failed batch is retried with
//!    back-off if the failure is transient, or narrowed down to the
//!    message(s) that fail on their own if it is deterministic; those
//!    become dead letters too ([`FailureClass`]).
//! 4. Send the dead letters and wait for their acknowledgements (one the
//!    broker refuses for good is sent as a bounded stub, [`dlq::Form`]).
//! 5. Only then commit, per partition, the offset after the batch's last
//!    message, for partitions this member still owns.
//!
//! A crash anywhere before 5 means the batch is delivered again, to this
//! member or another: effects happen at least once, and the handler's
//! dedup by event id turns that into exactly-once effect.

use crate::config::KafkaConfig;
use crate::dlq::{self, DeadLetter};
use crate::producer::EventProducer;
use events::{Envelope, avro};
use rdkafka::ClientContext;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Where a message came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageMeta {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Record timestamp (ms since the epoch), if the broker gave one.
    pub timestamp_ms: Option<i64>,
}

/// A decoded event and where it came from.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub envelope: Envelope,
    pub meta: MessageMeta,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Delivered {
    /// A span carrying the ids of this message, for the handler's logs.
    pub fn span(&self) -> tracing::Span {
        message_span(&self.meta, Some(&self.envelope))
    }

    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The message key as received (e.g. to verify a signature over it).
    pub fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }

    /// The message headers as received.
    pub fn headers(&self) -> &[(String, Option<Vec<u8>>)] {
        &self.headers
    }
}

fn message_span(meta: &MessageMeta, env: Option<&Envelope>) -> tracing::Span {
    tracing::info_span!(
        "message",
        topic = %meta.topic,
        partition = meta.partition,
        offset = meta.offset,
        event_id = env.map(|e| tracing::field::display(e.event_id)),
        payment_id = env.and_then(|e| e.payment_id).map(tracing::field::display),
        event_type = env.map(|e| e.event_type().as_str()),
    )
}

/// What the handler did with one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Its effects are durable.
    Applied,
    /// Its event id had been applied before; nothing changed.
    Duplicate,
    /// Not an event this consumer acts on (e.g. an executor seeing a
    /// ledger-only event); nothing to do.
    Ignored,
    /// It can never be applied (a business or validation rule says no): it
    /// goes to the dead-letter topic with this reason and the partition
    /// moves on.
    Rejected { kind: String, reason: String },
}

impl Outcome {
    pub fn rejected(kind: impl Into<String>, reason: impl Into<String>) -> Outcome {
        Outcome::Rejected {
            kind: kind.into(),
            reason: reason.into(),
        }
    }
}

/// Whether a failed batch may succeed if tried again.
///
/// | class | examples | what the loop does |
/// |---|---|---|
/// | [`Transient`](FailureClass::Transient) | database or broker unreachable, pool timeout, serialization failure (40001), deadlock (40P01), lock timeout (55P03), `SQLITE_BUSY`/`SQLITE_LOCKED`, I/O errors, an idempotency key in flight elsewhere | retries the same batch with exponential back-off, forever (until shutdown); commits nothing past it |
/// | [`Deterministic`](FailureClass::Deterministic) | SQL data exceptions (SQLSTATE class 22: NUL byte 22021, out of range 22003, ...) and integrity violations (class 23), their SQLite equivalents (`SQLITE_CONSTRAINT*`, `SQLITE_TOOBIG`, `SQLITE_MISMATCH`, "integer overflow"), values out of range in the handler's own arithmetic | the same input fails the same way every time: the loop narrows the batch down (bisection) to the message(s) that fail on their own, dead-letters exactly those with the error kind and message, and applies every other message of the batch |
///
/// Why: retrying a deterministic failure can never succeed, so retrying it
/// stalls its partition (and, through `max.poll.interval.ms`, whoever takes
/// it over) for good. Dead-lettering a transient failure would drop a valid
/// event from the flow because of an outage. When in doubt a failure is
/// transient: a stalled partition is visible (lag, `batch failed` errors)
/// and recovers by itself once the cause is fixed, a wrongly dead-lettered
/// event needs an operator's redrive. `storage::sql_error_class` classifies
/// `sqlx` errors along these lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    Transient,
    Deterministic,
}

/// A failure of a whole batch.
///
/// Transient: nothing is committed and the batch is tried again after a
/// back-off, until it succeeds or the loop is shut down. Deterministic: the
/// batch is split until the failing message(s) are found; those are
/// dead-lettered with [`kind`](Self::kind) and [`message`](Self::message)
/// as the reason, the rest is applied (see [`FailureClass`]).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    pub class: FailureClass,
    /// Stable, bounded code (the dead letter's `dlq.error_kind` when
    /// deterministic), e.g. `sql_data_exception`, `sql_integrity_violation`.
    pub kind: String,
    pub message: String,
}

/// Shorthand for [`HandlerError::transient`], kept for the handlers written
/// before failures were classified (`HandlerError(format!(..))`).
#[allow(non_snake_case)]
pub fn HandlerError(message: String) -> HandlerError {
    HandlerError::transient(message)
}

impl HandlerError {
    /// A failure that may go away (see [`FailureClass::Transient`]).
    pub fn transient(message: impl Into<String>) -> HandlerError {
        HandlerError {
            class: FailureClass::Transient,
            kind: "transient".to_owned(),
            message: message.into(),
        }
    }

    /// A failure the same input will always cause (see
    /// [`FailureClass::Deterministic`]).
    pub fn deterministic(kind: impl Into<String>, message: impl Into<String>) -> HandlerError {
        HandlerError {
            class: FailureClass::Deterministic,
            kind: kind.into(),
            message: message.into(),
        }
    }

    /// Deterministic with `kind` if a classifier found one (e.g.
    /// `storage::deterministic_kind`), transient otherwise.
    pub fn classified(
        deterministic_kind: Option<&str>,
        message: impl Into<String>,
    ) -> HandlerError {
        match deterministic_kind {
            Some(kind) => HandlerError::deterministic(kind, message),
            None => HandlerError::transient(message),
        }
    }

    pub fn is_deterministic(&self) -> bool {
        self.class == FailureClass::Deterministic
    }
}

/// Applies batches of events. Implementations must make the effects durable
/// before returning, and must be idempotent per event id: after a crash the
/// same events come again.
pub trait BatchHandler: Send {
    /// Returns exactly one outcome per event, in order.
    fn handle(
        &mut self,
        batch: &[Delivered],
    ) -> impl Future<Output = Result<Vec<Outcome>, HandlerError>> + Send;
}

/// Consumer-group settings of one loop.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub group_id: String,
    pub topics: Vec<String>,
    /// Most messages handed to the handler at once; bounds in-flight work.
    pub batch_max: usize,
    /// After the first message of a batch, wait at most this long for more.
    pub batch_linger: Duration,
    /// First back-off after a failed batch; doubles up to `retry_backoff_max`.
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
}

impl ConsumerSettings {
    pub fn new(group_id: impl Into<String>, topics: Vec<String>) -> ConsumerSettings {
        ConsumerSettings {
            group_id: group_id.into(),
            topics,
            batch_max: 500,
            batch_linger: Duration::from_millis(20),
            retry_backoff: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("cannot create Kafka consumer: {0}")]
    Create(KafkaError),
    #[error("cannot subscribe to {topics:?}: {error}")]
    Subscribe {
        topics: Vec<String>,
        error: KafkaError,
    },
}

/// Counts revocations so the loop can tell that a batch it is assembling
/// may hold messages of partitions it no longer owns.
struct LoopContext {
    group_id: String,
    revocations: AtomicU64,
}

impl ClientContext for LoopContext {
    /// librdkafka's statistics (every `statistics.interval.ms`): consumer
    /// lag per assigned partition, from the broker's high watermark.
    #[allow(clippy::cast_precision_loss)] // a lag gauge, not money
    fn stats(&self, stats: rdkafka::Statistics) {
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                // -1: partition not assigned here / not known yet.
                if *partition < 0 || p.consumer_lag < 0 {
                    continue;
                }
                metrics::gauge!(
                    crate::metrics::CONSUMER_LAG,
                    "group" => self.group_id.clone(),
                    "topic" => topic.clone(),
                    "partition" => partition.to_string()
                )
                .set(p.consumer_lag as f64);
            }
        }
    }
}

impl ConsumerContext for LoopContext {
    fn pre_rebalance(&self, _: &rdkafka::consumer::BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                self.revocations.fetch_add(1, Ordering::SeqCst);
                tracing::info!(group = %self.group_id, partitions = %describe(tpl), "partitions revoked");
            }
            Rebalance::Assign(tpl) => {
                tracing::info!(group = %self.group_id, partitions = %describe(tpl), "partitions assigned");
            }
            Rebalance::Error(e) => {
                tracing::warn!(group = %self.group_id, error = %e, "rebalance error")
            }
        }
    }
}

fn describe(tpl: &TopicPartitionList) -> String {
    tpl.elements()
        .iter()
        .map(|e| format!("{}/{}", e.topic(), e.partition()))
        .collect::<Vec<_>>()
        .join(",")
}

type LoopConsumer = StreamConsumer<LoopContext>;

fn create_consumer(
    cfg: &KafkaConfig,
    settings: &ConsumerSettings,
) -> Result<LoopConsumer, ConsumerError> {
    let mut c = cfg.client_config(&format!("paystream-{}", settings.group_id));
    c.set("group.id", &settings.group_id);
    // We commit ourselves, and only after the batch's effects are durable.
    c.set("enable.auto.commit", "false");
    // librdkafka must not mark offsets as processed on its own either.
    c.set("enable.auto.offset.store", "false");
    // A new group reads from the beginning: projections must see every event.
    c.set("auto.offset.reset", "earliest");
    // Rebalances move only the partitions that must move; the others keep
    // flowing while members join or leave.
    c.set("partition.assignment.strategy", "cooperative-sticky");
    // A member that died (kill -9) loses its partitions after 10 s; with a
    // stable instance id (static membership) its restart takes them back at
    // once. The id is per group member, so one process's consumers of
    // different groups can share it.
    if let Some(id) = cfg.instance_id.as_deref().filter(|id| !id.is_empty()) {
        c.set("group.instance.id", id);
    }
    c.set("session.timeout.ms", "10000");
    c.set("heartbeat.interval.ms", "1000");
    // The longest a batch may take (handler retries included) before the
    // group considers this member stuck and rebalances.
    c.set("max.poll.interval.ms", "300000");
    // No Kafka transactions are used anywhere (producers are idempotent,
    // consumers dedup), so there is nothing uncommitted to hide.
    c.set("isolation.level", "read_uncommitted");
    // Bounds prefetched data per member.
    c.set("queued.max.messages.kbytes", "65536");
    c.set("fetch.wait.max.ms", "100");
    // Statistics (consumer lag per partition) for the metrics, every 5 s.
    c.set("statistics.interval.ms", "5000");
    cfg.apply_overrides(&mut c);
    let ctx = LoopContext {
        group_id: settings.group_id.clone(),
        revocations: AtomicU64::new(0),
    };
    c.create_with_context(ctx).map_err(ConsumerError::Create)
}

/// Statistics of a finished loop, for tests and logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoopStats {
    pub batches: u64,
    pub applied: u64,
    pub duplicates: u64,
    pub ignored: u64,
    pub dead_lettered: u64,
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
    let consumer = create_consumer(&cfg, &settings)?;
    let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|error| ConsumerError::Subscribe {
            topics: settings.topics.clone(),
            error,
        })?;
    tracing::info!(group = %settings.group_id, topics = ?settings.topics, "consumer started");
    let mut stats = LoopStats::default();

    while !shutdown.is_cancelled() {
        let epoch = consumer.context().revocations.load(Ordering::SeqCst);
        let Some(batch) = poll_batch(&consumer, &settings, &shutdown).await else {
            break;
        };
        let batch = drop_revoked(&consumer, epoch, batch);
        if batch.is_empty() {
            continue;
        }
        // Owned copies: the handler may take a while, and BorrowedMessage
        // must not outlive the next poll.
        let mut decoded = Vec::with_capacity(batch.len());
        let mut dead = Vec::new();
        for raw in batch {
            let span = message_span(&raw.meta, None);
            let _guard = span.enter();
            match avro::decode(&raw.payload) {
                Ok(envelope) => decoded.push(Delivered {
                    envelope,
                    meta: raw.meta,
                    key: raw.key,
                    payload: raw.payload,
                    headers: raw.headers,
                }),
                Err(e) => {
                    tracing::warn!(error_kind = e.kind(), error = %e, "undecodable message; dead-lettering");
                    dead.push(DeadLetter {
                        error_kind: e.kind().to_owned(),
                        reason: e.to_string(),
                        origin: raw.meta,
                        consumer_group: settings.group_id.clone(),
                        key: raw.key,
                        payload: Some(raw.payload),
                        headers: raw.headers,
                    });
                }
            }
        }

        let Some(outcomes) = handle_with_retry(&mut handler, &decoded, &settings, &shutdown).await
        else {
            break; // shut down while the handler kept failing: commit nothing
        };
        let group = settings.group_id.clone();
        let count = |outcome: &'static str, n: u64| {
            if n > 0 {
                metrics::counter!(crate::metrics::EVENTS, "group" => group.clone(), "outcome" => outcome).increment(n);
            }
        };
        let before = stats.clone();
        for (d, outcome) in decoded.iter().zip(outcomes) {
            match outcome {
                Outcome::Applied => stats.applied += 1,
                Outcome::Duplicate => stats.duplicates += 1,
                Outcome::Ignored => stats.ignored += 1,
                Outcome::Rejected { kind, reason } => {
                    let _g = d.span().entered();
                    tracing::warn!(error_kind = %kind, %reason, "event rejected; dead-lettering");
                    dead.push(DeadLetter {
                        error_kind: kind,
                        reason,
                        origin: d.meta.clone(),
                        consumer_group: settings.group_id.clone(),
                        key: d.key.clone(),
                        payload: Some(d.payload.clone()),
                        headers: d.headers.clone(),
                    });
                }
            }
        }

        if !send_dead_letters(&producer, &dead, &settings, &shutdown).await {
            break; // shut down before the dead letters were safe: commit nothing
        }
        stats.dead_lettered += dead.len() as u64;
        stats.batches += 1;
        count("applied", stats.applied - before.applied);
        count("duplicate", stats.duplicates - before.duplicates);
        count("ignored", stats.ignored - before.ignored);
        count("dead_lettered", stats.dead_lettered - before.dead_lettered);
        for d in &dead {
            metrics::counter!(crate::metrics::DEAD_LETTERS, "group" => group.clone(), "kind" => d.error_kind.clone()).increment(1);
        }

        let mut last: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for d in &decoded {
            note_offset(&mut last, &d.meta);
        }
        for d in &dead {
            note_offset(&mut last, &d.origin);
        }
        commit(&consumer, &settings.group_id, &last);
    }

    tracing::info!(group = %settings.group_id, ?stats, "consumer stopping; leaving the group");
    consumer.unsubscribe();
    Ok(stats)
}

struct RawMessage {
    meta: MessageMeta,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: Vec<(String, Option<Vec<u8>>)>,
}

fn to_raw(m: &BorrowedMessage<'_>) -> RawMessage {
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
    }
}

/// Waits for the first message (or shutdown), then gathers more for at most
/// `batch_linger`. `None` means shutdown.
async fn poll_batch(
    consumer: &LoopConsumer,
    settings: &ConsumerSettings,
    shutdown: &CancellationToken,
) -> Option<Vec<RawMessage>> {
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            m = consumer.recv() => match m {
                Ok(m) => { batch.push(to_raw(&m)); break; }
                Err(e) => {
                    tracing::warn!(error = %e, "consumer error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    let deadline = tokio::time::Instant::now() + settings.batch_linger;
    while batch.len() < settings.batch_max {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => batch.push(to_raw(&m)),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "consumer error");
                break;
            }
            Err(_) => break,
        }
    }
    Some(batch)
}

/// Drops messages of partitions revoked while the batch was being polled:
/// their new owner will process them, and we could not commit them anyway.
fn drop_revoked(consumer: &LoopConsumer, epoch: u64, batch: Vec<RawMessage>) -> Vec<RawMessage> {
    if consumer.context().revocations.load(Ordering::SeqCst) == epoch {
        return batch;
    }
    let Ok(assignment) = consumer.assignment() else {
        return Vec::new();
    };
    let before = batch.len();
    let kept: Vec<_> = batch
        .into_iter()
        .filter(|m| {
            assignment
                .find_partition(&m.meta.topic, m.meta.partition)
                .is_some()
        })
        .collect();
    if kept.len() != before {
        tracing::info!(
            dropped = before - kept.len(),
            "dropped messages of revoked partitions"
        );
    }
    kept
}

/// Hands `decoded` to the handler and returns one outcome per event.
///
/// Transient failures retry the same (sub-)batch with back-off.
/// Deterministic failures split it in two halves, handled in order (left
/// first, so a partition's order is kept and what the left half applied is
/// durable before the right half runs), down to single messages: a message
/// that fails deterministically on its own becomes `Outcome::Rejected` with
/// the error's kind and message, i.e. a dead letter. Re-running the
/// messages of a failed attempt is safe because handlers are idempotent per
/// event id (an effect that did become durable comes back as `Duplicate`).
/// `None`: shut down while retrying.
async fn handle_with_retry<H: BatchHandler>(
    handler: &mut H,
    decoded: &[Delivered],
    settings: &ConsumerSettings,
    shutdown: &CancellationToken,
) -> Option<Vec<Outcome>> {
    let mut outcomes = Vec::with_capacity(decoded.len());
    // (start, end) ranges still to handle; the last one is next (left
    // halves on top).
    let mut todo: Vec<(usize, usize)> = vec![(0, decoded.len())];
    while let Some((start, end)) = todo.pop() {
        if start == end {
            continue;
        }
        let part = &decoded[start..end];
        match handle_until_not_transient(handler, part, settings, shutdown).await? {
            Ok(o) => outcomes.extend(o),
            Err(e) if part.len() == 1 => {
                let _g = part[0].span().entered();
                tracing::warn!(group = %settings.group_id, error_kind = %e.kind, error = %e, "message fails deterministically");
                outcomes.push(Outcome::Rejected {
                    kind: e.kind,
                    reason: e.message,
                });
            }
            Err(e) => {
                tracing::warn!(group = %settings.group_id, size = part.len(), error_kind = %e.kind, error = %e, "batch failed deterministically; narrowing it down");
                let mid = start + part.len() / 2;
                todo.push((mid, end));
                todo.push((start, mid));
            }
        }
    }
    Some(outcomes)
}

/// Retries `batch` while it fails transiently. `Some(Err)`: a
/// deterministic failure; `None`: shut down while retrying.
async fn handle_until_not_transient<H: BatchHandler>(
    handler: &mut H,
    batch: &[Delivered],
    settings: &ConsumerSettings,
    shutdown: &CancellationToken,
) -> Option<Result<Vec<Outcome>, HandlerError>> {
    let mut backoff = settings.retry_backoff;
    let mut attempt = 1u32;
    loop {
        let span =
            tracing::info_span!("batch", group = %settings.group_id, size = batch.len(), attempt);
        match handler.handle(batch).instrument(span).await {
            Ok(outcomes) => {
                // A handler that loses or invents outcomes is a bug; crash
                // rather than commit offsets of unapplied events.
                assert_eq!(
                    outcomes.len(),
                    batch.len(),
                    "handler must return one outcome per event"
                );
                return Some(Ok(outcomes));
            }
            Err(e) => {
                metrics::counter!(crate::metrics::BATCH_FAILURES, "group" => settings.group_id.clone()).increment(1);
                if e.is_deterministic() {
                    return Some(Err(e));
                }
                tracing::error!(group = %settings.group_id, attempt, error = %e, retry_in_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX), "batch failed; will retry");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(settings.retry_backoff_max);
                attempt = attempt.saturating_add(1);
            }
        }
    }
}

/// Sends every dead letter and waits for its acknowledgement. Retryable
/// produce errors (broker unavailable, queue full, timeouts) are retried
/// with back-off; a dead letter the producer or broker refuses for good
/// (too large, invalid record) is sent as a stub instead, and a stub that
/// is refused as a minimal stub (only `dlq.*` headers; bounded, so a
/// failure to produce it is the cluster's, not the message's, and is
/// retried). So one message can never block its partition here. `false`:
/// shut down before all were stored.
async fn send_dead_letters(
    producer: &EventProducer,
    dead: &[DeadLetter],
    settings: &ConsumerSettings,
    shutdown: &CancellationToken,
) -> bool {
    for d in dead {
        let mut backoff = settings.retry_backoff;
        let mut form = dlq::Form::Whole;
        let mut cause = String::new();
        loop {
            match d.send_as(producer, form, &cause).await {
                Ok(at) => {
                    tracing::info!(dlq_partition = at.partition, dlq_offset = at.offset, original_topic = %d.origin.topic, original_partition = d.origin.partition, original_offset = d.origin.offset, ?form, "dead letter stored");
                    break;
                }
                Err(e) if !e.is_retryable() && form != dlq::Form::Minimal => {
                    let next = if form == dlq::Form::Whole {
                        dlq::Form::Stub
                    } else {
                        dlq::Form::Minimal
                    };
                    tracing::warn!(error = %e, ?form, ?next, original_topic = %d.origin.topic, original_partition = d.origin.partition, original_offset = d.origin.offset, "dead letter refused for good; sending a stub");
                    cause = e.to_string();
                    form = next;
                }
                Err(e) => {
                    tracing::error!(error = %e, ?form, "cannot store dead letter; will retry");
                    tokio::select! {
                        _ = shutdown.cancelled() => return false,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(settings.retry_backoff_max);
                }
            }
        }
    }
    true
}

fn note_offset(last: &mut BTreeMap<(String, i32), i64>, meta: &MessageMeta) {
    let e = last
        .entry((meta.topic.clone(), meta.partition))
        .or_insert(meta.offset);
    *e = (*e).max(meta.offset);
}

/// Commits "next offset to read" for each partition we still own. A failed
/// commit is not fatal: the events come again and are deduplicated.
fn commit(consumer: &LoopConsumer, group: &str, last: &BTreeMap<(String, i32), i64>) {
    let assignment = consumer.assignment().ok();
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in last {
        if let Some(a) = &assignment
            && a.find_partition(topic, *partition).is_none()
        {
            continue;
        }
        if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(offset + 1)) {
            tracing::warn!(error = %e, "cannot build commit list");
            return;
        }
    }
    if tpl.count() == 0 {
        return;
    }
    let result = if tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
    {
        tokio::task::block_in_place(|| consumer.commit(&tpl, CommitMode::Sync))
    } else {
        consumer.commit(&tpl, CommitMode::Sync)
    };
    match result {
        Ok(()) => tracing::debug!(group, offsets = %describe(&tpl), "committed"),
        Err(e) => {
            tracing::warn!(group, error = %e, "commit failed; the batch will be delivered again")
        }
    }
}
