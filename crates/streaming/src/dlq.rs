//! Dead letters: a message a consumer could not decode or apply is copied,
//! bytes and headers unchanged, to the dead-letter topic with `dlq.*`
//! headers saying why and where it came from. The original partition then
//! moves on: a poison message never blocks it and is never silently dropped.
//!
//! A dead letter that cannot be produced whole (the producer or broker
//! refuses it for good: larger than `message.max.bytes`, an invalid record)
//! becomes a **stub** ([`Form::Stub`]): the original headers (if they fit
//! in [`STUB_HEADERS_MAX`]), the `dlq.*` headers, `dlq.truncated: true`,
//! the original payload's size and SHA-256 (hex), and its first
//! [`STUB_PAYLOAD_MAX`] bytes. If even that is refused, a
//! [`Form::Minimal`] stub carries only the `dlq.*` headers (size and hash
//! included). A stub is never redriven as if whole (`paystream dlq
//! redrive` refuses `dlq.truncated` letters); the original bytes stay in
//! the original topic at `dlq.original_offset`.

use crate::consumer::MessageMeta;
use crate::producer::{Appended, EventProducer, ProduceError};
use events::TopicKind;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use sha2::{Digest, Sha256};

pub const H_REASON: &str = "dlq.reason";
pub const H_ERROR_KIND: &str = "dlq.error_kind";
pub const H_ORIGINAL_TOPIC: &str = "dlq.original_topic";
pub const H_ORIGINAL_PARTITION: &str = "dlq.original_partition";
pub const H_ORIGINAL_OFFSET: &str = "dlq.original_offset";
pub const H_CONSUMER_GROUP: &str = "dlq.consumer_group";
pub const H_FAILED_AT: &str = "dlq.failed_at";
/// `true` on a stub: the payload is at most a prefix of the original.
pub const H_TRUNCATED: &str = "dlq.truncated";
/// Size in bytes of the original payload (stubs only).
pub const H_ORIGINAL_SIZE: &str = "dlq.original_size";
/// SHA-256 (lowercase hex) of the original payload (stubs only).
pub const H_ORIGINAL_SHA256: &str = "dlq.original_sha256";
/// Why the whole dead letter could not be produced (stubs only).
pub const H_STUB_CAUSE: &str = "dlq.stub_cause";
/// Set on a stub whose original headers were left out (too large, or a
/// minimal stub): how many there were.
pub const H_HEADERS_DROPPED: &str = "dlq.original_headers_dropped";
/// SHA-256 (hex) of an original key too long to keep ([`STUB_KEY_MAX`]).
pub const H_ORIGINAL_KEY_SHA256: &str = "dlq.original_key_sha256";

pub use crate::limits::{REASON_LEN_MAX, STUB_HEADERS_MAX, STUB_KEY_MAX, STUB_PAYLOAD_MAX};

/// One message on its way to the dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Stable, bounded code: `not_single_object`, `unknown_schema`,
    /// `malformed_body`, `invalid_field`, `rejected`, ...
    pub error_kind: String,
    pub reason: String,
    pub origin: MessageMeta,
    pub consumer_group: String,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// The original message's headers, kept as they were.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

fn truncate(s: &str) -> String {
    if s.len() <= REASON_LEN_MAX {
        return s.to_owned();
    }
    let mut end = REASON_LEN_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… (truncated)", &s[..end])
}

/// How much of the original a dead letter carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// Key, payload and headers as they were.
    Whole,
    /// Bounded: original headers if they fit, a prefix of the payload,
    /// size and hash of the whole payload.
    Stub,
    /// Only the `dlq.*` headers (with size and hash of the payload).
    Minimal,
}

impl Form {
    /// Its name in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Form::Whole => "whole",
            Form::Stub => "stub",
            Form::Minimal => "minimal",
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

impl DeadLetter {
    pub fn headers(&self, failed_at_rfc3339: &str) -> OwnedHeaders {
        self.headers_for(failed_at_rfc3339, Form::Whole, "")
    }

    fn original_headers_size(&self) -> usize {
        self.headers
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
            .sum()
    }

    fn keeps_original_headers(&self, form: Form) -> bool {
        match form {
            Form::Whole => true,
            Form::Stub => self.original_headers_size() <= STUB_HEADERS_MAX,
            Form::Minimal => false,
        }
    }

