//! `paystream reconcile resolve`: working off one discrepancy with an
//! action and a reason, recorded, then published.

use crate::envelope::{money_of, resolution_envelope};
use crate::ids::resolution_event_id;
use crate::report::{MoneyView, view_money};
use crate::{now_us, store};
use anyhow::{Context, bail};
use events::{DiscrepancyClass, ResolutionAction};
use storage::Db;
use streaming::EventProducer;
use uuid::Uuid;

/// What a resolution did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Resolved {
    pub discrepancy_id: String,
    pub class: String,
    pub action: String,
    pub state: String,
    /// Signed change of `psp_receivable` the ledger books (against
    /// `reconciliation_adjustments`), for accept_psp_amount.
    pub adjustment: Option<MoneyView>,
    pub event_id: String,
    /// True when this call only re-published a resolution recorded earlier
    /// whose event had not been appended.
    pub republished: bool,
}

/// Resolves a discrepancy: records the decision (conditionally: an open
/// discrepancy, or an escalated one getting a final action), then appends
/// `ReconciliationDiscrepancyResolved`. accept_psp_amount carries the
/// adjustment the ledger books: amount_mismatch theirs − ours, fee_mismatch
/// ours − theirs (a higher PSP fee lowers what the PSP owes us). Refused for
/// other classes, for a resolved discrepancy, and without a reason.
pub async fn resolve(
    db: &Db,
    producer: &EventProducer,
    id: &str,
    action: ResolutionAction,
    reason: &str,
    by: &str,
) -> anyhow::Result<Resolved> {
    let id = Uuid::parse_str(id.trim())
        .with_context(|| format!("discrepancy id {id:?} is not a UUID"))?
        .to_string();
    if reason.trim().is_empty() {
        bail!("a resolution needs a --reason (it is the audit trail)");
    }
    let d = store::load_discrepancy(db, &id)
        .await?
        .with_context(|| format!("no discrepancy {id}"))?;
    let done = |d: &store::DiscrepancyRow, republished| -> anyhow::Result<Resolved> {
        Ok(Resolved {
            discrepancy_id: d.discrepancy_id.clone(),
            class: d.class.clone(),
            action: d.action.clone().unwrap_or_default(),
            state: d.state.clone(),
            adjustment: view_money(&d.adjustment),
            event_id: d.resolution_event_id.clone().unwrap_or_default(),
            republished,
        })
    };
    let from: &[&str] = match d.state.as_str() {
        "open" => &["open"],
        "escalated" if action != ResolutionAction::Escalate => &["escalated"],
        _ => {
            if d.resolution_event_id.is_some() && !d.resolution_published {
                producer.append(&resolution_envelope(&d)?).await?;
                store::mark_resolution_published(db, &d.discrepancy_id).await?;
                return done(&d, true);
            }
            bail!(
                "discrepancy {id} is already {} ({} by {}: {}); it cannot be resolved twice",
                d.state,
                d.action.as_deref().unwrap_or("-"),
                d.resolved_by.as_deref().unwrap_or("-"),
                d.reason.as_deref().unwrap_or("-")
            );
        }
    };
    let class = DiscrepancyClass::parse(&d.class).context("stored class")?;
    let adjustment = match action {
        ResolutionAction::AcceptPspAmount => {
            let (Some(ours), Some(theirs)) = (money_of(&d.ours)?, money_of(&d.theirs)?) else {
                bail!(
                    "cannot accept the PSP's amount for a {} discrepancy: one side has no amount; use expect_late_settlement or escalate",
                    d.class
                );
            };
            if ours.currency() != theirs.currency() {
                bail!(
                    "cannot accept the PSP's amount across currencies ({} vs {}); escalate instead",
                    ours.currency(),
                    theirs.currency()
                );
            }
            let adj = match class {
                DiscrepancyClass::AmountMismatch => theirs.checked_sub(ours)?,
                DiscrepancyClass::FeeMismatch => ours.checked_sub(theirs)?,
                other => bail!(
                    "accept_psp_amount applies to amount_mismatch and fee_mismatch, not {}: a {} is settled by the PSP's outcome reaching the ledger; use expect_late_settlement or escalate",
                    other.as_str(),
                    other.as_str()
                ),
            };
            if adj.is_zero() {
                bail!("nothing to adjust: the amounts are equal");
            }
            if (ours.amount_minor() < 0) != (theirs.amount_minor() < 0) {
                bail!(
                    "cannot accept the PSP's amount: ours ({ours}) and theirs ({theirs}) differ in sign (a refund against a charge?); escalate instead"
                );
            }
            let max = projections::booking::MAX_AMOUNT_MINOR;
            if adj.amount_minor().unsigned_abs() > max.unsigned_abs() {
                bail!(
                    "cannot accept the PSP's amount: the adjustment {adj} is above the bound of {max} minor units; escalate instead"
                );
            }
            // The same settlement row also disagreed on status or currency:
            // the amounts compared are not the same kind of thing.
            let same_row: Vec<String> = store::discrepancies_of_day(db, &d.settlement_date)
                .await?
                .into_iter()
                .filter(|o| {
                    o.psp_reference == d.psp_reference
                        && o.line == d.line
                        && o.state != "resolved"
                        && (o.class == "status_mismatch" || o.class == "currency_mismatch")
                })
                .map(|o| format!("{} {}", o.class, o.discrepancy_id))
                .collect();
            if !same_row.is_empty() {
                bail!(
                    "cannot accept the PSP's amount: the same settlement row also has {}; settle that first or escalate",
                    same_row.join(", ")
                );
            }
            Some((adj.currency().code().to_owned(), adj.amount_minor()))
        }
        ResolutionAction::ExpectLateSettlement | ResolutionAction::Escalate => None,
    };
    let state = match action {
        ResolutionAction::AcceptPspAmount => "resolved",
        ResolutionAction::ExpectLateSettlement => "expected",
        ResolutionAction::Escalate => "escalated",
    };
    let disc = Uuid::parse_str(&d.discrepancy_id)?;
    let r = store::Resolution {
        state,
        action: action.as_str().to_owned(),
        reason: reason.trim().to_owned(),
        resolved_by: by.to_owned(),
        adjustment,
        event_id: resolution_event_id(disc, action).to_string(),
    };
    if !store::resolve(db, &id, from, &r, now_us()).await? {
        bail!("discrepancy {id} was resolved concurrently; nothing done");
    }
    let d = store::load_discrepancy(db, &id)
        .await?
        .context("discrepancy vanished")?;
    producer
        .append(&resolution_envelope(&d)?)
        .await
        .context("appending the resolution (recorded; re-run the same resolve to publish it)")?;
    store::mark_resolution_published(db, &id).await?;
    let d = store::load_discrepancy(db, &id)
        .await?
        .context("discrepancy vanished")?;
    done(&d, false)
}
