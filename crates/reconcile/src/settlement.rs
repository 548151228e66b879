//! Reading and validating a PSP settlement file, all of it, before anything
//! is written: strict UTF-8, the exact header, every row checked, duplicate
//! references reported with both line numbers.

use events::Currency;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fmt;
use time::macros::format_description;
use time::{Date, OffsetDateTime};

/// The settlement file's columns, in order (crates/psp-sim/README.md).
pub const COLUMNS: [&str; 7] = [
    "psp_reference",
    "order_id",
    "amount_minor",
    "currency",
    "status",
    "fee_minor",
    "settled_at",
];

/// Separates our order ids in the `order_id` column of a PSP batch row (one
/// settlement row for several of our orders; its amount and fee are the
/// sums of theirs).
pub const BATCH_SEPARATOR: char = ';';

pub use crate::limits::{PROBLEMS_SHOWN_MAX, PROGRESS_ROWS};

/// The PSP's status of a settlement row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RowStatus {
    /// A charge that settled that day (amount positive).
    Succeeded,
    /// A refund created that day (amount negative).
    Refunded,
}

impl RowStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            RowStatus::Succeeded => "succeeded",
            RowStatus::Refunded => "refunded",
        }
    }
}

/// One validated row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettlementRow {
    /// 1-based line in the file.
    pub line: u64,
    pub psp_reference: String,
    /// One order id, or several for a PSP batch row.
    pub order_ids: Vec<String>,
    pub amount_minor: i64,
    pub currency: Currency,
    pub status: RowStatus,
    pub fee_minor: i64,
    /// Milliseconds since the epoch.
    pub settled_at_ms: i64,
}

/// A whole validated file.
#[derive(Debug, Clone)]
pub struct SettlementFile {
    pub date: Date,
    pub sha256: String,
    pub rows: Vec<SettlementRow>,
    /// Identical copies of an earlier row (same reference, every field
    /// equal): `(copy, line of the first)`. Not in `rows`, counted once;
    /// reconciliation reports each copy (a conflicting duplicate rejects
    /// the file).
    pub duplicates: Vec<(SettlementRow, u64)>,
}

/// One problem in a file, at a line (0: the file as a whole).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: u64,
    pub message: String,
}

/// Why a file was rejected: every problem found, with line numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    pub problems: Vec<Problem>,
}

