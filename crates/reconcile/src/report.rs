//! The report of a run: JSON for machines, a table for people.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Money in a report: integer minor units and a currency code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoneyView {
    pub amount_minor: i64,
    pub currency: String,
}

impl From<events::Money> for MoneyView {
    fn from(m: events::Money) -> MoneyView {
        MoneyView {
            amount_minor: m.amount_minor(),
            currency: m.currency().code().to_owned(),
        }
    }
}

/// Money stored as `(currency, amount_minor)`, for a report.
pub(crate) fn view_money(m: &Option<(String, i64)>) -> Option<MoneyView> {
    m.as_ref().map(|(c, a)| MoneyView {
        amount_minor: *a,
        currency: c.clone(),
    })
}

/// One difference as reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscrepancyView {
    pub discrepancy_id: String,
    pub class: String,
    pub psp_reference: String,
    /// Our order id(s), `;`-separated for a PSP batch row.
    pub order_ids: String,
    pub ours: Option<MoneyView>,
    pub theirs: Option<MoneyView>,
    pub detail: String,
    /// Line of the settlement row, if any.
    pub line: Option<i64>,
    /// `open`, `resolved`, `expected` or `escalated` (as of printing).
    pub state: String,
    /// The run that first found it (an earlier run of the same day, for a
    /// difference already known).
    pub first_found_by: String,
}

/// Totals of the file per currency.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurrencyTotals {
    pub rows: i64,
    pub amount_minor: i64,
    pub fee_minor: i64,
}

/// Differences of one class in one currency.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassTotals {
    pub count: i64,
    /// Sum of our amounts (of the discrepancies that have one).
    pub ours_minor: i64,
    /// Sum of the PSP's amounts (of the discrepancies that have one).
    pub theirs_minor: i64,
}

/// The report of one reconciliation run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub run_id: String,
    pub settlement_date: String,
    pub source: String,
    pub file_sha256: String,
    /// Data rows in the file.
    pub rows: i64,
    /// Rows matched without any difference.
    pub matched: i64,
    /// Rows matched through our order id(s) (PSP batch rows), with or
    /// without differences.
    pub matched_by_order: i64,
    /// Every difference this run found (including ones an earlier run of
    /// the same day had found already: see `first_found_by`).
    pub discrepancies: Vec<DiscrepancyView>,
    /// Of those, how many this run found first.
    pub new_discrepancies: i64,
    /// Differences per class.
    pub per_class: BTreeMap<String, i64>,
    /// Differences per class and currency: class -> currency -> totals.
    pub per_class_currency: BTreeMap<String, BTreeMap<String, ClassTotals>>,
    /// The file's totals per currency.
    pub per_currency: BTreeMap<String, CurrencyTotals>,
    /// True when this run had been recorded before (same file, same day):
    /// nothing new was written or published.
    #[serde(default)]
    pub already_recorded: bool,
    /// Unresolved (open or escalated) discrepancies of the settlement day
    /// as of printing, all runs.
    #[serde(default)]
    pub unresolved: i64,
    /// Discrepancies an earlier run of the day had found, still open, whose
    /// figures this file changed (a corrected file): the stored figures
    /// were updated (resolved ones stay as they were).
    #[serde(default)]
    pub updated_discrepancies: Vec<String>,
    /// Open status mismatches (any day) this call closed because the
    /// ledger caught up.
    #[serde(default)]
    pub auto_resolved: Vec<String>,
}

/// A report whose amounts per class and currency do not fit in i64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("report totals overflow")]
pub struct TotalsOverflow;

impl Report {
    /// Fills `per_class` and `per_class_currency` from `discrepancies`.
    pub fn tally(&mut self) -> Result<(), TotalsOverflow> {
        self.per_class.clear();
        self.per_class_currency.clear();
        let overflow = || TotalsOverflow;
        for d in &self.discrepancies {
            *self.per_class.entry(d.class.clone()).or_default() += 1;
            // Counted under the PSP's currency (ours without theirs); each
            // amount is summed under its own currency (a currency_mismatch
            // has two).
            let currency = d
                .theirs
                .as_ref()
                .or(d.ours.as_ref())
                .map_or_else(|| "-".to_owned(), |m| m.currency.clone());
            let per = self.per_class_currency.entry(d.class.clone()).or_default();
            per.entry(currency).or_default().count += 1;
            if let Some(o) = &d.ours {
                let t = per.entry(o.currency.clone()).or_default();
                t.ours_minor = t
                    .ours_minor
                    .checked_add(o.amount_minor)
                    .ok_or_else(overflow)?;
            }
            if let Some(o) = &d.theirs {
                let t = per.entry(o.currency.clone()).or_default();
                t.theirs_minor = t
                    .theirs_minor
                    .checked_add(o.amount_minor)
                    .ok_or_else(overflow)?;
            }
        }
        Ok(())
    }

