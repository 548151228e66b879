//! Events per second through the Avro codec: the generic path
//! (apache-avro's `Value` tree, then a field-by-field conversion) against
//! the direct reader and writer, in the same run on the same bytes.
//! Prints figures; asserts only that both paths give the same envelopes.
//!
//! `cargo bench -p events --bench avro [-- EVENTS]` (default 200,000: the
//! sample story of one payment, one event of each of the 14 types, repeated
//! with fresh ids).

use events::avro::{self, paths};
use events::{Envelope, Timestamp, samples};
use std::hint::black_box;
use std::time::{Duration, Instant};

fn rate(n: usize, d: Duration) -> u128 {
    u128::try_from(n).expect("fits") * 1_000_000_000 / d.as_nanos().max(1)
}

/// `a / b` with one decimal.
fn ratio(a: Duration, b: Duration) -> String {
    let r10 = a.as_nanos() * 10 / b.as_nanos().max(1);
    format!("{}.{}x", r10 / 10, r10 % 10)
}

fn time<T>(mut f: impl FnMut() -> T) -> (T, Duration) {
    let t = Instant::now();
    let out = f();
    (out, t.elapsed())
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200_000);
    let start = Timestamp::from_micros(1_764_000_000_000_000);
    let mut envs: Vec<Envelope> = Vec::with_capacity(n);
    let mut i = 0;
    while envs.len() < n {
        envs.extend(samples::one_of_each("shop-1", &format!("bench-{i}"), start));
        i += 1;
    }
    envs.truncate(n);
    let bytes: Vec<Vec<u8>> = envs.iter().map(|e| avro::encode(e).unwrap()).collect();
    let total_bytes: usize = bytes.iter().map(Vec::len).sum();

    // Warm both paths (lazy schema parsing, allocator).
    for b in bytes.iter().take(1_000) {
        black_box(paths::decode_generic(b).unwrap());
        black_box(paths::decode_direct(b).unwrap().unwrap());
    }

    for round in 1..=3 {
        let (generic, dg) = time(|| {
            bytes
                .iter()
                .map(|b| paths::decode_generic(b).unwrap())
                .collect::<Vec<_>>()
        });
        let (direct, dd) = time(|| {
            bytes
                .iter()
                .map(|b| paths::decode_direct(b).unwrap().unwrap())
                .collect::<Vec<_>>()
        });
        let (public, dp) = time(|| {
            bytes
                .iter()
                .map(|b| avro::decode(b).unwrap())
                .collect::<Vec<_>>()
        });
        assert!(generic == envs && direct == envs && public == envs);
        drop((generic, direct, public));

        let (g, eg) = time(|| {
            envs.iter()
                .map(|e| paths::encode_generic(e).unwrap())
                .collect::<Vec<_>>()
        });
        let (d, ed) = time(|| envs.iter().map(paths::encode_direct).collect::<Vec<_>>());
        assert_eq!(
            g.iter().map(Vec::len).sum::<usize>(),
            d.iter().map(Vec::len).sum::<usize>()
        );
        drop((g, d));

        println!(
            "round {round}: {n} events, {} kB  decode: generic {:>9} ev/s  direct {:>9} ev/s ({})  avro::decode {:>9} ev/s  \
             encode: generic {:>9} ev/s  direct {:>9} ev/s ({})",
            total_bytes / 1_000,
            rate(n, dg),
            rate(n, dd),
            ratio(dg, dd),
            rate(n, dp),
            rate(n, eg),
            rate(n, ed),
            ratio(eg, ed),
        );
    }
}
