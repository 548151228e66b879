//! Reading a bounded range of topics without a consumer group: replays,
//! rebuilds, point-in-time projections and dead-letter tools.
//!
//! A [`TopicReader`] assigns every partition of the given topics itself (no
//! group membership, nothing committed), starts each partition where
//! [`Start`] says and stops it at the end offset fixed when it was opened
//! (the high watermark then, unless told otherwise), so a read of a live
//! topic terminates and is repeatable. Messages arrive in offset order per
//! partition, partitions interleaved.

use crate::config::KafkaConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use std::collections::BTreeMap;
use std::time::Duration;

/// How long a metadata, watermark or offset lookup may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(15);
/// A fetch that brings nothing for this long, while partitions are still
/// short of their end, is an error (a stuck broker, or a truncated topic).
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How often an idle read checks whether partitions reached their end.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// How opening or reading a [`TopicReader`] (or a watermark lookup) fails.
/// Where Kafka gave a cause, it is the variant's `source`, so `{:#}` shows
/// the whole chain.
#[derive(Debug, thiserror::Error)]
pub enum ReaderError {
    #[error("cannot create a Kafka consumer")]
    CreateConsumer(#[source] KafkaError),
    #[error("cannot read the metadata of topic {topic}")]
    Metadata {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("topic {topic} not in the broker's metadata")]
    NotInMetadata { topic: String },
    /// The broker's metadata carries an error for the topic.
    #[error("topic {topic}: {code:?}")]
    Topic { topic: String, code: RDKafkaRespErr },
    #[error("topic {topic} does not exist (no partitions)")]
    NoPartitions { topic: String },
    #[error("cannot read the watermarks of {topic}/{partition}")]
    Watermarks {
        topic: String,
        partition: i32,
        #[source]
        source: KafkaError,
    },
    #[error("building the partition assignment")]
    BuildAssignment(#[source] KafkaError),
    #[error("cannot assign the partitions to read")]
    Assign(#[source] KafkaError),
    #[error("reading from Kafka")]
    Recv(#[source] KafkaError),
    /// Partitions short of their end but nothing arrived for
    /// `stalled_secs`: a stuck broker, or a truncated topic.
    #[error(
        "no message for {stalled_secs}s while {topic}/{partition} is at offset {next} of {end} \
         (records compacted or deleted?)"
    )]
    Stalled {
        stalled_secs: u64,
        topic: String,
        partition: i32,
        next: i64,
        end: i64,
    },
    #[error("reading the consumer's positions")]
    Positions(#[source] KafkaError),
    #[error("building the offsets-for-times request")]
    BuildOffsetsForTimes(#[source] KafkaError),
    #[error("offsets-for-times lookup on {topic} failed")]
    OffsetsForTimes {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("offsets-for-times gave no answer for {topic}/{partition}")]
    NoOffsetForTime { topic: String, partition: i32 },
    /// The lookup answered with an error for one partition.
    #[error("offsets-for-times lookup on {topic}/{partition} failed: {error}")]
    OffsetForTime {
        topic: String,
        partition: i32,
        error: KafkaError,
    },
    #[error("offsets-for-times on {topic}/{partition} answered {offset:?}")]
    UnexpectedOffset {
        topic: String,
        partition: i32,
        offset: Offset,
    },
}

/// One message as stored: bytes, key, headers and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Record timestamp (ms since the epoch), if the broker gave one.
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<&str> {
        crate::dlq::header_str(&self.headers, name)
    }

    /// The same fields as the consumer loop hands to handlers.
    pub fn meta(&self) -> crate::MessageMeta {
        crate::MessageMeta {
            topic: self.topic.clone(),
            partition: self.partition,
            offset: self.offset,
            timestamp_ms: self.timestamp_ms,
        }
    }
}

/// Where each partition starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The log start offset (oldest message still kept).
    Beginning,
    /// This offset in every partition (clamped to what exists).
    Offset(i64),
    /// The first message whose timestamp is at or after this many ms since
    /// the epoch, by the broker's offsets-for-times lookup. The lookup may
    /// be coarse; filter by [`Record::timestamp_ms`] for exact bounds.
    Timestamp(i64),
}

/// Where each partition stops (exclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The high watermark when the reader was opened.
    Latest,
    /// This offset in every partition (clamped to the high watermark).
    Offset(i64),
}

/// The range a reader will read in one partition: `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionRange {
    pub topic: String,
    pub partition: i32,
    pub start: i64,
    pub end: i64,
}

