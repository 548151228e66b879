//! The order state machine over many thousands of random command
//! sequences, in memory: terminal states stay terminal, an order is
//! captured at most once, attempts only grow (by one per intent), the PSP
//! idempotency key is always the order id, and money in the events is the
//! order's.

use domain::order::{
    CallAnswer, Charge, ChargeStatus, Command, Failure, FailureKind, Lookup, Order, OrderEvent,
    Rejection, Rules, StateName, Status, apply, decide,
};
use events::{Currency, Event, Money, OrderId};
use proptest::prelude::*;

const RULES: Rules = Rules {
    max_attempts: 4,
    max_total_ms: 60_000,
    pending_poll_ms: 5_000,
    unknown_grace_ms: 3_000,
};

fn charge_status() -> impl Strategy<Value = ChargeStatus> {
    prop_oneof![
        4 => Just(ChargeStatus::Succeeded),
        2 => Just(ChargeStatus::Declined),
        2 => Just(ChargeStatus::Pending),
        1 => Just(ChargeStatus::Other("weird".into())),
    ]
}

fn charge() -> impl Strategy<Value = Charge> {
    (charge_status(), 0i64..500, any::<bool>(), 0u8..3).prop_map(|(status, fee, code, id)| Charge {
        // A few ids, so a second answer may name another charge.
        id: format!("ch_{id}"),
        status,
        fee_minor: fee,
        decline_code: code.then(|| "insufficient_funds".into()),
    })
}

fn failure() -> impl Strategy<Value = Failure> {
    prop_oneof![
        (any::<bool>()).prop_map(|u| Failure {
            kind: FailureKind::Transient { outcome_unknown: u },
            code: if u {
                "timeout".into()
            } else {
                "psp_unavailable".into()
            },
            reason: "r".into(),
            detail: "d".into(),
        }),
        (any::<bool>(), any::<bool>()).prop_map(|(validation, reused)| Failure {
            kind: FailureKind::Refused { validation },
            code: if reused {
                "idempotency_key_reused".into()
            } else {
                "not_found".into()
            },
            reason: "r".into(),
            detail: "d".into(),
        }),
    ]
}

fn lookup() -> impl Strategy<Value = Lookup> {
    prop_oneof![
        3 => charge().prop_map(Lookup::Found),
        2 => Just(Lookup::NoCharge),
        1 => Just(Lookup::Failed),
    ]
}

/// A command template; `now` and the attempt number are filled in while
/// running, so most commands are plausible and some are stale.
#[derive(Debug, Clone)]
enum Step {
    Approve,
    Cancel,
    Begin,
    Call {
        stale: bool,
        answer: CallAnswer,
        retry_wait_ms: i64,
        lookup: Lookup,
    },
    LookUp(Lookup),
    Settle(Charge),
    PollLater,
}

fn step() -> impl Strategy<Value = Step> {
    let answer = prop_oneof![
        charge().prop_map(CallAnswer::Charge),
        failure().prop_map(CallAnswer::Failure),
    ];
    prop_oneof![
        2 => Just(Step::Approve),
        1 => Just(Step::Cancel),
        4 => Just(Step::Begin),
        6 => (prop::bool::weighted(0.1), answer, 0i64..40_000, lookup()).prop_map(
            |(stale, answer, retry_wait_ms, lookup)| Step::Call { stale, answer, retry_wait_ms, lookup }
        ),
        2 => lookup().prop_map(Step::LookUp),
        2 => charge().prop_map(Step::Settle),
        1 => Just(Step::PollLater),
    ]
}

