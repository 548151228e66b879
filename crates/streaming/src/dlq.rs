//! Dead letters: a message a consumer could not decode or apply is copied,
//! bytes and headers unchanged, to the dead-letter topic with `dlq.*`
//! headers saying why and where it came from. The original partition then
//! moves on: a poison message never blocks it and is never silently dropped.

use crate::consumer::MessageMeta;
use crate::producer::{Appended, EventProducer, ProduceError};
use events::TopicKind;
use rdkafka::message::{Header, Headers, OwnedHeaders};

pub const H_REASON: &str = "dlq.reason";
pub const H_ERROR_KIND: &str = "dlq.error_kind";
pub const H_ORIGINAL_TOPIC: &str = "dlq.original_topic";
pub const H_ORIGINAL_PARTITION: &str = "dlq.original_partition";
pub const H_ORIGINAL_OFFSET: &str = "dlq.original_offset";
pub const H_CONSUMER_GROUP: &str = "dlq.consumer_group";
pub const H_FAILED_AT: &str = "dlq.failed_at";

/// Longest reason kept in a header; longer ones are cut (with a marker) so
/// a huge error message cannot push the dead letter over the size limit.
pub const REASON_LEN_MAX: usize = 4096;

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

impl DeadLetter {
    pub fn headers(&self, failed_at_rfc3339: &str) -> OwnedHeaders {
        let mut h = OwnedHeaders::new_with_capacity(self.headers.len() + 7);
        for (k, v) in &self.headers {
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
        h.insert(Header {
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
        })
    }

    /// Sends it and waits for the acknowledgement.
    pub async fn send(&self, producer: &EventProducer) -> Result<Appended, ProduceError> {
        let topic = producer.topology().name(TopicKind::DeadLetter);
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .expect("now formats as RFC 3339");
        producer
            .send_raw(
                &topic,
                self.key.as_deref(),
                self.payload.as_deref(),
                self.headers(&now),
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
}
