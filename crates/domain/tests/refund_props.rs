//! Properties of the refund state machine over random sequences of refund
//! requests, outcomes and redeliveries, in memory: refunds never exceed
//! captures, a decided refund never decides again, terminal refunds stay
//! terminal, and every succeeded refund is counted once.

use domain::payment::OrderStatus;
use domain::refund::{
    OrderRefunds, RefundCommand, RefundRejection, RefundRequest, RefundStatus, apply, decide,
};
use events::{
    ClientId, CorrelationId, Currency, Envelope, Event, EventId, Money, OrderFailed, OrderId,
    OrderSucceeded, PaymentId, RefundFailed, RefundId, RefundSucceeded, SCHEMA_VERSION, Timestamp,
};
use proptest::prelude::*;
use std::collections::BTreeMap;

fn payment() -> PaymentId {
    PaymentId::derive(&ClientId::parse("c").unwrap(), "k")
}

fn order() -> OrderId {
    OrderId::derive(payment(), 0)
}

fn refund_id(key: u8) -> RefundId {
    RefundId::derive(&ClientId::parse("c").unwrap(), &format!("refund-{key}"))
}

fn envelope(event: Event, n: usize) -> Envelope {
    Envelope {
        event_id: EventId::derive(order().as_uuid(), &format!("e-{n}")),
        occurred_at: Timestamp::from_micros(n as i64),
        payment_id: Some(payment()),
        correlation_id: CorrelationId::from_uuid(payment().as_uuid()),
        causation_id: None,
        producer: "test".into(),
        schema_version: SCHEMA_VERSION,
        event,
    }
}