    /// The key sent in `form`: a stub drops a key over [`STUB_KEY_MAX`].
    pub fn key_for(&self, form: Form) -> Option<&[u8]> {
        match (form, self.key.as_deref()) {
            (Form::Whole, k) => k,
            (_, Some(k)) if k.len() <= STUB_KEY_MAX => Some(k),
            _ => None,
        }
    }

    /// The payload sent in `form`: a stub keeps a prefix, a minimal one
    /// nothing.
    pub fn payload_for(&self, form: Form) -> Option<&[u8]> {
        match form {
            Form::Whole => self.payload.as_deref(),
            Form::Stub => self
                .payload
                .as_deref()
                .map(|p| &p[..p.len().min(STUB_PAYLOAD_MAX)]),
            Form::Minimal => None,
        }
    }

    /// The headers of the dead letter in `form`; `cause` says why it is a
    /// stub (ignored for [`Form::Whole`]).
    pub fn headers_for(&self, failed_at_rfc3339: &str, form: Form, cause: &str) -> OwnedHeaders {
        let mut h = OwnedHeaders::new_with_capacity(self.headers.len() + 14);
        let keep = self.keeps_original_headers(form);
        for (k, v) in self.headers.iter().filter(|_| keep) {
            // Drop earlier dlq.* headers so a message dead-lettered twice
            // (after a redrive) carries only its latest reason.
            if k.starts_with("dlq.") {
                continue;
            }
            h = h.insert(Header {
                key: k,
                value: v.as_deref(),
            });
        }
        let partition = self.origin.partition.to_string();
        let offset = self.origin.offset.to_string();
        let reason = truncate(&self.reason);
        h = h
            .insert(Header {
                key: H_REASON,
                value: Some(reason.as_str()),
            })
            .insert(Header {
                key: H_ERROR_KIND,
                value: Some(self.error_kind.as_str()),
            })
            .insert(Header {
                key: H_ORIGINAL_TOPIC,
                value: Some(self.origin.topic.as_str()),
            })
            .insert(Header {
                key: H_ORIGINAL_PARTITION,
                value: Some(partition.as_str()),
            })
            .insert(Header {
                key: H_ORIGINAL_OFFSET,
                value: Some(offset.as_str()),
            })
            .insert(Header {
                key: H_CONSUMER_GROUP,
                value: Some(self.consumer_group.as_str()),
            })
            .insert(Header {
                key: H_FAILED_AT,
                value: Some(failed_at_rfc3339),
            });
        if form == Form::Whole {
            return h;
        }
        let payload = self.payload.as_deref().unwrap_or_default();
        let size = payload.len().to_string();
        let sha = sha256_hex(payload);
        let cause = truncate(cause);
        h = h
            .insert(Header {
                key: H_TRUNCATED,
                value: Some("true"),
            })
            .insert(Header {
                key: H_ORIGINAL_SIZE,
                value: Some(size.as_str()),
            })
            .insert(Header {
                key: H_ORIGINAL_SHA256,
                value: Some(sha.as_str()),
            })
            .insert(Header {
                key: H_STUB_CAUSE,
                value: Some(cause.as_str()),
            });
        if !keep && !self.headers.is_empty() {
            let n = self.headers.len().to_string();
            h = h.insert(Header {
                key: H_HEADERS_DROPPED,
                value: Some(n.as_str()),
            });
        }
        if let Some(k) = self.key.as_deref()
            && self.key_for(form).is_none()
        {
            let k = sha256_hex(k);
            h = h.insert(Header {
                key: H_ORIGINAL_KEY_SHA256,
                value: Some(k.as_str()),
            });
        }
        h
    }

    /// Sends it whole and waits for the acknowledgement.
    pub async fn send(&self, producer: &EventProducer) -> Result<Appended, ProduceError> {
        self.send_as(producer, Form::Whole, "").await
    }

