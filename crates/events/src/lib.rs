//! The paystream domain: money, identifiers, the event model, topic layout,
//! and the Avro wire format of events.
//!
//! No I/O here: no tokio, rdkafka, sqlx or axum. Other crates build on it.

pub mod avro;
pub mod event;
pub mod ids;
pub mod json;
pub mod money;
pub mod samples;
pub mod topics;

pub use event::*;
pub use ids::*;
pub use money::{Currency, Money, MoneyError};
pub use topics::{TopicKind, TopicSpec, Topology};
