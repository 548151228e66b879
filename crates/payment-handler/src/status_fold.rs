//! The payment-status projection's executor outcomes and refunds decided
//! in memory, for a whole batch at once (issue #13).
//!
//! `store::apply_status` loads the rows a run of these events touches
//! ([`Needs`] says which: every order of a payment an order outcome names,
//! the orders and refunds a refund event names), folds the events over
//! them in order here ([`Fold::apply`]), and writes what changed with one
//! statement per table ([`Fold::writes`], `batch_sql::BatchSql::write_status`).
//! Several events of one payment in one batch therefore give the row that
//! applying them one by one gives: each event sees the state the previous
//! one left, exactly as the per-event statements did
//! (`status_per_event::apply_status_per_event`, the baseline the equality
//! test compares with).
//!
//! The transitions are the ones the per-event SQL guarded, decided with the
//! domain's rules: an order's status only changes while it is not final
//! (`OrderStatus::then`), a payment is rolled up once every order is final
//! (`payment::rollup`) unless the risk check rejected it, a refund leaves
//! `requested` once (a failed refund never turns succeeded, nor the other
//! way), a new refund reserves its amount, a failed one gives its
//! reservation back, a succeeded one is counted once. The writes keep those
//! guards in SQL too (compare-and-set on the status read here), and add
//! the money columns as deltas, so a concurrent reservation by `POST
//! .../refunds` (`store::reserve_refund`) is never overwritten.

use crate::batch_sql::{
    LoadedOrder, LoadedPayment, OrderWrite, PaymentWrite, RefundRow, RefundWrite, StatusWrites,
};
use domain::payment::{OrderStatus, PaymentStatus, order_change, rollup};
use domain::refund::RefundStatus;
use events::{Envelope, Event};
use std::collections::{BTreeMap, BTreeSet};
use streaming::Outcome;

/// Whether the fold (rather than the per-event statements) applies `event`.
pub(crate) fn folds(event: &Event) -> bool {
    matches!(
        event,
        Event::RefundRequested(_) | Event::RefundSucceeded(_) | Event::RefundFailed(_)
    ) || order_change(event).is_some()
}

/// The keys whose rows a run of folded events needs.
#[derive(Debug, Default)]
pub(crate) struct Needs {
    /// Payments (and all their orders) named by an order outcome.
    pub payments: BTreeSet<String>,
    /// Orders named by a refund event.
    pub orders: BTreeSet<String>,
    pub refunds: BTreeSet<String>,
}

