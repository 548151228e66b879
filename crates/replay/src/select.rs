//! Which records a replay keeps: range (offsets, record timestamps) and
//! event filters (payment, type, seller).

use crate::ReplayArgs;
use crate::bounds::{Bound, BoundError, parse_bound};
use events::{Envelope, Event, EventType, PaymentId};
use std::collections::{HashMap, HashSet};
use streaming::reader::{End, Start};

/// The parsed range and filters of one replay.
#[derive(Debug)]
pub struct Selection {
    pub start: Start,
    pub end: End,
    /// Keep records with timestamp ≥ this (ms), when given.
    pub from_ms: Option<i64>,
    /// Keep records with timestamp < this (ms), when given.
    pub to_ms: Option<i64>,
    payments: HashSet<uuid::Uuid>,
    types: HashSet<EventType>,
    seller: Option<SellerIndex>,
}

/// A replay's flags that select nothing sensible.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    /// `--from` or `--to` is none of the accepted forms.
    #[error("{flag}")]
    Bound {
        flag: &'static str,
        #[source]
        source: BoundError,
    },
    #[error("--from must come before --to (--to is exclusive)")]
    EmptyRange,
    #[error("--payment {input:?}: not a payment id (UUID): {error}")]
    NotAPaymentId { input: String, error: uuid::Error },
    #[error("--type {input:?}: unknown event type; one of {known}")]
    UnknownEventType { input: String, known: String },
    #[error("--seller: empty seller id")]
    EmptySeller,
}

impl Selection {
    pub fn parse(args: &ReplayArgs) -> Result<Selection, SelectError> {
        let bound = |flag: &'static str, value: Option<&str>| {
            value
                .map(parse_bound)
                .transpose()
                .map_err(|source| SelectError::Bound { flag, source })
        };
        let from = bound("--from", args.from.as_deref())?;
        let to = bound("--to", args.to.as_deref())?;
        if let (Some(Bound::Time(a)), Some(Bound::Time(b)))
        | (Some(Bound::Offset(a)), Some(Bound::Offset(b))) = (from, to)
            && a >= b
        {
            return Err(SelectError::EmptyRange);
        }
        let start = match from {
            None => Start::Beginning,
            Some(Bound::Offset(o)) => Start::Offset(o),
            Some(Bound::Time(ms)) => Start::Timestamp(ms),
        };
        let end = match to {
            Some(Bound::Offset(o)) => End::Offset(o),
            _ => End::Latest,
        };
        let payments = args
            .payments
            .iter()
            .map(|p| {
                uuid::Uuid::parse_str(p.trim()).map_err(|error| SelectError::NotAPaymentId {
                    input: p.clone(),
                    error,
                })
            })
            .collect::<Result<_, _>>()?;
        let types = args
            .types
            .iter()
            .map(|t| {
                EventType::parse(t.trim()).ok_or_else(|| {
                    let all: Vec<&str> = EventType::ALL.iter().map(EventType::as_str).collect();
                    SelectError::UnknownEventType {
                        input: t.clone(),
                        known: all.join(", "),
                    }
                })
            })
            .collect::<Result<_, _>>()?;
        let seller = match &args.seller {
            Some(s) if s.trim().is_empty() => return Err(SelectError::EmptySeller),
            Some(s) => Some(SellerIndex::new(s.trim())),
            None => None,
        };
        Ok(Selection {
            start,
            end,
            from_ms: match from {
                Some(Bound::Time(ms)) => Some(ms),
                _ => None,
            },
            to_ms: match to {
                Some(Bound::Time(ms)) => Some(ms),
                _ => None,
            },
            payments,
            types,
            seller,
        })
    }

    /// Whether a record timestamp is inside the time range. A record
    /// without a timestamp is outside any time range.
    pub fn in_time_range(&self, ts: Option<i64>) -> bool {
        if self.from_ms.is_none() && self.to_ms.is_none() {
            return true;
        }
        let Some(ts) = ts else { return false };
        self.from_ms.is_none_or(|f| ts >= f) && self.to_ms.is_none_or(|t| ts < t)
    }

    /// Whether the filters follow orders to sellers (learnt from
    /// PaymentRequested, so those topics are best read first).
    pub fn follows_orders(&self) -> bool {
        self.seller.is_some()
    }

    /// Learns from every decoded event (whatever the filters say), so the
    /// seller filter can follow orders to their sellers.
    pub fn learn(&mut self, env: &Envelope) {
        if let Some(s) = &mut self.seller {
            s.learn(env);
        }
    }

    /// Whether a decoded event passes the event filters.
    pub fn matches(&self, env: &Envelope) -> bool {
        if !self.payments.is_empty()
            && !env
                .payment_id
                .is_some_and(|p| self.payments.contains(&p.as_uuid()))
        {
            return false;
        }
        if !self.types.is_empty() && !self.types.contains(&env.event_type()) {
            return false;
        }
        match &self.seller {
            Some(s) => s.concerns(env),
            None => true,
        }
    }
}

