//! Avro single-object encoding of [`Envelope`]s, per `schemas/envelope.avsc`.
//!
//! Wire format: `C3 01`, the writer schema's CRC-64-AVRO fingerprint (8
//! bytes, little-endian), then the Avro binary body. A decoder looks the
//! fingerprint up among every schema version this build knows (the current
//! one and `schemas/history/`), reads the body with that writer schema and
//! resolves it to the current schema, so old events stay readable.
//!
//! Envelopes also go into Avro object container files (`paystream replay
//! --format avro`): [`ContainerWriter`] writes them, [`current_body`] gives
//! each envelope's body in the schema the file declares.
//!
//! This module is the only place in paystream that knows Avro.

mod canonical;
pub mod compat;
pub mod container;
mod convert;
mod direct;

pub use canonical::{SchemaError, crc64_avro, fingerprint, parsing_canonical_form};
pub use container::ContainerWriter;

use crate::event::{Envelope, EventType};
use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::writer::datum::GenericDatumWriter;
use std::collections::HashMap;
use std::sync::LazyLock;

/// The current envelope schema, the source of truth for the wire format.
pub const ENVELOPE_SCHEMA_JSON: &str = include_str!("../../../../schemas/envelope.avsc");

/// Earlier released versions of the envelope schema, oldest first, as
/// `(file name, JSON)`. Every file in `schemas/history/` must be listed here
/// (a test checks it), so events written by older producers stay readable.
pub const HISTORY: &[(&str, &str)] = &[(
    "envelope.v1.avsc",
    include_str!("../../../../schemas/history/envelope.v1.avsc"),
)];

/// The two magic bytes that open every single-object encoded datum.
pub const MAGIC: [u8; 2] = [0xC3, 0x01];
/// Magic plus fingerprint.
pub const HEADER_LEN: usize = 10;

/// Why bytes could not be decoded into an [`Envelope`]. The kind names are
/// stable: they go into dead-letter headers and metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not an Avro single-object datum: {0}")]
    NotSingleObject(String),
    #[error(
        "unknown schema fingerprint {fingerprint:016x}: not the current envelope schema nor any in schemas/history"
    )]
    UnknownSchema { fingerprint: u64 },
    #[error("Avro body does not match its schema: {0}")]
    Body(String),
    #[error("invalid field {field}: {reason}")]
    Invalid { field: String, reason: String },
}

impl DecodeError {
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::NotSingleObject(_) => "not_single_object",
            DecodeError::UnknownSchema { .. } => "unknown_schema",
            DecodeError::Body(_) => "malformed_body",
            DecodeError::Invalid { .. } => "invalid_field",
        }
    }
}

/// Why an envelope could not be encoded. Only a programming error can cause
/// it (the Rust types mirror the schema), so callers may treat it as fatal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot encode event as Avro: {0}")]
pub struct EncodeError(pub String);

struct Codec {
    fingerprint: u64,
    writer: GenericDatumWriter<'static>,
    /// One reader per known writer fingerprint, each resolving to the
    /// current schema.
    readers: HashMap<u64, GenericDatumReader<'static>>,
    /// Writer fingerprints the direct decoder reads -> the number of
    /// payload union branches that version has. Those are the current
    /// schema (when `direct` is written for it) and history versions that
    /// only lack branches at the union's end; any other version (none
    /// today) needs resolution and stays on the generic path.
    direct: HashMap<u64, usize>,
    /// Whether `encode` writes with the direct writer.
    direct_encode: bool,
    /// apache-avro's allocation limit, which the direct decoder honours too.
    max_alloc: usize,
}

fn leak_schema(json: &str, what: &str) -> &'static Schema {
    let schema = Schema::parse_str(json).unwrap_or_else(|e| panic!("{what} does not parse: {e}"));
    Box::leak(Box::new(schema))
}

