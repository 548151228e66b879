//! Consumer groups seen from outside: state, committed offsets, and
//! moving the committed offsets (`paystream offsets ...`, also used by
//! projection reset and rebuild).
//!
//! Offsets are committed with a plain consumer that carries the group id
//! but never joins the group (an OffsetCommit with no generation, as
//! `kafka-consumer-groups --reset-offsets` does). Kafka accepts that only
//! while the group has no active members; we also check first and refuse.

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;
use streaming::KafkaConfig;
use streaming::reader::ReaderError;

/// How long a broker lookup may take.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(15);

/// How a look-up or move of a group's offsets fails. Where Kafka gave a
/// cause, it is the variant's `source`.
#[derive(Debug, thiserror::Error)]
pub enum GroupsError {
    #[error(
        "consumer group {group} is active (state {state}, members {members}): stop its consumers first \
         (e.g. scale the deployment to 0) before {what}"
    )]
    Active {
        group: String,
        state: String,
        members: String,
        what: String,
    },
    #[error("cannot create a Kafka client")]
    CreateClient(#[source] KafkaError),
    #[error("a Kafka lookup panicked")]
    Panicked(#[source] tokio::task::JoinError),
    #[error("cannot describe consumer group {group}")]
    Describe {
        group: String,
        #[source]
        source: KafkaError,
    },
    // (A ReaderError is large: boxed, so every Result here stays small.)
    #[error(transparent)]
    Watermarks(Box<ReaderError>),
    #[error("cannot fetch the group's committed offsets")]
    Committed(#[source] KafkaError),
    #[error("cannot list the cluster's topics")]
    ListTopics(#[source] KafkaError),
    #[error("building the offsets-for-times request")]
    BuildOffsetsForTimes(#[source] KafkaError),
    #[error("offsets-for-times lookup failed")]
    OffsetsForTimes(#[source] KafkaError),
    #[error("offsets-for-times returned nothing for {topic}/{partition}")]
    NoOffsetForTime { topic: String, partition: i32 },
    #[error("offsets-for-times failed for {topic}/{partition}")]
    OffsetForTime {
        topic: String,
        partition: i32,
        #[source]
        source: KafkaError,
    },
    #[error(
        "offsets-for-times returned {offset:?} for {topic}/{partition}; expected an offset or the end"
    )]
    UnexpectedOffset {
        topic: String,
        partition: i32,
        offset: Offset,
    },
    #[error("building the offset commit")]
    BuildCommit(#[source] KafkaError),
    #[error("committing offsets for group {group} failed (is the group active?)")]
    Commit {
        group: String,
        #[source]
        source: KafkaError,
    },
    #[error("group {group}: {topic}/{partition} reads back {got:?} after committing {target}")]
    ReadBack {
        group: String,
        topic: String,
        partition: i32,
        got: Option<i64>,
        target: i64,
    },
}

impl From<ReaderError> for GroupsError {
    fn from(e: ReaderError) -> GroupsError {
        GroupsError::Watermarks(Box::new(e))
    }
}

/// A group as the broker describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupState {
    pub group: String,
    /// The broker's state string (`Empty`, `Stable`, `PreparingRebalance`,
    /// `CompletingRebalance`, `Dead`), or `Dead` when the broker does not
    /// know the group.
    pub state: String,
    /// Members, when known: the broker's member list, or 0 for an empty or
    /// dead group. `None` when the group is active but the broker returns
    /// no member details (Nisshi does not).
    pub members: Option<usize>,
    /// The assignment protocol (e.g. `range`, `cooperative-sticky`), if any.
    pub protocol: String,
}

impl GroupState {
    /// Whether the group has (or may have) live members. Anything but an
    /// empty or dead group counts as active, so an unknown state refuses.
    pub fn is_active(&self) -> bool {
        self.members.is_some_and(|m| m > 0) || !matches!(self.state.as_str(), "Empty" | "Dead")
    }

    /// Members for humans: a number or `unknown`.
    pub fn members_text(&self) -> String {
        self.members
            .map_or_else(|| "unknown".to_owned(), |m| m.to_string())
    }

    /// An error unless the group has no active members.
    pub fn ensure_inactive(&self, what: &str) -> Result<(), GroupsError> {
        if self.is_active() {
            return Err(GroupsError::Active {
                group: self.group.clone(),
                state: self.state.clone(),
                members: self.members_text(),
                what: what.to_owned(),
            });
        }
        Ok(())
    }
}

fn consumer(cfg: &KafkaConfig, group: &str) -> Result<BaseConsumer, GroupsError> {
    let mut c = cfg.client_config("paystream-ops");
    c.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    cfg.apply_overrides(&mut c);
    c.create().map_err(GroupsError::CreateClient)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, GroupsError> + Send + 'static,
) -> Result<T, GroupsError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(GroupsError::Panicked)?
}

/// Describes `group` (DescribeGroups through librdkafka's group list).
pub async fn describe(cfg: &KafkaConfig, group: &str) -> Result<GroupState, GroupsError> {
    let (cfg, group) = (cfg.clone(), group.to_owned());
    blocking(move || {
        let c = consumer(&cfg, &format!("paystream-ops-{}", uuid::Uuid::now_v7()))?;
        let list = c
            .fetch_group_list(Some(&group), LOOKUP_TIMEOUT)
            .map_err(|source| GroupsError::Describe {
                group: group.clone(),
                source,
            })?;
        let Some(g) = list.groups().iter().find(|g| g.name() == group) else {
            return Ok(GroupState {
                group,
                state: "Dead".into(),
                members: Some(0),
                protocol: String::new(),
            });
        };
        let state = g.state().to_owned();
        let n = g.members().len();
        let members = if n > 0 || matches!(state.as_str(), "Empty" | "Dead") {
            Some(n)
        } else {
            None
        };
        Ok(GroupState {
            group,
            state,
            members,
            protocol: g.protocol().to_owned(),
        })
    })
    .await
}

/// One partition's offsets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionOffsets {
    pub topic: String,
    pub partition: i32,
    /// Log start offset.
    pub low: i64,
    /// High watermark (offset of the next message).
    pub high: i64,
    /// The group's committed offset, if any.
    pub committed: Option<i64>,
}

impl PartitionOffsets {
    /// Messages the group has still to consume (from the log start when
    /// nothing is committed).
    pub fn lag(&self) -> i64 {
        let from = self.committed.unwrap_or(self.low).max(self.low);
        (self.high - from).max(0)
    }
}

fn committed_and_marks(
    c: &BaseConsumer,
    topics: &[String],
) -> Result<Vec<PartitionOffsets>, GroupsError> {
    let mut tpl = TopicPartitionList::new();
    let mut rows = Vec::new();
    for topic in topics {
        for (p, low, high) in streaming::reader::partition_watermarks(c, topic)? {
            tpl.add_partition(topic, p);
            rows.push(PartitionOffsets {
                topic: topic.clone(),
                partition: p,
                low,
                high,
                committed: None,
            });
        }
    }
    if rows.is_empty() {
        return Ok(rows);
    }
    let committed = c
        .committed_offsets(tpl, LOOKUP_TIMEOUT)
        .map_err(GroupsError::Committed)?;
    for r in &mut rows {
        if let Some(e) = committed.find_partition(&r.topic, r.partition)
            && let Offset::Offset(o) = e.offset()
        {
            r.committed = Some(o);
        }
    }
    Ok(rows)
}

/// Watermarks and the group's committed offset of every partition of
/// `topics`.
pub async fn offsets(
    cfg: &KafkaConfig,
    group: &str,
    topics: &[String],
) -> Result<Vec<PartitionOffsets>, GroupsError> {
    let (cfg, group, topics) = (cfg.clone(), group.to_owned(), topics.to_vec());
    blocking(move || committed_and_marks(&consumer(&cfg, &group)?, &topics)).await
}

/// The topics `group` has committed offsets for (every topic in the
/// cluster's metadata is asked, internal `__` topics excepted).
pub async fn committed_topics(cfg: &KafkaConfig, group: &str) -> Result<Vec<String>, GroupsError> {
    let (cfg, group) = (cfg.clone(), group.to_owned());
    blocking(move || {
        let c = consumer(&cfg, &group)?;
        let md = c
            .fetch_metadata(None, LOOKUP_TIMEOUT)
            .map_err(GroupsError::ListTopics)?;
        let mut tpl = TopicPartitionList::new();
        for t in md.topics() {
            if t.name().starts_with("__") || t.error().is_some() {
                continue;
            }
            for p in t.partitions() {
                tpl.add_partition(t.name(), p.id());
            }
        }
        if tpl.count() == 0 {
            return Ok(Vec::new());
        }
        let committed = c
            .committed_offsets(tpl, LOOKUP_TIMEOUT)
            .map_err(GroupsError::Committed)?;
        let mut topics: Vec<String> = committed
            .elements()
            .iter()
            .filter(|e| matches!(e.offset(), Offset::Offset(_)))
            .map(|e| e.topic().to_owned())
            .collect();
        topics.sort();
        topics.dedup();
        Ok(topics)
    })
    .await
}

/// Where to move a group's offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The log start offset.
    Earliest,
    /// The high watermark.
    Latest,
    /// The first offset whose record timestamp is ≥ this many ms since the
    /// epoch (the high watermark where there is none).
    Datetime(i64),
    /// The committed offset plus N (N may be negative); from the log start
    /// where nothing is committed.
    ShiftBy(i64),
    /// This offset in every partition.
    Offset(i64),
    /// Per partition (e.g. the ends a rebuild read up to); partitions not
    /// listed keep their committed offset (or the log start).
    Exact(BTreeMap<(String, i32), i64>),
}

