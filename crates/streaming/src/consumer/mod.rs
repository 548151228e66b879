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
//!      bounded stub, [`dlq::Form`](crate::dlq::Form)).
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
//!
//! Where each part lives:
//!
//! - this module: what a handler sees and returns ([`BatchHandler`],
//!   [`Delivered`], [`Outcome`], [`HandlerError`](struct@HandlerError) and its
//!   [`FailureClass`]) and what the loop returns ([`LoopStats`],
//!   [`ConsumerError`]);
//! - `config`: [`ConsumerSettings`], their `PAYSTREAM_CONSUMER_*`
//!   defaults, and the librdkafka options of the loop's consumer;
//! - `driver`: [`run_consumer`], the poll and decode stage and the apply
//!   stage (steps 1 to 4);
//! - `retry`: the handler calls of step 2, with retries and bisection;
//! - `dead_letters`: step 3;
//! - `offsets`: which partitions are owned and in flight, and what may be
//!   stored and committed (step 4, commits at revocation and shutdown);
//! - `rebalance`: the librdkafka context, where revocation happens.

mod config;
mod dead_letters;
mod driver;
mod offsets;
mod rebalance;
mod retry;

pub use config::{ConsumerSettings, ENV_BATCH_LINGER_MS, ENV_BATCH_MAX, ENV_PIPELINE_DEPTH};
pub use driver::run_consumer;

use events::Envelope;
use rdkafka::error::KafkaError;
use std::future::Future;

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

/// Statistics of a finished loop, for tests and logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoopStats {
    pub batches: u64,
    pub applied: u64,
    pub duplicates: u64,
    pub ignored: u64,
    pub dead_lettered: u64,
}
