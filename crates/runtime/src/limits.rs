//! Every limit of the process runtime in one place: secret lengths and the
//! defaults of the HTTP servers' limits. Each is named `*_MAX`/`*_MIN` (or
//! `*_DEFAULT`) with its unit; their relation is checked at compile time at
//! the end of this file. The Kafka plumbing's limits are
//! `streaming::limits`.

/// Shortest accepted secret, in characters: 32 characters of a random
/// hex string are 128 bits, which no one guesses.
pub const SECRET_LEN_MIN: usize = 32;
/// Longest accepted secret, in characters (it travels in an HTTP header).
pub const SECRET_LEN_MAX: usize = 1024;

/// Default `HttpLimits::max_body_bytes`: the largest request body read.
pub const HTTP_BODY_BYTES_MAX_DEFAULT: usize = 1024 * 1024;
/// Default `HttpLimits::max_concurrent_requests`: requests served at once.
pub const HTTP_CONCURRENT_REQUESTS_MAX_DEFAULT: usize = 256;

// Secrets have a non-empty range of accepted lengths.
const _: () = assert!(SECRET_LEN_MIN <= SECRET_LEN_MAX);