    /// A readable table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "reconciliation run {} — settlement day {} — {}",
            self.run_id, self.settlement_date, self.source
        );
        let _ = writeln!(s, "file sha256 {}", self.file_sha256);
        if self.already_recorded {
            let _ = writeln!(
                s,
                "(this file was reconciled before: same run, nothing new recorded or published)"
            );
        }
        let _ = writeln!(
            s,
            "rows {}   matched {}   (by order id / PSP batch: {})   discrepancies {} ({} new)   unresolved for the day {}",
            self.rows,
            self.matched,
            self.matched_by_order,
            self.discrepancies.len(),
            self.new_discrepancies,
            self.unresolved
        );
        if !self.updated_discrepancies.is_empty() {
            let _ = writeln!(
                s,
                "figures updated from this file (open discrepancies found by an earlier run of the day): {}",
                self.updated_discrepancies.join(", ")
            );
        }
        if !self.auto_resolved.is_empty() {
            let _ = writeln!(
                s,
                "status mismatches closed, the ledger caught up: {}",
                self.auto_resolved.join(", ")
            );
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:<10} {:>10} {:>20} {:>16}",
            "currency", "rows", "amount_minor", "fee_minor"
        );
        for (c, t) in &self.per_currency {
            let _ = writeln!(
                s,
                "{c:<10} {:>10} {:>20} {:>16}",
                t.rows, t.amount_minor, t.fee_minor
            );
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:<18} {:<8} {:>7} {:>18} {:>18}",
            "class", "currency", "count", "ours_minor", "theirs_minor"
        );
        for class in events::DiscrepancyClass::ALL {
            let name = class.as_str();
            match self.per_class_currency.get(name) {
                None => {
                    let _ = writeln!(s, "{name:<18} {:<8} {:>7}", "", 0);
                }
                Some(per) => {
                    for (c, t) in per {
                        let _ = writeln!(
                            s,
                            "{name:<18} {c:<8} {:>7} {:>18} {:>18}",
                            t.count, t.ours_minor, t.theirs_minor
                        );
                    }
                }
            }
        }
        if !self.discrepancies.is_empty() {
            let _ = writeln!(s);
            let _ = writeln!(
                s,
                "{:<36} {:<18} {:<10} {:<24} {:>14} {:>14}  detail",
                "discrepancy_id", "class", "state", "psp_reference", "ours", "theirs"
            );
            let m = |m: &Option<MoneyView>| {
                m.as_ref().map_or_else(
                    || "-".to_owned(),
                    |m| format!("{} {}", m.amount_minor, m.currency),
                )
            };
            for d in &self.discrepancies {
                let line = d.line.map(|l| format!(" [line {l}]")).unwrap_or_default();
                let _ = writeln!(
                    s,
                    "{:<36} {:<18} {:<10} {:<24} {:>14} {:>14}  {}{line}",
                    d.discrepancy_id,
                    d.class,
                    d.state,
                    d.psp_reference,
                    m(&d.ours),
                    m(&d.theirs),
                    d.detail
                );
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_currency_mismatch_sums_each_side_under_its_own_currency() {
        let m = |a: i64, c: &str| {
            Some(MoneyView {
                amount_minor: a,
                currency: c.into(),
            })
        };
        let mut r = Report {
            run_id: "r".into(),
            settlement_date: "2026-11-25".into(),
            source: "s".into(),
            file_sha256: "x".into(),
            rows: 1,
            matched: 0,
            matched_by_order: 0,
            discrepancies: vec![DiscrepancyView {
                discrepancy_id: "d".into(),
                class: "currency_mismatch".into(),
                psp_reference: "ch_1".into(),
                order_ids: "o1".into(),
                ours: m(1_000, "EUR"),
                theirs: m(1_100, "USD"),
                detail: String::new(),
                line: Some(2),
                state: "open".into(),
                first_found_by: "r".into(),
            }],
            new_discrepancies: 1,
            per_class: BTreeMap::new(),
            per_class_currency: BTreeMap::new(),
            per_currency: BTreeMap::new(),
            already_recorded: false,
            unresolved: 1,
            updated_discrepancies: Vec::new(),
            auto_resolved: Vec::new(),
        };
        r.tally().unwrap();
        let per = &r.per_class_currency["currency_mismatch"];
        assert_eq!(
            per["EUR"],
            ClassTotals {
                count: 0,
                ours_minor: 1_000,
                theirs_minor: 0
            }
        );
        assert_eq!(
            per["USD"],
            ClassTotals {
                count: 1,
                ours_minor: 0,
                theirs_minor: 1_100
            }
        );
    }
}