static CODEC: LazyLock<Codec> = LazyLock::new(|| {
    let current = leak_schema(ENVELOPE_SCHEMA_JSON, "schemas/envelope.avsc");
    let fp = fingerprint(ENVELOPE_SCHEMA_JSON).expect("current schema has a canonical form");
    let writer = GenericDatumWriter::builder(current)
        .build()
        .expect("current schema resolves");
    // The direct codec mirrors one schema; for any other current schema
    // everything stays on the generic path (and the events tests fail until
    // `direct.rs` follows the schema).
    let direct_current = fp == direct::WRITTEN_FOR;
    let mut direct = HashMap::new();
    if direct_current {
        direct.insert(fp, EventType::ALL.len());
    }
    let mut readers = HashMap::new();
    readers.insert(
        fp,
        GenericDatumReader::builder(current)
            .build()
            .expect("current schema resolves"),
    );
    for (name, json) in HISTORY {
        let old = leak_schema(json, name);
        let old_fp = fingerprint(json).expect("history schema has a canonical form");
        // apache-avro 0.22 resolves a writer's union branch to the first
        // reader branch whose structure fits, ignoring record names (a
        // RiskRejected would come out as a RiskApproved). Where the new
        // version only appended union branches, the old bodies are laid out
        // exactly as the current schema would write them, so they are read
        // with the old schema itself; otherwise resolution is needed, and
        // events' tests check every history version decodes correctly.
        let appended = only_appended_branches(json, ENVELOPE_SCHEMA_JSON);
        if appended && direct_current {
            let branches = payload_branches(json).expect("history schema has a payload union");
            direct.insert(old_fp, branches);
        }
        let reader = if appended {
            GenericDatumReader::builder(old).build()
        } else {
            GenericDatumReader::builder(old)
                .reader_schema(current)
                .build()
        }
        .unwrap_or_else(|e| panic!("{name} cannot be resolved to the current schema: {e}"));
        readers.insert(old_fp, reader);
    }
    Codec {
        fingerprint: fp,
        writer,
        readers,
        direct,
        direct_encode: direct_current,
        max_alloc: apache_avro::util::max_allocation_bytes(
            apache_avro::util::DEFAULT_MAX_ALLOCATION_BYTES,
        ),
    }
});

/// The number of branches of a schema's `payload` union.
fn payload_branches(json: &str) -> Option<usize> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    v["fields"]
        .as_array()?
        .iter()
        .find(|f| f["name"] == "payload")?["type"]
        .as_array()
        .map(Vec::len)
}

/// True when `new` is `old` with branches appended to the envelope's
/// `payload` union and nothing else changed.
fn only_appended_branches(old: &str, new: &str) -> bool {
    let Ok(mut n) = serde_json::from_str::<serde_json::Value>(new) else {
        return false;
    };
    let (Some(old_len), Some(new_len)) = (payload_branches(old), payload_branches(new)) else {
        return false;
    };
    if new_len < old_len {
        return false;
    }
    if let Some(branches) = n["fields"]
        .as_array_mut()
        .and_then(|f| f.iter_mut().find(|f| f["name"] == "payload"))
        .and_then(|f| f["type"].as_array_mut())
    {
        branches.truncate(old_len);
    }
    match (
        parsing_canonical_form(old),
        parsing_canonical_form(&n.to_string()),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Fingerprint of the current envelope schema.
pub fn current_fingerprint() -> u64 {
    CODEC.fingerprint
}

/// The single-object header for a fingerprint.
pub fn header(fingerprint: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..2].copy_from_slice(&MAGIC);
    h[2..].copy_from_slice(&fingerprint.to_le_bytes());
    h
}

/// Encodes with the current schema.
pub fn encode(envelope: &Envelope) -> Result<Vec<u8>, EncodeError> {
    if CODEC.direct_encode {
        return Ok(paths::encode_direct(envelope));
    }
    paths::encode_generic(envelope)
}

/// Decodes a single-object datum written with any known schema version.
///
/// The direct decoder reads every version it knows; when it refuses the
/// bytes, the generic path decides, so every result (value or error,
/// message included: dead-letter headers carry it) is exactly what the
/// generic path alone gives. Only malformed input pays for both.
pub fn decode(bytes: &[u8]) -> Result<Envelope, DecodeError> {
    let fp = read_header(bytes)?;
    if let Some(&branches) = CODEC.direct.get(&fp)
        && let Ok(env) = direct::decode_body(&bytes[HEADER_LEN..], branches, CODEC.max_alloc)
    {
        return Ok(env);
    }
    paths::decode_generic(bytes)
}

/// The current schema's binary body of `envelope`, decoded from the
/// single-object `datum`: the datum's own body when it was written with
/// the current schema, else `envelope` encoded afresh. What a
/// [`ContainerWriter`] declaring [`ENVELOPE_SCHEMA_JSON`] takes.
pub fn current_body<'a>(
    datum: &'a [u8],
    envelope: &Envelope,
) -> Result<std::borrow::Cow<'a, [u8]>, EncodeError> {
    if read_header(datum).is_ok_and(|fp| fp == current_fingerprint()) {
        return Ok(std::borrow::Cow::Borrowed(&datum[HEADER_LEN..]));
    }
    let mut bytes = encode(envelope)?;
    bytes.drain(..HEADER_LEN);
    Ok(std::borrow::Cow::Owned(bytes))
}

/// The two implementations behind [`encode`] and [`decode`], each on its
/// own, for the tests that prove them equal and the benchmark that compares
/// them. Not for production use: call [`encode`] and [`decode`].
#[doc(hidden)]
pub mod paths {
    use super::*;

