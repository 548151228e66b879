//! The payment state machine: what a submitted payment request decides, and
//! how a payment's status (and its orders' statuses) follow from the events
//! of the payments topic.
//!
//! [`decide`] turns a [`Submission`] into the two facts the handler appends
//! (`PaymentRequested` and the risk decision, ids derived from the payment
//! id). The risk verdict comes in with the submission: the handler computes
//! it (rule set plus the velocity window it read) before it decides, so this
//! function stays pure and a retried request can never be decided anew. A
//! payment that was decided replays its decided events for the same request
//! and refuses a different one ([`PaymentRejection::KeyReused`]), whatever
//! the clock or the risk check say now.
//!
//! [`apply`] folds events into a [`PaymentState`]; the payment-status
//! projection in SQL stores the same statuses (their [`PaymentStatus::as_str`]
//! and [`OrderStatus::as_str`]) and guards each transition with the state it
//! expects, so SQL and this module agree on every transition.

use events::{
    BuyerId, ClientId, CorrelationId, Envelope, Event, EventId, Money, OrderId, PaymentId,
    PaymentOrder, PaymentRequested, RiskApproved, RiskRejected, SCHEMA_VERSION, SellerId,
    Timestamp,
};
use std::collections::BTreeMap;

/// A payment's status as `GET /v1/payments/{id}` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PaymentStatus {
    /// Recorded; the risk decision is not applied yet.
    Requested,
    /// Risk approved; the orders are being executed.
    Processing,
    /// Refused by the risk check (terminal).
    Rejected,
    /// Every order succeeded (terminal).
    Succeeded,
    /// No order succeeded (terminal).
    Failed,
    /// Some orders succeeded, some failed (terminal).
    PartiallySucceeded,
}

impl PaymentStatus {
    pub const ALL: [PaymentStatus; 6] = [
        PaymentStatus::Requested,
        PaymentStatus::Processing,
        PaymentStatus::Rejected,
        PaymentStatus::Succeeded,
        PaymentStatus::Failed,
        PaymentStatus::PartiallySucceeded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PaymentStatus::Requested => "requested",
            PaymentStatus::Processing => "processing",
            PaymentStatus::Rejected => "rejected",
            PaymentStatus::Succeeded => "succeeded",
            PaymentStatus::Failed => "failed",
            PaymentStatus::PartiallySucceeded => "partially_succeeded",
        }
    }

    pub fn parse(s: &str) -> Option<PaymentStatus> {
        PaymentStatus::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// No event changes a terminal payment's status.
    pub fn is_terminal(self) -> bool {
        !matches!(self, PaymentStatus::Requested | PaymentStatus::Processing)
    }
}

/// One order's status in the payment-status view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OrderStatus {
    /// Part of a payment whose risk decision is not applied yet.
    Requested,
    /// Risk approved; waiting for the executor.
    Pending,
    /// The executor is charging it (or retrying after a retryable failure).
    Executing,
    /// The PSP is deciding; its webhook settles it.
    PendingPsp,
    /// Charged (final).
    Succeeded,
    /// Not charged, for good (final).
    Failed,
    /// Its payment was refused by the risk check (final).
    Rejected,
}

