//! Idempotent topic creation at start-up.

use crate::config::KafkaConfig;
use events::TopicSpec;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot create Kafka admin client: {0}")]
    Client(KafkaError),
    #[error("creating topics failed: {0}")]
    Request(KafkaError),
    #[error("creating topic {topic} failed: {code}")]
    Topic {
        topic: String,
        code: RDKafkaErrorCode,
    },
}

/// The old name of [`TOPIC_MESSAGE_BYTES_MAX`], which tests use.
pub use crate::limits::TOPIC_MESSAGE_BYTES_MAX as TOPIC_MAX_MESSAGE_BYTES;
use crate::limits::TOPIC_MESSAGE_BYTES_MAX;

/// Creates the topics that do not exist yet, with unlimited retention and
/// [`TOPIC_MESSAGE_BYTES_MAX`]; existing ones are left as they are (Kafka cannot shrink partitions, and
/// growing them re-maps keys; retention of an existing topic is the
/// operator's to set).
/// Returns the names that were created.
pub async fn ensure_topics(
    cfg: &KafkaConfig,
    specs: &[TopicSpec],
) -> Result<Vec<String>, AdminError> {
    let mut cc = cfg.client_config("paystream-admin");
    cfg.apply_overrides(&mut cc);
    let admin: AdminClient<DefaultClientContext> = cc.create().map_err(AdminError::Client)?;
    let max_message_bytes = TOPIC_MESSAGE_BYTES_MAX.to_string();
    let new: Vec<NewTopic<'_>> = specs
        .iter()
        .map(|s| {
            NewTopic::new(
                &s.name,
                s.partitions,
                TopicReplication::Fixed(cfg.replication_factor),
            )
            // The topics are the system of record: projections are rebuilt
            // and reconciled from their whole history, so nothing expires
            // (Kafka's default would delete records after 7 days).
            .set("retention.ms", "-1")
            .set("retention.bytes", "-1")
            .set("max.message.bytes", &max_message_bytes)
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(new.iter(), &opts)
        .await
        .map_err(AdminError::Request)?;
    let mut created = Vec::new();
    for r in results {
        match r {
            Ok(name) => {
                tracing::info!(topic = %name, "created topic");
                created.push(name);
            }
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(AdminError::Topic { topic, code }),
        }
    }
    Ok(created)
}
