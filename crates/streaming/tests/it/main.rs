//! Integration tests of the Kafka plumbing against a real Kafka-protocol
//! broker (`PAYSTREAM_TEST_BROKERS`, default 127.0.0.1:9092). Every test
//! uses its own topic prefix and consumer groups.

mod admin;
mod harness;
mod interop;
mod loop_tests;
mod pipeline;
mod poison;
mod reader;
mod roundtrip;
