//! Properties of the payment state machine over random command and event
//! sequences, in memory: a decided key never re-decides (the same request
//! replays the same events, a different one is refused), terminal statuses
//! stay terminal and final orders stay final.

use domain::payment::{
    OrderStatus, PaymentCommand, PaymentRejection, PaymentState, PaymentStatus, RiskVerdict,
    Submission, apply, decide,
};
use events::{
    BuyerId, ClientId, CorrelationId, Currency, Envelope, Event, EventId, Money,
    OrderExecutionStarted, OrderFailed, OrderId, OrderPending, OrderSettledByWebhook,
    OrderSucceeded, PaymentId, SCHEMA_VERSION, SellerId, Timestamp,
};
use proptest::prelude::*;

const KEY: &str = "key-1";

fn client() -> ClientId {
    ClientId::parse("client-a").unwrap()
}

fn payment_id() -> PaymentId {
    PaymentId::derive(&client(), KEY)
}

/// One of a few requests under the same key (so reuse with a different
/// body happens often), decided at a random time with a random verdict.
fn submission(variant: u8, approved: bool, at_us: i64) -> Submission {
    let orders = (0..=(variant % 3))
        .map(|i| {
            (
                SellerId::parse(&format!("seller-{i}")).unwrap(),
                Money::new(100 + i64::from(variant), Currency::EUR),
            )
        })
        .collect();
    Submission {
        payment_id: payment_id(),
        client_id: client(),
        idempotency_key: Some(KEY.into()),
        buyer_id: BuyerId::parse(&format!("buyer-{}", variant % 2)).unwrap(),
        orders,
        metadata: Default::default(),
        risk: if approved {
            RiskVerdict::Approved {
                rule_set: "rules-v1".into(),
            }
        } else {
            RiskVerdict::Rejected {
                rule_set: "rules-v1".into(),
                rule: "velocity_count".into(),
                reason: "too many".into(),
            }
        },
        at: Timestamp::from_micros(at_us),
        producer: "test".into(),
    }
}

#[derive(Debug, Clone)]
enum Step {
    Submit {
        variant: u8,
        approved: bool,
        at_us: i64,
    },
    /// An executor outcome for order `order` (index), of kind `kind`.
    Outcome { order: usize, kind: u8 },
    /// A copy of an event seen before, delivered again.
    Redeliver(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        1 => (0u8..4, any::<bool>(), 0i64..1_000_000_000).prop_map(|(variant, approved, at_us)| Step::Submit {
            variant,
            approved,
            at_us
        }),
        3 => (0usize..3, 0u8..6).prop_map(|(order, kind)| Step::Outcome { order, kind }),
        1 => (0usize..64).prop_map(Step::Redeliver),
    ]
}

