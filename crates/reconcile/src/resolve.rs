//! `paystream reconcile resolve`: working off one discrepancy with an
//! action and a reason, recorded, then published.

use crate::envelope::{StoredRowError, money_of, resolution_envelope};
use crate::ids::resolution_event_id;
use crate::report::{MoneyView, view_money};
use crate::{now_us, store};
use events::{DiscrepancyClass, Money, MoneyError, ResolutionAction};
use storage::Db;
use streaming::{EventProducer, ProduceError};
use uuid::Uuid;

/// Why a resolution was refused or failed. The refusals (a discrepancy
/// already resolved, an action that does not fit its class, amounts that
/// cannot be accepted as they are) say what to do instead.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("discrepancy id {id:?} is not a UUID")]
    NotAUuid {
        id: String,
        #[source]
        source: uuid::Error,
    },
    #[error("a resolution needs a --reason (it is the audit trail)")]
    NoReason,
    #[error("no discrepancy {id}")]
    NotFound { id: String },
    #[error(
        "discrepancy {id} is already {state} ({action} by {by}: {reason}); it cannot be resolved twice"
    )]
    AlreadyResolved {
        id: String,
        state: String,
        action: String,
        by: String,
        reason: String,
    },
    #[error(
        "cannot accept the PSP's amount for a {class} discrepancy: one side has no amount; use expect_late_settlement or escalate"
    )]
    NoAmount { class: String },
    #[error(
        "cannot accept the PSP's amount across currencies ({ours} vs {theirs}); escalate instead"
    )]
    AcrossCurrencies { ours: String, theirs: String },
    #[error(
        "accept_psp_amount applies to amount_mismatch and fee_mismatch, not {class}: a {class} is settled by the PSP's outcome reaching the ledger; use expect_late_settlement or escalate"
    )]
    NotAnAmountClass { class: &'static str },
    #[error("nothing to adjust: the amounts are equal")]
    NothingToAdjust,
    #[error(
        "cannot accept the PSP's amount: ours ({ours}) and theirs ({theirs}) differ in sign (a refund against a charge?); escalate instead"
    )]
    SignsDiffer { ours: Money, theirs: Money },
    #[error(
        "cannot accept the PSP's amount: the adjustment {adjustment} is above the bound of {max} minor units; escalate instead"
    )]
    AboveBound { adjustment: Money, max: i64 },
    #[error(
        "cannot accept the PSP's amount: the same settlement row also has {others}; settle that first or escalate"
    )]
    SameRowOpen { others: String },
    #[error("discrepancy {id} was resolved concurrently; nothing done")]
    ResolvedConcurrently { id: String },
    #[error("discrepancy vanished")]
    Vanished,
    #[error("appending the resolution (recorded; re-run the same resolve to publish it)")]
    AppendResolution(#[source] ProduceError),
    /// The adjustment itself (theirs − ours) does not compute.
    #[error(transparent)]
    Money(#[from] MoneyError),
    #[error(transparent)]
    StoredRow(#[from] StoredRowError),
    #[error(transparent)]
    Produce(#[from] ProduceError),
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

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
) -> Result<Resolved, ResolveError> {
    let id = Uuid::parse_str(id.trim())
        .map_err(|source| ResolveError::NotAUuid {
            id: id.to_owned(),
            source,
        })?
        .to_string();
    if reason.trim().is_empty() {
        return Err(ResolveError::NoReason);
    }
    let d = store::load_discrepancy(db, &id)
        .await?
        .ok_or_else(|| ResolveError::NotFound { id: id.clone() })?;
    let done = |d: &store::DiscrepancyRow, republished| -> Result<Resolved, ResolveError> {
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
            return Err(ResolveError::AlreadyResolved {
                id,
                state: d.state.clone(),
                action: d.action.as_deref().unwrap_or("-").to_owned(),
                by: d.resolved_by.as_deref().unwrap_or("-").to_owned(),
                reason: d.reason.as_deref().unwrap_or("-").to_owned(),
            });
        }
    };
    let class = DiscrepancyClass::parse(&d.class).ok_or(StoredRowError::Class)?;
    let adjustment = match action {
        ResolutionAction::AcceptPspAmount => {
            let (Some(ours), Some(theirs)) = (money_of(&d.ours)?, money_of(&d.theirs)?) else {
                return Err(ResolveError::NoAmount {
                    class: d.class.clone(),
                });
            };
            if ours.currency() != theirs.currency() {
                return Err(ResolveError::AcrossCurrencies {
                    ours: ours.currency().to_string(),
                    theirs: theirs.currency().to_string(),
                });
            }
            let adj = match class {
                DiscrepancyClass::AmountMismatch => theirs.checked_sub(ours)?,
                DiscrepancyClass::FeeMismatch => ours.checked_sub(theirs)?,
                other => {
                    return Err(ResolveError::NotAnAmountClass {
                        class: other.as_str(),
                    });
                }
            };
            if adj.is_zero() {
                return Err(ResolveError::NothingToAdjust);
            }
            if (ours.amount_minor() < 0) != (theirs.amount_minor() < 0) {
                return Err(ResolveError::SignsDiffer { ours, theirs });
            }
            let max = projections::booking::MAX_AMOUNT_MINOR;
            if adj.amount_minor().unsigned_abs() > max.unsigned_abs() {
                return Err(ResolveError::AboveBound {
                    adjustment: adj,
                    max,
                });
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
                return Err(ResolveError::SameRowOpen {
                    others: same_row.join(", "),
                });
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
    let disc = Uuid::parse_str(&d.discrepancy_id).map_err(StoredRowError::from)?;
    let r = store::Resolution {
        state,
        action: action.as_str().to_owned(),
        reason: reason.trim().to_owned(),
        resolved_by: by.to_owned(),
        adjustment,
        event_id: resolution_event_id(disc, action).to_string(),
    };
    if !store::resolve(db, &id, from, &r, now_us()).await? {
        return Err(ResolveError::ResolvedConcurrently { id });
    }
    let d = store::load_discrepancy(db, &id)
        .await?
        .ok_or(ResolveError::Vanished)?;
    producer
        .append(&resolution_envelope(&d)?)
        .await
        .map_err(ResolveError::AppendResolution)?;
    store::mark_resolution_published(db, &id).await?;
    let d = store::load_discrepancy(db, &id)
        .await?
        .ok_or(ResolveError::Vanished)?;
    done(&d, false)
}
