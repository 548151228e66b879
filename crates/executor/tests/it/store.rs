//! The executor's SQL on its own (real PostgreSQL and SQLite): the lease is
//! fenced by its owner token.

use executor::store::{self, IntakeOp, IntakeResult, NewOrder, OrderUpdate, Outgoing};
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
async fn a_retaken_lease_fences_its_old_holder(db: &Db) {
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

#[tokio::test]
async fn a_retaken_lease_fences_its_old_holder_postgres() {
    let db = storage::testing::fresh_postgres().await.unwrap();
    a_retaken_lease_fences_its_old_holder(&db).await;
}

#[tokio::test]
async fn a_retaken_lease_fences_its_old_holder_sqlite() {
    let (db, _dir) = storage::testing::fresh_sqlite().await.unwrap();
    a_retaken_lease_fences_its_old_holder(&db).await;
}

/// Refunds of one payment run in request (offset) order, even when they
/// arrive in one batch and their random ids sort the other way.
async fn refunds_run_in_request_order(db: &Db) {
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

#[tokio::test]
async fn refunds_run_in_request_order_postgres() {
    let db = storage::testing::fresh_postgres().await.unwrap();
    refunds_run_in_request_order(&db).await;
}

#[tokio::test]
async fn refunds_run_in_request_order_sqlite() {
    let (db, _dir) = storage::testing::fresh_sqlite().await.unwrap();
    refunds_run_in_request_order(&db).await;
}
