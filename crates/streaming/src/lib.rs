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
pub mod limits;
pub mod metrics;
pub mod producer;
pub mod progress;
pub mod reader;
pub mod secret;
pub mod shutdown;
pub mod supervise;
pub mod telemetry;

/// Every paystream process (the `paystream` binary, the benches, the
/// tests) allocates through mimalloc instead of the C library's malloc:
/// the hot paths allocate and free many small buffers (decoded events,
/// rows, SQL arguments), and glibc's malloc and free took about a quarter
/// of a rebuild's CPU (`perf`); `cargo bench -p ops` measured the apply
/// phase about 1.8 to 2.5 times faster with another allocator. It lives
/// here because every component links this crate; with `streaming` split
/// (issue 17 item 1) it belongs to the process runtime.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub use config::KafkaConfig;
pub use consumer::{
    BatchHandler, ConsumerSettings, Delivered, HandlerError, MessageMeta, Outcome, run_consumer,
};
pub use producer::{Appended, EventProducer, ProduceError};
