//! Reading the dead-letter topic (without a consumer group, nothing
//! committed): all of it, or the one message at a position.

use super::DlqError;
use events::TopicKind;
use runtime::progress::Progress;
use std::collections::BTreeMap;
use streaming::KafkaConfig;
use streaming::reader::{End, Record, Start, TopicReader};

pub(super) fn dlq_topic(kafka: &KafkaConfig) -> String {
    kafka.topology().name(TopicKind::DeadLetter)
}

/// Every message of the dead-letter topic, oldest first per partition.
pub(super) async fn read_all(kafka: &KafkaConfig) -> Result<Vec<Record>, DlqError> {
    let topic = dlq_topic(kafka);
    let mut reader = TopicReader::open(
        kafka,
        std::slice::from_ref(&topic),
        Start::Beginning,
        End::Latest,
        None,
    )
    .await
    .map_err(|source| DlqError::OpenTopic {
        topic: topic.clone(),
        source: Box::new(source),
    })?;
    let progress = Progress::new("dead letters", reader.total());
    let mut out = Vec::new();
    while let Some(batch) = reader.next_batch(2000).await? {
        progress.inc(u64::try_from(batch.len()).unwrap_or(0));
        out.extend(batch);
    }
    progress.finish();
    out.sort_by_key(|r| (r.partition, r.offset));
    Ok(out)
}

/// Reads the one message at `pos` of the dead-letter topic.
pub(super) async fn read_one(kafka: &KafkaConfig, pos: (i32, i64)) -> Result<Record, DlqError> {
    let topic = dlq_topic(kafka);
    let marks = streaming::reader::watermarks(kafka, &topic)?;
    let Some(&(_, lo, hi)) = marks.iter().find(|(p, _, _)| *p == pos.0) else {
        return Err(DlqError::NoPartition {
            topic,
            partition: pos.0,
            partitions: marks.len(),
        });
    };
    if !(lo..hi).contains(&pos.1) {
        return Err(DlqError::OutsidePartition {
            topic,
            partition: pos.0,
            offset: pos.1,
            low: lo,
            high: hi,
        });
    }
    let mut starts = BTreeMap::new();
    for (p, _, hi) in &marks {
        // Other partitions start at their end: nothing to read there.
        starts.insert((topic.clone(), *p), if *p == pos.0 { pos.1 } else { *hi });
    }
    let mut reader = TopicReader::open(
        kafka,
        std::slice::from_ref(&topic),
        Start::Beginning,
        End::Offset(pos.1 + 1),
        Some(&starts),
    )
    .await?;
    while let Some(batch) = reader.next_batch(16).await? {
        if let Some(r) = batch
            .into_iter()
            .find(|r| r.partition == pos.0 && r.offset == pos.1)
        {
            return Ok(r);
        }
    }
    Err(DlqError::Gone {
        partition: pos.0,
        offset: pos.1,
    })
}
