//! The executor's SQL on its own (real PostgreSQL and SQLite): the lease is
//! fenced by its owner token, and a set-based batch keeps every row's guard.

use executor::store::{
    self, IntakeOp, IntakeResult, Intent, NewOrder, OrderUpdate, Outcome, Outgoing,
};
use storage::Db;

fn started(payment_id: &str, order_id: &str) -> Outgoing {
    // Only the outbox row's identity matters here.
    Outgoing {
        event_id: format!("{order_id}-started"),
        payment_id: payment_id.to_owned(),
        body: vec![1],
    }
}

/// Two dispatchers, A then B (after A's lease ran out): once B holds the
/// lease, A can neither renew nor release it, nor begin or record an
/// attempt; B can.
async fn a_retaken_lease_fences_its_old_holder(db: Db) {
    let db = &db;
    store::migrate(db).await.unwrap();
    let pay = uuid::Uuid::new_v4().to_string();
    let ord = uuid::Uuid::new_v4().to_string();
    let r = store::intake(
        db,
        &[
            IntakeOp::Requested {
                payment_id: pay.clone(),
                correlation_id: uuid::Uuid::new_v4().to_string(),
                card_token: "tok_visa".into(),
                orders: vec![NewOrder {
                    order_id: ord.clone(),
                    seq: 0,
                    seller_id: "seller".into(),
                    amount_minor: 100,
                    currency: "EUR".into(),
                }],
            },
            IntakeOp::Approved {
                payment_id: pay.clone(),
            },
        ],
    )
    .await
    .unwrap();
    assert_eq!(r, vec![IntakeResult::Applied, IntakeResult::Applied]);
    let ids = vec![pay.clone()];
    let (a, b) = (store::new_lease_owner(), store::new_lease_owner());
    let t0 = store::now_ms();
    assert_eq!(
        store::lease_payments(db, &ids, t0, 1_000, &a)
            .await
            .unwrap(),
        ids
    );
    // Held: nobody else gets it.
    assert!(
        store::lease_payments(db, &ids, t0 + 500, 1_000, &b)
            .await
            .unwrap()
            .is_empty()
    );
    // A's lease ran out (A stalled); B takes the payment.
    let t1 = t0 + 5_000;
    assert_eq!(
        store::lease_payments(db, &ids, t1, 60_000, &b)
            .await
            .unwrap(),
        ids
    );
    assert!(!store::renew_lease(db, &pay, &a, t1, 60_000).await.unwrap());
    assert!(!store::release_payment(db, &pay, &a).await.unwrap());
    assert!(
        !store::begin_attempt(db, &a, &ord, 1, 60_000, 600_000, &started(&pay, &ord))
            .await
            .unwrap()
    );
    // A's failed release left B's lease in place.
    assert!(
        store::lease_payments(db, &ids, t1 + 1, 1_000, &a)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store::renew_lease(db, &pay, &b, t1, 60_000).await.unwrap());
    assert!(
        store::begin_attempt(db, &b, &ord, 1, 60_000, 600_000, &started(&pay, &ord))
            .await
            .unwrap()
    );
    let update = OrderUpdate::RetryWait {
        at_ms: t1,
        reason: "test".into(),
        outcome_unknown: false,
    };
    assert!(
        !store::record_attempt(db, &a, &ord, 1, &update, &[])
            .await
            .unwrap()
    );
    assert!(
        store::record_attempt(db, &b, &ord, 1, &update, &[])
            .await
            .unwrap()
    );
    assert!(store::release_payment(db, &pay, &b).await.unwrap());
}

testkit::both!(
    a_retaken_lease_fences_its_old_holder,
    a_retaken_lease_fences_its_old_holder,
    executor::store::migrate
);

