//! The ids of reconciliation: runs, discrepancies and the events about
//! them, derived (UUIDv5) from what they are about, so recording or
//! publishing again yields the same ids. These names are stable: changing
//! one changes the ids of everything recorded since.

use crate::settlement;
use events::{DiscrepancyClass, EventId, PAYSTREAM_NAMESPACE, ResolutionAction};
use time::Date;
use uuid::Uuid;

/// A difference of a settlement day: its class and the PSP reference it
/// is about. A corrected file of the same day finds the same ids.
pub(crate) fn discrepancy_uuid(date: &str, class: DiscrepancyClass, reference: &str) -> Uuid {
    Uuid::new_v5(
        &PAYSTREAM_NAMESPACE,
        format!(
            "reconciliation-discrepancy\0{date}\0{}\0{reference}",
            class.as_str()
        )
        .as_bytes(),
    )
}

/// A run, from its [`run_id`]: the correlation id of its events.
pub(crate) fn run_uuid(run_id: &str) -> Uuid {
    Uuid::new_v5(
        &PAYSTREAM_NAMESPACE,
        format!("reconciliation-run\0{run_id}").as_bytes(),
    )
}

/// The run id of a file: settlement day plus the first 16 hex digits of
/// its SHA-256.
pub fn run_id(date: Date, sha256: &str) -> String {
    format!(
        "{}-{}",
        settlement::format_date(date),
        &sha256[..16.min(sha256.len())]
    )
}

/// The `ReconciliationDiscrepancyFound` of a discrepancy.
pub(crate) fn found_event_id(discrepancy: Uuid) -> EventId {
    EventId::derive(discrepancy, "found")
}

/// The `ReconciliationDiscrepancyResolved` of a discrepancy by `action`.
pub(crate) fn resolution_event_id(discrepancy: Uuid, action: ResolutionAction) -> EventId {
    EventId::derive(discrepancy, &format!("resolved-{}", action.as_str()))
}

/// The `ReconciliationRunCompleted` of a run (its [`run_uuid`]).
pub(crate) fn run_completed_event_id(run: Uuid) -> EventId {
    EventId::derive(run, "completed")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Recorded rows and published events carry these ids: they must not
    /// change (values computed independently with Python's uuid5).
    #[test]
    fn ids_are_stable() {
        let disc = discrepancy_uuid("2026-03-14", DiscrepancyClass::AmountMismatch, "psp_ch_1");
        assert_eq!(disc.to_string(), "0380fd30-cd47-50f0-a988-9b1f2089e66e");
        let run_id = run_id(
            time::macros::date!(2026 - 03 - 14),
            "0123456789abcdef0123456789abcdef",
        );
        assert_eq!(run_id, "2026-03-14-0123456789abcdef");
        let run = run_uuid(&run_id);
        assert_eq!(run.to_string(), "7c39eaaa-d2d1-5739-90fc-6ddeac3ecea1");
        assert_eq!(
            found_event_id(disc).to_string(),
            "49c3c95f-c000-5684-a34d-1eee66abd3ba"
        );
        assert_eq!(
            resolution_event_id(disc, ResolutionAction::AcceptPspAmount).to_string(),
            "5b2b24fc-6e09-50c6-9382-7e0c0a7a2fa8"
        );
        assert_eq!(
            run_completed_event_id(run).to_string(),
            "cce3a678-85f0-5249-9004-b5d056dd78ea"
        );
    }
}