fn command(order: &Order, s: &Step, now_ms: i64) -> Command {
    match s.clone() {
        Step::Approve => Command::Approve { now_ms },
        Step::Cancel => Command::Cancel,
        Step::Begin => Command::BeginAttempt { now_ms },
        Step::Call {
            stale,
            answer,
            retry_wait_ms,
            ..
        } => Command::RecordCall {
            attempt: if stale {
                order.attempts - 1
            } else {
                order.attempts
            },
            now_ms,
            answer,
            retry_wait_ms,
            lookup_wait_ms: 1_000,
            lookup: None,
        },
        Step::LookUp(answer) => Command::LookUp {
            now_ms,
            lookup_wait_ms: 1_000,
            answer,
        },
        Step::Settle(charge) => Command::Settle { charge },
        Step::PollLater => Command::PollLater {
            at_ms: now_ms + 5_000,
        },
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 5_000, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_over_random_command_sequences(
        steps in prop::collection::vec((step(), 0i64..20_000), 1..60),
        amount in 1i64..=Money::MAX_MINOR,
    ) {
        let id = order_id(amount);
        let money = Money::new(amount, Currency::from_code("EUR").unwrap());
        let mut order = Order::new(id, money);
        let mut now = 1_700_000_000_000i64;
        let mut captures = 0usize;
        let mut published_ids = Vec::new();
        let mut began = false;
        for (s, dt) in &steps {
            now += dt;
            let before = order.clone();
            let mut result = decide(&order, &RULES, command(&order, s, now));
            // The executor's loop: a decision that needs the PSP's charges
            // gets them and is made again.
            if result == Err(Rejection::LookupNeeded) {
                let Step::Call { lookup, .. } = s else {
                    panic!("only a call's outcome may need a look-up");
                };
                let mut c = command(&order, s, now);
                if let Command::RecordCall { lookup: l, .. } = &mut c {
                    *l = Some(lookup.clone());
                }
                result = decide(&order, &RULES, c);
                prop_assert_ne!(&result, &Err(Rejection::LookupNeeded));
            }
            match result {
                Err(r) => {
                    if before.status.is_terminal() {
                        prop_assert_eq!(r, Rejection::Terminal(before.status.name()));
                    }
                }
                Ok(events) => {
                    prop_assert!(!before.status.is_terminal(), "a terminal order moved: {:?}", events);
                    prop_assert!(!events.is_empty());
                    for e in &events {
                        if let OrderEvent::AttemptStarted { attempt, idempotency_key, .. } = e {
                            prop_assert_eq!(*idempotency_key, id, "the PSP key is the order id");
                            prop_assert_eq!(*attempt, order.attempts + 1, "one attempt at a time");
                            began = true;
                        }
                        if e.is_capture() {
                            captures += 1;
                            prop_assert!(began, "a capture without an attempt");
                        }
                        if let Some((disc, ev)) = e.published(&order) {
                            check_money(&ev, money, id)?;
                            published_ids.push(disc);
                        }
                        let after = apply(order.clone(), e);
                        prop_assert!(after.attempts >= order.attempts, "attempts only grow");
                        prop_assert_eq!(after.id, id);
                        prop_assert_eq!(after.amount, money);
                        order = after;
                    }
                }
            }
            if before.status.is_terminal() {
                prop_assert_eq!(&order, &before, "a terminal order changed");
            }
            prop_assert!(captures <= 1, "captured {} times", captures);
            // A captured order is Succeeded, and only then.
            prop_assert_eq!(
                captures == 1,
                matches!(order.status, Status::Succeeded { .. }),
                "captured {} times but {:?}", captures, order.status
            );
        }
        // Each published fact has its own event id (re-appends aside).
        let mut sorted = published_ids.clone();
        sorted.sort();
        sorted.dedup();
        prop_assert_eq!(sorted.len(), published_ids.len(), "{:?}", published_ids);
    }
}

fn check_money(ev: &Event, money: Money, id: OrderId) -> Result<(), TestCaseError> {
    match ev {
        Event::OrderSucceeded(e) => {
            prop_assert_eq!(e.amount, money);
            prop_assert_eq!(e.order_id, id);
            prop_assert_eq!(e.fee.currency(), money.currency());
        }
        Event::OrderPending(e) => prop_assert_eq!(e.amount, money),
        Event::OrderSettledByWebhook(e) => {
            prop_assert_eq!(e.amount, money);
            prop_assert_eq!(e.fee.is_some(), e.succeeded);
        }
        Event::OrderFailed(e) => prop_assert_eq!(e.order_id, id),
        Event::OrderExecutionStarted(e) => prop_assert_eq!(e.order_id, id),
        other => prop_assert!(false, "not an order event: {:?}", other),
    }
    Ok(())
}

fn order_id(n: i64) -> OrderId {
    format!(
        "00000000-0000-4000-8000-{:012x}",
        n.unsigned_abs() & 0xffff_ffff_ffff
    )
    .parse()
    .unwrap()
}

/// Stored state names round-trip, and exactly the final ones are terminal.
#[test]
fn state_names_round_trip() {
    for n in StateName::ALL {
        assert_eq!(StateName::parse(n.as_str()), Some(n));
    }
    assert_eq!(StateName::parse("bogus"), None);
    let terminal: Vec<_> = StateName::ALL
        .into_iter()
        .filter(|n| n.is_terminal())
        .collect();
    assert_eq!(
        terminal,
        [
            StateName::Succeeded,
            StateName::Failed,
            StateName::Cancelled
        ]
    );
}

fn executing(attempts: i32) -> Order {
    let mut o = Order::new(
        order_id(7),
        Money::new(1000, Currency::from_code("EUR").unwrap()),
    );
    o.status = Status::Executing;
    o.attempts = attempts;
    o.deadline_ms = Some(1_000_000);
    o
}

fn transient(unknown: bool) -> CallAnswer {
    CallAnswer::Failure(Failure {
        kind: FailureKind::Transient {
            outcome_unknown: unknown,
        },
        code: "timeout".into(),
        reason: "r".into(),
        detail: "timeout: r".into(),
    })
}

fn call(attempt: i32, answer: CallAnswer, lookup: Option<Lookup>) -> Command {
    Command::RecordCall {
        attempt,
        now_ms: 10,
        answer,
        retry_wait_ms: 100,
        lookup_wait_ms: 50,
        lookup,
    }
}

/// The exhausted-attempts rules, one by one: an unknown outcome never
/// fails without the PSP's definite answer, and a charge found decides.
#[test]
fn exhausted_attempts_fail_only_on_a_definite_no_charge() {
    let o = executing(RULES.max_attempts);
    assert_eq!(
        decide(&o, &RULES, call(o.attempts, transient(true), None)),
        Err(Rejection::LookupNeeded)
    );
    // Unknown outcome and no charge found: the lookup state, not failed.
    let ev = decide(
        &o,
        &RULES,
        call(o.attempts, transient(true), Some(Lookup::NoCharge)),
    )
    .unwrap();
    let after = ev.iter().fold(o.clone(), apply);
    assert!(
        matches!(
            after.status,
            Status::Lookup {
                since_ms: 10,
                at_ms: 60
            }
        ),
        "{after:?}"
    );
    assert_eq!(after.last_unknown_ms, Some(10));
    // Known "no charge": failed, retries exhausted.
    let ev = decide(
        &o,
        &RULES,
        call(o.attempts, transient(false), Some(Lookup::NoCharge)),
    )
    .unwrap();
    assert!(matches!(&ev[1], OrderEvent::Failed { code, .. } if code == "retries_exhausted"));
    // A charge found succeeds the order.
    let found = Charge {
        id: "ch_1".into(),
        status: ChargeStatus::Succeeded,
        fee_minor: 59,
        decline_code: None,
    };
    let ev = decide(
        &o,
        &RULES,
        call(o.attempts, transient(true), Some(Lookup::Found(found))),
    )
    .unwrap();
    assert!(ev.iter().any(OrderEvent::is_capture));
    // In the lookup state, "no charge" fails only after the grace period.
    let mut l = after;
    let early = decide(
        &l,
        &RULES,
        Command::LookUp {
            now_ms: 11,
            lookup_wait_ms: 50_000,
            answer: Lookup::NoCharge,
        },
    )
    .unwrap();
    assert_eq!(
        early,
        vec![OrderEvent::LookupRepeated {
            at_ms: 10 + RULES.unknown_grace_ms
        }]
    );
    l = apply(l, &early[0]);
    let late = decide(
        &l,
        &RULES,
        Command::LookUp {
            now_ms: 10 + RULES.unknown_grace_ms,
            lookup_wait_ms: 50,
            answer: Lookup::NoCharge,
        },
    )
    .unwrap();
    assert!(matches!(&late[0], OrderEvent::Failed { code, .. } if code == "retries_exhausted"));
}

/// A stale attempt's answer (another executor moved on) changes nothing;
/// a 400 fails without a look-up; other refusals look the charges up.
#[test]
fn refusals_and_stale_answers() {
    let o = executing(2);
    assert_eq!(
        decide(&o, &RULES, call(1, transient(false), None)),
        Err(Rejection::NotCurrentAttempt { current: 2, got: 1 })
    );
    let refused = |validation| {
        CallAnswer::Failure(Failure {
            kind: FailureKind::Refused { validation },
            code: "idempotency_key_reused".into(),
            reason: "r".into(),
            detail: "d".into(),
        })
    };
    assert!(matches!(
        decide(&o, &RULES, call(2, refused(true), None)).unwrap()[0],
        OrderEvent::Failed { .. }
    ));
    assert_eq!(
        decide(&o, &RULES, call(2, refused(false), None)),
        Err(Rejection::LookupNeeded)
    );
    // The key was used: a charge exists somewhere, so "none found" is not
    // believed; the order keeps looking.
    assert!(matches!(
        decide(&o, &RULES, call(2, refused(false), Some(Lookup::NoCharge))).unwrap()[0],
        OrderEvent::LookupScheduled {
            outcome_unknown: true,
            ..
        }
    ));
}
