//! Offset tracking: which partitions this member owns, under which
//! assignment generation, and which of them the handler is working on;
//! and what may be stored and committed. A batch's offsets (per partition,
//! the one after its last message) are stored only once every message of
//! the batch is durable (applied, or dead-lettered and acknowledged), and
//! only for partitions still owned under the generation the batch was
//! polled in; then committed asynchronously. Revocation and shutdown
//! commit the stored offsets synchronously ([`commit_stored`]).

use super::Delivered;
use super::dead_letters::Dead;
use super::driver::Prepared;
use super::rebalance::{LoopConsumer, LoopContext};
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;

/// Which partitions this member owns, under which assignment generation,
/// and which of them the handler is working on. Shared by the poll thread
/// (rebalance callbacks, tagging messages) and the apply task.
#[derive(Default)]
pub(super) struct Ownership {
    /// topic -> partition -> generation of its current assignment.
    pub(super) owned: HashMap<String, HashMap<i32, u64>>,
    pub(super) next_generation: u64,
    /// Partitions of the batch the handler is applying (until its offsets
    /// are stored or it is abandoned).
    pub(super) in_flight: HashSet<(String, i32)>,
}

impl Ownership {
    pub(super) fn generation(&self, topic: &str, partition: i32) -> Option<u64> {
        self.owned.get(topic)?.get(&partition).copied()
    }

    pub(super) fn owns(&self, topic: &str, partition: i32, generation: u64) -> bool {
        self.generation(topic, partition) == Some(generation)
    }
}

/// The poll thread's copy of the assignment generations, refreshed when
/// a rebalance changed them (rebalances run inside this thread's `poll`).
#[derive(Default)]
pub(super) struct Generations {
    seen: Option<u64>,
    copy: HashMap<String, HashMap<i32, u64>>,
}

impl Generations {
    /// The generation of the partition's current assignment; 0 (never
    /// owned) if it is not assigned, so such a message is dropped.
    pub(super) fn of(&mut self, ctx: &LoopContext, topic: &str, partition: i32) -> u64 {
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

/// Commits the stored offsets (those of durable batches) and waits for the
/// broker. For revocation and shutdown only; batches commit asynchronously.
pub(super) fn commit_stored(consumer: &LoopConsumer, group: &str, why: &str) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => tracing::debug!(group, why, "committed stored offsets"),
        Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::NoOffset) => {}
        Err(e) => {
            tracing::warn!(group, why, error = %e, "commit failed; uncommitted events will be delivered again")
        }
    }
}

/// The partitions of the batch the handler works on; released (and a
/// waiting revocation woken) when dropped, whichever way the batch ends.
pub(super) struct InFlight<'a> {
    ctx: &'a LoopContext,
    partitions: HashSet<(String, i32)>,
}

impl<'a> InFlight<'a> {
    /// Keeps only messages of partitions still owned under the generation
    /// they were polled in, and marks those partitions in flight, in one
    /// step under the lock: a revocation either sees them in flight (and
    /// waits) or happened before (and they are dropped here).
    pub(super) fn claim(ctx: &'a LoopContext, batch: &mut Prepared) -> InFlight<'a> {
        let mut flight = InFlight {
            ctx,
            partitions: HashSet::new(),
        };
        flight.keep_owned(batch);
        flight
    }

    /// Drops messages of partitions revoked since they were polled, and
    /// releases those partitions.
    pub(super) fn keep_owned(&mut self, batch: &mut Prepared) {
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
    pub(super) fn store(&self, consumer: &LoopConsumer, last: &BTreeMap<(&str, i32), (i64, u64)>) {
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

/// The last offset of each partition in a batch (its decoded messages and
/// its dead letters), with the generation the partition was polled in:
/// what [`InFlight::store`] stores, plus one, once every message of the
/// batch is durable.
pub(super) fn last_offsets<'a>(
    decoded: &'a [Delivered],
    dead: &'a [Dead],
) -> BTreeMap<(&'a str, i32), (i64, u64)> {
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
    last
}

#[cfg(test)]
mod tests {
    use super::super::MessageMeta;
    use super::*;

    fn tpl(parts: &[(&str, i32)]) -> TopicPartitionList {
        let mut t = TopicPartitionList::new();
        for (topic, p) in parts {
            t.add_partition(topic, *p);
        }
        t
    }

    fn ctx() -> LoopContext {
        LoopContext::new("g".into())
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
