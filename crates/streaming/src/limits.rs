//! Every limit of the Kafka plumbing in one place (issue 17 item 4): the
//! sizes of messages and dead letters, the timeouts that bound a broker
//! call, and the default of the consumer's batches. Each is named
//! `*_MAX`/`*_MIN` (or `*_DEFAULT`) with its unit, or is a `Duration` named
//! for what it bounds; the relations between them are checked at compile
//! time at the end of this file. The old names stay where they were, as
//! re-exports. The process runtime's limits (secrets, HTTP servers) are
//! `runtime::limits`.

use std::time::Duration;

/// The producer's `message.max.bytes`: the largest message it sends.
pub const MESSAGE_BYTES_MAX: usize = 1_000_000;
/// `max.message.bytes` of every topic: the largest record batch (after
/// compression) the broker accepts. Kafka's default (1 MiB + 12), stated
/// explicitly so a cluster with a smaller default cannot refuse what we
/// produce: our producer's batches are at most [`MESSAGE_BYTES_MAX`]
/// (1,000,000) plus the batch header, and a dead-letter stub is at most
/// [`STUB_PAYLOAD_MAX`] + [`STUB_HEADERS_MAX`] + [`STUB_KEY_MAX`] + the
/// `dlq.*` headers (about 140 KiB). An upstream writer can still put a
/// larger message on the inbound topic when it compresses to under this
/// limit; the consumer then dead-letters it as a stub.
pub const TOPIC_MESSAGE_BYTES_MAX: usize = 1_048_588;

/// Most payload bytes a dead-letter stub keeps.
pub const STUB_PAYLOAD_MAX: usize = 64 * 1024;
/// Most bytes of original headers (keys + values) a stub keeps; beyond
/// that they are left out and counted in `dlq.original_headers_dropped`.
pub const STUB_HEADERS_MAX: usize = 64 * 1024;
/// Longest original key a stub keeps; a longer one is replaced by its hash.
pub const STUB_KEY_MAX: usize = 4 * 1024;
/// Longest reason kept in a dead letter's header; longer ones are cut
/// (with a marker) so a huge error message cannot push the dead letter
/// over the size limit.
pub const REASON_LEN_MAX: usize = 4096;

/// How long an append may wait for the broker before it fails; the caller
/// then decides (retry, or answer the client with an error). Bounded so a
/// lost broker turns into an error instead of a hung request.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a revocation waits for a handler call already running on the
/// revoked partitions. Past it the partitions move anyway: that call's
/// offsets are never stored (its generation is gone), so its events are
/// delivered again to the new owner and deduplicated there.
pub const REVOKE_WAIT: Duration = Duration::from_secs(60);

/// Default `ConsumerSettings::batch_max`: most messages handed to a
/// handler at once.
pub const CONSUMER_BATCH_MAX_DEFAULT: usize = 500;

// Anything the producer sends fits on our topics, batch framing included.
const _: () = assert!(MESSAGE_BYTES_MAX + 1024 <= TOPIC_MESSAGE_BYTES_MAX);
// A dead-letter stub (payload, headers, key, the reason twice and the
// other `dlq.*` headers) is a message the producer sends.
const _: () = assert!(
    STUB_PAYLOAD_MAX + STUB_HEADERS_MAX + STUB_KEY_MAX + 2 * REASON_LEN_MAX + 4096
        <= MESSAGE_BYTES_MAX
);
// A handler call stuck in an append fails (its delivery timeout) before
// a revocation stops waiting for it.
const _: () = assert!(DELIVERY_TIMEOUT.as_millis() <= REVOKE_WAIT.as_millis());
