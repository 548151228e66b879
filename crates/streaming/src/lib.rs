//! Kafka plumbing shared by every paystream component: configuration, the
//! idempotent event producer, the at-least-once consumer-group loop with
//! its dead-letter topic, topic creation, logging and shutdown.
//!
//! Code here speaks only the Kafka protocol (through librdkafka), never a
//! particular broker's specifics.

pub mod admin;
pub mod config;
pub mod consumer;
pub mod dlq;
pub mod http;
pub mod metrics;
pub mod producer;
pub mod progress;
pub mod reader;
pub mod secret;
pub mod shutdown;
pub mod supervise;
pub mod telemetry;

pub use config::KafkaConfig;
pub use consumer::{
    BatchHandler, ConsumerSettings, Delivered, HandlerError, MessageMeta, Outcome, run_consumer,
};
pub use producer::{Appended, EventProducer, ProduceError};