/// What the replay has learnt about one seller so far: its orders (from
/// PaymentRequested), the payments it takes part in, and the discrepancies
/// found on its orders.
#[derive(Debug)]
struct SellerIndex {
    seller: String,
    orders: HashSet<String>,
    payments: HashSet<PaymentId>,
    discrepancies: HashSet<String>,
}

impl SellerIndex {
    fn new(seller: &str) -> SellerIndex {
        SellerIndex {
            seller: seller.to_owned(),
            orders: HashSet::new(),
            payments: HashSet::new(),
            discrepancies: HashSet::new(),
        }
    }

    fn learn(&mut self, env: &Envelope) {
        match &env.event {
            Event::PaymentRequested(r) => {
                let mine: HashMap<String, bool> = r
                    .orders
                    .iter()
                    .map(|o| (o.order_id.to_string(), o.seller_id.as_str() == self.seller))
                    .collect();
                for (order, is_mine) in mine {
                    if is_mine {
                        self.orders.insert(order);
                        if let Some(p) = env.payment_id {
                            self.payments.insert(p);
                        }
                    }
                }
            }
            Event::ReconciliationDiscrepancyFound(d)
                if d.order_id
                    .is_some_and(|o| self.orders.contains(&o.to_string())) =>
            {
                self.discrepancies.insert(d.discrepancy_id.to_string());
            }
            _ => {}
        }
    }

    fn order(&self, order: &impl ToString) -> bool {
        self.orders.contains(&order.to_string())
    }

    fn concerns(&self, env: &Envelope) -> bool {
        match &env.event {
            Event::PaymentRequested(r) => {
                r.orders.iter().any(|o| o.seller_id.as_str() == self.seller)
            }
            Event::RiskApproved(_) | Event::RiskRejected(_) => {
                env.payment_id.is_some_and(|p| self.payments.contains(&p))
            }
            Event::OrderExecutionStarted(e) => self.order(&e.order_id),
            Event::OrderSucceeded(e) => self.order(&e.order_id),
            Event::OrderFailed(e) => self.order(&e.order_id),
            Event::OrderPending(e) => self.order(&e.order_id),
            Event::OrderSettledByWebhook(e) => self.order(&e.order_id),
            Event::RefundRequested(e) => self.order(&e.order_id),
            Event::RefundSucceeded(e) => self.order(&e.order_id),
            Event::RefundFailed(e) => self.order(&e.order_id),
            Event::ReconciliationDiscrepancyFound(d) => {
                self.discrepancies.contains(&d.discrepancy_id.to_string())
            }
            Event::ReconciliationDiscrepancyResolved(d) => {
                self.discrepancies.contains(&d.discrepancy_id.to_string())
            }
            // A whole settlement run: about no seller in particular.
            Event::ReconciliationRunCompleted(_) => false,
        }
    }
}
