//! The loop consumer's librdkafka context, called back on the poll thread
//! from inside `poll`: rebalances (an assignment gives each partition a
//! new generation; a revocation stops new work on its partitions, waits
//! for the handler call on them and commits what it stored, before the
//! partitions move), commit results, and the consumer-lag statistics.

use super::offsets::{Ownership, commit_stored};
use crate::limits::REVOKE_WAIT;
use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaResult, RDKafkaErrorCode};
use rdkafka::topic_partition_list::TopicPartitionList;
use runtime::metrics::events::{InternalEvent as _, RebalanceKind, Rebalanced};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use tokio::sync::Notify;

/// The loop's consumer.
pub(super) type LoopConsumer = BaseConsumer<LoopContext>;

/// What the poll thread's rebalance callbacks and the apply task share:
/// the group, the partitions owned (and in flight), and the signals
/// between the two.
pub(super) struct LoopContext {
    pub(super) group_id: String,
    ownership: Mutex<Ownership>,
    /// Signalled when `in_flight` shrinks.
    pub(super) idle: Condvar,
    /// Wakes a handler retry back-off when partitions are revoked.
    pub(super) revoked: Notify,
    /// Bumped on every assignment change, so the poll thread knows when
    /// to refresh its copy of the generations.
    pub(super) changes: AtomicU64,
}

impl LoopContext {
    /// A context that owns no partition yet.
    pub(super) fn new(group_id: String) -> LoopContext {
        LoopContext {
            group_id,
            ownership: Mutex::new(Ownership::default()),
            idle: Condvar::new(),
            revoked: Notify::new(),
            changes: AtomicU64::new(0),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Ownership> {
        // Nothing runs user code while holding the lock, so a poisoned lock
        // still holds consistent data.
        self.ownership
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn assign(&self, tpl: &TopicPartitionList) {
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
