//! The order state machine: how one payment order is executed at the PSP.
//!
//! An order waits for the risk decision, then is charged in attempts. Each
//! attempt is an intent (`AttemptStarted`, recorded before the PSP call)
//! followed by the call's outcome. The PSP idempotency key of every attempt
//! is the order id, so a repeated call (after a crash, a timeout or a lost
//! intent) replays the first charge instead of making a second one.
//!
//! Outcomes: a charge `succeeded` (captured, final), `declined` (final),
//! `pending` (the PSP decides later: a webhook or a poll settles it once);
//! a transient error parks the order for a retry with back-off; once the
//! attempts or the time are used up the order fails only if the PSP
//! definitely has no charge, otherwise it enters the lookup state and asks
//! the PSP (`GET /v1/charges?reference=`) until it answers definitely.
//!
//! `decide` never does I/O: when a decision depends on the PSP's list of
//! charges for the order it refuses with [`Rejection::LookupNeeded`], the
//! caller looks the charges up and decides again with the answer. Time
//! (`now_ms`) and waits (back-off with jitter, drawn by the caller) come in
//! with the command.

use events::{
    Event, Money, OrderExecutionStarted, OrderFailed, OrderId, OrderPending, OrderSettledByWebhook,
    OrderSucceeded,
};

/// The state names as stored (`executor_orders.state`). The lookup state is
/// stored as `retry_wait` with `lookup_since_ms` set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StateName {
    AwaitingRisk,
    Ready,
    Executing,
    RetryWait,
    Pending,
    Succeeded,
    Failed,
    Cancelled,
}

impl StateName {
    pub const ALL: [StateName; 8] = [
        StateName::AwaitingRisk,
        StateName::Ready,
        StateName::Executing,
        StateName::RetryWait,
        StateName::Pending,
        StateName::Succeeded,
        StateName::Failed,
        StateName::Cancelled,
    ];

    /// The stored spelling (an SQL literal).
    pub const fn as_str(self) -> &'static str {
        match self {
            StateName::AwaitingRisk => "awaiting_risk",
            StateName::Ready => "ready",
            StateName::Executing => "executing",
            StateName::RetryWait => "retry_wait",
            StateName::Pending => "pending",
            StateName::Succeeded => "succeeded",
            StateName::Failed => "failed",
            StateName::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<StateName> {
        StateName::ALL.into_iter().find(|n| n.as_str() == s)
    }

    /// Succeeded, failed and cancelled orders never move again.
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            StateName::Succeeded | StateName::Failed | StateName::Cancelled
        )
    }
}

impl std::fmt::Display for StateName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an order is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Recorded from `PaymentRequested`; waits for the risk decision.
    AwaitingRisk,
    /// Approved; the first attempt is due.
    Ready,
    /// Attempt `Order::attempts` was recorded and may be at the PSP.
    Executing,
    /// A transient failure; attempt `attempts + 1` is due at `at_ms`.
    RetryWait { at_ms: i64 },
    /// Attempts are used up but a charge may exist: the PSP's charges for
    /// the order are looked up at `at_ms` (and on, until a definite answer).
    Lookup { since_ms: i64, at_ms: i64 },
    /// The PSP made the charge `charge_id` pending; a webhook or a poll at
    /// `poll_at_ms` settles it.
    Pending {
        charge_id: String,
        since_ms: i64,
        poll_at_ms: i64,
    },
    /// Captured. Final.
    Succeeded { charge_id: String, fee_minor: i64 },
    /// Not charged (declined, refused, given up). Final.
    Failed { charge_id: Option<String> },
    /// Rejected by the risk check. Final.
    Cancelled,
}

impl Status {
    pub const fn name(&self) -> StateName {
        match self {
            Status::AwaitingRisk => StateName::AwaitingRisk,
            Status::Ready => StateName::Ready,
            Status::Executing => StateName::Executing,
            Status::RetryWait { .. } | Status::Lookup { .. } => StateName::RetryWait,
            Status::Pending { .. } => StateName::Pending,
            Status::Succeeded { .. } => StateName::Succeeded,
            Status::Failed { .. } => StateName::Failed,
            Status::Cancelled => StateName::Cancelled,
        }
    }

