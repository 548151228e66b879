//! The payment handler: where upstream order services submit payments.
//!
//! `POST /v1/payments` (with an Idempotency-Key) validates the request,
//! runs the risk check, appends `PaymentRequested` and the risk decision to
//! the payments topic (acknowledged by the broker) and answers. The same
//! request retried any number of times, concurrently or after a crash,
//! yields exactly one payment: the payment id and event ids derive from
//! (client, key), the key is unique in SQL, and consumers dedup by event id.
//!
//! It also consumes the inbound topic (payment requests produced straight to
//! Kafka) and keeps the payment-status projection behind
//! `GET /v1/payments/{id}`.

pub mod api;
pub mod batch_sql;
pub mod error_code;
pub mod group;
pub mod inbound;
pub mod instances;
pub mod keys;
pub mod limits;
pub mod request;
pub mod risk;
pub mod service;
pub mod status;
mod status_fold;
#[doc(hidden)]
pub mod status_per_event;
pub mod store;

pub use service::{HandlerArgs, Running, serve, start};
