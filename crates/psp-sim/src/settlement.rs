//! Daily settlement files, optionally with injected discrepancies for
//! reconciliation tests. Injection is deterministic for a given seed and
//! set of rows, and reported exactly, so a test can check that a
//! reconciler found each discrepancy.

use crate::limits::SETTLEMENT_INJECT_PER_KIND_MAX;
use crate::store::{SettlementRow, rfc3339};
use serde::{Deserialize, Serialize};

/// `missing:2,extra:1,wrong_amount:1,wrong_fee:1`
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InjectionSpec {
    pub missing: usize,
    pub extra: usize,
    pub wrong_amount: usize,
    pub wrong_fee: usize,
}

impl InjectionSpec {
    pub fn parse(s: &str) -> Result<InjectionSpec, String> {
        let mut spec = InjectionSpec::default();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (kind, n) = part
                .split_once(':')
                .ok_or_else(|| format!("expected kind:count, got {part:?}"))?;
            let n: usize = n
                .parse()
                .ok()
                .filter(|n| *n <= SETTLEMENT_INJECT_PER_KIND_MAX)
                .ok_or_else(|| {
                    format!("count of {kind} must be 0..={SETTLEMENT_INJECT_PER_KIND_MAX}")
                })?;
            match kind {
                "missing" => spec.missing = n,
                "extra" => spec.extra = n,
                "wrong_amount" => spec.wrong_amount = n,
                "wrong_fee" => spec.wrong_fee = n,
                other => {
                    return Err(format!(
                        "unknown discrepancy {other:?} (missing, extra, wrong_amount, wrong_fee)"
                    ));
                }
            }
        }
        Ok(spec)
    }
}

/// A row left out of, or added to, the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InjectedRow {
    pub psp_reference: String,
    pub order_id: String,
    pub amount_minor: i64,
}

/// A row whose amount or fee in the file differs from the truth.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrongValue {
    pub psp_reference: String,
    pub order_id: String,
    pub true_minor: i64,
    pub reported_minor: i64,
}

/// Exactly what was injected (fewer than asked when the day has too few
/// rows: every kind but `extra` picks distinct genuine rows).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Injected {
    pub missing: Vec<InjectedRow>,
    pub extra: Vec<InjectedRow>,
    pub wrong_amount: Vec<WrongValue>,
    pub wrong_fee: Vec<WrongValue>,
}

#[derive(Debug)]
pub(crate) struct Report {
    pub rows: Vec<SettlementRow>,
    pub injected: Injected,
}

/// SplitMix64: tiny, deterministic, good enough to pick rows.
#[derive(Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform-enough in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "empty range");
        self.next() % n
    }

    fn index_below(&mut self, n: usize) -> usize {
        let n64 = u64::try_from(n).expect("usize fits u64");
        usize::try_from(self.below(n64)).expect("below n, which is a usize")
    }

    fn small(&mut self, n: u64) -> i64 {
        i64::try_from(self.below(n)).expect("small range")
    }
}

const DAY_MS: u64 = 24 * 3600 * 1000;