    pub const fn is_terminal(&self) -> bool {
        self.name().is_terminal()
    }
}

/// One order as the executor keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub id: OrderId,
    pub amount: Money,
    pub status: Status,
    /// Attempts recorded so far (the last one's number).
    pub attempts: i32,
    /// No new attempt after this (set by the first attempt).
    pub deadline_ms: Option<i64>,
    /// When the last attempt whose outcome is unknown ended.
    pub last_unknown_ms: Option<i64>,
    /// The last error, for people (not a rule input except in messages).
    pub last_error: Option<String>,
}

impl Order {
    /// A new order, waiting for the risk decision.
    pub fn new(id: OrderId, amount: Money) -> Order {
        Order {
            id,
            amount,
            status: Status::AwaitingRisk,
            attempts: 0,
            deadline_ms: None,
            last_unknown_ms: None,
            last_error: None,
        }
    }

    /// The PSP idempotency key of every charge attempt of this order: the
    /// order id, always.
    pub fn idempotency_key(&self) -> OrderId {
        self.id
    }
}

/// The retry rules, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    pub max_attempts: i32,
    /// From the first attempt; no retry starts after it.
    pub max_total_ms: i64,
    /// A pending order is polled this long after it went pending.
    pub pending_poll_ms: i64,
    /// How long after an unknown-outcome attempt the PSP's "no charge" is
    /// not trusted yet.
    pub unknown_grace_ms: i64,
}

/// A charge's status as the PSP reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeStatus {
    Succeeded,
    Declined,
    Pending,
    /// A status we do not know (treated as an unreadable answer).
    Other(String),
}

impl ChargeStatus {
    pub fn parse(s: &str) -> ChargeStatus {
        match s {
            "succeeded" => ChargeStatus::Succeeded,
            "declined" => ChargeStatus::Declined,
            "pending" => ChargeStatus::Pending,
            other => ChargeStatus::Other(other.to_owned()),
        }
    }
}

/// A charge the PSP reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    pub id: String,
    pub status: ChargeStatus,
    pub fee_minor: i64,
    pub decline_code: Option<String>,
}

/// How a PSP call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureKind {
    /// Worth retrying with the same key; `outcome_unknown` when the PSP may
    /// still have made the charge (timeout, connection lost, 409 key in
    /// use, unreadable answer).
    Transient { outcome_unknown: bool },
    /// A final refusal; `validation` (400) is the only one that proves no
    /// charge exists.
    Refused { validation: bool },
}

/// A failed PSP call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    /// Stable code (e.g. `psp_unavailable`, `idempotency_key_reused`).
    pub code: String,
    /// The PSP's message (goes into events).
    pub reason: String,
    /// The whole error for people (goes into the stored last error).
    pub detail: String,
}

impl Failure {
    pub fn outcome_unknown(&self) -> bool {
        matches!(
            self.kind,
            FailureKind::Transient {
                outcome_unknown: true
            }
        )
    }
}

/// What a charge call answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallAnswer {
    Charge(Charge),
    Failure(Failure),
}

/// What `GET /v1/charges?reference=<order id>` answered: the last charge,
/// none, or the look-up failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Found(Charge),
    NoCharge,
    Failed,
}

/// What may happen to an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// The risk check approved the payment.
    Approve { now_ms: i64 },
    /// The risk check rejected the payment.
    Cancel,
    /// Start the next attempt (the intent, recorded before the call).
    BeginAttempt { now_ms: i64 },
    /// The answer to the charge call of `attempt`. `retry_wait_ms` is the
    /// back-off before the next attempt (jitter drawn by the caller, at
    /// least any `Retry-After`); `lookup_wait_ms` the wait before a charge
    /// look-up; `lookup` the PSP's charges for the order, when `decide`
    /// asked for them ([`Rejection::LookupNeeded`]).
    RecordCall {
        attempt: i32,
        now_ms: i64,
        answer: CallAnswer,
        retry_wait_ms: i64,
        lookup_wait_ms: i64,
        lookup: Option<Lookup>,
    },
    /// The look-up of an order in the lookup state.
    LookUp {
        now_ms: i64,
        lookup_wait_ms: i64,
        answer: Lookup,
    },
    /// A final charge state for a pending order (verified webhook or poll).
    Settle { charge: Charge },
    /// A pending order is still pending (or its poll failed): poll at `at_ms`.
    PollLater { at_ms: i64 },
}

