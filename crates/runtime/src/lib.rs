//! The process runtime every paystream component shares, whatever it
//! talks to: serving an HTTP API with limits (`http`) and the
//! `error_codes!` macro its error codes are declared with, Prometheus
//! metrics and typed internal events (`metrics`), logging and traces
//! (`telemetry`), SIGTERM/SIGINT (`shutdown`), the task supervisor
//! (`supervise`), progress lines (`progress`), secrets (`secret`), the
//! limits of all these (`limits`) and the process-wide allocator.
//!
//! Nothing here knows Kafka: the Kafka plumbing is the `streaming` crate,
//! and a component that talks no Kafka (the PSP simulator) links only this
//! one.

pub mod http;
pub mod limits;
pub mod metrics;
pub mod progress;
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
/// here because every component links this crate (`streaming` depends on
/// it too), and it is declared nowhere else.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