/// One row of a reset plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlanRow {
    pub topic: String,
    pub partition: i32,
    pub low: i64,
    pub high: i64,
    pub current: Option<i64>,
    /// Where the offset will be, clamped to `[low, high]`.
    pub target: i64,
}

/// Computes where each partition's offset goes (nothing is changed).
pub async fn plan(
    cfg: &KafkaConfig,
    group: &str,
    topics: &[String],
    target: &Target,
) -> Result<Vec<PlanRow>, GroupsError> {
    let (cfg, group, topics, target) = (
        cfg.clone(),
        group.to_owned(),
        topics.to_vec(),
        target.clone(),
    );
    blocking(move || {
        let c = consumer(&cfg, &group)?;
        let rows = committed_and_marks(&c, &topics)?;
        let by_time = match target {
            Target::Datetime(ms) => Some(times(&c, &rows, ms)?),
            _ => None,
        };
        Ok(rows
            .into_iter()
            .map(|r| {
                let start = r.committed.unwrap_or(r.low);
                let want = match &target {
                    Target::Earliest => r.low,
                    Target::Latest => r.high,
                    Target::Datetime(_) => by_time
                        .as_ref()
                        .and_then(|m| m.get(&(r.topic.clone(), r.partition)).copied())
                        .unwrap_or(r.high),
                    Target::ShiftBy(n) => start.saturating_add(*n),
                    Target::Offset(o) => *o,
                    Target::Exact(m) => m
                        .get(&(r.topic.clone(), r.partition))
                        .copied()
                        .unwrap_or(start),
                };
                PlanRow {
                    target: want.clamp(r.low, r.high.max(r.low)),
                    topic: r.topic,
                    partition: r.partition,
                    low: r.low,
                    high: r.high,
                    current: r.committed,
                }
            })
            .collect())
    })
    .await
}

