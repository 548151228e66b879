//! The consumer side: records the work an event asks for in SQL and returns.
//! It never calls the PSP, so a slow PSP never holds up a partition; the
//! dispatcher picks the recorded work up.

use crate::limits::CARD_TOKEN_LEN_MAX;
use crate::service::App;
use crate::store::{self, IntakeOp, IntakeResult, NewOrder};
use events::{Event, Money};
use streaming::{BatchHandler, Delivered, HandlerError, Outcome};

/// The payment metadata key naming the payment method to charge. There is
/// no default: a payment without one is dead-lettered, never charged.
pub const CARD_TOKEN_KEY: &str = "card_token";

#[derive(Debug)]
pub struct Intake {
    app: App,
}

impl Intake {
    pub fn new(app: App) -> Intake {
        Intake { app }
    }
}

/// What to do with one event: an operation, or an outcome without one.
fn op_for(d: &Delivered) -> Result<IntakeOp, Outcome> {
    let env = &d.envelope;
    let payment = env.payment_id.map(|p| p.to_string());
    let need_payment = || {
        payment.clone().ok_or_else(|| {
            Outcome::rejected(
                "missing_payment_id",
                format!("{} without a payment id", env.event_type()),
            )
        })
    };
    match &env.event {
        Event::PaymentRequested(r) => {
            let mut orders = Vec::with_capacity(r.orders.len());
            for (i, o) in r.orders.iter().enumerate() {
                let seq = i32::try_from(i)
                    .map_err(|_| Outcome::rejected("too_many_orders", "order index overflows"))?;
                if o.amount.amount_minor() <= 0 {
                    return Err(Outcome::rejected(
                        "invalid_amount",
                        format!("order {} has a non-positive amount", o.order_id),
                    ));
                }
                if !o.amount.within_bound() {
                    return Err(Outcome::rejected(
                        "invalid_amount",
                        format!(
                            "order {} amount {} is above the bound of {} minor units",
                            o.order_id,
                            o.amount,
                            Money::MAX_MINOR
                        ),
                    ));
                }
                orders.push(NewOrder {
                    order_id: o.order_id.to_string(),
                    seq,
                    seller_id: o.seller_id.to_string(),
                    amount_minor: o.amount.amount_minor(),
                    currency: o.amount.currency().code().to_owned(),
                });
            }
            // The payment total is bounded like each order (what the
            // handler accepts), so no later sum overflows.
            let total = r
                .orders
                .first()
                .map(|o| o.amount.currency())
                .and_then(|c| Money::checked_sum(c, r.orders.iter().map(|o| o.amount)).ok());
            if !total.is_some_and(|t| t.within_bound()) {
                return Err(Outcome::rejected(
                    "invalid_amount",
                    format!(
                        "the orders' total is missing, mixes currencies or is above the bound of {} minor units",
                        Money::MAX_MINOR
                    ),
                ));
            }
            let card_token = match r.metadata.get(CARD_TOKEN_KEY) {
                None => {
                    return Err(Outcome::rejected(
                        "missing_payment_method",
                        format!("payment without metadata.{CARD_TOKEN_KEY}: nothing to charge"),
                    ));
                }
                Some(t)
                    if t.is_empty()
                        || t.len() > CARD_TOKEN_LEN_MAX
                        || t.chars().any(char::is_control) =>
                {
                    return Err(Outcome::rejected(
                        "invalid_payment_method",
                        format!(
                            "metadata.{CARD_TOKEN_KEY} must be 1 to {CARD_TOKEN_LEN_MAX} bytes without control characters"
                        ),
                    ));
                }
                Some(t) => t.clone(),
            };
            Ok(IntakeOp::Requested {
                payment_id: need_payment()?,
                correlation_id: env.correlation_id.to_string(),
                card_token,
                orders,
            })
        }
        Event::RiskApproved(_) => Ok(IntakeOp::Approved {
            payment_id: need_payment()?,
        }),
        Event::RiskRejected(_) => Ok(IntakeOp::Rejected {
            payment_id: need_payment()?,
        }),
        Event::RefundRequested(r) => {
            if r.amount.amount_minor() <= 0 || !r.amount.within_bound() {
                return Err(Outcome::rejected(
                    "invalid_amount",
                    format!(
                        "refund {} amount {} is not positive or above the bound",
                        r.refund_id, r.amount
                    ),
                ));
            }
            Ok(IntakeOp::Refund {
                refund_id: r.refund_id.to_string(),
                order_id: r.order_id.to_string(),
                amount_minor: r.amount.amount_minor(),
                currency: r.amount.currency().code().to_owned(),
                reason: r.reason.clone(),
                source_partition: d.meta.partition,
                source_offset: d.meta.offset,
            })
        }
        _ => Err(Outcome::Ignored),
    }
}

impl BatchHandler for Intake {
    async fn handle(&mut self, batch: &[Delivered]) -> Result<Vec<Outcome>, HandlerError> {
        let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(batch.len());
        let mut ops = Vec::new();
        for d in batch {
            match op_for(d) {
                Ok(op) => {
                    ops.push(op);
                    outcomes.push(None);
                }
                Err(o) => outcomes.push(Some(o)),
            }
        }
        let results = if ops.is_empty() {
            Vec::new()
        } else {
            store::intake(&self.app.db, &ops).await.map_err(|e| {
                HandlerError::classified(storage::deterministic_kind(&e), format!("database: {e}"))
            })?
        };
        assert_eq!(results.len(), ops.len(), "one result per operation");
        let mut results = results.into_iter().zip(ops.iter());
        let out = outcomes
            .into_iter()
            .map(|o| match o {
                Some(o) => o,
                None => {
                    let (r, op) = results.next().expect("a result for every operation");
                    match r {
                        IntakeResult::Applied => Outcome::Applied,
                        IntakeResult::Duplicate => Outcome::Duplicate,
                        IntakeResult::Unknown => match op {
                            IntakeOp::Rejected { .. } => Outcome::Ignored,
                            IntakeOp::Refund { order_id, .. } => Outcome::rejected(
                                "unknown_order",
                                format!(
                                    "refund for order {order_id}, which the executor never saw"
                                ),
                            ),
                            _ => Outcome::rejected(
                                "unknown_payment",
                                "risk decision for a payment the executor never saw",
                            ),
                        },
                    }
                }
            })
            .collect();
        self.app.work.notify_one();
        Ok(out)
    }
}
