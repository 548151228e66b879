//! Status mismatches the ledger has caught up on since: closed at the
//! start of every run, with an amount or fee difference recorded first
//! where the booked figures differ from the PSP's.

use crate::envelope::{StoredRowError, found_envelope, money_of, resolution_envelope};
use crate::ids::{discrepancy_uuid, found_event_id, resolution_event_id};
use crate::matching::Tolerance;
use crate::{PRODUCER, now_us, store};
use events::{DiscrepancyClass, Money, ResolutionAction};
use storage::Db;
use streaming::EventProducer;
use uuid::Uuid;

/// Re-checks every open `status_mismatch` (single-order rows, all days)
/// against the current ledger. When the ledger now has the reference with
/// the status the PSP reported: the difference is closed (`resolved`,
/// action `expect_late_settlement`, reason "ledger caught up", no
/// adjustment, `ReconciliationDiscrepancyResolved` published); if the
/// amount or the fee (beyond the tolerance) now differ from the PSP row's,
/// an `amount_mismatch` / `fee_mismatch` is recorded and published first.
/// Returns the ids closed.
pub(crate) async fn recheck_status_mismatches(
    db: &Db,
    producer: &EventProducer,
    tol: Tolerance,
) -> Result<Vec<String>, crate::Error> {
    let mut closed = Vec::new();
    for d in store::open_status_mismatches(db).await? {
        let (Some(theirs), Some(psp_fee)) = (money_of(&d.theirs)?, d.theirs_fee_minor) else {
            continue;
        };
        let refs =
            store::refs_where_in(db, "psp_reference", std::slice::from_ref(&d.psp_reference))
                .await?;
        let Some(r) = refs.first() else { continue };
        let (kind, status) = if theirs.amount_minor() < 0 {
            ("refund", "refunded")
        } else {
            ("charge", "succeeded")
        };
        if r.kind != kind || r.status != status || r.currency != theirs.currency() {
            continue;
        }
        let mut follow: Vec<(DiscrepancyClass, Money, Money, String)> = Vec::new();
        if r.amount_minor != theirs.amount_minor() {
            follow.push((
                DiscrepancyClass::AmountMismatch,
                Money::new(r.amount_minor, r.currency),
                theirs,
                format!(
                    "after the ledger caught up ({} {}): amount differs by {} {}",
                    r.kind,
                    r.status,
                    i128::from(theirs.amount_minor()) - i128::from(r.amount_minor),
                    r.currency
                ),
            ));
        }
        let fee_diff = i128::from(psp_fee) - i128::from(r.fee_minor);
        if fee_diff.abs() > i128::from(tol.fee_minor) {
            follow.push((
                DiscrepancyClass::FeeMismatch,
                Money::new(r.fee_minor, r.currency),
                Money::new(psp_fee, r.currency),
                format!(
                    "after the ledger caught up ({} {}): fee differs by {fee_diff} {} (tolerance {})",
                    r.kind, r.status, r.currency, tol.fee_minor
                ),
            ));
        }
        let now = now_us();
        let mut recorded = Vec::new();
        for (class, ours, theirs, detail) in follow {
            let id = discrepancy_uuid(&d.settlement_date, class, &d.psp_reference);
            let row = store::DiscrepancyRow {
                discrepancy_id: id.to_string(),
                class: class.as_str().to_owned(),
                ours: Some((ours.currency().code().to_owned(), ours.amount_minor())),
                theirs: Some((theirs.currency().code().to_owned(), theirs.amount_minor())),
                detail,
                found_event_id: found_event_id(id).to_string(),
                found_published: false,
                created_at: now,
                theirs_fee_minor: Some(psp_fee),
                ..d.clone()
            };
            if store::insert_discrepancy(db, &row).await? {
                producer.append(&found_envelope(&row)?).await?;
                store::mark_found_published(db, &row.discrepancy_id).await?;
            }
            recorded.push(format!("{} {}", row.class, row.discrepancy_id));
        }
        let mut reason = "ledger caught up".to_owned();
        if !recorded.is_empty() {
            reason.push_str(&format!("; recorded {}", recorded.join(", ")));
        }
        let disc = Uuid::parse_str(&d.discrepancy_id).map_err(StoredRowError::from)?;
        let action = ResolutionAction::ExpectLateSettlement;
        let res = store::Resolution {
            state: "resolved",
            action: action.as_str().to_owned(),
            reason,
            resolved_by: PRODUCER.to_owned(),
            adjustment: None,
            event_id: resolution_event_id(disc, action).to_string(),
        };
        if store::resolve(db, &d.discrepancy_id, &["open"], &res, now).await? {
            let d = store::load_discrepancy(db, &d.discrepancy_id)
                .await?
                .ok_or(crate::Error::DiscrepancyVanished)?;
            producer.append(&resolution_envelope(&d)?).await?;
            store::mark_resolution_published(db, &d.discrepancy_id).await?;
            tracing::info!(discrepancy = %d.discrepancy_id, "status_mismatch closed: the ledger caught up");
            closed.push(d.discrepancy_id);
        }
    }
    Ok(closed)
}
