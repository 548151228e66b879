//! The refund state machine, per order: what a refund request decides, and
//! the order's refund bookkeeping as the events of the payments topic move
//! it.
//!
//! The rule it guarantees: the refunds of an order never add up to more
//! than what was captured on it. A refund reserves its amount when it is
//! decided ([`decide`] refuses what exceeds `captured - reserved`); a
//! failed refund gives its reservation back; a succeeded one is counted as
//! refunded once. Amounts are in the order's currency (a refund request
//! names minor units only), so the bound holds per order and currency.
//!
//! The handler keeps this state in `handler_payment_orders` (status,
//! amount, `reserved_minor`, `refunded_minor`) and `handler_refunds`; its
//! SQL reserves with a compare-and-set (`amount_minor - reserved_minor >=
//! $amount AND status = 'succeeded'`) so concurrent refunds obey the same
//! bound this module decides with.

use crate::payment::{OrderStatus, order_change};
use events::{
    CorrelationId, Envelope, Event, EventId, Money, OrderId, PaymentId, RefundId, RefundRequested,
    SCHEMA_VERSION, Timestamp,
};
use std::collections::BTreeMap;

/// A refund's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RefundStatus {
    Requested,
    /// Paid back (terminal).
    Succeeded,
    /// Not paid back; its reservation is released (terminal).
    Failed,
}

impl RefundStatus {
    pub const ALL: [RefundStatus; 3] = [
        RefundStatus::Requested,
        RefundStatus::Succeeded,
        RefundStatus::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RefundStatus::Requested => "requested",
            RefundStatus::Succeeded => "succeeded",
            RefundStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<RefundStatus> {
        RefundStatus::ALL.into_iter().find(|r| r.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        self != RefundStatus::Requested
    }
}

/// One refund of the order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refund {
    pub requested: RefundRequested,
    pub status: RefundStatus,
}

/// An order's refund bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRefunds {
    pub payment_id: PaymentId,
    pub order_id: OrderId,
    /// The order's amount: what is captured once it succeeded.
    pub amount: Money,
    pub status: OrderStatus,
    /// Sum of the refunds that have not failed.
    pub reserved_minor: i64,
    /// Sum of the refunds that succeeded.
    pub refunded_minor: i64,
    pub refunds: BTreeMap<RefundId, Refund>,
}

impl OrderRefunds {
    /// An order of `amount` in `status`, without refunds.
    pub fn new(
        payment_id: PaymentId,
        order_id: OrderId,
        amount: Money,
        status: OrderStatus,
    ) -> Self {
        OrderRefunds {
            payment_id,
            order_id,
            amount,
            status,
            reserved_minor: 0,
            refunded_minor: 0,
            refunds: BTreeMap::new(),
        }
    }

    /// What was captured on the order: its amount once it succeeded.
    pub fn captured_minor(&self) -> i64 {
        if self.status == OrderStatus::Succeeded {
            self.amount.amount_minor()
        } else {
            0
        }
    }

    /// What is left to refund.
    pub fn available_minor(&self) -> i64 {
        self.captured_minor().saturating_sub(self.reserved_minor)
    }
}

/// A refund request, with its id, time and producer injected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundRequest {
    pub refund_id: RefundId,
    /// `None`: everything that is left.
    pub amount_minor: Option<i64>,
    pub reason: String,
    pub at: Timestamp,
    pub producer: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundCommand {
    Request(RefundRequest),
}

/// Why a refund was refused. Closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefundRejection {
    /// The order failed or was rejected: nothing was captured, for good.
    #[error("the order {}; nothing was captured", .0.as_str())]
    NotRefundable(OrderStatus),
    /// The order has not succeeded yet (it may still): ask again later.
    #[error("the order is {}; refund it once it succeeded", .0.as_str())]
    NotCaptured(OrderStatus),
    /// More than is left, or nothing.
    #[error(
        "at most {available_minor} minor units ({currency}) are left to refund on this order (captured {captured_minor}, refunds requested {reserved_minor})"
    )]
    ExceedsRefundable {
        available_minor: i64,
        captured_minor: i64,
        reserved_minor: i64,
        currency: String,
    },
    /// This refund id was decided for a different request.
    #[error("a different refund was already decided under this Idempotency-Key")]
    KeyReused,
}

