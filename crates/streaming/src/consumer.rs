//! The at-least-once consumer-group loop, pipelined.
//!
//! Two stages joined by a bounded channel of `pipeline_depth` batches:
//!
//! - **Poll and decode** (a thread of its own, which also runs librdkafka's
//!   rebalance callbacks): poll a batch (at most `batch_max` messages,
//!   waiting at most `batch_linger` after the first), decode each message
//!   (undecodable ones become dead letters), tag each with its partition's
//!   assignment generation, and pass the batch on. So the decode of batch
//!   k+1 runs while batch k is applied.
//! - **Apply** (the loop's own task), per batch, in order:
//!   1. Keep only messages of partitions this member still owns under the
//!      same assignment (a batch may wait in the channel across a
//!      rebalance), and mark those partitions in flight.
//!   2. Hand the decoded events to the [`BatchHandler`], which makes its
//!      effects durable (deduplicating by event id) before it returns.
//!      Events it rejects become dead letters. A failed batch is retried
//!      with back-off if the failure is transient, or narrowed down to the
//!      message(s) that fail on their own if it is deterministic; those
//!      become dead letters too ([`FailureClass`]).
//!   3. Send the batch's dead letters concurrently and wait for every
//!      acknowledgement (one the broker refuses for good is sent as a
//!      bounded stub, [`dlq::Form`]).
//!   4. Only then store, per partition still owned, the offset after the
//!      batch's last message, and ask for an asynchronous commit of the
//!      stored offsets (no broker round trip on this task).
//!
//! Revocation (in the poll thread's rebalance callback) first takes the
//! partitions out of the owned set, so no new handler call starts on them,
//! then waits for a handler call already running on them to finish and
//! store its offsets, then commits the stored offsets synchronously before
//! the partitions move: the next owner starts right after the last durable
//! batch, and a revoked partition is never applied or committed here again.
//! Shutdown finishes the batch in flight, drops the ones queued behind it
//! (uncommitted, so delivered again) and commits synchronously.
//!
//! A crash anywhere before a commit means the batch is delivered again, to
//! this member or another: effects happen at least once, and the handler's
//! dedup by event id turns that into exactly-once effect.

use crate::config::KafkaConfig;
use crate::dlq::{self, DeadLetter};
use crate::producer::EventProducer;
use events::{Envelope, avro};
use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use runtime::metrics::events::{
    BatchFailed, BatchHandled, DeadLetterStored, EventRejected, InternalEvent as _, RebalanceKind,
    Rebalanced,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
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
    /// Assignment generation of its partition when it was polled.
    generation: u64,
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
///
/// [`ConsumerSettings::new`] takes its batching defaults from the
/// environment when set, so an operator can tune any component's loops
/// without a code change: `PAYSTREAM_CONSUMER_BATCH_MAX` (messages per
/// batch), `PAYSTREAM_CONSUMER_BATCH_LINGER_MS` and
/// `PAYSTREAM_CONSUMER_PIPELINE_DEPTH`. A component that sets a field after
/// `new` (the projections' `--batch-size`) overrides the environment.
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
    /// Decoded batches that may wait for the handler (at least 1). The poll
    /// stage holds one more while it waits for room, so up to
    /// `pipeline_depth + 1` batches are read ahead of the one applying;
    /// none of them is committed before it is applied.
    pub pipeline_depth: usize,
}

/// Environment variable: default `batch_max` of every loop.
pub const ENV_BATCH_MAX: &str = "PAYSTREAM_CONSUMER_BATCH_MAX";
/// Environment variable: default `batch_linger` of every loop, in ms.
pub const ENV_BATCH_LINGER_MS: &str = "PAYSTREAM_CONSUMER_BATCH_LINGER_MS";
/// Environment variable: default `pipeline_depth` of every loop.
pub const ENV_PIPELINE_DEPTH: &str = "PAYSTREAM_CONSUMER_PIPELINE_DEPTH";