impl OrderStatus {
    pub const ALL: [OrderStatus; 7] = [
        OrderStatus::Requested,
        OrderStatus::Pending,
        OrderStatus::Executing,
        OrderStatus::PendingPsp,
        OrderStatus::Succeeded,
        OrderStatus::Failed,
        OrderStatus::Rejected,
    ];
    /// The statuses no later event changes (refund bookkeeping aside).
    pub const FINAL: [OrderStatus; 3] = [
        OrderStatus::Succeeded,
        OrderStatus::Failed,
        OrderStatus::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Requested => "requested",
            OrderStatus::Pending => "pending",
            OrderStatus::Executing => "executing",
            OrderStatus::PendingPsp => "pending_psp",
            OrderStatus::Succeeded => "succeeded",
            OrderStatus::Failed => "failed",
            OrderStatus::Rejected => "rejected",
        }
    }

    pub fn parse(s: &str) -> Option<OrderStatus> {
        OrderStatus::ALL.into_iter().find(|o| o.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        OrderStatus::FINAL.contains(&self)
    }

    /// The status after a change to `to`: a final status never regresses
    /// (a late "started" after "succeeded" changes nothing).
    pub fn then(self, to: OrderStatus) -> OrderStatus {
        if self.is_final() { self } else { to }
    }

    /// `'succeeded','failed','rejected'`: the final statuses as an SQL list,
    /// for the projection's guards (`status NOT IN (...)`).
    pub fn final_sql_list() -> String {
        OrderStatus::FINAL
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// What an executor event does to one order of a payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderChange {
    pub order_id: OrderId,
    pub status: OrderStatus,
    pub psp_reference: Option<String>,
    pub failure: Option<String>,
}

/// The order change an event carries, if it is an order outcome.
pub fn order_change(event: &Event) -> Option<OrderChange> {
    let change = |order_id, status, psp_reference, failure| {
        Some(OrderChange {
            order_id,
            status,
            psp_reference,
            failure,
        })
    };
    match event {
        Event::OrderExecutionStarted(e) => change(e.order_id, OrderStatus::Executing, None, None),
        Event::OrderSucceeded(e) => change(
            e.order_id,
            OrderStatus::Succeeded,
            Some(e.psp_reference.clone()),
            None,
        ),
        // A retryable failure is retried by the executor: still executing.
        Event::OrderFailed(e) => change(
            e.order_id,
            if e.retryable {
                OrderStatus::Executing
            } else {
                OrderStatus::Failed
            },
            None,
            Some(format!("{}: {}", e.code, e.reason)),
        ),
        Event::OrderPending(e) => change(
            e.order_id,
            OrderStatus::PendingPsp,
            Some(e.psp_reference.clone()),
            None,
        ),
        Event::OrderSettledByWebhook(e) => change(
            e.order_id,
            if e.succeeded {
                OrderStatus::Succeeded
            } else {
                OrderStatus::Failed
            },
            Some(e.psp_reference.clone()),
            e.failure_reason.clone(),
        ),
        _ => None,
    }
}

/// A payment's status once every order is final (`None` while one is
/// open): succeeded if all succeeded, failed if none did, else partially.
pub fn rollup(orders: impl IntoIterator<Item = OrderStatus>) -> Option<PaymentStatus> {
    let (mut all, mut ok) = (0usize, 0usize);
    for o in orders {
        if !o.is_final() {
            return None;
        }
        all += 1;
        ok += usize::from(o == OrderStatus::Succeeded);
    }
    Some(if ok == all {
        PaymentStatus::Succeeded
    } else if ok == 0 {
        PaymentStatus::Failed
    } else {
        PaymentStatus::PartiallySucceeded
    })
}

/// The risk check's verdict on a submission, computed by the caller from
/// its rule set and the buyer's velocity window before deciding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RiskVerdict {
    Approved {
        rule_set: String,
    },
    Rejected {
        rule_set: String,
        rule: String,
        reason: String,
    },
}

/// A payment request as the handler validated it, with everything the
/// decision needs injected: ids, time, the risk verdict, who produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submission {
    pub payment_id: PaymentId,
    pub client_id: ClientId,
    pub idempotency_key: Option<String>,
    pub buyer_id: BuyerId,
    /// (seller, amount) per order; all in one currency, each payable.
    pub orders: Vec<(SellerId, Money)>,
    pub metadata: BTreeMap<String, String>,
    pub risk: RiskVerdict,
    pub at: Timestamp,
    /// Component and version recorded in the envelopes.
    pub producer: String,
}