/// Why a command does nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("the order is {0}, which is final")]
    Terminal(StateName),
    #[error("the order is {0}, not awaiting the risk decision")]
    NotAwaitingRisk(StateName),
    #[error("the order is {0}; no attempt can start")]
    NotExecutable(StateName),
    #[error("the order is in the lookup state; no attempt can start")]
    InLookup,
    #[error("attempt {got} is not the order's current attempt {current} in progress")]
    NotCurrentAttempt { current: i32, got: i32 },
    #[error("the order is not in the lookup state")]
    NotInLookup,
    #[error("the order is {0}, not pending")]
    NotPending(StateName),
    #[error("the charge is not final yet")]
    ChargeNotFinal,
    /// The decision depends on the PSP's charges for the order: look them
    /// up and decide again with `lookup`.
    #[error("the PSP's charges for the order must be looked up first")]
    LookupNeeded,
}

/// Facts about an order. Some are published (see [`OrderEvent::published`]),
/// the others only change the stored schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderEvent {
    Approved {
        at_ms: i64,
    },
    Cancelled,
    /// The intent of attempt `attempt`; the call uses `idempotency_key`.
    AttemptStarted {
        attempt: i32,
        idempotency_key: OrderId,
        deadline_ms: i64,
    },
    /// Attempt `attempt` failed transiently (published as a retryable
    /// `OrderFailed`).
    AttemptFailed {
        attempt: i32,
        code: String,
        reason: String,
    },
    RetryScheduled {
        at_ms: i64,
        error: String,
        /// The attempt may have made a charge; ended at `now_ms`.
        outcome_unknown: bool,
        now_ms: i64,
    },
    /// Enter (or stay in) the lookup state; look up at `at_ms`.
    LookupScheduled {
        at_ms: i64,
        error: String,
        outcome_unknown: bool,
        now_ms: i64,
    },
    /// A look-up without a definite answer: look again at `at_ms`.
    LookupRepeated {
        at_ms: i64,
    },
    Succeeded {
        attempt: i32,
        charge_id: String,
        fee_minor: i64,
    },
    Declined {
        attempt: i32,
        charge_id: String,
        code: String,
    },
    /// Failed for good without a charge (validation error, retries
    /// exhausted): published as a final `OrderFailed`.
    Failed {
        attempt: i32,
        code: String,
        reason: String,
        error: String,
    },
    WentPending {
        charge_id: String,
        now_ms: i64,
        poll_at_ms: i64,
    },
    /// A pending charge became final.
    Settled {
        charge_id: String,
        succeeded: bool,
        fee_minor: i64,
        decline_code: Option<String>,
    },
    PollScheduled {
        at_ms: i64,
    },
}

impl OrderEvent {
    /// Whether this fact captures money (a charge succeeded).
    pub fn is_capture(&self) -> bool {
        matches!(
            self,
            OrderEvent::Succeeded { .. }
                | OrderEvent::Settled {
                    succeeded: true,
                    ..
                }
        )
    }

