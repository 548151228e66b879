//! The calendar of `serve reconciler`: the time of day of the nightly run
//! and the days a run reconciles. Pure: the current time comes in.

use crate::limits::CATCH_UP_DAYS_MAX;
use std::num::ParseIntError;
use time::Date;

/// An `--at` that is not a time of day.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AtError {
    #[error("--at {input:?}: expected HH:MM")]
    NoColon { input: String },
    #[error("--at {input:?}: bad hour")]
    Hour {
        input: String,
        #[source]
        source: ParseIntError,
    },
    #[error("--at {input:?}: bad minute")]
    Minute {
        input: String,
        #[source]
        source: ParseIntError,
    },
    #[error("--at {input:?}: expected HH:MM between 00:00 and 23:59")]
    OutOfRange { input: String },
}

/// `HH:MM` → minutes after midnight.
pub(crate) fn parse_at(s: &str) -> Result<(u8, u8), AtError> {
    let input = || s.to_owned();
    let (h, m) = s
        .split_once(':')
        .ok_or_else(|| AtError::NoColon { input: input() })?;
    let h: u8 = h.parse().map_err(|source| AtError::Hour {
        input: input(),
        source,
    })?;
    let m: u8 = m.parse().map_err(|source| AtError::Minute {
        input: input(),
        source,
    })?;
    if h > 23 || m > 59 {
        return Err(AtError::OutOfRange { input: input() });
    }
    Ok((h, m))
}

/// The next instant at `h:m` UTC strictly after `now`.
pub(crate) fn next_at(
    now: time::OffsetDateTime,
    h: u8,
    m: u8,
) -> Result<time::OffsetDateTime, time::error::ComponentRange> {
    let today = now.date().with_hms(h, m, 0)?.assume_utc();
    Ok(if today > now {
        today
    } else {
        today + time::Duration::days(1)
    })
}

/// The days a scheduled run reconciles, oldest first: every day after the
/// watermark (the last day the schedule reconciled successfully) up to
/// `today - lag_days`, at most [`CATCH_UP_DAYS_MAX`]; without a watermark
/// (first start) only `today - lag_days`.
pub fn day_plan(watermark: Option<Date>, today: Date, lag_days: u16) -> Vec<Date> {
    let target = today - time::Duration::days(i64::from(lag_days));
    let oldest = target - time::Duration::days(CATCH_UP_DAYS_MAX - 1);
    let start = match watermark {
        Some(w) => (w + time::Duration::days(1)).max(oldest),
        None => target,
    };
    let mut out = Vec::new();
    let mut d = start;
    while d <= target {
        out.push(d);
        match d.next_day() {
            Some(n) => d = n,
            None => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_the_next_run() {
        let now = time::macros::datetime!(2026-11-25 02:29:59 UTC);
        assert_eq!(
            next_at(now, 2, 30).unwrap(),
            time::macros::datetime!(2026-11-25 02:30:00 UTC)
        );
        let now = time::macros::datetime!(2026-11-25 02:30:00 UTC);
        assert_eq!(
            next_at(now, 2, 30).unwrap(),
            time::macros::datetime!(2026-11-26 02:30:00 UTC)
        );
        assert!(parse_at("24:00").is_err());
        assert_eq!(parse_at("02:30").unwrap(), (2, 30));
    }

    #[test]
    fn the_day_plan_catches_up_from_the_watermark() {
        use time::macros::date;
        let today = date!(2026 - 11 - 25);
        // First start: only today - lag.
        assert_eq!(day_plan(None, today, 1), [date!(2026 - 11 - 24)]);
        // Up to date: nothing.
        assert!(day_plan(Some(date!(2026 - 11 - 24)), today, 1).is_empty());
        // Two days failed or missed: both, oldest first.
        assert_eq!(
            day_plan(Some(date!(2026 - 11 - 21)), today, 1),
            [
                date!(2026 - 11 - 22),
                date!(2026 - 11 - 23),
                date!(2026 - 11 - 24)
            ]
        );
        // Long outage: bounded to CATCH_UP_DAYS_MAX, ending at today - lag.
        let p = day_plan(Some(date!(2026 - 01 - 01)), today, 2);
        assert_eq!(p.len(), 31);
        assert_eq!(p.last(), Some(&date!(2026 - 11 - 23)));
        assert_eq!(p[0], date!(2026 - 10 - 24));
    }
}
