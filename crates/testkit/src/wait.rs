//! Waiting for something to become true, with a deadline, instead of
//! sleeping a fixed time and hoping. An absence check ("X did not happen")
//! first waits here for a positive signal that X would have preceded (a
//! later marker handled, the group caught up), then asserts.

use std::fmt::Display;
use std::time::Duration;

/// How often the waits poll.
const POLL: Duration = Duration::from_millis(100);

/// Polls `ready` until it is true; panics naming `what` after `timeout`.
pub async fn wait_until(
    what: impl Display,
    timeout: Duration,
    mut ready: impl AsyncFnMut() -> bool,
) {
    wait_for(what, timeout, async || ready().await.then_some(())).await;
}

/// Polls `found` until it returns a value, and returns it; panics naming
/// `what` after `timeout`.
pub async fn wait_for<T>(
    what: impl Display,
    timeout: Duration,
    mut found: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = found().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Waits (up to 120 s) until `group` has committed, on every partition of
/// `topics`, the end of the partition: everything produced so far is
/// handled. Only with the `kafka` feature.
#[cfg(feature = "kafka")]
pub async fn wait_caught_up(cfg: &streaming::KafkaConfig, group: &str, topics: &[String]) {
    use rdkafka::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("offsets consumer");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let mut ends = TopicPartitionList::new();
        let mut want = Vec::new();
        for t in topics {
            for (p, _, high) in streaming::reader::watermarks(cfg, t).expect("watermarks") {
                ends.add_partition(t, p);
                want.push((t.clone(), p, high));
            }
        }
        let committed = consumer
            .committed_offsets(ends, Duration::from_secs(10))
            .expect("committed offsets");
        let done = want.iter().all(|(t, p, high)| {
            *high == 0
                || matches!(committed.find_partition(t, *p).map(|e| e.offset()), Some(Offset::Offset(o)) if o >= *high)
        });
        if done {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "group {group} did not catch up: want {want:?}, committed {committed:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