    /// The event published for this fact, with the discriminator its event
    /// id is derived from (with the order id: `EventId::derive(order id,
    /// discriminator)`), so re-appends of it are duplicates consumers drop.
    /// None for facts that only change the schedule.
    pub fn published(&self, order: &Order) -> Option<(String, Event)> {
        let order_id = order.id;
        let currency = order.amount.currency();
        Some(match self {
            OrderEvent::AttemptStarted { attempt, .. } => (
                format!("attempt-{attempt}-started"),
                OrderExecutionStarted {
                    order_id,
                    attempt: *attempt,
                }
                .into(),
            ),
            OrderEvent::AttemptFailed {
                attempt,
                code,
                reason,
            } => (
                format!("attempt-{attempt}-failed"),
                OrderFailed {
                    order_id,
                    retryable: true,
                    code: code.clone(),
                    reason: reason.clone(),
                    attempt: *attempt,
                }
                .into(),
            ),
            OrderEvent::Succeeded {
                charge_id,
                fee_minor,
                ..
            } => (
                "succeeded".into(),
                OrderSucceeded {
                    order_id,
                    psp_reference: charge_id.clone(),
                    amount: order.amount,
                    fee: Money::new(*fee_minor, currency),
                }
                .into(),
            ),
            OrderEvent::Declined { attempt, code, .. } => (
                "failed-final".into(),
                OrderFailed {
                    order_id,
                    retryable: false,
                    code: code.clone(),
                    reason: format!("the PSP declined the charge ({code})"),
                    attempt: *attempt,
                }
                .into(),
            ),
            OrderEvent::Failed {
                attempt,
                code,
                reason,
                ..
            } => (
                "failed-final".into(),
                OrderFailed {
                    order_id,
                    retryable: false,
                    code: code.clone(),
                    reason: reason.clone(),
                    attempt: *attempt,
                }
                .into(),
            ),
            OrderEvent::WentPending { charge_id, .. } => (
                "pending".into(),
                OrderPending {
                    order_id,
                    psp_reference: charge_id.clone(),
                    amount: order.amount,
                }
                .into(),
            ),
            OrderEvent::Settled {
                charge_id,
                succeeded,
                fee_minor,
                decline_code,
            } => (
                "settled".into(),
                OrderSettledByWebhook {
                    order_id,
                    psp_reference: charge_id.clone(),
                    succeeded: *succeeded,
                    amount: order.amount,
                    fee: succeeded.then(|| Money::new(*fee_minor, currency)),
                    failure_reason: (!succeeded)
                        .then(|| decline_code.clone().unwrap_or_else(|| "declined".into())),
                }
                .into(),
            ),
            OrderEvent::Approved { .. }
            | OrderEvent::Cancelled
            | OrderEvent::RetryScheduled { .. }
            | OrderEvent::LookupScheduled { .. }
            | OrderEvent::LookupRepeated { .. }
            | OrderEvent::PollScheduled { .. } => return None,
        })
    }
}