#[derive(Debug, Clone)]
enum Step {
    /// A refund request under key `key` (a few keys, so keys are reused).
    Request {
        key: u8,
        amount: Option<i64>,
        reason: u8,
    },
    Succeed(u8),
    Fail(u8),
    /// The order's own outcome: 0 succeeded, 1 failed, 2 started.
    Order(u8),
    Redeliver(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0u8..8, proptest::option::weighted(0.8, 1i64..700), 0u8..2)
            .prop_map(|(key, amount, reason)| Step::Request { key, amount, reason }),
        2 => (0u8..8).prop_map(Step::Succeed),
        2 => (0u8..8).prop_map(Step::Fail),
        1 => (0u8..3).prop_map(Step::Order),
        1 => (0usize..64).prop_map(Step::Redeliver),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 5000, ..ProptestConfig::default() })]

    #[test]
    fn refunds_never_exceed_captures(
        amount in 1i64..2000,
        start in prop_oneof![Just(OrderStatus::Succeeded), Just(OrderStatus::Pending), Just(OrderStatus::Executing)],
        steps in proptest::collection::vec(step(), 1..60),
    ) {
        let mut state = OrderRefunds::new(payment(), order(), Money::new(amount, Currency::EUR), start);
        let mut seen: Vec<Envelope> = Vec::new();
        // key → (the request's amount and reason, its decided events)
        let mut decided: BTreeMap<u8, (Option<i64>, String, Vec<Envelope>)> = BTreeMap::new();
        for (n, s) in steps.into_iter().enumerate() {
            let before = state.clone();
            let mut emit = |e: Envelope, state: &mut OrderRefunds| {
                *state = apply(state.clone(), &e);
                seen.push(e);
            };
            match s {
                Step::Request { key, amount: want, reason } => {
                    let reason = format!("reason-{reason}");
                    let got = decide(&state, RefundCommand::Request(RefundRequest {
                        refund_id: refund_id(key),
                        amount_minor: want,
                        reason: reason.clone(),
                        at: Timestamp::from_micros(n as i64),
                        producer: "test".into(),
                    }));
                    match decided.get(&key) {
                        Some((w0, r0, evs)) => {
                            let same = *r0 == reason && want.is_none_or(|w| Some(w) == *w0 || match &evs[0].event {
                                Event::RefundRequested(r) => r.amount.amount_minor() == w,
                                _ => false,
                            });
                            if same {
                                let got = got.expect("the same request replays");
                                prop_assert_eq!(got.len(), 1);
                                // Same fact, same id: never a second refund.
                                prop_assert_eq!(&got[0].event, &evs[0].event);
                                prop_assert_eq!(got[0].event_id, evs[0].event_id);
                            } else {
                                prop_assert_eq!(got, Err(RefundRejection::KeyReused));
                            }
                        }
                        None => match got {
                            Ok(evs) => {
                                prop_assert_eq!(state.status, OrderStatus::Succeeded);
                                for e in &evs { emit(e.clone(), &mut state); }
                                decided.insert(key, (want, reason, evs));
                            }
                            Err(RefundRejection::ExceedsRefundable { available_minor, .. }) => {
                                prop_assert_eq!(state.status, OrderStatus::Succeeded);
                                prop_assert!(want.unwrap_or(available_minor) > available_minor || want.unwrap_or(available_minor) <= 0);
                            }
                            Err(RefundRejection::NotCaptured(s)) => prop_assert!(!s.is_final()),
                            Err(RefundRejection::NotRefundable(s)) => prop_assert!(matches!(s, OrderStatus::Failed | OrderStatus::Rejected)),
                            Err(RefundRejection::KeyReused) => prop_assert!(false, "a fresh key is never reused"),
                        },
                    }
                }
                Step::Succeed(key) | Step::Fail(key) => {
                    let ok = matches!(s, Step::Succeed(_));
                    // Outcomes the executor would produce: only for refunds it knows.
                    if let Some((_, _, evs)) = decided.get(&key) && let Event::RefundRequested(r) = &evs[0].event {
                        let event: Event = if ok {
                            RefundSucceeded { refund_id: r.refund_id, order_id: r.order_id, psp_reference: "psp".into(), amount: r.amount }.into()
                        } else {
                            RefundFailed { refund_id: r.refund_id, order_id: r.order_id, code: "declined".into(), reason: "no".into() }.into()
                        };
                        emit(envelope(event, n), &mut state);
                    }
                }
                Step::Order(k) => {
                    let event: Event = match k {
                        0 => OrderSucceeded { order_id: order(), psp_reference: "p".into(), amount: state.amount, fee: Money::zero(Currency::EUR) }.into(),
                        1 => OrderFailed { order_id: order(), retryable: false, code: "x".into(), reason: "y".into(), attempt: 1 }.into(),
                        _ => events::OrderExecutionStarted { order_id: order(), attempt: 1 }.into(),
                    };
                    emit(envelope(event, n), &mut state);
                }
                Step::Redeliver(i) => {
                    if !seen.is_empty() {
                        let e = seen[i % seen.len()].clone();
                        state = apply(state, &e);
                    }
                }
            }
            // Never more reserved than captured; never more refunded than reserved.
            prop_assert!(state.reserved_minor <= state.captured_minor(), "{:?}", state);
            prop_assert!(0 <= state.refunded_minor && state.refunded_minor <= state.reserved_minor);
            // The sums are exactly the refunds' amounts: each counted once.
            let sum = |f: &dyn Fn(RefundStatus) -> bool| -> i64 {
                state.refunds.values().filter(|r| f(r.status)).map(|r| r.requested.amount.amount_minor()).sum()
            };
            prop_assert_eq!(state.reserved_minor, sum(&|s| s != RefundStatus::Failed));
            prop_assert_eq!(state.refunded_minor, sum(&|s| s == RefundStatus::Succeeded));
            // Terminal refunds stay terminal; a final order stays final.
            for (id, r) in &before.refunds {
                if r.status.is_terminal() {
                    prop_assert_eq!(state.refunds[id].status, r.status);
                }
            }
            if before.status.is_final() {
                prop_assert_eq!(before.status, state.status);
            }
        }
    }
}

#[test]
fn a_full_refund_takes_what_is_left() {
    let mut state = OrderRefunds::new(
        payment(),
        order(),
        Money::new(500, Currency::JPY),
        OrderStatus::Succeeded,
    );
    let req = |key, amount| {
        RefundCommand::Request(RefundRequest {
            refund_id: refund_id(key),
            amount_minor: amount,
            reason: "r".into(),
            at: Timestamp::from_micros(1),
            producer: "t".into(),
        })
    };
    for e in decide(&state, req(1, Some(120))).unwrap() {
        state = apply(state, &e);
    }
    let evs = decide(&state, req(2, None)).unwrap();
    match &evs[0].event {
        Event::RefundRequested(r) => assert_eq!(r.amount, Money::new(380, Currency::JPY)),
        other => panic!("{other:?}"),
    }
    for e in &evs {
        state = apply(state, e);
    }
    assert_eq!(
        decide(&state, req(3, Some(1))).unwrap_err().to_string(),
        "at most 0 minor units (JPY) are left to refund on this order (captured 500, refunds requested 500)"
    );
}