pub(crate) fn build(
    mut rows: Vec<SettlementRow>,
    spec: &InjectionSpec,
    seed: u64,
    day_start_ms: i64,
) -> Report {
    let mut rng = SplitMix64(seed);
    let mut injected = Injected::default();
    // A seeded shuffle of the genuine rows; each kind takes the next ones,
    // so no row carries two discrepancies.
    let mut order: Vec<usize> = (0..rows.len()).collect();
    for i in (1..order.len()).rev() {
        let j = rng.index_below(i + 1);
        order.swap(i, j);
    }
    let mut picks = order.into_iter();
    let missing: Vec<usize> = picks.by_ref().take(spec.missing).collect();
    for i in picks.by_ref().take(spec.wrong_amount).collect::<Vec<_>>() {
        let r = &mut rows[i];
        let delta = 1 + rng.small(100);
        let reported = if r.amount_minor < 0 {
            r.amount_minor.saturating_sub(delta)
        } else {
            r.amount_minor.saturating_add(delta)
        };
        injected.wrong_amount.push(WrongValue {
            psp_reference: r.psp_reference.clone(),
            order_id: r.order_id.clone(),
            true_minor: r.amount_minor,
            reported_minor: reported,
        });
        r.amount_minor = reported;
    }
    for i in picks.by_ref().take(spec.wrong_fee).collect::<Vec<_>>() {
        let r = &mut rows[i];
        let reported = r.fee_minor.saturating_add(1 + rng.small(50));
        injected.wrong_fee.push(WrongValue {
            psp_reference: r.psp_reference.clone(),
            order_id: r.order_id.clone(),
            true_minor: r.fee_minor,
            reported_minor: reported,
        });
        r.fee_minor = reported;
    }
    for &i in &missing {
        let r = &rows[i];
        injected.missing.push(InjectedRow {
            psp_reference: r.psp_reference.clone(),
            order_id: r.order_id.clone(),
            amount_minor: r.amount_minor,
        });
    }
    let mut kept: Vec<SettlementRow> = rows
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !missing.contains(i))
        .map(|(_, r)| r)
        .collect();
    let currency = kept
        .first()
        .map_or_else(|| "EUR".to_owned(), |r| r.currency.clone());
    for _ in 0..spec.extra {
        let row = SettlementRow {
            psp_reference: format!("ch_x{:016x}", rng.next()),
            order_id: format!("ord_unknown_{:08x}", rng.below(1 << 32)),
            amount_minor: 100 + rng.small(100_000),
            currency: currency.clone(),
            status: "succeeded".into(),
            fee_minor: 30 + rng.small(300),
            settled_at_ms: day_start_ms + rng.small(DAY_MS),
        };
        injected.extra.push(InjectedRow {
            psp_reference: row.psp_reference.clone(),
            order_id: row.order_id.clone(),
            amount_minor: row.amount_minor,
        });
        kept.push(row);
    }
    kept.sort_by(|a, b| {
        (a.settled_at_ms, &a.psp_reference).cmp(&(b.settled_at_ms, &b.psp_reference))
    });
    Report {
        rows: kept,
        injected,
    }
}

pub(crate) const CSV_HEADER: [&str; 7] = [
    "psp_reference",
    "order_id",
    "amount_minor",
    "currency",
    "status",
    "fee_minor",
    "settled_at",
];

pub(crate) fn render_csv(rows: &[SettlementRow]) -> Result<String, csv::Error> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(CSV_HEADER)?;
    for r in rows {
        w.write_record([
            r.psp_reference.as_str(),
            r.order_id.as_str(),
            &r.amount_minor.to_string(),
            r.currency.as_str(),
            r.status.as_str(),
            &r.fee_minor.to_string(),
            &rfc3339(r.settled_at_ms),
        ])?;
    }
    let bytes = w.into_inner().map_err(|e| e.into_error())?;
    Ok(String::from_utf8(bytes).expect("CSV of UTF-8 fields is UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(i: i64) -> SettlementRow {
        SettlementRow {
            psp_reference: format!("ch_{i}"),
            order_id: format!("ord_{i}"),
            amount_minor: 1000 + i,
            currency: "EUR".into(),
            status: "succeeded".into(),
            fee_minor: 59,
            settled_at_ms: i,
        }
    }

    #[test]
    fn injection_is_deterministic_and_disjoint() {
        let rows: Vec<_> = (0..10).map(row).collect();
        let spec = InjectionSpec::parse("missing:2,extra:1,wrong_amount:1,wrong_fee:1").unwrap();
        let a = build(rows.clone(), &spec, 42, 0);
        let b = build(rows.clone(), &spec, 42, 0);
        assert_eq!(a.injected, b.injected);
        assert_eq!(a.rows.len(), 10 - 2 + 1);
        let mut touched: Vec<&str> = a
            .injected
            .missing
            .iter()
            .map(|m| m.psp_reference.as_str())
            .chain(
                a.injected
                    .wrong_amount
                    .iter()
                    .map(|w| w.psp_reference.as_str()),
            )
            .chain(
                a.injected
                    .wrong_fee
                    .iter()
                    .map(|w| w.psp_reference.as_str()),
            )
            .collect();
        touched.sort_unstable();
        touched.dedup();
        assert_eq!(touched.len(), 4);
        let c = build(rows, &spec, 43, 0);
        assert_ne!(a.injected, c.injected);
    }

    #[test]
    fn asks_beyond_the_rows_inject_what_exists() {
        let spec = InjectionSpec::parse("missing:5,wrong_fee:5").unwrap();
        let r = build(vec![row(1), row(2)], &spec, 1, 0);
        assert_eq!(r.injected.missing.len(), 2);
        assert!(r.injected.wrong_fee.is_empty());
        assert!(r.rows.is_empty());
    }

    #[test]
    fn rejects_unknown_kinds() {
        assert!(InjectionSpec::parse("dup:1").is_err());
        assert!(InjectionSpec::parse("missing:x").is_err());
    }
}