impl Needs {
    pub fn add(&mut self, env: &Envelope) {
        let Some(payment) = env.payment_id else {
            return;
        };
        match &env.event {
            Event::RefundRequested(e) => {
                self.orders.insert(e.order_id.to_string());
                self.refunds.insert(e.refund_id.to_string());
            }
            Event::RefundSucceeded(e) => {
                self.orders.insert(e.order_id.to_string());
                self.refunds.insert(e.refund_id.to_string());
            }
            Event::RefundFailed(e) => {
                self.orders.insert(e.order_id.to_string());
                self.refunds.insert(e.refund_id.to_string());
            }
            other => {
                if order_change(other).is_some() {
                    self.payments.insert(payment.to_string());
                }
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.payments.is_empty() && self.orders.is_empty() && self.refunds.is_empty()
    }
}

#[derive(Debug, Clone)]
struct Order {
    loaded: LoadedOrder,
    status: String,
    psp_reference: Option<String>,
    failure_reason: Option<String>,
    add_reserved: i64,
    add_refunded: i64,
}

#[derive(Debug, Clone)]
struct Payment {
    loaded: LoadedPayment,
    status: String,
    updated_us: i64,
}

#[derive(Debug, Clone)]
struct Refund {
    /// `None`: first seen in this batch (inserted).
    loaded_status: Option<String>,
    row: RefundRow,
}

/// A sum of money columns left `i64`: the per-event statements would have
/// failed on it too (or on the stored value); the caller turns it into the
/// same deterministic error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Overflow {
    pub a: i64,
    pub b: i64,
}

/// The rows of one run of folded events, as they are after each event.
#[derive(Debug, Default)]
pub(crate) struct Fold {
    payments: BTreeMap<String, Payment>,
    orders: BTreeMap<String, Order>,
    /// Order ids per payment (complete for the payments in `Needs::payments`,
    /// whose orders were all loaded).
    by_payment: BTreeMap<String, Vec<String>>,
    refunds: BTreeMap<String, Refund>,
}

impl Fold {
    pub fn new(
        payments: Vec<LoadedPayment>,
        orders: Vec<LoadedOrder>,
        refunds: Vec<RefundRow>,
    ) -> Fold {
        let mut f = Fold::default();
        for p in payments {
            f.payments.insert(
                p.payment.clone(),
                Payment {
                    status: p.status.clone(),
                    updated_us: p.updated_us,
                    loaded: p,
                },
            );
        }
        for o in orders {
            if f.orders.contains_key(&o.order) {
                continue;
            }
            f.by_payment
                .entry(o.payment.clone())
                .or_default()
                .push(o.order.clone());
            f.orders.insert(
                o.order.clone(),
                Order {
                    status: o.status.clone(),
                    psp_reference: o.psp_reference.clone(),
                    failure_reason: o.failure_reason.clone(),
                    add_reserved: 0,
                    add_refunded: 0,
                    loaded: o,
                },
            );
        }
        for r in refunds {
            f.refunds.insert(
                r.refund.clone(),
                Refund {
                    loaded_status: Some(r.status.clone()),
                    row: r,
                },
            );
        }
        f
    }

    /// Applies one fresh event (one [`folds`] accepts, with a payment id)
    /// and returns its outcome, as the per-event statements decided it.
    pub fn apply(&mut self, env: &Envelope) -> Result<Outcome, Overflow> {
        let Some(payment) = env.payment_id else {
            return Ok(Outcome::rejected(
                "missing_payment_id",
                format!("{} without a payment id", env.event_type()),
            ));
        };
        let pid = payment.to_string();
        let at = env.occurred_at.as_micros();
        match &env.event {
            Event::RefundRequested(e) => {
                let refund = e.refund_id.to_string();
                if self.refunds.contains_key(&refund) {
                    // Inserted by the API (with its reservation) or before.
                    return Ok(Outcome::Applied);
                }
                let order_id = e.order_id.to_string();
                let Some(order) = self
                    .orders
                    .get_mut(&order_id)
                    .filter(|o| o.loaded.payment == pid)
                else {
                    return Ok(Outcome::rejected(
                        "unknown_order",
                        format!(
                            "refund of order {} of payment {pid}, never requested",
                            e.order_id
                        ),
                    ));
                };
                // Seen first here (a rebuild, or another producer): reserve now.
                order.add_reserved = add(order.add_reserved, e.amount.amount_minor())?;
                self.refunds.insert(
                    refund.clone(),
                    Refund {
                        loaded_status: None,
                        row: RefundRow {
                            refund,
                            order: order_id,
                            payment: pid,
                            amount_minor: e.amount.amount_minor(),
                            currency: e.amount.currency().code().to_owned(),
                            status: RefundStatus::Requested.as_str().to_owned(),
                            reason: e.reason.clone(),
                            failure: None,
                            created_us: at,
                            updated_us: at,
                        },
                    },
                );
            }
            Event::RefundSucceeded(e) => {
                // Counted once, on the transition out of requested
                // (`refund::apply`: a failed refund stays failed).
                if let Some(r) = self.refunds.get_mut(&e.refund_id.to_string())
                    && RefundStatus::parse(&r.row.status) == Some(RefundStatus::Requested)
                {
                    r.row.status = RefundStatus::Succeeded.as_str().to_owned();
                    r.row.updated_us = at;
                    if let Some(o) = self.orders.get_mut(&e.order_id.to_string()) {
                        o.add_refunded = add(o.add_refunded, e.amount.amount_minor())?;
                    }
                }
            }
            Event::RefundFailed(e) => {
                if let Some(r) = self.refunds.get_mut(&e.refund_id.to_string())
                    && RefundStatus::parse(&r.row.status) == Some(RefundStatus::Requested)
                {
                    r.row.status = RefundStatus::Failed.as_str().to_owned();
                    r.row.failure = Some(format!("{}: {}", e.code, e.reason));
                    r.row.updated_us = at;
                    // A failed refund gives its reservation back.
                    let amount = r.row.amount_minor;
                    if let Some(o) = self.orders.get_mut(&e.order_id.to_string()) {
                        o.add_reserved = add(
                            o.add_reserved,
                            amount.checked_neg().ok_or(Overflow { a: 0, b: amount })?,
                        )?;
                    }
                }
            }
            other => {
                let Some(change) = order_change(other) else {
                    return Ok(Outcome::Applied);
                };
                let order_id = change.order_id.to_string();
                let Some(order) = self
                    .orders
                    .get_mut(&order_id)
                    .filter(|o| o.loaded.payment == pid)
                else {
                    return Ok(Outcome::rejected(
                        "unknown_order",
                        format!("order {order_id} of payment {pid} was never requested"),
                    ));
                };
                // Final states never regress (a late "started" after
                // "succeeded"); an unknown stored status counts as open.
                let now = OrderStatus::parse(&order.status);
                if !now.is_some_and(OrderStatus::is_final) {
                    let to = now.map_or(change.status, |s| s.then(change.status));
                    order.status = to.as_str().to_owned();
                    if change.psp_reference.is_some() {
                        order.psp_reference = change.psp_reference;
                    }
                    if change.failure.is_some() {
                        order.failure_reason = change.failure;
                    }
                }
                // Roll the payment up once every order is final.
                let orders = &self.orders;
                let rolled = rollup(self.by_payment.get(&pid).into_iter().flatten().map(|id| {
                    orders
                        .get(id)
                        .and_then(|o| OrderStatus::parse(&o.status))
                        .unwrap_or(OrderStatus::Executing)
                }));
                if let Some(status) = rolled
                    && let Some(p) = self.payments.get_mut(&pid)
                    && PaymentStatus::parse(&p.status) != Some(PaymentStatus::Rejected)
                {
                    p.status = status.as_str().to_owned();
                    p.updated_us = at;
                }
            }
        }
        Ok(Outcome::Applied)
    }