impl Submission {
    /// The `PaymentRequested` this submission asks for: the request itself,
    /// without time, verdict or producer. Two submissions are the same
    /// request exactly when these are equal.
    pub fn requested(&self) -> PaymentRequested {
        PaymentRequested {
            client_id: self.client_id.clone(),
            idempotency_key: self.idempotency_key.clone(),
            buyer_id: self.buyer_id.clone(),
            orders: self
                .orders
                .iter()
                .enumerate()
                .map(|(i, (seller, amount))| PaymentOrder {
                    order_id: OrderId::derive(self.payment_id, i),
                    seller_id: seller.clone(),
                    amount: *amount,
                })
                .collect(),
            metadata: self.metadata.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaymentCommand {
    Submit(Submission),
}

/// Why a command was refused. Closed: every caller handles every case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PaymentRejection {
    /// A different request was already decided under this payment's key.
    #[error("a different request was already decided under this Idempotency-Key")]
    KeyReused,
    /// The submission names another payment than the state holds.
    #[error("the submission is for payment {submitted}, the state holds {held}")]
    WrongPayment {
        submitted: PaymentId,
        held: PaymentId,
    },
    /// No orders, mixed currencies, or an amount that is not payable.
    #[error("invalid orders: {0}")]
    InvalidOrders(&'static str),
}

/// A payment that exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payment {
    pub payment_id: PaymentId,
    pub requested: PaymentRequested,
    /// The facts decided for the request (`PaymentRequested`, then the risk
    /// decision once applied): what a replay of the same request returns.
    pub decided: Vec<Envelope>,
    pub status: PaymentStatus,
    /// (order, status), in the request's order.
    pub orders: Vec<(OrderId, OrderStatus)>,
    /// (rule, reason) when the risk check refused it.
    pub rejection: Option<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PaymentState {
    /// Nothing was decided for this payment id.
    #[default]
    New,
    Live(Box<Payment>),
}

impl PaymentState {
    pub fn status(&self) -> Option<PaymentStatus> {
        match self {
            PaymentState::New => None,
            PaymentState::Live(p) => Some(p.status),
        }
    }
}

/// The events a submission decides, or why not. A decided payment never
/// decides again: the same request gets the stored events back unchanged.
pub fn decide(
    state: &PaymentState,
    command: PaymentCommand,
) -> Result<Vec<Envelope>, PaymentRejection> {
    let PaymentCommand::Submit(s) = command;
    match state {
        PaymentState::Live(p) => {
            if p.payment_id != s.payment_id {
                return Err(PaymentRejection::WrongPayment {
                    submitted: s.payment_id,
                    held: p.payment_id,
                });
            }
            if p.requested == s.requested() {
                Ok(p.decided.clone())
            } else {
                Err(PaymentRejection::KeyReused)
            }
        }
        PaymentState::New => decide_new(s),
    }
}

fn decide_new(s: Submission) -> Result<Vec<Envelope>, PaymentRejection> {
    let Some((_, first)) = s.orders.first() else {
        return Err(PaymentRejection::InvalidOrders(
            "a payment has at least one order",
        ));
    };
    let currency = first.currency();
    if s.orders.iter().any(|(_, m)| m.currency() != currency) {
        return Err(PaymentRejection::InvalidOrders(
            "orders of one payment share a currency",
        ));
    }
    if s.orders
        .iter()
        .any(|(_, m)| m.amount_minor() <= 0 || !m.within_bound())
    {
        return Err(PaymentRejection::InvalidOrders(
            "every order amount is payable",
        ));
    }
    if Money::checked_sum(currency, s.orders.iter().map(|(_, m)| *m)).is_err() {
        return Err(PaymentRejection::InvalidOrders(
            "the orders' total overflows",
        ));
    }
    let payment = s.payment_id;
    let requested_id = EventId::derive(payment.as_uuid(), "requested");
    let envelope = |event_id, causation_id, event| Envelope {
        event_id,
        occurred_at: s.at,
        payment_id: Some(payment),
        correlation_id: CorrelationId::from_uuid(payment.as_uuid()),
        causation_id,
        producer: s.producer.clone(),
        schema_version: SCHEMA_VERSION,
        event,
    };
    let requested = envelope(requested_id, None, s.requested().into());
    let risk_event = match s.risk.clone() {
        RiskVerdict::Approved { rule_set } => RiskApproved { rule_set }.into(),
        RiskVerdict::Rejected {
            rule_set,
            rule,
            reason,
        } => RiskRejected {
            rule_set,
            rule,
            reason,
        }
        .into(),
    };
    // Approved or rejected, the risk decision of a payment has one id.
    let risk = envelope(
        EventId::derive(payment.as_uuid(), "risk"),
        Some(requested_id),
        risk_event,
    );
    Ok(vec![requested, risk])
}

/// The state after an event. Events of other payments, duplicates and
/// events that do not apply in the state change nothing.
pub fn apply(state: PaymentState, env: &Envelope) -> PaymentState {
    match (state, &env.event) {
        (PaymentState::New, Event::PaymentRequested(r)) => match env.payment_id {
            Some(payment_id) => PaymentState::Live(Box::new(Payment {
                payment_id,
                requested: r.clone(),
                decided: vec![env.clone()],
                status: PaymentStatus::Requested,
                orders: r
                    .orders
                    .iter()
                    .map(|o| (o.order_id, OrderStatus::Requested))
                    .collect(),
                rejection: None,
            })),
            None => PaymentState::New,
        },
        (PaymentState::New, _) => PaymentState::New,
        (PaymentState::Live(mut p), event) => {
            if env.payment_id != Some(p.payment_id) {
                return PaymentState::Live(p);
            }
            match event {
                Event::RiskApproved(_) | Event::RiskRejected(_)
                    if p.status == PaymentStatus::Requested =>
                {
                    p.decided.push(env.clone());
                    let order_status = if let Event::RiskRejected(r) = event {
                        p.status = PaymentStatus::Rejected;
                        p.rejection = Some((r.rule.clone(), r.reason.clone()));
                        OrderStatus::Rejected
                    } else {
                        p.status = PaymentStatus::Processing;
                        OrderStatus::Pending
                    };
                    for (_, o) in &mut p.orders {
                        if *o == OrderStatus::Requested {
                            *o = order_status;
                        }
                    }
                }
                other => {
                    if let Some(change) = order_change(other)
                        && let Some((_, o)) =
                            p.orders.iter_mut().find(|(id, _)| *id == change.order_id)
                    {
                        *o = o.then(change.status);
                        if !p.status.is_terminal()
                            && let Some(rolled) = rollup(p.orders.iter().map(|(_, s)| *s))
                        {
                            p.status = rolled;
                        }
                    }
                }
            }
            PaymentState::Live(p)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_their_names() {
        for s in PaymentStatus::ALL {
            assert_eq!(PaymentStatus::parse(s.as_str()), Some(s));
        }
        for s in OrderStatus::ALL {
            assert_eq!(OrderStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(
            OrderStatus::final_sql_list(),
            "'succeeded','failed','rejected'"
        );
    }

    #[test]
    fn rollup_waits_for_every_order() {
        use OrderStatus::*;
        assert_eq!(rollup([Succeeded, Executing]), None);
        assert_eq!(
            rollup([Succeeded, Succeeded]),
            Some(PaymentStatus::Succeeded)
        );
        assert_eq!(rollup([Failed, Rejected]), Some(PaymentStatus::Failed));
        assert_eq!(
            rollup([Succeeded, Failed]),
            Some(PaymentStatus::PartiallySucceeded)
        );
    }
}