fn outcome(order: OrderId, kind: u8, n: usize) -> Envelope {
    let event: Event = match kind {
        0 => OrderExecutionStarted {
            order_id: order,
            attempt: 1,
        }
        .into(),
        1 => OrderSucceeded {
            order_id: order,
            psp_reference: format!("psp-{n}"),
            amount: Money::new(1, Currency::EUR),
            fee: Money::new(0, Currency::EUR),
        }
        .into(),
        2 => OrderFailed {
            order_id: order,
            retryable: false,
            code: "declined".into(),
            reason: "no".into(),
            attempt: 1,
        }
        .into(),
        3 => OrderFailed {
            order_id: order,
            retryable: true,
            code: "timeout".into(),
            reason: "later".into(),
            attempt: 1,
        }
        .into(),
        4 => OrderPending {
            order_id: order,
            psp_reference: format!("psp-{n}"),
            amount: Money::new(1, Currency::EUR),
        }
        .into(),
        _ => OrderSettledByWebhook {
            order_id: order,
            psp_reference: format!("psp-{n}"),
            succeeded: n.is_multiple_of(2),
            amount: Money::new(1, Currency::EUR),
            fee: None,
            failure_reason: None,
        }
        .into(),
    };
    Envelope {
        event_id: EventId::derive(order.as_uuid(), &format!("outcome-{n}")),
        occurred_at: Timestamp::from_micros(n as i64),
        payment_id: Some(payment_id()),
        correlation_id: CorrelationId::from_uuid(payment_id().as_uuid()),
        causation_id: None,
        producer: "executor".into(),
        schema_version: SCHEMA_VERSION,
        event,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn a_decided_key_never_decides_again(steps in proptest::collection::vec(step(), 1..40)) {
        let mut state = PaymentState::New;
        let mut seen: Vec<Envelope> = Vec::new();
        // (the request, the events) of the first decision under the key.
        let mut first: Option<(Submission, Vec<Envelope>)> = None;
        for (n, s) in steps.into_iter().enumerate() {
            let before = state.clone();
            match s {
                Step::Submit { variant, approved, at_us } => {
                    let sub = submission(variant, approved, at_us);
                    let got = decide(&state, PaymentCommand::Submit(sub.clone()));
                    match &first {
                        None => {
                            let evs = got.expect("a fresh valid request decides");
                            prop_assert_eq!(evs.len(), 2);
                            for e in &evs {
                                state = apply(state, e);
                                seen.push(e.clone());
                            }
                            first = Some((sub, evs));
                        }
                        Some((req, evs)) => {
                            if req.requested() == sub.requested() {
                                // The same request: the same events, byte for
                                // byte, whatever the clock and verdict now.
                                prop_assert_eq!(got.as_ref(), Ok(evs));
                            } else {
                                prop_assert_eq!(got, Err(PaymentRejection::KeyReused));
                            }
                        }
                    }
                }
                Step::Outcome { order, kind } => {
                    let orders = match &state {
                        PaymentState::Live(p) => p.orders.clone(),
                        PaymentState::New => Vec::new(),
                    };
                    let id = orders.get(order).map(|(id, _)| *id).unwrap_or_else(|| OrderId::derive(payment_id(), order));
                    let e = outcome(id, kind, n);
                    state = apply(state, &e);
                    seen.push(e);
                }
                Step::Redeliver(i) => {
                    if !seen.is_empty() {
                        let e = seen[i % seen.len()].clone();
                        state = apply(state, &e);
                    }
                }
            }
            // Terminal stays terminal; final orders stay final.
            if let (PaymentState::Live(b), PaymentState::Live(a)) = (&before, &state) {
                if b.status.is_terminal() {
                    prop_assert_eq!(b.status, a.status);
                }
                for ((_, ob), (_, oa)) in b.orders.iter().zip(&a.orders) {
                    if ob.is_final() {
                        prop_assert_eq!(ob, oa);
                    }
                }
                // A decided payment keeps its decided events.
                prop_assert!(a.decided.starts_with(&b.decided));
            }
            if matches!(before, PaymentState::Live(_)) {
                prop_assert!(matches!(state, PaymentState::Live(_)));
            }
            // The status is the roll-up of its orders once they are final.
            if let PaymentState::Live(p) = &state
                && p.status != PaymentStatus::Rejected
                && p.status != PaymentStatus::Requested
                && let Some(r) = domain::payment::rollup(p.orders.iter().map(|(_, s)| *s))
            {
                prop_assert_eq!(p.status, r);
            }
            if let PaymentState::Live(p) = &state && p.status == PaymentStatus::Rejected {
                prop_assert!(p.orders.iter().all(|(_, s)| *s == OrderStatus::Rejected));
            }
        }
    }
}

#[test]
fn invalid_orders_are_refused() {
    let mut s = submission(0, true, 1);
    s.orders
        .push((SellerId::parse("s").unwrap(), Money::new(5, Currency::USD)));
    assert!(matches!(
        decide(&PaymentState::New, PaymentCommand::Submit(s)),
        Err(PaymentRejection::InvalidOrders(_))
    ));
    let mut s = submission(0, true, 1);
    s.orders.clear();
    assert!(matches!(
        decide(&PaymentState::New, PaymentCommand::Submit(s)),
        Err(PaymentRejection::InvalidOrders(_))
    ));
}

#[test]
fn a_rejected_verdict_rejects_every_order() {
    let evs = decide(
        &PaymentState::New,
        PaymentCommand::Submit(submission(2, false, 7)),
    )
    .unwrap();
    let state = evs.iter().fold(PaymentState::New, apply);
    let PaymentState::Live(p) = state else {
        panic!("live")
    };
    assert_eq!(p.status, PaymentStatus::Rejected);
    assert_eq!(p.orders.len(), 3);
    assert_eq!(
        p.rejection,
        Some(("velocity_count".into(), "too many".into()))
    );
    assert!(evs[1].causation_id == Some(evs[0].event_id));
}
