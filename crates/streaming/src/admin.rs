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

/// `max.message.bytes` of every topic: the largest record batch (after
/// compression) the broker accepts. Kafka's default (1 MiB + 12), stated
/// explicitly so a cluster with a smaller default cannot refuse what we
/// produce: our producer's batches are at most
/// [`MESSAGE_MAX_BYTES`](crate::producer::MESSAGE_MAX_BYTES) (1,000,000)
/// plus the batch header, and a dead-letter stub is at most
/// [`STUB_PAYLOAD_MAX`](crate::dlq::STUB_PAYLOAD_MAX) +
/// [`STUB_HEADERS_MAX`](crate::dlq::STUB_HEADERS_MAX) +
/// [`STUB_KEY_MAX`](crate::dlq::STUB_KEY_MAX) + the `dlq.*` headers
/// (about 140 KiB). An upstream writer can still put a larger message on
/// the inbound topic when it compresses to under this limit; the consumer
/// then dead-letters it as a stub.
pub const TOPIC_MAX_MESSAGE_BYTES: usize = 1_048_588;

const _: () = assert!(crate::producer::MESSAGE_MAX_BYTES + 1024 <= TOPIC_MAX_MESSAGE_BYTES);
const _: () = assert!(
    crate::dlq::STUB_PAYLOAD_MAX
        + crate::dlq::STUB_HEADERS_MAX
        + crate::dlq::STUB_KEY_MAX
        + 2 * crate::dlq::REASON_LEN_MAX
        + 4096
        <= crate::producer::MESSAGE_MAX_BYTES
);

/// Creates the topics that do not exist yet, with unlimited retention and
/// [`TOPIC_MAX_MESSAGE_BYTES`]; existing ones are left as they are (Kafka cannot shrink partitions, and
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
    let max_message_bytes = TOPIC_MAX_MESSAGE_BYTES.to_string();
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
