//! Integration tests against real PostgreSQL, SQLite and the Kafka broker.
//! Every database test runs on both backends (see `both!`).

mod harness;

mod broker;
mod bulk;
mod cli;
mod db;
mod http;
mod migrations;
mod plans;
mod prop;
mod psp_refs;
mod redrive;
mod scope;
