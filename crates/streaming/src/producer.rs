//! The idempotent event producer. An append returns only after the broker
//! acknowledged the write on all in-sync replicas.

use crate::config::KafkaConfig;
use events::{Envelope, Topology, avro};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use std::time::Duration;

/// Header names paystream puts on every event message, so tools can route
/// and filter without decoding Avro.
pub const HEADER_EVENT_TYPE: &str = "paystream.event_type";
pub const HEADER_EVENT_ID: &str = "paystream.event_id";
pub const HEADER_CONTENT_TYPE: &str = "content-type";
/// Value of the content-type header: Avro single-object encoding.
pub const CONTENT_TYPE_AVRO: &str = "application/vnd.apache.avro.single-object";

/// Where an appended message landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    #[error("cannot create Kafka producer: {0}")]
    Create(KafkaError),
    #[error(transparent)]
    Encode(#[from] avro::EncodeError),
    #[error("broker did not acknowledge the append to {topic}: {error}")]
    NotAcknowledged { topic: String, error: KafkaError },
}

impl ProduceError {
    /// True when trying again later may succeed (timeouts, a full local
    /// queue, brokers unavailable); false for errors a retry cannot fix
    /// (message too large, authorization, a bug).
    pub fn is_retryable(&self) -> bool {
        match self {
            ProduceError::Create(_) | ProduceError::Encode(_) => false,
            ProduceError::NotAcknowledged { error, .. } => !matches!(
                error.rdkafka_error_code(),
                Some(
                    RDKafkaErrorCode::MessageSizeTooLarge
                        | RDKafkaErrorCode::MessageBatchTooLarge
                        | RDKafkaErrorCode::InvalidMessageSize
                        | RDKafkaErrorCode::TopicAuthorizationFailed
                        | RDKafkaErrorCode::ClusterAuthorizationFailed
                        | RDKafkaErrorCode::InvalidRecord
                        | RDKafkaErrorCode::Fatal
                )
            ),
        }
    }
}

/// Produces [`Envelope`]s to the topic the [`Topology`] assigns, keyed by
/// payment, plus raw messages (dead letters, redrives).
#[derive(Clone)]
pub struct EventProducer {
    inner: FutureProducer,
    topology: Topology,
}

impl std::fmt::Debug for EventProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventProducer")
            .field("topology", &self.topology)
            .finish_non_exhaustive()
    }
}

pub use crate::limits::DELIVERY_TIMEOUT;
use crate::limits::MESSAGE_BYTES_MAX;

/// The headers every appended envelope carries: its event type, event id
/// and content type.
pub fn envelope_headers(envelope: &Envelope) -> OwnedHeaders {
    let event_id = envelope.event_id.to_string();
    OwnedHeaders::new()
        .insert(Header {
            key: HEADER_EVENT_TYPE,
            value: Some(envelope.event_type().as_str()),
        })
        .insert(Header {
            key: HEADER_EVENT_ID,
            value: Some(event_id.as_str()),
        })
        .insert(Header {
            key: HEADER_CONTENT_TYPE,
            value: Some(CONTENT_TYPE_AVRO),
        })
}

impl EventProducer {
    pub fn new(cfg: &KafkaConfig, client_id: &str) -> Result<EventProducer, ProduceError> {
        let mut c = cfg.client_config(client_id);
        // The broker deduplicates retried sends per partition (producer id +
        // sequence numbers): a retry after a lost ack never writes twice and
        // never reorders.
        c.set("enable.idempotence", "true");
        // An ack means every in-sync replica has the event: an acknowledged
        // payment survives the loss of the leader.
        c.set("acks", "all");
        // The most the idempotent producer allows while keeping order.
        c.set("max.in.flight.requests.per.connection", "5");
        // Upper bound on an append, retries included (see DELIVERY_TIMEOUT).
        c.set(
            "message.timeout.ms",
            DELIVERY_TIMEOUT.as_millis().to_string(),
        );
        c.set("request.timeout.ms", "10000");
        // A few ms of batching buys a lot of throughput under load and costs
        // little latency when idle.
        c.set("linger.ms", "5");
        c.set("compression.type", "lz4");
        // Bounded local queue: when full, appends fail fast (retryable)
        // instead of growing memory without limit.
        c.set("queue.buffering.max.messages", "100000");
        c.set("queue.buffering.max.kbytes", "262144");
        // Largest message (and request) we produce: Kafka's default broker
        // limit; larger events are a bug, and a dead letter this large is
        // sent as a bounded stub instead (`dlq`). Topics are created to
        // accept it (`limits::TOPIC_MESSAGE_BYTES_MAX`).
        c.set("message.max.bytes", MESSAGE_BYTES_MAX.to_string());
        // The Java client's partitioner, so a key maps to the same partition
        // whichever client (ours, or an upstream JVM service writing to the
        // inbound topic) produced it.
        c.set("partitioner", "murmur2_random");
        cfg.apply_overrides(&mut c);
        let inner: FutureProducer = c.create().map_err(ProduceError::Create)?;
        Ok(EventProducer {
            inner,
            topology: cfg.topology(),
        })
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Appends to the topic the topology assigns to this event.
    pub async fn append(&self, envelope: &Envelope) -> Result<Appended, ProduceError> {
        let topic = self.topology.topic_for(envelope);
        self.append_to(&topic, envelope).await
    }

    /// Appends to a named topic (e.g. the inbound topic).
    pub async fn append_to(
        &self,
        topic: &str,
        envelope: &Envelope,
    ) -> Result<Appended, ProduceError> {
        let payload = avro::encode(envelope)?;
        self.append_encoded(topic, envelope, &payload).await
    }

    /// Appends an envelope whose Avro bytes were encoded already (e.g.
    /// stored before the append), with the key, headers and timestamp
    /// `append_to` gives it. Sending starts when the future is first polled.
    pub async fn append_encoded(
        &self,
        topic: &str,
        envelope: &Envelope,
        payload: &[u8],
    ) -> Result<Appended, ProduceError> {
        let key = envelope.partition_key();
        self.send_raw(
            topic,
            Some(key.as_bytes()),
            Some(payload),
            envelope_headers(envelope),
            Some(envelope.occurred_at.as_millis()),
        )
        .await
    }

    /// Sends bytes as they are and waits for the acknowledgement.
    pub async fn send_raw(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: OwnedHeaders,
        timestamp_ms: Option<i64>,
    ) -> Result<Appended, ProduceError> {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(p) = payload {
            record = record.payload(p);
        }
        if let Some(ts) = timestamp_ms {
            record = record.timestamp(ts);
        }
        match self.inner.send(record, DELIVERY_TIMEOUT).await {
            Ok(d) => Ok(Appended {
                topic: topic.to_owned(),
                partition: d.partition,
                offset: d.offset,
            }),
            Err((error, _)) => Err(ProduceError::NotAcknowledged {
                topic: topic.to_owned(),
                error,
            }),
        }
    }

    /// Whether a broker answers a metadata request within `timeout`, for
    /// readiness checks.
    pub async fn check_broker(&self, timeout: Duration) -> Result<(), KafkaError> {
        let producer = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            producer.client().fetch_metadata(None, timeout).map(drop)
        })
        .await
        .unwrap_or(Err(KafkaError::Canceled))
    }

    /// Waits until everything queued has been acknowledged (or the timeout).
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.inner.flush(timeout)
    }
}
