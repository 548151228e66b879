//! Integration tests against real PostgreSQL, SQLite, the Kafka broker and
//! the PSP simulator (in-process, real HTTP). Database tests run on both
//! backends (see `both!`).

mod harness;

mod batch;
mod chunks;
mod clean_day;
mod flow;
mod malformed;
mod review;
mod service;
