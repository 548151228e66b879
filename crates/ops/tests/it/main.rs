//! Integration tests against the real broker (127.0.0.1:9092), PostgreSQL
//! and SQLite. Every database test runs on both backends.

mod harness;

mod offsets;
mod project;
mod rebuild;
mod safety;
mod shadow;
mod status;
mod tables;