impl PartitionRange {
    pub fn len(&self) -> u64 {
        u64::try_from(self.end.saturating_sub(self.start)).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Low and high watermark of every partition of `topic`.
pub fn watermarks(cfg: &KafkaConfig, topic: &str) -> Result<Vec<(i32, i64, i64)>, ReaderError> {
    let consumer = plain_consumer(cfg, "paystream-reader")?;
    partition_watermarks(&consumer, topic)
}

fn plain_consumer(cfg: &KafkaConfig, client_id: &str) -> Result<StreamConsumer, ReaderError> {
    let mut c = cfg.client_config(client_id);
    // Never joins a group: partitions are assigned by hand. librdkafka
    // still wants a group id to be set.
    c.set(
        "group.id",
        format!("paystream-reader-{}", uuid::Uuid::now_v7()),
    )
    .set("enable.auto.commit", "false")
    .set("enable.auto.offset.store", "false")
    .set("enable.partition.eof", "false")
    .set("auto.offset.reset", "earliest");
    cfg.apply_overrides(&mut c);
    c.create().map_err(ReaderError::CreateConsumer)
}

/// Low and high watermark of every partition of `topic` (sorted by
/// partition), read through `consumer`.
pub fn partition_watermarks<C: Consumer>(
    consumer: &C,
    topic: &str,
) -> Result<Vec<(i32, i64, i64)>, ReaderError> {
    let md = consumer
        .fetch_metadata(Some(topic), LOOKUP_TIMEOUT)
        .map_err(|source| ReaderError::Metadata {
            topic: topic.to_owned(),
            source,
        })?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(|| ReaderError::NotInMetadata {
            topic: topic.to_owned(),
        })?;
    if let Some(code) = t.error() {
        return Err(ReaderError::Topic {
            topic: topic.to_owned(),
            code,
        });
    }
    if t.partitions().is_empty() {
        return Err(ReaderError::NoPartitions {
            topic: topic.to_owned(),
        });
    }
    let mut out = Vec::new();
    for p in t.partitions() {
        let (lo, hi) = consumer
            .fetch_watermarks(topic, p.id(), LOOKUP_TIMEOUT)
            .map_err(|source| ReaderError::Watermarks {
                topic: topic.to_owned(),
                partition: p.id(),
                source,
            })?;
        out.push((p.id(), lo, hi));
    }
    out.sort_unstable();
    Ok(out)
}

/// Reads `[start, end)` of every partition of some topics.
pub struct TopicReader {
    consumer: StreamConsumer,
    ranges: Vec<PartitionRange>,
    /// Next offset still to deliver, per (topic, partition), for partitions
    /// not yet at their end.
    open: BTreeMap<(String, i32), (i64, i64)>,
}

impl TopicReader {
    /// Plans and assigns the ranges. `starts`, when given, overrides
    /// `start` per `(topic, partition)` (e.g. a group's committed offsets).
    pub async fn open(
        cfg: &KafkaConfig,
        topics: &[String],
        start: Start,
        end: End,
        starts: Option<&BTreeMap<(String, i32), i64>>,
    ) -> Result<TopicReader, ReaderError> {
        let consumer = plain_consumer(cfg, "paystream-reader")?;
        let mut ranges = Vec::new();
        for topic in topics {
            let marks = partition_watermarks(&consumer, topic)?;
            let by_time = match start {
                Start::Timestamp(ms) => Some(offsets_for_time(&consumer, topic, &marks, ms)?),
                _ => None,
            };
            for (p, lo, hi) in marks {
                let end = match end {
                    End::Latest => hi,
                    End::Offset(o) => o.clamp(lo, hi),
                };
                let explicit = starts.and_then(|s| s.get(&(topic.clone(), p)).copied());
                let begin = match (explicit, start) {
                    (Some(o), _) => o,
                    (None, Start::Beginning) => lo,
                    (None, Start::Offset(o)) => o,
                    (None, Start::Timestamp(_)) => by_time
                        .as_ref()
                        .and_then(|m| m.get(&p).copied())
                        .unwrap_or(hi),
                };
                let begin = begin.clamp(lo, end.max(lo));
                ranges.push(PartitionRange {
                    topic: topic.clone(),
                    partition: p,
                    start: begin,
                    end,
                });
            }
        }
        let mut tpl = TopicPartitionList::new();
        let mut open = BTreeMap::new();
        for r in ranges.iter().filter(|r| !r.is_empty()) {
            tpl.add_partition_offset(&r.topic, r.partition, Offset::Offset(r.start))
                .map_err(ReaderError::BuildAssignment)?;
            open.insert((r.topic.clone(), r.partition), (r.start, r.end));
        }
        if tpl.count() > 0 {
            consumer.assign(&tpl).map_err(ReaderError::Assign)?;
        }
        Ok(TopicReader {
            consumer,
            ranges,
            open,
        })
    }

    /// The planned ranges, one per partition.
    pub fn ranges(&self) -> &[PartitionRange] {
        &self.ranges
    }

    /// Messages in the planned ranges (fewer arrive if some were compacted
    /// away or are transaction markers).
    pub fn total(&self) -> u64 {
        self.ranges.iter().map(PartitionRange::len).sum()
    }

    /// Up to `max` records; `None` once every partition reached its end.
    pub async fn next_batch(&mut self, max: usize) -> Result<Option<Vec<Record>>, ReaderError> {
        if self.open.is_empty() {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(max.min(4096));
        let mut idle = Duration::ZERO;
        while out.len() < max && !self.open.is_empty() {
            let wait = if out.is_empty() {
                IDLE_CHECK
            } else {
                Duration::from_millis(0)
            };
            let m = match tokio::time::timeout(wait, self.consumer.recv()).await {
                Ok(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {
                    self.finish_reached()?;
                    continue;
                }
                Ok(m) => m.map_err(ReaderError::Recv)?,
                Err(_) if out.is_empty() => {
                    // Nothing for a while: finish partitions whose position
                    // passed their end without a message at end - 1.
                    self.finish_reached()?;
                    idle += IDLE_CHECK;
                    if idle < STALL_TIMEOUT || self.open.is_empty() {
                        continue;
                    }
                    let (k, (next, end)) = self.open.iter().next().expect("open is not empty");
                    return Err(ReaderError::Stalled {
                        stalled_secs: STALL_TIMEOUT.as_secs(),
                        topic: k.0.clone(),
                        partition: k.1,
                        next: *next,
                        end: *end,
                    });
                }
                Err(_) => break,
            };
            idle = Duration::ZERO;
            let key = (m.topic().to_owned(), m.partition());
            let Some(&(_, end)) = self.open.get(&key) else {
                continue; // a partition already finished
            };
            if m.offset() >= end {
                self.finish(&key)?;
                continue;
            }
            let rec = Record {
                topic: key.0.clone(),
                partition: key.1,
                offset: m.offset(),
                timestamp_ms: m.timestamp().to_millis(),
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                headers: m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                            .collect()
                    })
                    .unwrap_or_default(),
            };
            if m.offset() + 1 >= end {
                self.finish(&key)?;
            } else if let Some(slot) = self.open.get_mut(&key) {
                slot.0 = m.offset() + 1;
            }
            out.push(rec);
        }
        Ok(Some(out))
    }

    /// Finishes every open partition whose fetch position reached its end.
    fn finish_reached(&mut self) -> Result<(), ReaderError> {
        let positions = self.consumer.position().map_err(ReaderError::Positions)?;
        let done: Vec<(String, i32)> = self
            .open
            .iter()
            .filter(|((t, p), (_, end))| {
                matches!(
                    positions.find_partition(t, *p).map(|e| e.offset()),
                    Some(Offset::Offset(o)) if o >= *end
                )
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in done {
            self.finish(&k)?;
        }
        Ok(())
    }

    fn finish(&mut self, key: &(String, i32)) -> Result<(), ReaderError> {
        self.open.remove(key);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&key.0, key.1);
        // Stop fetching it; a failure only costs a few discarded messages.
        let _ = self.consumer.pause(&tpl);
        Ok(())
    }
}

/// Per partition, the first offset whose timestamp is ≥ `ms` (the high
/// watermark where there is none).
fn offsets_for_time(
    consumer: &StreamConsumer,
    topic: &str,
    marks: &[(i32, i64, i64)],
    ms: i64,
) -> Result<BTreeMap<i32, i64>, ReaderError> {
    let mut tpl = TopicPartitionList::new();
    for (p, _, _) in marks {
        tpl.add_partition_offset(topic, *p, Offset::Offset(ms))
            .map_err(ReaderError::BuildOffsetsForTimes)?;
    }
    let found = consumer
        .offsets_for_times(tpl, LOOKUP_TIMEOUT)
        .map_err(|source| ReaderError::OffsetsForTimes {
            topic: topic.to_owned(),
            source,
        })?;
    let mut out = BTreeMap::new();
    for (p, _, hi) in marks {
        let e = found
            .find_partition(topic, *p)
            .ok_or_else(|| ReaderError::NoOffsetForTime {
                topic: topic.to_owned(),
                partition: *p,
            })?;
        if let Err(error) = e.error() {
            return Err(ReaderError::OffsetForTime {
                topic: topic.to_owned(),
                partition: *p,
                error,
            });
        }
        let o = match e.offset() {
            Offset::Offset(o) => o,
            // No message at or after the time: start at the end.
            Offset::End => *hi,
            offset => {
                return Err(ReaderError::UnexpectedOffset {
                    topic: topic.to_owned(),
                    partition: *p,
                    offset,
                });
            }
        };
        out.insert(*p, o);
    }
    Ok(out)
}

impl std::fmt::Debug for TopicReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicReader")
            .field("ranges", &self.ranges)
            .field("open", &self.open)
            .finish_non_exhaustive()
    }
}