/// What `command` means for `order`: the facts it produces, or why it does
/// nothing.
pub fn decide(
    order: &Order,
    rules: &Rules,
    command: Command,
) -> Result<Vec<OrderEvent>, Rejection> {
    let name = order.status.name();
    if name.is_terminal() {
        return Err(Rejection::Terminal(name));
    }
    match command {
        Command::Approve { now_ms } => match order.status {
            Status::AwaitingRisk => Ok(vec![OrderEvent::Approved { at_ms: now_ms }]),
            _ => Err(Rejection::NotAwaitingRisk(name)),
        },
        Command::Cancel => match order.status {
            Status::AwaitingRisk => Ok(vec![OrderEvent::Cancelled]),
            _ => Err(Rejection::NotAwaitingRisk(name)),
        },
        Command::BeginAttempt { now_ms } => match order.status {
            // An order found `executing` lost its holder mid-call: the next
            // attempt repeats the call under the same key.
            Status::Ready | Status::RetryWait { .. } | Status::Executing => {
                Ok(vec![OrderEvent::AttemptStarted {
                    attempt: order.attempts.saturating_add(1),
                    idempotency_key: order.idempotency_key(),
                    deadline_ms: order
                        .deadline_ms
                        .unwrap_or_else(|| now_ms.saturating_add(rules.max_total_ms)),
                }])
            }
            Status::Lookup { .. } => Err(Rejection::InLookup),
            _ => Err(Rejection::NotExecutable(name)),
        },
        Command::RecordCall {
            attempt,
            now_ms,
            answer,
            retry_wait_ms,
            lookup_wait_ms,
            lookup,
        } => {
            if order.status != Status::Executing || attempt != order.attempts {
                return Err(Rejection::NotCurrentAttempt {
                    current: order.attempts,
                    got: attempt,
                });
            }
            let call = CallContext {
                order,
                rules,
                attempt,
                now_ms,
                lookup_wait_ms,
            };
            match answer {
                CallAnswer::Charge(c) => match charge_outcome(order, attempt, now_ms, rules, &c) {
                    Some(events) => Ok(events),
                    None => call.transient(
                        &Failure {
                            kind: FailureKind::Transient {
                                outcome_unknown: true,
                            },
                            code: "psp_bad_answer".into(),
                            reason: format!("unknown charge status {:?}", status_text(&c.status)),
                            detail: format!(
                                "psp_bad_answer: unknown charge status {:?}",
                                status_text(&c.status)
                            ),
                        },
                        retry_wait_ms,
                        lookup,
                    ),
                },
                CallAnswer::Failure(f) => match f.kind {
                    FailureKind::Refused { validation } => call.refused(&f, validation, lookup),
                    FailureKind::Transient { .. } => call.transient(&f, retry_wait_ms, lookup),
                },
            }
        }
        Command::LookUp {
            now_ms,
            lookup_wait_ms,
            answer,
        } => {
            let Status::Lookup { .. } = order.status else {
                return Err(Rejection::NotInLookup);
            };
            let n = order.attempts;
            let next = now_ms.saturating_add(lookup_wait_ms);
            match answer {
                Lookup::Found(c) => Ok(charge_outcome(order, n, now_ms, rules, &c)
                    .unwrap_or_else(|| vec![OrderEvent::LookupRepeated { at_ms: next }])),
                Lookup::Failed => Ok(vec![OrderEvent::LookupRepeated { at_ms: next }]),
                Lookup::NoCharge => {
                    let grace_end = order
                        .last_unknown_ms
                        .map_or(0, |t| t.saturating_add(rules.unknown_grace_ms));
                    if now_ms < grace_end {
                        return Ok(vec![OrderEvent::LookupRepeated {
                            at_ms: next.min(grace_end),
                        }]);
                    }
                    let last = order.last_error.clone().unwrap_or_default();
                    Ok(vec![exhausted(
                        n,
                        &last,
                        format!("retries exhausted, the PSP has no charge: {last}"),
                    )])
                }
            }
        }
        Command::Settle { charge } => {
            if !matches!(order.status, Status::Pending { .. }) {
                return Err(Rejection::NotPending(name));
            }
            let succeeded = match charge.status {
                ChargeStatus::Succeeded => true,
                ChargeStatus::Declined => false,
                ChargeStatus::Pending | ChargeStatus::Other(_) => {
                    return Err(Rejection::ChargeNotFinal);
                }
            };
            Ok(vec![OrderEvent::Settled {
                charge_id: charge.id,
                succeeded,
                fee_minor: if succeeded { charge.fee_minor } else { 0 },
                decline_code: charge.decline_code,
            }])
        }
        Command::PollLater { at_ms } => match order.status {
            Status::Pending { .. } => Ok(vec![OrderEvent::PollScheduled { at_ms }]),
            _ => Err(Rejection::NotPending(name)),
        },
    }
}

fn status_text(s: &ChargeStatus) -> &str {
    match s {
        ChargeStatus::Succeeded => "succeeded",
        ChargeStatus::Declined => "declined",
        ChargeStatus::Pending => "pending",
        ChargeStatus::Other(o) => o,
    }
}

/// The facts for a charge the PSP reported; None for a status we do not
/// know.
fn charge_outcome(
    _order: &Order,
    attempt: i32,
    now_ms: i64,
    rules: &Rules,
    c: &Charge,
) -> Option<Vec<OrderEvent>> {
    Some(vec![match c.status {
        ChargeStatus::Succeeded => OrderEvent::Succeeded {
            attempt,
            charge_id: c.id.clone(),
            fee_minor: c.fee_minor,
        },
        ChargeStatus::Declined => OrderEvent::Declined {
            attempt,
            charge_id: c.id.clone(),
            code: c.decline_code.clone().unwrap_or_else(|| "declined".into()),
        },
        ChargeStatus::Pending => OrderEvent::WentPending {
            charge_id: c.id.clone(),
            now_ms,
            poll_at_ms: now_ms.saturating_add(rules.pending_poll_ms),
        },
        ChargeStatus::Other(_) => return None,
    }])
}