/// The events a refund request decides, or why not. A decided refund id
/// never decides again: the same request replays its event.
pub fn decide(
    state: &OrderRefunds,
    command: RefundCommand,
) -> Result<Vec<Envelope>, RefundRejection> {
    let RefundCommand::Request(r) = command;
    if let Some(done) = state.refunds.get(&r.refund_id) {
        let same = done.requested.reason == r.reason
            && r.amount_minor
                .is_none_or(|a| a == done.requested.amount.amount_minor());
        return if same {
            Ok(vec![refund_envelope(
                state.payment_id,
                &done.requested,
                r.at,
                &r.producer,
            )])
        } else {
            Err(RefundRejection::KeyReused)
        };
    }
    match state.status {
        OrderStatus::Succeeded => {}
        s @ (OrderStatus::Failed | OrderStatus::Rejected) => {
            return Err(RefundRejection::NotRefundable(s));
        }
        s => return Err(RefundRejection::NotCaptured(s)),
    }
    let available = state.available_minor();
    let want = r.amount_minor.unwrap_or(available);
    if want <= 0 || want > available {
        return Err(RefundRejection::ExceedsRefundable {
            available_minor: available,
            captured_minor: state.captured_minor(),
            reserved_minor: state.reserved_minor,
            currency: state.amount.currency().code().to_owned(),
        });
    }
    let requested = RefundRequested {
        refund_id: r.refund_id,
        order_id: state.order_id,
        amount: Money::new(want, state.amount.currency()),
        reason: r.reason,
    };
    Ok(vec![refund_envelope(
        state.payment_id,
        &requested,
        r.at,
        &r.producer,
    )])
}

/// The envelope of a decided refund (its id derives from the refund's).
pub fn refund_envelope(
    payment: PaymentId,
    requested: &RefundRequested,
    at: Timestamp,
    producer: &str,
) -> Envelope {
    Envelope {
        event_id: EventId::derive(requested.refund_id.as_uuid(), "requested"),
        occurred_at: at,
        payment_id: Some(payment),
        correlation_id: CorrelationId::from_uuid(payment.as_uuid()),
        causation_id: None,
        producer: producer.to_owned(),
        schema_version: SCHEMA_VERSION,
        event: requested.clone().into(),
    }
}

/// The bookkeeping after an event. Events of other orders, repeated events
/// and transitions out of a terminal refund change nothing.
pub fn apply(mut state: OrderRefunds, env: &Envelope) -> OrderRefunds {
    match &env.event {
        Event::RefundRequested(r) if r.order_id == state.order_id => {
            if !state.refunds.contains_key(&r.refund_id)
                && r.amount.currency() == state.amount.currency()
            {
                state.reserved_minor = state.reserved_minor.saturating_add(r.amount.amount_minor());
                state.refunds.insert(
                    r.refund_id,
                    Refund {
                        requested: r.clone(),
                        status: RefundStatus::Requested,
                    },
                );
            }
        }
        Event::RefundSucceeded(r) if r.order_id == state.order_id => {
            if let Some(refund) = state.refunds.get_mut(&r.refund_id)
                && refund.status == RefundStatus::Requested
            {
                refund.status = RefundStatus::Succeeded;
                state.refunded_minor = state
                    .refunded_minor
                    .saturating_add(refund.requested.amount.amount_minor());
            }
        }
        Event::RefundFailed(r) if r.order_id == state.order_id => {
            if let Some(refund) = state.refunds.get_mut(&r.refund_id)
                && refund.status == RefundStatus::Requested
            {
                refund.status = RefundStatus::Failed;
                state.reserved_minor = state
                    .reserved_minor
                    .saturating_sub(refund.requested.amount.amount_minor());
            }
        }
        other => {
            if let Some(change) = order_change(other)
                && change.order_id == state.order_id
            {
                state.status = state.status.then(change.status);
            }
        }
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_their_names() {
        for s in RefundStatus::ALL {
            assert_eq!(RefundStatus::parse(s.as_str()), Some(s));
        }
    }
}
