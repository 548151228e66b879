//! Every limit of the PSP simulator in one place (issue 17 item 4), named
//! `*_MAX` with their unit; their relations are checked at compile time at
//! the end of this file.

/// Longest idle sleep of either worker (webhooks, pending resolutions);
/// the database is the source of truth.
pub const WORKER_IDLE_MS_MAX: i64 = 1_000;
/// Webhook deliveries attempted concurrently per round.
pub const WEBHOOK_DELIVERIES_PER_ROUND_MAX: i64 = 32;
/// Concurrently open connections; more wait in the backlog.
pub const CONNECTIONS_MAX: usize = 1024;
/// Most ops in one group-commit transaction (`--durability batched`).
pub const WRITER_BATCH_OPS_MAX: usize = 256;
/// Ops queued for the committer before senders wait (back pressure).
pub const WRITER_QUEUE_OPS_MAX: usize = 4 * WRITER_BATCH_OPS_MAX;
/// Any configured delay (latency, hold, pending resolution): 400 days.
/// Larger values are configuration mistakes.
pub const DELAY_MS_MAX: u64 = 400 * 24 * 3600 * 1000;
/// The rule list; it is scanned on every request.
pub const RULES_MAX: usize = 1000;
/// Discrepancies of each kind injected into one settlement file.
pub const SETTLEMENT_INJECT_PER_KIND_MAX: usize = 1_000;
/// Idempotency keys: 1..=255 visible characters.
pub const IDEMPOTENCY_KEY_LEN_MAX: usize = 255;

const _: () = {
    assert!(WORKER_IDLE_MS_MAX > 0);
    assert!(WEBHOOK_DELIVERIES_PER_ROUND_MAX > 0);
    assert!(WRITER_QUEUE_OPS_MAX >= WRITER_BATCH_OPS_MAX);
    assert!(CONNECTIONS_MAX >= WRITER_BATCH_OPS_MAX);
};
