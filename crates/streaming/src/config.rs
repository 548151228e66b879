//! Kafka configuration from flags and `PAYSTREAM_*` environment variables.

use clap::Args;
use events::Topology;
use rdkafka::ClientConfig;

/// Connection and topic settings shared by every component.
#[derive(Debug, Clone, Args)]
pub struct KafkaConfig {
    /// Kafka bootstrap servers, comma-separated.
    #[arg(
        long,
        env = "PAYSTREAM_BROKERS",
        default_value = "localhost:9092",
        global = true
    )]
    pub brokers: String,

    /// Extra librdkafka options as KEY=VALUE, applied last so they override
    /// paystream's own (e.g. security.protocol=SASL_SSL). Repeatable; the
    /// environment variable takes a comma-separated list.
    #[arg(
        long = "kafka-option",
        env = "PAYSTREAM_KAFKA_OPTIONS",
        value_name = "KEY=VALUE",
        value_delimiter = ',',
        value_parser = parse_key_value,
        global = true
    )]
    pub kafka_options: Vec<(String, String)>,

    /// Prefix of every topic name (include the separator).
    #[arg(long, env = "PAYSTREAM_TOPIC_PREFIX", default_value = events::topics::DEFAULT_PREFIX, global = true)]
    pub topic_prefix: String,

    /// Partitions of each topic when paystream creates it. Choose the final
    /// count up front: it bounds consumer parallelism, and changing it
    /// re-maps payment ids to partitions.
    #[arg(long, env = "PAYSTREAM_PARTITIONS", default_value_t = events::topics::DEFAULT_PARTITIONS, global = true)]
    pub partitions: i32,

    /// Replication factor of topics paystream creates (1 for a local
    /// broker; 3 on a production cluster).
    #[arg(
        long,
        env = "PAYSTREAM_REPLICATION_FACTOR",
        default_value_t = 1,
        global = true
    )]
    pub replication_factor: i32,

    /// This process's stable identity in its consumer groups (Kafka static
    /// membership, `group.instance.id`): unique per running instance, the
    /// same across its restarts, e.g. the pod name of a StatefulSet. A
    /// member restarted after a crash (kill -9) then gets its partitions
    /// back at once instead of after the session timeout (measured on the
    /// local broker: 0.01 s instead of 9.9 s). Two live processes must never
    /// share one (the broker fences the older). Unset: dynamic membership.
    #[arg(long, env = "PAYSTREAM_INSTANCE_ID", global = true)]
    pub instance_id: Option<String>,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    let k = k.trim();
    if k.is_empty() {
        return Err(format!("empty key in {s:?}"));
    }
    Ok((k.to_owned(), v.trim().to_owned()))
}

impl KafkaConfig {
    /// Settings for a local broker with the given topic prefix (tests).
    pub fn local(brokers: &str, topic_prefix: &str, partitions: i32) -> KafkaConfig {
        KafkaConfig {
            brokers: brokers.to_owned(),
            kafka_options: Vec::new(),
            topic_prefix: topic_prefix.to_owned(),
            partitions,
            replication_factor: 1,
            instance_id: None,
        }
    }

    pub fn topology(&self) -> Topology {
        Topology::new(self.topic_prefix.clone(), self.partitions)
    }

    /// Base client configuration: bootstrap servers and the client id.
    /// Callers add their role's options, then [`KafkaConfig::apply_overrides`].
    pub fn client_config(&self, client_id: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        // Shows up in broker logs and metrics; name the component.
        c.set("client.id", client_id);
        c
    }

    /// Applies the user's raw librdkafka options last.
    pub fn apply_overrides(&self, c: &mut ClientConfig) {
        for (k, v) in &self.kafka_options {
            c.set(k, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_raw_options() {
        assert_eq!(
            parse_key_value("a.b=c=d").unwrap(),
            ("a.b".into(), "c=d".into())
        );
        assert!(parse_key_value("novalue").is_err());
        assert!(parse_key_value("=x").is_err());
    }
}