    /// What changed, one list per table, in key order (the lock order of
    /// the writes).
    pub fn writes(self) -> StatusWrites {
        let mut w = StatusWrites::default();
        for (_, p) in self.payments {
            if p.status != p.loaded.status || p.updated_us != p.loaded.updated_us {
                w.payments.push(PaymentWrite {
                    payment: p.loaded.payment,
                    old_status: p.loaded.status,
                    status: p.status,
                    updated_us: p.updated_us,
                });
            }
        }
        for (_, o) in self.orders {
            if o.status != o.loaded.status
                || o.psp_reference != o.loaded.psp_reference
                || o.failure_reason != o.loaded.failure_reason
                || o.add_reserved != 0
                || o.add_refunded != 0
            {
                w.orders.push(OrderWrite {
                    order: o.loaded.order,
                    old_status: o.loaded.status,
                    status: o.status,
                    psp_reference: o.psp_reference,
                    failure_reason: o.failure_reason,
                    add_reserved: o.add_reserved,
                    add_refunded: o.add_refunded,
                });
            }
        }
        for (_, r) in self.refunds {
            match r.loaded_status {
                None => w.new_refunds.push(r.row),
                Some(old) if old != r.row.status => w.refunds.push(RefundWrite {
                    refund: r.row.refund,
                    old_status: old,
                    status: r.row.status,
                    failure: r.row.failure,
                    updated_us: r.row.updated_us,
                }),
                Some(_) => {}
            }
        }
        w
    }
}

fn add(a: i64, b: i64) -> Result<i64, Overflow> {
    a.checked_add(b).ok_or(Overflow { a, b })
}