/// Refunds of one payment run in request (offset) order, even when they
/// arrive in one batch and their random ids sort the other way.
async fn refunds_run_in_request_order(db: Db) {
    let db = &db;
    store::migrate(db).await.unwrap();
    let pay = uuid::Uuid::new_v4().to_string();
    let ord = uuid::Uuid::new_v4().to_string();
    let refund = |id: &str, offset: i64| IntakeOp::Refund {
        refund_id: id.to_owned(),
        order_id: ord.clone(),
        amount_minor: 10,
        currency: "EUR".into(),
        reason: "r".into(),
        source_partition: 3,
        source_offset: offset,
    };
    let (late_id, early_id) = (
        "ffffffff-0000-4000-8000-000000000000",
        "00000000-0000-4000-8000-000000000000",
    );
    let r = store::intake(
        db,
        &[
            IntakeOp::Requested {
                payment_id: pay.clone(),
                correlation_id: uuid::Uuid::new_v4().to_string(),
                card_token: "tok_visa".into(),
                orders: vec![NewOrder {
                    order_id: ord.clone(),
                    seq: 0,
                    seller_id: "seller".into(),
                    amount_minor: 100,
                    currency: "EUR".into(),
                }],
            },
            // Requested first, but its id sorts last.
            refund(late_id, 41),
            refund(early_id, 42),
        ],
    )
    .await
    .unwrap();
    assert_eq!(r, vec![IntakeResult::Applied; 3]);
    let due = store::due_refunds(db, &pay, store::now_ms() + 1)
        .await
        .unwrap();
    let ids: Vec<&str> = due.iter().map(|r| r.refund_id.as_str()).collect();
    assert_eq!(ids, vec![late_id, early_id]);
}

testkit::both!(
    refunds_run_in_request_order,
    refunds_run_in_request_order,
    executor::store::migrate
);

/// An outbox row of `order`'s event `what`.
fn event(payment_id: &str, order_id: &str, what: &str) -> Outgoing {
    Outgoing {
        event_id: format!("{order_id}-{what}"),
        payment_id: payment_id.to_owned(),
        body: what.as_bytes().to_vec(),
    }
}

/// The event ids in the outbox, in seq order.
async fn outbox_ids(db: &Db) -> Vec<String> {
    storage::with_pool!(db, p => sqlx::query_scalar("SELECT event_id FROM executor_outbox ORDER BY seq")
        .fetch_all(p).await.unwrap())
}