    /// The direct writer, whatever the current schema (check
    /// [`direct_enabled`] first).
    pub fn encode_direct(envelope: &Envelope) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(&header(CODEC.fingerprint));
        direct::encode_body(envelope, &mut out);
        out
    }

    /// Whether the direct codec is written for the current schema, so
    /// [`encode`] and [`decode`] use it.
    pub fn direct_enabled() -> bool {
        CODEC.direct_encode
    }

    /// The direct decoder alone, without the generic fallback; `None` for
    /// a fingerprint it does not read.
    pub fn decode_direct(bytes: &[u8]) -> Option<Result<Envelope, DecodeError>> {
        let fp = match read_header(bytes) {
            Ok(fp) => fp,
            Err(e) => return Some(Err(e)),
        };
        let branches = *CODEC.direct.get(&fp)?;
        Some(direct::decode_body(
            &bytes[HEADER_LEN..],
            branches,
            CODEC.max_alloc,
        ))
    }

    /// The generic writer: an `apache_avro::Value` tree, then its bytes.
    pub fn encode_generic(envelope: &Envelope) -> Result<Vec<u8>, EncodeError> {
        let value = convert::to_value(envelope);
        let body = CODEC
            .writer
            .write_value_to_vec(value)
            .map_err(|e| EncodeError(e.to_string()))?;
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.extend_from_slice(&header(CODEC.fingerprint));
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// The generic reader: an `apache_avro::Value` tree read with the
    /// writer's schema, then converted field by field.
    pub fn decode_generic(bytes: &[u8]) -> Result<Envelope, DecodeError> {
        let fp = read_header(bytes)?;
        let reader = CODEC
            .readers
            .get(&fp)
            .ok_or(DecodeError::UnknownSchema { fingerprint: fp })?;
        let mut body = &bytes[HEADER_LEN..];
        let value = reader
            .read_value(&mut body)
            .map_err(|e| DecodeError::Body(e.to_string()))?;
        if !body.is_empty() {
            return Err(DecodeError::Body(format!(
                "{} trailing bytes after the datum",
                body.len()
            )));
        }
        convert::from_value(value)
    }
}

/// Reads the fingerprint from a single-object header.
pub fn read_header(bytes: &[u8]) -> Result<u64, DecodeError> {
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::NotSingleObject(format!(
            "{} bytes, shorter than the {HEADER_LEN}-byte header",
            bytes.len()
        )));
    }
    if bytes[..2] != MAGIC {
        return Err(DecodeError::NotSingleObject(format!(
            "starts with {:02x} {:02x}, expected c3 01",
            bytes[0], bytes[1]
        )));
    }
    let mut fp = [0u8; 8];
    fp.copy_from_slice(&bytes[2..HEADER_LEN]);
    Ok(u64::from_le_bytes(fp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_schema_parses_and_has_a_stable_fingerprint() {
        assert_eq!(
            current_fingerprint(),
            fingerprint(ENVELOPE_SCHEMA_JSON).unwrap()
        );
        assert_eq!(header(current_fingerprint())[..2], MAGIC);
    }

    #[test]
    fn the_direct_codec_is_written_for_the_current_schema() {
        // On a schema change, follow it in direct.rs, then update
        // WRITTEN_FOR to the new fingerprint.
        assert_eq!(
            direct::WRITTEN_FOR,
            current_fingerprint(),
            "direct.rs mirrors another schema: current fingerprint {:#018x}",
            current_fingerprint()
        );
        assert!(paths::direct_enabled());
        // And it reads every history version (all only appended branches).
        assert_eq!(CODEC.direct.len(), 1 + HISTORY.len());
    }

    #[test]
    fn container_bodies_are_the_current_schemas() {
        use std::borrow::Cow;
        let start = crate::event::Timestamp::from_micros(1_700_000_000_000_000);
        let env = crate::samples::one_of_each("c", "k", start).remove(0);
        let datum = encode(&env).unwrap();
        let body = current_body(&datum, &env).unwrap();
        assert!(matches!(body, Cow::Borrowed(_)), "current: taken as it is");
        assert_eq!(&*body, &datum[HEADER_LEN..]);
        // Another schema's datum (its body is not the current layout):
        // the envelope is encoded afresh.
        let mut old = header(fingerprint(HISTORY[0].1).unwrap()).to_vec();
        old.extend_from_slice(b"\x00 not the current layout");
        let body = current_body(&old, &env).unwrap();
        assert!(matches!(body, Cow::Owned(_)));
        assert_eq!(&*body, &datum[HEADER_LEN..]);
    }

    #[test]
    fn rejects_short_and_foreign_bytes() {
        assert_eq!(decode(b"").unwrap_err().kind(), "not_single_object");
        assert_eq!(
            decode(b"hello world, not avro").unwrap_err().kind(),
            "not_single_object"
        );
        let mut unknown = header(0x0123_4567_89ab_cdef).to_vec();
        unknown.extend_from_slice(b"\x00\x00");
        assert_eq!(
            decode(&unknown),
            Err(DecodeError::UnknownSchema {
                fingerprint: 0x0123_4567_89ab_cdef
            })
        );
        let mut truncated = header(current_fingerprint()).to_vec();
        truncated.extend_from_slice(b"\x02");
        assert_eq!(decode(&truncated).unwrap_err().kind(), "malformed_body");
    }
}