    /// Sends it in `form` (`cause`: why not whole) and waits for the
    /// acknowledgement.
    pub async fn send_as(
        &self,
        producer: &EventProducer,
        form: Form,
        cause: &str,
    ) -> Result<Appended, ProduceError> {
        let topic = producer.topology().name(TopicKind::DeadLetter);
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .expect("now formats as RFC 3339");
        producer
            .send_raw(
                &topic,
                self.key_for(form),
                self.payload_for(form),
                self.headers_for(&now, form, cause),
                None,
            )
            .await
    }
}

/// Collects a message's headers as owned pairs.
pub fn owned_headers<H: Headers>(headers: Option<&H>) -> Vec<(String, Option<Vec<u8>>)> {
    headers
        .map(|h| {
            h.iter()
                .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                .collect()
        })
        .unwrap_or_default()
}

/// Reads one header as UTF-8 text.
pub fn header_str<'a>(headers: &'a [(String, Option<Vec<u8>>)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| v.as_deref())
        .and_then(|v| std::str::from_utf8(v).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_reasons_are_truncated_on_a_char_boundary() {
        let s = "é".repeat(REASON_LEN_MAX);
        let t = truncate(&s);
        assert!(t.len() < REASON_LEN_MAX + 20);
        assert!(t.ends_with("(truncated)"));
        assert_eq!(truncate("short"), "short");
    }

    fn letter(payload: Vec<u8>, headers: Vec<(String, Option<Vec<u8>>)>) -> DeadLetter {
        DeadLetter {
            error_kind: "malformed_body".into(),
            reason: "bad".into(),
            origin: MessageMeta {
                topic: "t".into(),
                partition: 3,
                offset: 7,
                timestamp_ms: None,
            },
            consumer_group: "g".into(),
            key: Some(vec![b'k'; STUB_KEY_MAX + 1]),
            payload: Some(payload),
            headers,
        }
    }

    fn get(h: &OwnedHeaders, name: &str) -> Option<String> {
        h.iter()
            .find(|x| x.key == name)
            .and_then(|x| x.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    #[test]
    fn a_stub_is_bounded_and_says_what_it_stands_for() {
        let payload: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
        let d = letter(
            payload.clone(),
            vec![("x-trace".into(), Some(b"abc".to_vec()))],
        );
        assert_eq!(
            d.payload_for(Form::Whole).map(<[u8]>::len),
            Some(payload.len())
        );
        let stub = d.payload_for(Form::Stub).unwrap();
        assert_eq!(stub, &payload[..STUB_PAYLOAD_MAX]);
        assert_eq!(d.key_for(Form::Stub), None, "an over-long key is dropped");
        let h = d.headers_for("now", Form::Stub, "Message size too large");
        assert_eq!(get(&h, H_TRUNCATED).as_deref(), Some("true"));
        assert_eq!(get(&h, H_ORIGINAL_SIZE), Some(payload.len().to_string()));
        assert_eq!(get(&h, H_ORIGINAL_SHA256), Some(sha256_hex(&payload)));
        assert_eq!(get(&h, H_ORIGINAL_SHA256).unwrap().len(), 64);
        assert_eq!(
            get(&h, H_ORIGINAL_KEY_SHA256),
            Some(sha256_hex(&[b'k'; STUB_KEY_MAX + 1]))
        );
        assert_eq!(get(&h, "x-trace").as_deref(), Some("abc"));
        assert_eq!(get(&h, H_ERROR_KIND).as_deref(), Some("malformed_body"));
        assert_eq!(
            get(&h, H_STUB_CAUSE).as_deref(),
            Some("Message size too large")
        );
        // A whole dead letter carries no stub headers.
        let whole = d.headers_for("now", Form::Whole, "ignored");
        assert_eq!(get(&whole, H_TRUNCATED), None);
    }

    #[test]
    fn stubs_leave_out_headers_too_large_to_carry() {
        let big = vec![("h".to_string(), Some(vec![0u8; STUB_HEADERS_MAX + 1]))];
        let d = letter(b"small".to_vec(), big);
        let h = d.headers_for("now", Form::Stub, "too large");
        assert_eq!(get(&h, "h"), None);
        assert_eq!(get(&h, H_HEADERS_DROPPED).as_deref(), Some("1"));
        let m = d.headers_for("now", Form::Minimal, "too large");
        assert_eq!(get(&m, H_ORIGINAL_SIZE).as_deref(), Some("5"));
        assert_eq!(d.payload_for(Form::Minimal), None);
    }
}
