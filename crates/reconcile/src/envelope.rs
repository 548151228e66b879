//! The events reconciliation publishes, built from what it recorded (the
//! stored rows, the stored report): built again after a crash, an event
//! has the same id.

use crate::ids::{run_completed_event_id, run_uuid};
use crate::report::Report;
use crate::{PRODUCER, now_us, store};
use events::{
    CorrelationId, DiscrepancyClass, DiscrepancyId, Envelope, Money, OrderId, PaymentId,
    ReconciliationDiscrepancyFound, ReconciliationDiscrepancyResolved, ReconciliationRunCompleted,
    ResolutionAction, Timestamp,
};
use uuid::Uuid;

/// Money stored as `(currency, amount_minor)`.
/// A stored row that does not make an event (a corrupt or hand-edited row).
#[derive(Debug, thiserror::Error)]
pub enum StoredRowError {
    #[error(transparent)]
    Uuid(#[from] uuid::Error),
    #[error(transparent)]
    Id(#[from] events::IdError),
    #[error(transparent)]
    Money(#[from] events::MoneyError),
    #[error(transparent)]
    Count(#[from] std::num::TryFromIntError),
    #[error("stored class")]
    Class,
    #[error("stored action")]
    Action,
    #[error("stored resolution event id")]
    ResolutionEventId,
}

pub(crate) fn money_of(m: &Option<(String, i64)>) -> Result<Option<Money>, StoredRowError> {
    m.as_ref()
        .map(|(c, a)| Ok(Money::new(*a, events::Currency::from_code(c)?)))
        .transpose()
}

/// `ReconciliationDiscrepancyFound` of a recorded discrepancy.
pub(crate) fn found_envelope(d: &store::DiscrepancyRow) -> Result<Envelope, StoredRowError> {
    let id = Uuid::parse_str(&d.discrepancy_id)?;
    let class = DiscrepancyClass::parse(&d.class).ok_or(StoredRowError::Class)?;
    let order_id = if d.order_ids.contains(';') {
        None
    } else {
        d.order_ids.parse::<OrderId>().ok()
    };
    Ok(Envelope {
        event_id: d.found_event_id.parse()?,
        occurred_at: Timestamp::from_micros(d.created_at),
        payment_id: d.payment_id.as_deref().map(str::parse).transpose()?,
        correlation_id: CorrelationId::from_uuid(run_uuid(&d.run_id)),
        causation_id: None,
        producer: PRODUCER.to_owned(),
        schema_version: events::SCHEMA_VERSION,
        event: ReconciliationDiscrepancyFound {
            discrepancy_id: DiscrepancyId::from_uuid(id),
            run_id: d.run_id.clone(),
            class,
            psp_reference: Some(d.psp_reference.clone()),
            order_id,
            ours: money_of(&d.ours)?,
            theirs: money_of(&d.theirs)?,
            detail: if order_id.is_none() && !d.order_ids.is_empty() {
                format!("{} (order ids: {})", d.detail, d.order_ids)
            } else {
                d.detail.clone()
            },
        }
        .into(),
    })
}

/// `ReconciliationDiscrepancyResolved` of a recorded resolution.
pub(crate) fn resolution_envelope(d: &store::DiscrepancyRow) -> Result<Envelope, StoredRowError> {
    let id = Uuid::parse_str(&d.discrepancy_id)?;
    let action = d
        .action
        .as_deref()
        .and_then(ResolutionAction::parse)
        .ok_or(StoredRowError::Action)?;
    Ok(Envelope {
        event_id: d
            .resolution_event_id
            .as_deref()
            .ok_or(StoredRowError::ResolutionEventId)?
            .parse()?,
        occurred_at: Timestamp::from_micros(d.resolved_at.unwrap_or_else(now_us)),
        payment_id: d
            .payment_id
            .as_deref()
            .map(str::parse::<PaymentId>)
            .transpose()?,
        correlation_id: CorrelationId::from_uuid(id),
        causation_id: Some(d.found_event_id.parse()?),
        producer: PRODUCER.to_owned(),
        schema_version: events::SCHEMA_VERSION,
        event: ReconciliationDiscrepancyResolved {
            discrepancy_id: DiscrepancyId::from_uuid(id),
            action,
            reason: d.reason.clone().unwrap_or_default(),
            adjustment: money_of(&d.adjustment)?,
            resolved_by: d.resolved_by.clone().unwrap_or_default(),
        }
        .into(),
    })
}

/// `ReconciliationRunCompleted` of a recorded run.
pub(crate) fn run_completed_envelope(report: &Report) -> Result<Envelope, StoredRowError> {
    let run = run_uuid(&report.run_id);
    Ok(Envelope {
        event_id: run_completed_event_id(run),
        occurred_at: Timestamp::now(),
        payment_id: None,
        correlation_id: CorrelationId::from_uuid(run),
        causation_id: None,
        producer: PRODUCER.to_owned(),
        schema_version: events::SCHEMA_VERSION,
        event: ReconciliationRunCompleted {
            run_id: report.run_id.clone(),
            settlement_date: report.settlement_date.clone(),
            source: report.source.clone(),
            file_sha256: report.file_sha256.clone(),
            rows: report.rows,
            matched: report.matched,
            discrepancies: i64::try_from(report.discrepancies.len())?,
            class_counts: report.per_class.clone(),
        }
        .into(),
    })
}
