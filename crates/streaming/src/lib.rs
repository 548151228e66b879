//! Kafka plumbing shared by every paystream component that talks to the
//! broker: configuration, the idempotent event producer, the at-least-once
//! consumer-group loop with its dead-letter topic, reading topics back,
//! topic creation, and the limits of all these.
//!
//! Code here speaks only the Kafka protocol (through librdkafka), never a
//! particular broker's specifics. The process runtime (HTTP serving,
//! metrics, logging, shutdown, supervision, the allocator) is the
//! `runtime` crate.

pub mod admin;
pub mod config;
pub mod consumer;
pub mod dlq;
pub mod limits;
pub mod producer;
pub mod reader;

pub use config::KafkaConfig;
pub use consumer::{
    BatchHandler, ConsumerSettings, Delivered, HandlerError, MessageMeta, Outcome, run_consumer,
};
pub use producer::{Appended, EventProducer, ProduceError};
