//! What a dead letter says about itself: its `dlq.*` headers and, when
//! the payload decodes, the event's id and type; and positions in the
//! dead-letter topic (`PARTITION:OFFSET`).

use crate::DlqFilter;
use crate::bounds::rfc3339_ms;
use events::avro;
use serde::Serialize;
use streaming::dlq as h;
use streaming::reader::Record;

/// What one dead letter says about itself.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterInfo {
    /// `PARTITION:OFFSET` in the dead-letter topic.
    pub position: String,
    pub partition: i32,
    pub offset: i64,
    pub timestamp: Option<String>,
    pub error_kind: Option<String>,
    pub reason: Option<String>,
    pub original_topic: Option<String>,
    pub original_partition: Option<i32>,
    pub original_offset: Option<i64>,
    pub consumer_group: Option<String>,
    pub failed_at: Option<String>,
    pub event_id: Option<String>,
    pub event_type: Option<String>,
    pub payment_id: Option<String>,
    /// Why the payload does not decode, when it does not.
    pub decode_error: Option<String>,
    /// A stub (`dlq.truncated`): the payload is only a prefix of the
    /// original, which stays at its origin; never redriven.
    pub truncated: bool,
}

impl DeadLetterInfo {
    pub fn of(rec: &Record) -> DeadLetterInfo {
        let s = |name: &str| rec.header(name).map(str::to_owned);
        let truncated = rec.header(h::H_TRUNCATED) == Some("true");
        let decoded = avro::decode(&rec.payload);
        let (event_id, event_type, payment_id, decode_error) = match &decoded {
            _ if truncated => (
                None,
                None,
                None,
                Some(format!(
                    "stub: the first {} of {} bytes (sha256 {})",
                    rec.payload.len(),
                    rec.header(h::H_ORIGINAL_SIZE).unwrap_or("?"),
                    rec.header(h::H_ORIGINAL_SHA256).unwrap_or("?")
                )),
            ),
            Ok(env) => (
                Some(env.event_id.to_string()),
                Some(env.event_type().as_str().to_owned()),
                env.payment_id.map(|p| p.to_string()),
                None,
            ),
            Err(e) => (None, None, None, Some(format!("{}: {e}", e.kind()))),
        };
        DeadLetterInfo {
            position: format!("{}:{}", rec.partition, rec.offset),
            partition: rec.partition,
            offset: rec.offset,
            timestamp: rec.timestamp_ms.map(rfc3339_ms),
            error_kind: s(h::H_ERROR_KIND),
            reason: s(h::H_REASON),
            original_topic: s(h::H_ORIGINAL_TOPIC),
            original_partition: rec
                .header(h::H_ORIGINAL_PARTITION)
                .and_then(|p| p.parse().ok()),
            original_offset: rec
                .header(h::H_ORIGINAL_OFFSET)
                .and_then(|p| p.parse().ok()),
            consumer_group: s(h::H_CONSUMER_GROUP),
            failed_at: s(h::H_FAILED_AT),
            event_id,
            event_type,
            payment_id,
            decode_error,
            truncated,
        }
    }

    /// Whether --group/--kind select it.
    pub(super) fn matches(&self, f: &DlqFilter) -> bool {
        f.group
            .as_ref()
            .is_none_or(|g| self.consumer_group.as_ref() == Some(g))
            && f.kind
                .as_ref()
                .is_none_or(|k| self.error_kind.as_ref() == Some(k))
    }
}

/// A dead-letter position that is not `PARTITION:OFFSET`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PositionError {
    #[error("{input:?}: expected PARTITION:OFFSET, e.g. 3:1042")]
    Malformed { input: String },
    #[error("{input:?}: partition and offset cannot be negative")]
    Negative { input: String },
}

/// `PARTITION:OFFSET`.
pub fn parse_position(s: &str) -> Result<(i32, i64), PositionError> {
    let bad = || PositionError::Malformed {
        input: s.to_owned(),
    };
    let (p, o) = s.trim().split_once(':').ok_or_else(bad)?;
    let p: i32 = p.parse().map_err(|_| bad())?;
    let o: i64 = o.parse().map_err(|_| bad())?;
    if p < 0 || o < 0 {
        return Err(PositionError::Negative {
            input: s.to_owned(),
        });
    }
    Ok((p, o))
}

/// `PARTITION:OFFSET` of a position.
pub(super) fn position_str(pos: (i64, i64)) -> String {
    format!("{}:{}", pos.0, pos.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_parse() {
        assert_eq!(parse_position("3:1042").unwrap(), (3, 1042));
        for bad in ["3", "a:1", "1:-2", "-1:0", ""] {
            assert!(parse_position(bad).is_err(), "{bad}");
        }
    }
}