/// A set-based batch keeps every row's own guard: of four orders, one
/// whose payment another owner took over and one whose attempts moved on
/// write nothing (neither their order row nor their events), the other two
/// write everything, in one batch of intents and one of outcomes.
async fn a_batch_writes_exactly_the_rows_that_keep_their_guard(db: Db) {
    let db = &db;
    store::migrate(db).await.unwrap();
    let pays: Vec<String> = (0..4).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let ords: Vec<String> = (0..4).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let mut ops = Vec::new();
    for (pay, ord) in pays.iter().zip(&ords) {
        ops.push(IntakeOp::Requested {
            payment_id: pay.clone(),
            correlation_id: uuid::Uuid::new_v4().to_string(),
            card_token: "tok_visa".into(),
            orders: vec![NewOrder {
                order_id: ord.clone(),
                seq: 0,
                seller_id: "seller".into(),
                amount_minor: 100,
                currency: "EUR".into(),
            }],
        });
        ops.push(IntakeOp::Approved {
            payment_id: pay.clone(),
        });
    }
    store::intake(db, &ops).await.unwrap();
    let (x, y) = (store::new_lease_owner(), store::new_lease_owner());
    let t0 = store::now_ms();
    assert_eq!(
        store::lease_payments(db, &pays, t0, 1_000, &x)
            .await
            .unwrap()
            .len(),
        4
    );
    // Payment 1: X's lease ran out and Y took it over.
    let taken = std::slice::from_ref(&pays[1]);
    assert_eq!(
        store::lease_payments(db, taken, t0 + 5_000, 60_000, &y)
            .await
            .unwrap(),
        taken
    );
    // Order 2: its attempt 1 already began (attempts moved on).
    assert!(
        store::begin_attempt(
            db,
            &x,
            &ords[2],
            1,
            60_000,
            600_000,
            &event(&pays[2], &ords[2], "earlier")
        )
        .await
        .unwrap()
    );
    let intents: Vec<Intent> = pays
        .iter()
        .zip(&ords)
        .map(|(pay, ord)| Intent {
            order_id: ord.clone(),
            attempt: 1,
            deadline_ms: t0 + 600_000,
            started: event(pay, ord, "started"),
        })
        .collect();
    let (done, rows) = store::begin_attempts(db, &x, &intents, 60_000)
        .await
        .unwrap();
    assert_eq!(done, vec![true, false, false, true]);
    let bodies: Vec<Vec<u8>> = rows.iter().map(|(_, b)| b.clone()).collect();
    assert_eq!(bodies, vec![b"started".to_vec(), b"started".to_vec()]);
    let ords_ref = &ords;
    let ord = |i: usize| async move { store::order(db, &ords_ref[i]).await.unwrap().unwrap() };
    for (i, (state, attempts)) in [
        ("executing", 1),
        ("ready", 0),
        ("executing", 1),
        ("executing", 1),
    ]
    .into_iter()
    .enumerate()
    {
        let o = ord(i).await;
        assert_eq!(
            (o.state.as_str(), o.attempts),
            (state, attempts),
            "order {i}"
        );
    }
    assert_eq!(
        outbox_ids(db).await,
        vec![
            format!("{}-earlier", ords[2]),
            format!("{}-started", ords[0]),
            format!("{}-started", ords[3]),
        ]
    );

    // Outcomes: order 1 is Y's, order 2 is recorded for an attempt it is
    // not in; orders 0 and 3 succeed and go pending.
    let outcome = |i: usize, attempt: i32, update: OrderUpdate, what: &[&str]| Outcome {
        order_id: ords[i].clone(),
        attempt,
        update,
        events: what.iter().map(|w| event(&pays[i], &ords[i], w)).collect(),
    };
    let ok = |c: &str| OrderUpdate::Succeeded {
        charge_id: c.into(),
        fee_minor: 3,
    };
    let outcomes = vec![
        outcome(0, 1, ok("ch_0"), &["failed-1", "succeeded"]),
        outcome(1, 1, ok("ch_1"), &["succeeded"]),
        outcome(2, 2, ok("ch_2"), &["succeeded"]),
        outcome(
            3,
            1,
            OrderUpdate::Pending {
                charge_id: "ch_3".into(),
                poll_at_ms: t0 + 1,
            },
            &["pending"],
        ),
    ];
    let (done, rows) = store::record_attempts(db, &x, &outcomes).await.unwrap();
    assert_eq!(done, vec![true, false, false, true]);
    let mut rows = rows;
    rows.sort_unstable_by_key(|(seq, _)| *seq);
    let bodies: Vec<Vec<u8>> = rows.into_iter().map(|(_, b)| b).collect();
    assert_eq!(
        bodies,
        vec![
            b"failed-1".to_vec(),
            b"succeeded".to_vec(),
            b"pending".to_vec()
        ]
    );
    let o = ord(0).await;
    assert_eq!(
        (o.state.as_str(), o.psp_charge_id.as_deref(), o.fee_minor),
        ("succeeded", Some("ch_0"), Some(3))
    );
    assert_eq!(
        (ord(1).await.state.as_str(), ord(1).await.attempts),
        ("ready", 0)
    );
    let o = ord(2).await;
    assert_eq!((o.state.as_str(), o.psp_charge_id), ("executing", None));
    let o = ord(3).await;
    assert_eq!(
        (
            o.state.as_str(),
            o.psp_charge_id.as_deref(),
            o.next_attempt_ms
        ),
        ("pending", Some("ch_3"), Some(t0 + 1))
    );
    assert_eq!(
        outbox_ids(db).await,
        vec![
            format!("{}-earlier", ords[2]),
            format!("{}-started", ords[0]),
            format!("{}-started", ords[3]),
            format!("{}-failed-1", ords[0]),
            format!("{}-succeeded", ords[0]),
            format!("{}-pending", ords[3]),
        ]
    );
    // The same batch again changes nothing (every guard is now lost).
    let (done, rows) = store::record_attempts(db, &x, &outcomes).await.unwrap();
    assert_eq!((done, rows.len()), (vec![false; 4], 0));
    assert_eq!(outbox_ids(db).await.len(), 6);
}

testkit::both!(
    a_batch_writes_exactly_the_rows_that_keep_their_guard,
    a_batch_writes_exactly_the_rows_that_keep_their_guard,
    executor::store::migrate
);

