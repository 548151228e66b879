//! Integration tests against the real broker, PostgreSQL and SQLite.

mod harness;

mod dlq_tests;
mod replay_tests;
