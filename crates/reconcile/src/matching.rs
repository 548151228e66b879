//! Matching settlement rows against the ledger's PSP references: pure, no
//! I/O. See the crate README for the rules.

use crate::settlement::{RowStatus, SettlementRow};
use events::{Currency, DiscrepancyClass, Money};
use std::collections::{HashMap, HashSet};

/// What the ledger knows about one PSP reference (`ledger_psp_references`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerRef {
    pub psp_reference: String,
    /// `charge` or `refund`.
    pub kind: String,
    pub order_id: String,
    /// `pending`, `succeeded`, `failed` or `refunded`.
    pub status: String,
    pub currency: Currency,
    /// Refunds negative, as in the settlement file.
    pub amount_minor: i64,
    pub fee_minor: i64,
    /// µs since the epoch.
    pub occurred_at: i64,
}

/// One difference found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub class: DiscrepancyClass,
    /// The PSP's reference (the file's), or ours for `missing_at_psp`.
    pub psp_reference: String,
    /// Our order id(s) as text (several for a PSP batch row).
    pub order_ids: Vec<String>,
    pub ours: Option<Money>,
    pub theirs: Option<Money>,
    pub detail: String,
    /// Line of the settlement row, if the difference has one.
    pub line: Option<u64>,
    /// The PSP's fee of the row (kept with a `status_mismatch` so a later
    /// run can tell whether the ledger caught up with the same fee).
    pub psp_fee_minor: Option<i64>,
}

/// The outcome of matching one file.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub findings: Vec<Finding>,
    /// Rows matched with no difference at all.
    pub matched: u64,
    /// PSP batch rows matched through our order ids.
    pub matched_by_order: u64,
    /// Ledger references this file matched (to a row with or without
    /// differences): `(our reference, the row's reference)`. Recorded so no
    /// later run of another day matches them again.
    pub claimed: Vec<(String, String)>,
}

/// Options of a run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tolerance {
    /// Fee differences up to this many minor units (absolute) are not
    /// reported.
    pub fee_minor: i64,
}

fn expected(status: RowStatus) -> (&'static str, &'static str) {
    match status {
        RowStatus::Succeeded => ("charge", "succeeded"),
        RowStatus::Refunded => ("refund", "refunded"),
    }
}

fn sum(mut it: impl Iterator<Item = i64>) -> Option<i64> {
    it.try_fold(0i64, |acc, x| acc.checked_add(x))
}

/// Compares one row with the ledger reference(s) it matched; pushes the
/// differences. Returns whether there were none.
fn compare(
    row: &SettlementRow,
    ours: &[&LedgerRef],
    tol: Tolerance,
    via: Option<&str>,
    out: &mut Vec<Finding>,
) -> bool {
    let before = out.len();
    // Built only when there is a difference: most rows match, and a file
    // has a million of them.
    let order_ids = || ours.iter().map(|r| r.order_id.clone()).collect();
    let note = via.map(|v| format!(" ({v})")).unwrap_or_default();
    let theirs = Money::new(row.amount_minor, row.currency);
    let push = |out: &mut Vec<Finding>, class, ours, theirs, detail: String| {
        out.push(Finding {
            class,
            psp_reference: row.psp_reference.clone(),
            order_ids: order_ids(),
            ours,
            theirs,
            detail,
            line: Some(row.line),
            psp_fee_minor: Some(row.fee_minor),
        });
    };
    let Some(our_amount) = sum(ours.iter().map(|r| r.amount_minor)) else {
        push(
            out,
            DiscrepancyClass::AmountMismatch,
            None,
            Some(theirs),
            format!("our amounts overflow{note}"),
        );
        return false;
    };
    let our_currency = ours[0].currency;
    if ours.iter().any(|r| r.currency != row.currency) {
        push(
            out,
            DiscrepancyClass::CurrencyMismatch,
            Some(Money::new(our_amount, our_currency)),
            Some(theirs),
            format!(
                "we booked {} {}, the PSP settled {} {}{note}",
                our_amount, our_currency, row.amount_minor, row.currency
            ),
        );
        return false;
    }
    let (kind, status) = expected(row.status);
    let wrong: Vec<&&LedgerRef> = ours
        .iter()
        .filter(|r| r.kind != kind || r.status != status)
        .collect();
    if !wrong.is_empty() {
        let ours_says: Vec<String> = wrong
            .iter()
            .map(|r| format!("{} {} {}", r.psp_reference, r.kind, r.status))
            .collect();
        push(
            out,
            DiscrepancyClass::StatusMismatch,
            Some(Money::new(our_amount, our_currency)),
            Some(theirs),
            format!(
                "we have {}, the PSP says {} {}{note}",
                ours_says.join("; "),
                kind,
                row.status.as_str()
            ),
        );
    }
    if our_amount != row.amount_minor {
        push(
            out,
            DiscrepancyClass::AmountMismatch,
            Some(Money::new(our_amount, our_currency)),
            Some(theirs),
            format!(
                "amount differs by {} {}{note}",
                i128::from(row.amount_minor) - i128::from(our_amount),
                row.currency
            ),
        );
    }
    // A fee is only known once the charge succeeded.
    if wrong.is_empty()
        && let Some(our_fee) = sum(ours.iter().map(|r| r.fee_minor))
    {
        let diff = i128::from(row.fee_minor) - i128::from(our_fee);
        if diff.abs() > i128::from(tol.fee_minor) {
            push(
                out,
                DiscrepancyClass::FeeMismatch,
                Some(Money::new(our_fee, our_currency)),
                Some(Money::new(row.fee_minor, row.currency)),
                format!(
                    "fee differs by {diff} {} (tolerance {}){note}",
                    row.currency, tol.fee_minor
                ),
            );
        }
    }
    out.len() == before
}

