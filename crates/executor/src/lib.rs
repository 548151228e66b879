//! The payment executor: turns approved payment orders into money movement
//! at the PSP, exactly once.
//!
//! - The intake (a consumer group over the payments topic) only records
//!   durable work in SQL: orders on `PaymentRequested`, made ready by
//!   `RiskApproved`, cancelled by `RiskRejected`; refunds on
//!   `RefundRequested`. It never calls the PSP.
//! - The dispatcher leases due payments and executes their orders one after
//!   the other (intent → PSP call with the order id as idempotency key →
//!   outcome), many payments at once, parking transient failures in SQL with
//!   a back-off instead of sleeping on them.
//! - Every event goes through an outbox row written with the state change,
//!   so a crash never loses one; derived event ids make re-appends harmless.
//! - The HTTP server takes the PSP's signed webhooks; pending orders no
//!   webhook resolved in time are polled.

pub mod dispatch;
pub mod intake;
pub mod limits;
pub mod psp;
pub mod service;
pub mod store;
pub mod webhook;

pub use service::{App, DEFAULT_MAX_IN_FLIGHT, ExecutorArgs, Running, serve, start};