impl FileError {
    fn one(line: u64, message: impl Into<String>) -> FileError {
        FileError {
            problems: vec![Problem {
                line,
                message: message.into(),
            }],
        }
    }
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "malformed settlement file: {} problem(s); nothing was recorded",
            self.problems.len()
        )?;
        for p in self.problems.iter().take(PROBLEMS_SHOWN_MAX) {
            if p.line == 0 {
                write!(f, "\n  {}", p.message)?;
            } else {
                write!(f, "\n  line {}: {}", p.line, p.message)?;
            }
        }
        if self.problems.len() > PROBLEMS_SHOWN_MAX {
            write!(
                f,
                "\n  ... and {} more",
                self.problems.len() - PROBLEMS_SHOWN_MAX
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for FileError {}

/// `YYYY-MM-DD`.
pub fn parse_date(s: &str) -> Result<Date, String> {
    Date::parse(s, format_description!("[year]-[month]-[day]"))
        .map_err(|e| format!("invalid date {s:?} (expected YYYY-MM-DD): {e}"))
}

pub fn format_date(d: Date) -> String {
    d.format(format_description!("[year]-[month]-[day]"))
        .expect("a date formats")
}

/// Milliseconds of the first instant of `d` (UTC).
pub fn day_start_ms(d: Date) -> i64 {
    let ts = d.midnight().assume_utc().unix_timestamp();
    ts * 1_000
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Line (1-based) and column (1-based, in bytes) of byte `offset`.
fn line_col(bytes: &[u8], offset: usize) -> (u64, usize) {
    let before = &bytes[..offset.min(bytes.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let col = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(offset + 1, |nl| offset - nl);
    (u64::try_from(line).unwrap_or(u64::MAX), col)
}

/// Parses and validates the whole file. `date`: the settlement day the
/// caller expects; `None` takes it from the rows (they must all share one
/// UTC day). Every row's `settled_at` must fall on that day.
pub fn parse(bytes: &[u8], date: Option<Date>) -> Result<SettlementFile, FileError> {
    parse_with(bytes, date, |_| {})
}

/// What [`parse_with`] reports while it reads.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    /// SHA-256 of the whole file (hex).
    pub sha256: &'a str,
    /// The settlement day once known: the one given, else that of the first
    /// row with a valid `settled_at` (the day [`parse`] returns).
    pub date: Option<Date>,
    /// Rows accepted since the previous report, in file order. Provisional:
    /// a problem further down still rejects the whole file.
    pub rows: &'a [SettlementRow],
}

/// [`parse`], reporting the rows accepted so far to `progress` as it goes:
/// once as soon as the settlement day is known (possibly with no rows),
/// then every [`PROGRESS_ROWS`] rows, and the remaining rows at the end
/// (before the verdict). Lets a caller start work that depends only on the
/// day and the rows' references while the rest of the file is read; the
/// result is the same as [`parse`]'s.
pub fn parse_with(
    bytes: &[u8],
    date: Option<Date>,
    mut progress: impl FnMut(Progress<'_>),
) -> Result<SettlementFile, FileError> {
    let sha256 = sha256_hex(bytes);
    if date.is_some() {
        progress(Progress {
            sha256: &sha256,
            date,
            rows: &[],
        });
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let (line, col) = line_col(bytes, e.valid_up_to());
            return Err(FileError::one(
                line,
                format!(
                    "not UTF-8: invalid byte sequence at column {col} (byte offset {}); the file must be UTF-8",
                    e.valid_up_to()
                ),
            ));
        }
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.trim().is_empty() {
        return Err(FileError::one(
            0,
            format!("empty file: expected the header {}", COLUMNS.join(",")),
        ));
    }
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(text.as_bytes());
    let mut problems: Vec<Problem> = Vec::new();
    let mut records = reader.records();
    // Header.
    match records.next() {
        Some(Ok(h)) => {
            let got: Vec<&str> = h.iter().map(str::trim).collect();
            if got != COLUMNS {
                let unknown: Vec<&str> = got
                    .iter()
                    .copied()
                    .filter(|c| !COLUMNS.contains(c))
                    .collect();
                let missing: Vec<&str> = COLUMNS
                    .iter()
                    .copied()
                    .filter(|c| !got.contains(c))
                    .collect();
                let mut msg = String::from("header does not match");
                if !unknown.is_empty() {
                    msg.push_str(&format!("; unknown column(s): {}", unknown.join(", ")));
                }
                if !missing.is_empty() {
                    msg.push_str(&format!("; missing column(s): {}", missing.join(", ")));
                }
                if unknown.is_empty() && missing.is_empty() {
                    msg.push_str("; columns duplicated or out of order");
                }
                msg.push_str(&format!("; expected exactly: {}", COLUMNS.join(",")));
                return Err(FileError::one(1, msg));
            }
        }
        Some(Err(e)) => return Err(FileError::one(1, format!("unreadable header: {e}"))),
        None => {
            return Err(FileError::one(
                0,
                format!("empty file: expected the header {}", COLUMNS.join(",")),
            ));
        }
    }
    let mut rows: Vec<SettlementRow> = Vec::new();
    // Reference -> (first line, its fields) to tell identical copies from
    // conflicting duplicates.
    let mut first_line: HashMap<String, (u64, Vec<String>)> = HashMap::new();
    let mut duplicates: Vec<(SettlementRow, u64)> = Vec::new();
    let mut day: Option<Date> = date;
    // Rows already handed to `progress`; whether the day was announced.
    let mut reported = 0;
    let mut announced = date.is_some();
    for rec in records {
        let rec = match rec {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                problems.push(Problem {
                    line,
                    message: format!("bad CSV: {e}"),
                });
                continue;
            }
        };
        let line = rec.position().map_or(0, |p| p.line());
        if rec.len() == 1 && rec.get(0).is_some_and(|f| f.trim().is_empty()) {
            continue; // a blank line
        }
        if rec.len() != COLUMNS.len() {
            problems.push(Problem {
                line,
                message: format!("{} fields, expected {}", rec.len(), COLUMNS.len()),
            });
            continue;
        }
        let mut bad = |msg: String| problems.push(Problem { line, message: msg });
        let f = |i: usize| rec.get(i).unwrap_or("").trim();
        let reference = f(0);
        if reference.is_empty() {
            bad("psp_reference is empty".into());
        }
        let order_ids: Vec<String> = f(1)
            .split(BATCH_SEPARATOR)
            .map(|s| s.trim().to_owned())
            .collect();
        if order_ids.iter().any(String::is_empty) {
            bad(format!("order_id {:?} has an empty order id", f(1)));
        }
        {
            let mut seen = std::collections::HashSet::new();
            for o in order_ids.iter().filter(|o| !o.is_empty()) {
                if !seen.insert(o.as_str()) {
                    bad(format!(
                        "order id {o:?} is listed twice in order_id {:?}",
                        f(1)
                    ));
                }
            }
        }
        let max = projections::booking::MAX_AMOUNT_MINOR.unsigned_abs();
        let amount = f(2).parse::<i64>();
        match &amount {
            Err(_) => bad(format!(
                "amount_minor {:?} is not an integer (minor units)",
                f(2)
            )),
            Ok(a) if a.unsigned_abs() > max => bad(format!(
                "amount_minor {a} is above the bound of {max} minor units"
            )),
            Ok(_) => {}
        }
        let currency = Currency::from_code(f(3));
        if let Err(e) = &currency {
            bad(format!("currency {:?}: {e}", f(3)));
        }
        let status = match f(4) {
            "succeeded" => Some(RowStatus::Succeeded),
            "refunded" => Some(RowStatus::Refunded),
            other => {
                bad(format!(
                    "status {other:?} is not one of succeeded, refunded"
                ));
                None
            }
        };
        let fee = f(5).parse::<i64>();
        match &fee {
            Err(_) => bad(format!(
                "fee_minor {:?} is not an integer (minor units)",
                f(5)
            )),
            Ok(x) if *x < 0 => bad(format!("fee_minor {x} is negative")),
            Ok(x) if x.unsigned_abs() > max => bad(format!(
                "fee_minor {x} is above the bound of {max} minor units"
            )),
            Ok(_) => {}
        }
        let settled = OffsetDateTime::parse(f(6), &time::format_description::well_known::Rfc3339);
        if settled.is_err() {
            bad(format!("settled_at {:?} is not an RFC 3339 time", f(6)));
        }
        if let (Ok(a), Some(s)) = (&amount, status) {
            match s {
                RowStatus::Succeeded if *a <= 0 => {
                    bad(format!(
                        "a succeeded charge needs a positive amount, got {a}"
                    ));
                }
                RowStatus::Refunded if *a >= 0 => {
                    bad(format!("a refund needs a negative amount, got {a}"));
                }
                _ => {}
            }
        }
        if let Ok(t) = &settled {
            let d = t.to_offset(time::UtcOffset::UTC).date();
            match day {
                None => day = Some(d),
                Some(want) if want != d => bad(format!(
                    "settled_at {} is not on the settlement day {}",
                    f(6),
                    format_date(want)
                )),
                Some(_) => {}
            }
        }
        let mut copy_of = None;
        if !reference.is_empty() {
            let fields: Vec<String> = (1..COLUMNS.len()).map(|i| f(i).to_owned()).collect();
            match first_line.get(reference) {
                Some((prev, same)) if *same == fields => copy_of = Some(*prev),
                Some((prev, _)) => bad(format!(
                    "duplicate psp_reference {reference:?} with different fields: also on line {prev}"
                )),
                None => {
                    first_line.insert(reference.to_owned(), (line, fields));
                }
            }
        }
        if let (Ok(amount_minor), Ok(currency), Some(status), Ok(fee_minor), Ok(settled)) =
            (amount, currency, status, fee, settled)
        {
            let ms = settled.unix_timestamp_nanos() / 1_000_000;
            let row = SettlementRow {
                line,
                psp_reference: reference.to_owned(),
                order_ids,
                amount_minor,
                currency,
                status,
                fee_minor,
                settled_at_ms: i64::try_from(ms).unwrap_or(i64::MAX),
            };
            match copy_of {
                Some(first) => duplicates.push((row, first)),
                None => rows.push(row),
            }
        }
        if rows.len() - reported >= PROGRESS_ROWS || (!announced && day.is_some()) {
            announced = true;
            progress(Progress {
                sha256: &sha256,
                date: day,
                rows: &rows[reported..],
            });
            reported = rows.len();
        }
    }
    if reported < rows.len() {
        progress(Progress {
            sha256: &sha256,
            date: day,
            rows: &rows[reported..],
        });
    }
    if !problems.is_empty() {
        problems.sort_by_key(|p| p.line);
        return Err(FileError { problems });
    }
    let Some(date) = day else {
        return Err(FileError::one(
            0,
            "the file has no rows: give the settlement day with --date",
        ));
    };
    Ok(SettlementFile {
        date,
        sha256,
        rows,
        duplicates,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str =
        "psp_reference,order_id,amount_minor,currency,status,fee_minor,settled_at\n";

    #[test]
    fn parses_a_good_file() {
        let f = format!(
            "{HEADER}ch_1,o1,1050,EUR,succeeded,60,2026-11-25T14:20:01.123Z\nre_1,o1,-300,EUR,refunded,0,2026-11-25T15:02:11.001Z\n"
        );
        let s = parse(f.as_bytes(), None).unwrap();
        assert_eq!(format_date(s.date), "2026-11-25");
        assert_eq!(s.rows.len(), 2);
        assert_eq!(s.rows[1].line, 3);
        assert_eq!(s.rows[1].amount_minor, -300);
    }

    #[test]
    fn reports_every_problem_with_lines() {
        let f = format!(
            "{HEADER}ch_1,o1,10.50,EUR,succeeded,60,2026-11-25T14:20:01Z\nch_2,o2,100,XXX,succeeded,1,2026-11-25T14:20:01Z\nch_1,o3,100,EUR,succeeded,1,2026-11-25T14:20:01Z\n"
        );
        let e = parse(f.as_bytes(), None).unwrap_err();
        let lines: Vec<u64> = e.problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, [2, 3, 4], "{e}");
        assert!(e.to_string().contains("also on line 2"), "{e}");
    }

    #[test]
    fn repeated_orders_and_unbounded_amounts_are_rejected_identical_copies_kept_once() {
        let f = format!(
            "{HEADER}bt_1,o1;o2;o1,100,EUR,succeeded,1,2026-11-25T14:20:01Z\nch_2,o2,1000000000000001,EUR,succeeded,1,2026-11-25T14:20:01Z\nch_3,o3,100,EUR,succeeded,1000000000000001,2026-11-25T14:20:01Z\nre_4,o4,-1000000000000001,EUR,refunded,0,2026-11-25T14:20:01Z\n"
        );
        let e = parse(f.as_bytes(), None).unwrap_err();
        let lines: Vec<u64> = e.problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, [2, 3, 4, 5], "{e}");
        assert!(e.to_string().contains("\"o1\" is listed twice"), "{e}");
        assert!(e.to_string().contains("above the bound"), "{e}");
        // Exactly at the bound is fine.
        let f = format!(
            "{HEADER}ch_2,o2,1000000000000000,EUR,succeeded,1000000000000000,2026-11-25T14:20:01Z\n"
        );
        assert!(parse(f.as_bytes(), None).is_ok());
        // An identical copy is kept aside; a conflicting one rejects.
        let row = "ch_1,o1,100,EUR,succeeded,1,2026-11-25T14:20:01Z\n";
        let f = format!("{HEADER}{row}{row}");
        let s = parse(f.as_bytes(), None).unwrap();
        assert_eq!(s.rows.len(), 1);
        assert_eq!(s.duplicates.len(), 1);
        assert_eq!((s.duplicates[0].0.line, s.duplicates[0].1), (3, 2));
        let f = format!("{HEADER}{row}ch_1,o1,101,EUR,succeeded,1,2026-11-25T14:20:01Z\n");
        let e = parse(f.as_bytes(), None).unwrap_err();
        assert!(
            e.to_string().contains("different fields: also on line 2"),
            "{e}"
        );
    }

    #[test]
    fn progress_hands_over_every_row_once_in_order() {
        let n = PROGRESS_ROWS * 2 + 7;
        let mut f = String::from(HEADER);
        for i in 0..n {
            f.push_str(&format!(
                "ch_{i},o{i},100,EUR,succeeded,1,2026-11-25T14:20:01Z\n"
            ));
            if i == PROGRESS_ROWS {
                // An identical copy is not a row of its own.
                f.push_str(&format!(
                    "ch_{i},o{i},100,EUR,succeeded,1,2026-11-25T14:20:01Z\n"
                ));
            }
        }
        for date in [None, Some(parse_date("2026-11-25").unwrap())] {
            let mut seen: Vec<SettlementRow> = Vec::new();
            let mut calls = Vec::new();
            let s = parse_with(f.as_bytes(), date, |p| {
                assert_eq!(p.date, Some(parse_date("2026-11-25").unwrap()));
                assert_eq!(p.sha256, sha256_hex(f.as_bytes()));
                calls.push(p.rows.len());
                seen.extend_from_slice(p.rows);
            })
            .unwrap();
            assert_eq!(seen, s.rows);
            assert_eq!(s.rows.len(), n);
            assert_eq!(s.duplicates.len(), 1);
            // The day first (with the first row when it is read from the
            // rows), then full chunks, then the rest.
            let first = if date.is_some() { 0 } else { 1 };
            assert_eq!(calls[0], first, "{calls:?}");
            assert!(
                calls[1..calls.len() - 1]
                    .iter()
                    .all(|&c| c == PROGRESS_ROWS),
                "{calls:?}"
            );
            let s2 = parse(f.as_bytes(), date).unwrap();
            assert_eq!((s2.rows, s2.sha256, s2.date), (s.rows, s.sha256, s.date));
        }
        // A bad row after a chunk was handed over still rejects the file.
        let bad = format!("{f}ch_x,ox,1.5,EUR,succeeded,1,2026-11-25T14:20:01Z\n");
        let mut handed = 0;
        let e = parse_with(bad.as_bytes(), None, |p| handed += p.rows.len()).unwrap_err();
        assert_eq!(handed, n);
        assert!(e.to_string().contains("not an integer"), "{e}");
    }

    #[test]
    fn bad_bytes_give_their_line() {
        let mut f = HEADER.as_bytes().to_vec();
        f.extend_from_slice(b"ch_1,o1,100,EUR,succeeded,1,2026-11-25T14:20:01Z\nch_\xff2,o2");
        let e = parse(&f, None).unwrap_err();
        assert_eq!(e.problems[0].line, 3, "{e}");
        assert!(e.to_string().contains("not UTF-8"));
    }
}