/// Matches `rows` against the ledger.
/// - `by_ref`: the ledger references by reference, at least those among
///   the rows' references (others are never looked at);
/// - `by_order`: the ledger's references (charges and refunds) of the order
///   ids of rows whose reference the ledger does not know;
/// - `day`: the ledger's references that occurred on the settlement day;
/// - `earlier`: ledger references already matched by a run of another
///   settlement day -> that day. They are never matched again (a second
///   settlement of one reference is `missing_in_ledger`) and never
///   `missing_at_psp`.
///
/// Only a PSP batch row (several order ids) is matched through order ids,
/// and only to references of the row's kind (a refund row to refunds) that
/// no row has matched yet. A single-order row with an unknown reference is
/// `missing_in_ledger`: the ledger did not book that charge, whatever else
/// the order has (its known references are named in the detail).
pub fn match_rows(
    rows: &[SettlementRow],
    by_ref: &HashMap<&str, &LedgerRef>,
    by_order: &HashMap<String, Vec<LedgerRef>>,
    day: &[LedgerRef],
    earlier: &HashMap<String, String>,
    tol: Tolerance,
) -> Outcome {
    let mut out = Outcome::default();
    let mut claimed: HashSet<&str> = HashSet::new();
    let mut unknown: Vec<&SettlementRow> = Vec::new();
    let missing = |row: &SettlementRow, detail: String| Finding {
        class: DiscrepancyClass::MissingInLedger,
        psp_reference: row.psp_reference.clone(),
        order_ids: row.order_ids.clone(),
        ours: None,
        theirs: Some(Money::new(row.amount_minor, row.currency)),
        detail,
        line: Some(row.line),
        psp_fee_minor: Some(row.fee_minor),
    };
    // 1. By reference.
    for row in rows {
        match by_ref.get(row.psp_reference.as_str()).copied() {
            Some(r) => {
                if let Some(d) = earlier.get(&r.psp_reference) {
                    out.findings.push(missing(
                        row,
                        format!(
                            "the PSP settled reference {} again: the settlement file of {d} already matched it to our {} {}; the ledger booked it once",
                            row.psp_reference, r.kind, r.status
                        ),
                    ));
                    continue;
                }
                if !claimed.insert(r.psp_reference.as_str()) {
                    continue; // the parser rejects duplicate references
                }
                out.claimed
                    .push((r.psp_reference.clone(), row.psp_reference.clone()));
                if compare(row, &[r], tol, None, &mut out.findings) {
                    out.matched += 1;
                }
            }
            None => unknown.push(row),
        }
    }
    // 2. Unknown references: only PSP batch rows go by our order ids.
    for row in unknown {
        let (kind, _) = expected(row.status);
        if row.order_ids.len() == 1 {
            let o = &row.order_ids[0];
            let known: Vec<String> = by_order
                .get(o)
                .map(|cs| {
                    cs.iter()
                        .filter(|c| c.kind == kind)
                        .map(|c| format!("{} ({})", c.psp_reference, c.status))
                        .collect()
                })
                .unwrap_or_default();
            let detail = if known.is_empty() {
                format!(
                    "the PSP settled {} {} {} for order {o} that our ledger does not know",
                    row.status.as_str(),
                    row.amount_minor,
                    row.currency,
                )
            } else {
                format!(
                    "the PSP settled {} {} {} for order {o} under reference {}, which our ledger never booked; the order's {kind} in our ledger: {} (a second {kind}?)",
                    row.status.as_str(),
                    row.amount_minor,
                    row.currency,
                    row.psp_reference,
                    known.join(", ")
                )
            };
            out.findings.push(missing(row, detail));
            continue;
        }
        let mut group: Vec<&LedgerRef> = Vec::new();
        let mut absent: Vec<&str> = Vec::new();
        for o in &row.order_ids {
            let candidate = by_order.get(o).and_then(|cs| {
                cs.iter()
                    .filter(|c| {
                        c.kind == kind
                            && !claimed.contains(c.psp_reference.as_str())
                            && !earlier.contains_key(&c.psp_reference)
                    })
                    .min_by_key(|c| (c.status != expected(row.status).1, c.occurred_at))
            });
            match candidate {
                Some(c) => group.push(c),
                None => absent.push(o),
            }
        }
        if group.is_empty() || !absent.is_empty() {
            out.findings.push(missing(
                row,
                format!(
                    "PSP batch row of {} orders; without an unmatched {kind} in our ledger: {}",
                    row.order_ids.len(),
                    absent.join(", ")
                ),
            ));
            continue;
        }
        for c in &group {
            claimed.insert(c.psp_reference.as_str());
            out.claimed
                .push((c.psp_reference.clone(), row.psp_reference.clone()));
        }
        let refs: Vec<&str> = group.iter().map(|c| c.psp_reference.as_str()).collect();
        let via = format!("PSP batch of our references {}", refs.join(", "));
        out.matched_by_order += 1;
        if compare(row, &group, tol, Some(&via), &mut out.findings) {
            out.matched += 1;
        }
    }
    // 3. Ours on the day, final, and in no row of this file or an earlier
    //    day's.
    for r in day {
        let final_ = matches!(
            (r.kind.as_str(), r.status.as_str()),
            ("charge", "succeeded") | ("refund", "refunded")
        );
        if final_
            && !claimed.contains(r.psp_reference.as_str())
            && !earlier.contains_key(&r.psp_reference)
        {
            out.findings.push(Finding {
                class: DiscrepancyClass::MissingAtPsp,
                psp_reference: r.psp_reference.clone(),
                order_ids: vec![r.order_id.clone()],
                ours: Some(Money::new(r.amount_minor, r.currency)),
                theirs: None,
                detail: format!(
                    "our {} {} of {} {} is not in the PSP's file",
                    r.status, r.kind, r.amount_minor, r.currency
                ),
                line: None,
                psp_fee_minor: None,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(line: u64, r: &str, orders: &[&str], amount: i64, fee: i64) -> SettlementRow {
        SettlementRow {
            line,
            psp_reference: r.into(),
            order_ids: orders.iter().map(|s| (*s).to_owned()).collect(),
            amount_minor: amount,
            currency: Currency::EUR,
            status: if amount < 0 {
                RowStatus::Refunded
            } else {
                RowStatus::Succeeded
            },
            fee_minor: fee,
            settled_at_ms: 0,
        }
    }

    fn ours(r: &str, order: &str, status: &str, amount: i64, fee: i64) -> LedgerRef {
        LedgerRef {
            psp_reference: r.into(),
            kind: if amount < 0 { "refund" } else { "charge" }.into(),
            order_id: order.into(),
            status: status.into(),
            currency: Currency::EUR,
            amount_minor: amount,
            fee_minor: fee,
            occurred_at: 0,
        }
    }

    #[test]
    fn classifies_and_handles_batches() {
        let ledger = [
            ours("ch_1", "o1", "succeeded", 1000, 59),
            ours("ch_2", "o2", "succeeded", 2000, 88),
            ours("ch_3", "o3", "pending", 500, 0),
            ours("ch_4", "o4", "succeeded", 100, 33),
            ours("ch_5", "o5", "succeeded", 300, 39),
            ours("ch_6", "o6", "succeeded", 700, 50),
        ];
        let rows = [
            row(2, "ch_1", &["o1"], 1000, 59),
            row(3, "ch_2", &["o2"], 2001, 90),
            row(4, "ch_3", &["o3"], 500, 45),
            row(5, "bt_1", &["o4", "o5"], 400, 72),
            row(6, "ch_x", &["o_unknown"], 10, 1),
        ];
        let by_ref: HashMap<_, _> = ledger
            .iter()
            .filter(|l| rows.iter().any(|r| r.psp_reference == l.psp_reference))
            .map(|l| (l.psp_reference.as_str(), l))
            .collect();
        let by_order: HashMap<_, _> = ledger
            .iter()
            .map(|l| (l.order_id.clone(), vec![l.clone()]))
            .collect();
        let o = match_rows(
            &rows,
            &by_ref,
            &by_order,
            &ledger,
            &HashMap::new(),
            Tolerance { fee_minor: 1 },
        );
        let got: Vec<(DiscrepancyClass, &str)> = o
            .findings
            .iter()
            .map(|f| (f.class, f.psp_reference.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (DiscrepancyClass::AmountMismatch, "ch_2"),
                (DiscrepancyClass::FeeMismatch, "ch_2"),
                (DiscrepancyClass::StatusMismatch, "ch_3"),
                (DiscrepancyClass::MissingInLedger, "ch_x"),
                (DiscrepancyClass::MissingAtPsp, "ch_6"),
            ]
        );
        assert_eq!(o.matched, 2, "ch_1 and the batch bt_1");
        assert_eq!(o.matched_by_order, 1);
    }

    fn by_order(ledger: &[LedgerRef]) -> HashMap<String, Vec<LedgerRef>> {
        let mut m: HashMap<String, Vec<LedgerRef>> = HashMap::new();
        for l in ledger {
            m.entry(l.order_id.clone()).or_default().push(l.clone());
        }
        m
    }

    #[test]
    fn a_second_charge_or_refund_is_never_matched_by_order_id() {
        // o1 was charged once (ch_1, settled on an earlier day); the PSP
        // settles a second charge ch_9 for o1 and a refund re_9 of o2 we
        // never booked.
        let ledger = [
            ours("ch_1", "o1", "succeeded", 1000, 59),
            ours("ch_2", "o2", "succeeded", 2000, 88),
        ];
        let rows = [
            row(2, "ch_9", &["o1"], 1000, 59),
            row(3, "re_9", &["o2"], -500, 0),
            row(4, "bt_9", &["o1", "o2"], 3000, 147),
        ];
        let earlier: HashMap<String, String> =
            [("ch_1".to_owned(), "2026-11-24".to_owned())].into();
        let o = match_rows(
            &rows,
            &HashMap::new(),
            &by_order(&ledger),
            &[],
            &earlier,
            Tolerance::default(),
        );
        let got: Vec<(DiscrepancyClass, &str)> = o
            .findings
            .iter()
            .map(|f| (f.class, f.psp_reference.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (DiscrepancyClass::MissingInLedger, "ch_9"),
                (DiscrepancyClass::MissingInLedger, "re_9"),
                (DiscrepancyClass::MissingInLedger, "bt_9"),
            ]
        );
        assert!(
            o.findings[0].detail.contains("ch_1 (succeeded)"),
            "{:?}",
            o.findings[0]
        );
        assert!(o.findings[2].detail.contains("o1"), "{:?}", o.findings[2]);
        assert_eq!((o.matched, o.matched_by_order), (0, 0));
        assert!(o.claimed.is_empty());
        // The same reference settled again on a later day.
        let by_ref: HashMap<_, _> = [("ch_1", &ledger[0])].into();
        let o = match_rows(
            &[row(2, "ch_1", &["o1"], 1000, 59)],
            &by_ref,
            &HashMap::new(),
            &[],
            &earlier,
            Tolerance::default(),
        );
        assert_eq!(o.findings.len(), 1);
        assert_eq!(o.findings[0].class, DiscrepancyClass::MissingInLedger);
        assert!(o.findings[0].detail.contains("again"));
    }

    #[test]
    fn refs_matched_on_an_earlier_day_are_not_missing_at_psp() {
        let ledger = [
            ours("ch_1", "o1", "succeeded", 1000, 59),
            ours("ch_2", "o2", "succeeded", 2000, 88),
        ];
        let earlier: HashMap<String, String> =
            [("ch_1".to_owned(), "2026-11-24".to_owned())].into();
        let o = match_rows(
            &[],
            &HashMap::new(),
            &HashMap::new(),
            &ledger,
            &earlier,
            Tolerance::default(),
        );
        let got: Vec<&str> = o
            .findings
            .iter()
            .map(|f| f.psp_reference.as_str())
            .collect();
        assert_eq!(got, ["ch_2"]);
    }
}