impl ConsumerSettings {
    pub fn new(group_id: impl Into<String>, topics: Vec<String>) -> ConsumerSettings {
        let mut s = ConsumerSettings {
            group_id: group_id.into(),
            topics,
            batch_max: crate::limits::CONSUMER_BATCH_MAX_DEFAULT,
            batch_linger: Duration::from_millis(20),
            retry_backoff: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(10),
            pipeline_depth: 1,
        };
        s.apply_env(|name| std::env::var(name).ok());
        s
    }

    /// Applies the `PAYSTREAM_CONSUMER_*` defaults `get` returns. A value
    /// that does not parse (or is 0 where 0 makes no sense) is reported and
    /// ignored rather than turned into a loop that cannot make progress.
    fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) {
        let positive = |name: &str| -> Option<usize> {
            let v = get(name)?;
            match v.trim().parse::<usize>() {
                Ok(n) if n > 0 => Some(n),
                _ => {
                    tracing::warn!(variable = name, value = %v, "ignoring: expected a positive integer");
                    None
                }
            }
        };
        if let Some(n) = positive(ENV_BATCH_MAX) {
            self.batch_max = n;
        }
        if let Some(n) = positive(ENV_PIPELINE_DEPTH) {
            self.pipeline_depth = n;
        }
        if let Some(v) = get(ENV_BATCH_LINGER_MS) {
            match v.trim().parse::<u64>() {
                Ok(ms) => self.batch_linger = Duration::from_millis(ms),
                Err(_) => {
                    tracing::warn!(variable = ENV_BATCH_LINGER_MS, value = %v, "ignoring: expected milliseconds");
                }
            }
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
    #[error("cannot start the consumer's poll thread: {0}")]
    Thread(std::io::Error),
}

/// Which partitions this member owns, under which assignment generation,
/// and which of them the handler is working on. Shared by the poll thread
/// (rebalance callbacks, tagging messages) and the apply task.
#[derive(Default)]
struct Ownership {
    /// topic -> partition -> generation of its current assignment.
    owned: HashMap<String, HashMap<i32, u64>>,
    next_generation: u64,
    /// Partitions of the batch the handler is applying (until its offsets
    /// are stored or it is abandoned).
    in_flight: HashSet<(String, i32)>,
}

impl Ownership {
    fn generation(&self, topic: &str, partition: i32) -> Option<u64> {
        self.owned.get(topic)?.get(&partition).copied()
    }

    fn owns(&self, topic: &str, partition: i32, generation: u64) -> bool {
        self.generation(topic, partition) == Some(generation)
    }
}

struct LoopContext {
    group_id: String,
    ownership: Mutex<Ownership>,
    /// Signalled when `in_flight` shrinks.
    idle: Condvar,
    /// Wakes a handler retry back-off when partitions are revoked.
    revoked: Notify,
    /// Bumped on every assignment change, so the poll thread knows when
    /// to refresh its copy of the generations.
    changes: AtomicU64,
}

use crate::limits::REVOKE_WAIT;

impl LoopContext {
    fn lock(&self) -> MutexGuard<'_, Ownership> {
        // Nothing runs user code while holding the lock, so a poisoned lock
        // still holds consistent data.
        self.ownership
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn assign(&self, tpl: &TopicPartitionList) {
        let mut o = self.lock();
        for e in tpl.elements() {
            o.next_generation += 1;
            let g = o.next_generation;
            o.owned
                .entry(e.topic().to_owned())
                .or_default()
                .insert(e.partition(), g);
        }
        self.changes.fetch_add(1, Ordering::SeqCst);
    }

    /// Stops new work on `tpl`'s partitions, waits (at most
    /// [`REVOKE_WAIT`]) for the handler call on them to finish and store
    /// its offsets, then commits every stored offset synchronously, so the
    /// next owner starts right after the last durable batch.
    fn revoke(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let revoked: HashSet<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        let mut o = self.lock();
        for (topic, partition) in &revoked {
            if let Some(m) = o.owned.get_mut(topic) {
                m.remove(partition);
            }
        }
        self.changes.fetch_add(1, Ordering::SeqCst);
        self.revoked.notify_waiters();
        let deadline = std::time::Instant::now() + REVOKE_WAIT;
        while o.in_flight.iter().any(|p| revoked.contains(p)) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                tracing::warn!(group = %self.group_id, "a batch of revoked partitions is still being handled; letting them go (its events will be delivered again)");
                break;
            }
            o = self
                .idle
                .wait_timeout(o, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        drop(o);
        commit_stored(consumer, &self.group_id, "revocation");
    }
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
                    runtime::metrics::CONSUMER_LAG,
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
    // Runs in the poll thread, inside `poll`, before librdkafka applies the
    // change.
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                Rebalanced {
                    group: &self.group_id,
                    kind: RebalanceKind::Revoked,
                    detail: &describe(tpl),
                }
                .emit();
                self.revoke(consumer, tpl);
            }
            Rebalance::Assign(tpl) => {
                Rebalanced {
                    group: &self.group_id,
                    kind: RebalanceKind::Assigned,
                    detail: &describe(tpl),
                }
                .emit();
                self.assign(tpl);
            }
            Rebalance::Error(e) => Rebalanced {
                group: &self.group_id,
                kind: RebalanceKind::Error,
                detail: &e.to_string(),
            }
            .emit(),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => {
                tracing::debug!(group = %self.group_id, offsets = %describe(offsets), "committed")
            }
            // Nothing stored since the last commit.
            Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::NoOffset) => {}
            Err(e) => {
                tracing::warn!(group = %self.group_id, error = %e, "commit failed; uncommitted events will be delivered again")
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

/// Commits the stored offsets (those of durable batches) and waits for the
/// broker. For revocation and shutdown only; batches commit asynchronously.
fn commit_stored(consumer: &BaseConsumer<LoopContext>, group: &str, why: &str) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => tracing::debug!(group, why, "committed stored offsets"),
        Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::NoOffset) => {}
        Err(e) => {
            tracing::warn!(group, why, error = %e, "commit failed; uncommitted events will be delivered again")
        }
    }
}