fn times(
    c: &BaseConsumer,
    rows: &[PartitionOffsets],
    ms: i64,
) -> Result<BTreeMap<(String, i32), i64>, GroupsError> {
    let mut tpl = TopicPartitionList::new();
    for r in rows {
        tpl.add_partition_offset(&r.topic, r.partition, Offset::Offset(ms))
            .map_err(GroupsError::BuildOffsetsForTimes)?;
    }
    let found = c
        .offsets_for_times(tpl, LOOKUP_TIMEOUT)
        .map_err(GroupsError::OffsetsForTimes)?;
    let mut out = BTreeMap::new();
    for r in rows {
        let e = found.find_partition(&r.topic, r.partition).ok_or_else(|| {
            GroupsError::NoOffsetForTime {
                topic: r.topic.clone(),
                partition: r.partition,
            }
        })?;
        e.error().map_err(|source| GroupsError::OffsetForTime {
            topic: r.topic.clone(),
            partition: r.partition,
            source,
        })?;
        let o = match e.offset() {
            Offset::Offset(o) if o >= 0 => o,
            // No record at or after T: the end of the partition.
            Offset::End => r.high,
            offset => {
                return Err(GroupsError::UnexpectedOffset {
                    topic: r.topic.clone(),
                    partition: r.partition,
                    offset,
                });
            }
        };
        out.insert((r.topic.clone(), r.partition), o);
    }
    Ok(out)
}

/// Commits the plan's targets for `group`, after checking (again) that
/// the group has no active members, and reads them back.
pub async fn execute(cfg: &KafkaConfig, group: &str, rows: &[PlanRow]) -> Result<(), GroupsError> {
    describe(cfg, group)
        .await?
        .ensure_inactive("moving its offsets")?;
    if rows.is_empty() {
        return Ok(());
    }
    let (cfg, group, rows) = (cfg.clone(), group.to_owned(), rows.to_vec());
    blocking(move || {
        let c = consumer(&cfg, &group)?;
        let mut tpl = TopicPartitionList::new();
        for r in &rows {
            tpl.add_partition_offset(&r.topic, r.partition, Offset::Offset(r.target))
                .map_err(GroupsError::BuildCommit)?;
        }
        c.commit(&tpl, CommitMode::Sync)
            .map_err(|source| GroupsError::Commit {
                group: group.clone(),
                source,
            })?;
        let topics: Vec<String> = {
            let mut t: Vec<String> = rows.iter().map(|r| r.topic.clone()).collect();
            t.dedup();
            t
        };
        let back = committed_and_marks(&c, &topics)?;
        for r in &rows {
            let got = back
                .iter()
                .find(|b| b.topic == r.topic && b.partition == r.partition)
                .and_then(|b| b.committed);
            if got != Some(r.target) {
                return Err(GroupsError::ReadBack {
                    group: group.clone(),
                    topic: r.topic.clone(),
                    partition: r.partition,
                    got,
                    target: r.target,
                });
            }
        }
        Ok(())
    })
    .await
}

/// The plan as a table, like `kafka-consumer-groups --reset-offsets`.
pub fn render_plan(rows: &[PlanRow]) -> String {
    let mut s = format!(
        "{:<40} {:>9} {:>12} {:>12} {:>12} {:>12}\n",
        "TOPIC", "PARTITION", "LOW", "HIGH", "CURRENT", "NEW-OFFSET"
    );
    for r in rows {
        s.push_str(&format!(
            "{:<40} {:>9} {:>12} {:>12} {:>12} {:>12}\n",
            r.topic,
            r.partition,
            r.low,
            r.high,
            r.current.map_or_else(|| "-".to_owned(), |c| c.to_string()),
            r.target
        ));
    }
    s
}