/// The final failure of an order whose attempts are used up.
fn exhausted(attempt: i32, last_error: &str, error: String) -> OrderEvent {
    OrderEvent::Failed {
        attempt,
        code: "retries_exhausted".into(),
        reason: format!("gave up after {attempt} attempts; last error: {last_error}"),
        error,
    }
}

struct CallContext<'a> {
    order: &'a Order,
    rules: &'a Rules,
    attempt: i32,
    now_ms: i64,
    lookup_wait_ms: i64,
}

impl CallContext<'_> {
    /// A final refusal. Only a validation error (400) proves no charge
    /// exists; for anything else (e.g. 422 `idempotency_key_reused`: a
    /// charge was made under our key) the PSP's charges decide first.
    fn refused(
        &self,
        f: &Failure,
        validation: bool,
        lookup: Option<Lookup>,
    ) -> Result<Vec<OrderEvent>, Rejection> {
        let n = self.attempt;
        let fail = || {
            vec![OrderEvent::Failed {
                attempt: n,
                code: f.code.clone(),
                reason: f.reason.clone(),
                error: f.detail.clone(),
            }]
        };
        if validation {
            return Ok(fail());
        }
        let charge_exists = f.code == "idempotency_key_reused";
        let to_lookup = || {
            vec![OrderEvent::LookupScheduled {
                at_ms: self.now_ms.saturating_add(self.lookup_wait_ms),
                error: format!("refused, looking the charge up: {}", f.detail),
                outcome_unknown: charge_exists,
                now_ms: self.now_ms,
            }]
        };
        Ok(match lookup.ok_or(Rejection::LookupNeeded)? {
            Lookup::Found(c) => {
                charge_outcome(self.order, n, self.now_ms, self.rules, &c).unwrap_or_else(to_lookup)
            }
            Lookup::NoCharge if charge_exists => to_lookup(),
            Lookup::NoCharge => fail(),
            Lookup::Failed => to_lookup(),
        })
    }

    /// A transient failure: retry later, or give up once the attempts or
    /// the time are used up, but only on a definite "no charge" from the
    /// PSP; if any attempt may have made a charge, the order waits in the
    /// lookup state until the PSP answers definitely.
    fn transient(
        &self,
        f: &Failure,
        retry_wait_ms: i64,
        lookup: Option<Lookup>,
    ) -> Result<Vec<OrderEvent>, Rejection> {
        let n = self.attempt;
        let now = self.now_ms;
        let attempt_failed = OrderEvent::AttemptFailed {
            attempt: n,
            code: f.code.clone(),
            reason: f.reason.clone(),
        };
        let deadline = self.order.deadline_ms.unwrap_or(i64::MAX);
        let at = now.saturating_add(retry_wait_ms);
        let exhausted_now = n >= self.rules.max_attempts || at > deadline;
        if !exhausted_now {
            return Ok(vec![
                attempt_failed,
                OrderEvent::RetryScheduled {
                    at_ms: at,
                    error: f.detail.clone(),
                    outcome_unknown: f.outcome_unknown(),
                    now_ms: now,
                },
            ]);
        }
        let unknown = f.outcome_unknown() || self.order.last_unknown_ms.is_some();
        let to_lookup = || {
            vec![
                attempt_failed.clone(),
                OrderEvent::LookupScheduled {
                    at_ms: now.saturating_add(self.lookup_wait_ms),
                    error: format!("retries exhausted, looking the charge up: {}", f.detail),
                    outcome_unknown: f.outcome_unknown(),
                    now_ms: now,
                },
            ]
        };
        Ok(match lookup.ok_or(Rejection::LookupNeeded)? {
            Lookup::Found(c) => match charge_outcome(self.order, n, now, self.rules, &c) {
                Some(events) => std::iter::once(attempt_failed.clone())
                    .chain(events)
                    .collect(),
                None => to_lookup(),
            },
            Lookup::NoCharge if unknown => to_lookup(),
            Lookup::Failed => to_lookup(),
            Lookup::NoCharge => vec![
                attempt_failed.clone(),
                exhausted(n, &f.detail, format!("retries exhausted: {}", f.detail)),
            ],
        })
    }
}

