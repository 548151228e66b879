//! The loop's settings: [`ConsumerSettings`] (group, topics, batching,
//! back-off, pipeline depth), their defaults from the
//! `PAYSTREAM_CONSUMER_*` environment variables with the validation of
//! those values, and the librdkafka options of the loop's consumer, each
//! with the reason it is set.

use crate::config::KafkaConfig;
use rdkafka::ClientConfig;
use std::time::Duration;

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

/// The librdkafka configuration of a loop's consumer: the connection,
/// the group and paystream's options, then the user's overrides (last, so
/// they win).
pub(super) fn client_config(cfg: &KafkaConfig, settings: &ConsumerSettings) -> ClientConfig {
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
    c
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
}