/// The intake's rows and results as a comparable snapshot: payments, and
/// orders with their state and whether they are due (the due time itself is
/// the clock's).
async fn intake_snapshot(
    db: &Db,
) -> (
    Vec<(String, String, String)>,
    Vec<(String, String, i32, String, i64, String, String, bool)>,
) {
    let Db::Postgres(p) = db else {
        unreachable!("PostgreSQL only")
    };
    let pays = sqlx::query_as(
        "SELECT payment_id, correlation_id, card_token FROM executor_payments ORDER BY payment_id",
    )
    .fetch_all(p)
    .await
    .unwrap();
    let orders = sqlx::query_as(
        "SELECT order_id, payment_id, seq, seller_id, amount_minor, currency, state, next_attempt_ms IS NOT NULL \
         FROM executor_orders ORDER BY order_id",
    )
    .fetch_all(p)
    .await
    .unwrap();
    (pays, orders)
}

/// On PostgreSQL a usual intake batch is written set-based (a statement per
/// table, not per event). Random batches (new and known payments, repeated
/// requests with other orders, approvals and rejections, decisions before
/// requests, decisions for unknown payments, refunds) give the same results
/// and the same rows as applying the same operations one by one.
#[tokio::test]
async fn the_set_based_intake_equals_one_by_one_postgres() {
    use rand::{Rng, SeedableRng};
    let (a, b) = (
        testkit::fresh_postgres().await.unwrap(),
        testkit::fresh_postgres().await.unwrap(),
    );
    store::migrate(&a).await.unwrap();
    store::migrate(&b).await.unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(20261206);
    let payments: Vec<String> = (0..60).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let shared_orders: Vec<String> = (0..5).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let requested = |rng: &mut rand::rngs::StdRng, p: &str| {
        let n = rng.random_range(1..=3);
        IntakeOp::Requested {
            payment_id: p.to_owned(),
            correlation_id: uuid::Uuid::new_v4().to_string(),
            card_token: format!("tok_{}", rng.random_range(0..5)),
            orders: (0..n)
                .map(|i| NewOrder {
                    // Now and then an order id another payment has (or will
                    // have): the first row written keeps it.
                    order_id: if rng.random_bool(0.1) {
                        shared_orders[rng.random_range(0..shared_orders.len())].clone()
                    } else {
                        uuid::Uuid::new_v4().to_string()
                    },
                    seq: i,
                    seller_id: "seller".into(),
                    amount_minor: rng.random_range(1..10_000),
                    currency: "EUR".into(),
                })
                .collect(),
        }
    };
    let mut set_based_batches = 0;
    for round in 0..40 {
        let mut ops = Vec::new();
        // Most rounds are the usual kind: requests each followed by their
        // decision; the others mix in everything that must take the slow path.
        let usual = round % 3 != 2;
        let mut used = std::collections::HashSet::new();
        for _ in 0..rng.random_range(1..20) {
            let p = payments[rng.random_range(0..payments.len())].clone();
            if usual {
                if !used.insert(p.clone()) {
                    continue;
                }
                match rng.random_range(0..4) {
                    0 => ops.push(requested(&mut rng, &p)),
                    1 => ops.push(IntakeOp::Approved { payment_id: p }),
                    2 => ops.push(IntakeOp::Rejected { payment_id: p }),
                    _ => {
                        ops.push(requested(&mut rng, &p));
                        ops.push(if rng.random_bool(0.8) {
                            IntakeOp::Approved { payment_id: p }
                        } else {
                            IntakeOp::Rejected { payment_id: p }
                        });
                    }
                }
            } else {
                ops.push(match rng.random_range(0..4) {
                    0 => requested(&mut rng, &p),
                    1 => IntakeOp::Approved { payment_id: p },
                    2 => IntakeOp::Rejected { payment_id: p },
                    _ => IntakeOp::Refund {
                        refund_id: uuid::Uuid::new_v4().to_string(),
                        order_id: uuid::Uuid::new_v4().to_string(),
                        amount_minor: 10,
                        currency: "EUR".into(),
                        reason: "r".into(),
                        source_partition: 0,
                        source_offset: round,
                    },
                });
            }
        }
        if usual {
            set_based_batches += 1;
        }
        let got = store::intake(&a, &ops).await.unwrap();
        let want = store::intake_one_by_one(&b, &ops, store::now_ms())
            .await
            .unwrap();
        assert_eq!(got, want, "round {round}: {ops:?}");
    }
    assert!(set_based_batches > 20);
    let (sa, sb) = (intake_snapshot(&a).await, intake_snapshot(&b).await);
    assert!(sa.1.iter().any(|o| o.6 == "ready") && sa.1.iter().any(|o| o.6 == "cancelled"));
    assert_eq!(sa, sb);
}