/// The order after `event`.
pub fn apply(mut order: Order, event: &OrderEvent) -> Order {
    match event {
        OrderEvent::Approved { .. } => order.status = Status::Ready,
        OrderEvent::Cancelled => order.status = Status::Cancelled,
        OrderEvent::AttemptStarted {
            attempt,
            deadline_ms,
            ..
        } => {
            order.attempts = order.attempts.max(*attempt);
            order.deadline_ms = Some(*deadline_ms);
            order.status = Status::Executing;
        }
        OrderEvent::AttemptFailed { .. } => {}
        OrderEvent::RetryScheduled {
            at_ms,
            error,
            outcome_unknown,
            now_ms,
        } => {
            order.status = Status::RetryWait { at_ms: *at_ms };
            order.last_error = Some(error.clone());
            if *outcome_unknown {
                order.last_unknown_ms = Some(*now_ms);
            }
        }
        OrderEvent::LookupScheduled {
            at_ms,
            error,
            outcome_unknown,
            now_ms,
        } => {
            let since_ms = match order.status {
                Status::Lookup { since_ms, .. } => since_ms,
                _ => *now_ms,
            };
            order.status = Status::Lookup {
                since_ms,
                at_ms: *at_ms,
            };
            order.last_error = Some(error.clone());
            if *outcome_unknown {
                order.last_unknown_ms = Some(*now_ms);
            }
        }
        OrderEvent::LookupRepeated { at_ms } => {
            if let Status::Lookup { since_ms, .. } = order.status {
                order.status = Status::Lookup {
                    since_ms,
                    at_ms: *at_ms,
                };
            }
        }
        OrderEvent::Succeeded {
            charge_id,
            fee_minor,
            ..
        } => {
            order.status = Status::Succeeded {
                charge_id: charge_id.clone(),
                fee_minor: *fee_minor,
            };
            order.last_error = None;
        }
        OrderEvent::Declined {
            charge_id, code, ..
        } => {
            order.status = Status::Failed {
                charge_id: Some(charge_id.clone()),
            };
            order.last_error = Some(format!("declined: {code}"));
        }
        OrderEvent::Failed { error, .. } => {
            order.status = Status::Failed { charge_id: None };
            order.last_error = Some(error.clone());
        }
        OrderEvent::WentPending {
            charge_id,
            now_ms,
            poll_at_ms,
        } => {
            order.status = Status::Pending {
                charge_id: charge_id.clone(),
                since_ms: *now_ms,
                poll_at_ms: *poll_at_ms,
            };
            order.last_error = None;
        }
        OrderEvent::Settled {
            charge_id,
            succeeded,
            fee_minor,
            decline_code,
        } => {
            order.status = if *succeeded {
                Status::Succeeded {
                    charge_id: charge_id.clone(),
                    fee_minor: *fee_minor,
                }
            } else {
                Status::Failed {
                    charge_id: Some(charge_id.clone()),
                }
            };
            order.last_error = decline_code.clone();
        }
        OrderEvent::PollScheduled { at_ms } => {
            if let Status::Pending {
                charge_id,
                since_ms,
                ..
            } = order.status
            {
                order.status = Status::Pending {
                    charge_id,
                    since_ms,
                    poll_at_ms: *at_ms,
                };
            }
        }
    }
    order
}

/// `decide` then `apply` of every fact: the facts and the order after them.
pub fn execute(
    order: &Order,
    rules: &Rules,
    command: Command,
) -> Result<(Vec<OrderEvent>, Order), Rejection> {
    let events = decide(order, rules, command)?;
    let after = events.iter().fold(order.clone(), apply);
    Ok((events, after))
}