type LoopConsumer = BaseConsumer<LoopContext>;

fn create_consumer(
    cfg: &KafkaConfig,
    settings: &ConsumerSettings,
) -> Result<LoopConsumer, ConsumerError> {
    let mut c = cfg.client_config(&format!("paystream-{}", settings.group_id));
    c.set("group.id", &settings.group_id);
    // We commit ourselves, and only after the batch's effects are durable.
    c.set("enable.auto.commit", "false");
    // librdkafka must not mark offsets as processed on its own either: the
    // loop stores a batch's offsets after its effects and dead letters.
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
        ownership: Mutex::new(Ownership::default()),
        idle: Condvar::new(),
        revoked: Notify::new(),
        changes: AtomicU64::new(0),
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

/// A dead letter and the assignment generation of its partition.
struct Dead {
    generation: u64,
    letter: DeadLetter,
}

/// A polled and decoded batch on its way to the handler.
struct Prepared {
    decoded: Vec<Delivered>,
    dead: Vec<Dead>,
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

/// The poll thread's copy of the assignment generations, refreshed when
/// a rebalance changed them (rebalances run inside this thread's `poll`).
#[derive(Default)]
struct Generations {
    seen: Option<u64>,
    copy: HashMap<String, HashMap<i32, u64>>,
}

impl Generations {
    /// The generation of the partition's current assignment; 0 (never
    /// owned) if it is not assigned, so such a message is dropped.
    fn of(&mut self, ctx: &LoopContext, topic: &str, partition: i32) -> u64 {
        let now = ctx.changes.load(Ordering::SeqCst);
        if self.seen != Some(now) {
            self.copy = ctx.lock().owned.clone();
            self.seen = Some(now);
        }
        self.copy
            .get(topic)
            .and_then(|m| m.get(&partition))
            .copied()
            .unwrap_or(0)
    }
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

/// The partitions of the batch the handler works on; released (and a
/// waiting revocation woken) when dropped, whichever way the batch ends.
struct InFlight<'a> {
    ctx: &'a LoopContext,
    partitions: HashSet<(String, i32)>,
}

impl<'a> InFlight<'a> {
    /// Keeps only messages of partitions still owned under the generation
    /// they were polled in, and marks those partitions in flight, in one
    /// step under the lock: a revocation either sees them in flight (and
    /// waits) or happened before (and they are dropped here).
    fn claim(ctx: &'a LoopContext, batch: &mut Prepared) -> InFlight<'a> {
        let mut flight = InFlight {
            ctx,
            partitions: HashSet::new(),
        };
        flight.keep_owned(batch);
        flight
    }

    /// Drops messages of partitions revoked since they were polled, and
    /// releases those partitions.
    fn keep_owned(&mut self, batch: &mut Prepared) {
        let mut o = self.ctx.lock();
        let before = batch.decoded.len() + batch.dead.len();
        batch
            .decoded
            .retain(|d| o.owns(&d.meta.topic, d.meta.partition, d.generation));
        batch.dead.retain(|d| {
            o.owns(
                &d.letter.origin.topic,
                d.letter.origin.partition,
                d.generation,
            )
        });
        let kept: HashSet<(&str, i32)> = batch
            .decoded
            .iter()
            .map(|d| &d.meta)
            .chain(batch.dead.iter().map(|d| &d.letter.origin))
            .map(|m| (m.topic.as_str(), m.partition))
            .collect();
        let kept: HashSet<(String, i32)> =
            kept.into_iter().map(|(t, p)| (t.to_owned(), p)).collect();
        let released: Vec<_> = self.partitions.difference(&kept).cloned().collect();
        for p in &released {
            o.in_flight.remove(p);
        }
        for p in &kept {
            o.in_flight.insert(p.clone());
        }
        drop(o);
        self.partitions = kept;
        if !released.is_empty() {
            self.ctx.idle.notify_all();
        }
        let dropped = before - batch.decoded.len() - batch.dead.len();
        if dropped > 0 {
            tracing::info!(group = %self.ctx.group_id, dropped, "dropped messages of revoked partitions");
        }
    }

    /// Stores "next offset to read" for each partition still owned under
    /// the generation the batch was polled in, then asks for an
    /// asynchronous commit. Under the lock, so a revocation commits after
    /// this store.
    fn store(&self, consumer: &LoopConsumer, last: &BTreeMap<(&str, i32), (i64, u64)>) {
        let o = self.ctx.lock();
        let mut tpl = TopicPartitionList::new();
        for (&(topic, partition), &(offset, generation)) in last {
            if !o.owns(topic, partition, generation) {
                continue;
            }
            if let Err(e) = tpl.add_partition_offset(topic, partition, Offset::Offset(offset + 1)) {
                tracing::warn!(group = %self.ctx.group_id, error = %e, "cannot build offset list");
                return;
            }
        }
        if tpl.count() == 0 {
            return;
        }
        if let Err(e) = consumer.store_offsets(&tpl) {
            tracing::warn!(group = %self.ctx.group_id, error = %e, "cannot store offsets; the batch will be delivered again");
            return;
        }
        drop(o);
        // Queued to librdkafka's thread; the result comes back through
        // `commit_callback`. A commit lost in a crash only means the
        // batch is delivered again and deduplicated.
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Async) {
            tracing::warn!(group = %self.ctx.group_id, error = %e, "cannot request a commit");
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.partitions.is_empty() {
            return;
        }
        let mut o = self.ctx.lock();
        for p in self.partitions.drain() {
            o.in_flight.remove(&p);
        }
        drop(o);
        self.ctx.idle.notify_all();
    }
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
    let mut last: BTreeMap<(&str, i32), (i64, u64)> = BTreeMap::new();
    for (meta, generation) in decoded
        .iter()
        .map(|d| (&d.meta, d.generation))
        .chain(dead.iter().map(|d| (&d.letter.origin, d.generation)))
    {
        let e = last
            .entry((meta.topic.as_str(), meta.partition))
            .or_insert((meta.offset, generation));
        e.0 = e.0.max(meta.offset);
    }
    flight.store(consumer, &last);
    true
}

/// How a handler call (with its retries) ended.
enum Handled<T> {
    Done(T),
    /// Shut down while retrying.
    Shutdown,
    /// A partition of the batch was revoked while it kept failing.
    Revoked,
}

/// Whether every message of `batch` belongs to a partition still owned
/// under the generation it was polled in.
fn still_owned(ctx: &LoopContext, batch: &[Delivered]) -> bool {
    let o = ctx.lock();
    batch
        .iter()
        .all(|d| o.owns(&d.meta.topic, d.meta.partition, d.generation))
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
/// No attempt starts on a part whose partitions were revoked.
async fn handle_with_retry<H: BatchHandler>(
    handler: &mut H,
    decoded: &[Delivered],
    settings: &ConsumerSettings,
    shutdown: &CancellationToken,
    ctx: &LoopContext,
) -> Handled<Vec<Outcome>> {
    let mut outcomes = Vec::with_capacity(decoded.len());
    // (start, end) ranges still to handle; the last one is next (left
    // halves on top).
    let mut todo: Vec<(usize, usize)> = vec![(0, decoded.len())];
    while let Some((start, end)) = todo.pop() {
        if start == end {
            continue;
        }
        let part = &decoded[start..end];
        let result = match handle_until_not_transient(handler, part, settings, shutdown, ctx).await
        {
            Handled::Done(r) => r,
            Handled::Shutdown => return Handled::Shutdown,
            Handled::Revoked => return Handled::Revoked,
        };
        match result {
            Ok(o) => outcomes.extend(o),
            // Rejected: logged as such with the batch's other outcomes.
            Err(e) if part.len() == 1 => {
                outcomes.push(Outcome::Rejected {
                    kind: e.kind,
                    reason: e.message,
                });
            }
            // Logged by the failure itself (BatchFailed).
            Err(_) => {
                let mid = start + part.len() / 2;
                todo.push((mid, end));
                todo.push((start, mid));
            }
        }
    }
    Handled::Done(outcomes)
}

/// Retries `batch` while it fails transiently. `Done(Err)`: a
/// deterministic failure.
async fn handle_until_not_transient<H: BatchHandler>(
    handler: &mut H,
    batch: &[Delivered],
    settings: &ConsumerSettings,
    shutdown: &CancellationToken,
    ctx: &LoopContext,
) -> Handled<Result<Vec<Outcome>, HandlerError>> {
    let mut backoff = settings.retry_backoff;
    let mut attempt = 1u32;
    loop {
        // Re-checked before every attempt: the handler never starts on a
        // partition after its revocation was seen.
        if !still_owned(ctx, batch) {
            return Handled::Revoked;
        }
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
                return Handled::Done(Ok(outcomes));
            }
            Err(e) => {
                let deterministic = e.is_deterministic();
                BatchFailed {
                    group: &settings.group_id,
                    size: batch.len(),
                    attempt,
                    error: &e,
                    retry_in: (!deterministic).then_some(backoff),
                }
                .emit();
                if deterministic {
                    return Handled::Done(Err(e));
                }
                // Registered before the ownership check so a revocation
                // in between still wakes the back-off.
                let revoked = ctx.revoked.notified();
                tokio::pin!(revoked);
                revoked.as_mut().enable();
                if !still_owned(ctx, batch) {
                    return Handled::Revoked;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Handled::Shutdown,
                    _ = tokio::time::sleep(backoff) => {}
                    _ = revoked => {}
                }
                backoff = (backoff * 2).min(settings.retry_backoff_max);
                attempt = attempt.saturating_add(1);
            }
        }
    }
}

/// Sends every dead letter, all at once, and waits for every
/// acknowledgement. `false`: shut down before all were stored.
async fn send_dead_letters(
    producer: &EventProducer,
    dead: &[Dead],
    settings: &ConsumerSettings,
    shutdown: &CancellationToken,
) -> bool {
    futures::future::join_all(
        dead.iter()
            .map(|d| send_dead_letter(producer, &d.letter, settings, shutdown)),
    )
    .await
    .into_iter()
    .all(|stored| stored)
}

/// Sends one dead letter and waits for its acknowledgement. Retryable
/// produce errors (broker unavailable, queue full, timeouts) are retried
/// with back-off; a dead letter the producer or broker refuses for good
/// (too large, invalid record) is sent as a stub instead, and a stub that
/// is refused as a minimal stub (only `dlq.*` headers; bounded, so a
/// failure to produce it is the cluster's, not the message's, and is
/// retried). So one message can never block its partition here. `false`:
/// shut down before it was stored.
async fn send_dead_letter(
    producer: &EventProducer,
    d: &DeadLetter,
    settings: &ConsumerSettings,
    shutdown: &CancellationToken,
) -> bool {
    let mut backoff = settings.retry_backoff;
    let mut form = dlq::Form::Whole;
    let mut cause = String::new();
    loop {
        match d.send_as(producer, form, &cause).await {
            Ok(at) => {
                DeadLetterStored {
                    group: &d.consumer_group,
                    kind: &d.error_kind,
                    original_topic: &d.origin.topic,
                    original_partition: d.origin.partition,
                    original_offset: d.origin.offset,
                    dlq_partition: at.partition,
                    dlq_offset: at.offset,
                    form: form.as_str(),
                }
                .emit();
                return true;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_take_their_defaults_from_the_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let mut s = ConsumerSettings::new("g", vec![]);
        s.apply_env(env(&[
            (ENV_BATCH_MAX, "2000"),
            (ENV_BATCH_LINGER_MS, " 5 "),
            (ENV_PIPELINE_DEPTH, "2"),
        ]));
        assert_eq!(s.batch_max, 2000);
        assert_eq!(s.batch_linger, Duration::from_millis(5));
        assert_eq!(s.pipeline_depth, 2);

        // Nonsense is ignored, never a loop that cannot move.
        let mut t = s.clone();
        t.apply_env(env(&[
            (ENV_BATCH_MAX, "0"),
            (ENV_BATCH_LINGER_MS, "soon"),
            (ENV_PIPELINE_DEPTH, "-1"),
        ]));
        assert_eq!(t.batch_max, 2000);
        assert_eq!(t.batch_linger, Duration::from_millis(5));
        assert_eq!(t.pipeline_depth, 2);
    }

    fn tpl(parts: &[(&str, i32)]) -> TopicPartitionList {
        let mut t = TopicPartitionList::new();
        for (topic, p) in parts {
            t.add_partition(topic, *p);
        }
        t
    }

    fn ctx() -> LoopContext {
        LoopContext {
            group_id: "g".into(),
            ownership: Mutex::new(Ownership::default()),
            idle: Condvar::new(),
            revoked: Notify::new(),
            changes: AtomicU64::new(0),
        }
    }

    fn delivered(topic: &str, partition: i32, offset: i64, generation: u64) -> Delivered {
        let envelope =
            events::samples::one_of_each("c", "k", events::Timestamp::from_micros(0)).remove(0);
        Delivered {
            envelope,
            meta: MessageMeta {
                topic: topic.into(),
                partition,
                offset,
                timestamp_ms: None,
            },
            key: None,
            payload: Vec::new(),
            headers: Vec::new(),
            generation,
        }
    }

    #[test]
    fn a_batch_of_an_earlier_assignment_is_dropped_and_the_rest_claimed() {
        let c = ctx();
        c.assign(&tpl(&[("t", 0), ("t", 1)]));
        let g0 = c.lock().generation("t", 0).unwrap();
        let g1 = c.lock().generation("t", 1).unwrap();
        // Partition 0 is revoked and assigned again while its messages of
        // the first assignment wait in the channel.
        c.lock().owned.get_mut("t").unwrap().remove(&0);
        c.assign(&tpl(&[("t", 0)]));
        assert_ne!(c.lock().generation("t", 0), Some(g0));
        let mut batch = Prepared {
            decoded: vec![delivered("t", 0, 7, g0), delivered("t", 1, 3, g1)],
            dead: vec![],
        };
        let flight = InFlight::claim(&c, &mut batch);
        assert_eq!(batch.decoded.len(), 1);
        assert_eq!(batch.decoded[0].meta.partition, 1);
        assert!(c.lock().in_flight.contains(&("t".to_owned(), 1)));
        assert!(!c.lock().in_flight.contains(&("t".to_owned(), 0)));
        drop(flight);
        assert!(
            c.lock().in_flight.is_empty(),
            "released when the batch ends"
        );
    }
}
