//! The payment handler against a real broker, PostgreSQL and SQLite, over
//! real HTTP.

mod group_commit;
mod hardening;
mod harness;
mod idempotency;
mod inbound;
mod inbound_again;
mod keys;
mod refunds;
mod retries;
mod routes;
mod status_batch;
