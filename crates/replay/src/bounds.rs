//! `--from` / `--to`: a record timestamp or an offset.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// One end of a replay range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// Record timestamp, milliseconds since the Unix epoch.
    Time(i64),
    /// This offset in every partition.
    Offset(i64),
}

/// A `--from` / `--to` value that is none of the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BoundError {
    #[error("{input:?}: expected offset:N with N a whole number")]
    NotAnOffset { input: String },
    #[error("{input:?}: an offset cannot be negative")]
    NegativeOffset { input: String },
    #[error("{input:?}: milliseconds out of range")]
    MillisOutOfRange { input: String },
    #[error(
        "{input:?}: expected an RFC 3339 timestamp (2026-01-31T12:00:00Z), milliseconds since the epoch, or offset:N ({error})"
    )]
    NotATimestamp {
        input: String,
        error: time::error::Parse,
    },
    #[error("{input:?}: timestamp out of range")]
    TimestampOutOfRange { input: String },
}

/// Parses `offset:N`, a number of milliseconds since the epoch, or an RFC
/// 3339 timestamp (sub-millisecond digits are cut: record timestamps are
/// milliseconds).
pub fn parse_bound(s: &str) -> Result<Bound, BoundError> {
    let s = s.trim();
    let input = || s.to_owned();
    if let Some(n) = s.strip_prefix("offset:") {
        let n: i64 = n
            .parse()
            .map_err(|_| BoundError::NotAnOffset { input: input() })?;
        if n < 0 {
            return Err(BoundError::NegativeOffset { input: input() });
        }
        return Ok(Bound::Offset(n));
    }
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let ms: i64 = s
            .parse()
            .map_err(|_| BoundError::MillisOutOfRange { input: input() })?;
        return Ok(Bound::Time(ms));
    }
    let t = OffsetDateTime::parse(s, &Rfc3339).map_err(|error| BoundError::NotATimestamp {
        input: input(),
        error,
    })?;
    let ms = t.unix_timestamp_nanos().div_euclid(1_000_000);
    Ok(Bound::Time(i64::try_from(ms).map_err(|_| {
        BoundError::TimestampOutOfRange { input: input() }
    })?))
}

/// Milliseconds since the epoch as RFC 3339 (UTC, milliseconds).
pub fn rfc3339_ms(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::macros::format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
            ))
            .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms() {
        assert_eq!(parse_bound("offset:42").unwrap(), Bound::Offset(42));
        assert_eq!(
            parse_bound("1700000000123").unwrap(),
            Bound::Time(1_700_000_000_123)
        );
        assert_eq!(
            parse_bound("2023-11-14T22:13:20.123456Z").unwrap(),
            Bound::Time(1_700_000_000_123)
        );
        assert_eq!(
            parse_bound("2023-11-15T00:13:20+02:00").unwrap(),
            Bound::Time(1_700_000_000_000)
        );
        assert_eq!(
            parse_bound("1969-12-31T23:59:59.9995Z").unwrap(),
            Bound::Time(-1)
        );
        for bad in ["offset:-1", "offset:x", "yesterday", "", "2023-11-14"] {
            assert!(parse_bound(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn formats_milliseconds() {
        assert_eq!(rfc3339_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }
}
