use crate::both;
use crate::harness::*;
use events::{
    Currency, DiscrepancyId, Event, Money, OrderId, OrderSettledByWebhook, PaymentId, PaymentOrder,
    ReconciliationDiscrepancyResolved, RefundId, RefundSucceeded, ResolutionAction, SellerId,
    Timestamp, samples,
};
use projections::booking::{self, BookState, Decision};
use projections::query;
use projections::{Projection, verify};
use storage::Db;
use streaming::Outcome;

fn story() -> Vec<events::Envelope> {
    samples::one_of_each(
        "c1",
        "story-1",
        Timestamp::from_micros(1_700_000_000_000_000),
    )
}

async fn bal(db: &Db, account: &str, as_of: Option<i64>) -> Vec<(String, i64)> {
    query::account_balance(db, account, as_of)
        .await
        .unwrap()
        .balances
        .into_iter()
        .map(|b| (b.currency, b.balance_minor))
        .collect()
}

async fn sample_story_books_expected_balances(db: Db) {
    let evs = story();
    let outcomes = apply_both(&db, &evs, 100).await;
    let applied = outcomes.iter().filter(|o| **o == Outcome::Applied).count();
    // PaymentRequested, two captures, one refund, one adjustment.
    assert_eq!(applied, 5, "{outcomes:?}");
    let e = |m| vec![("EUR".to_owned(), m)];
    assert_eq!(
        bal(&db, "merchant_payable:c1/seller-a", None).await,
        e(-550)
    );
    assert_eq!(
        bal(&db, "merchant_payable:c1/seller-b", None).await,
        e(-2500)
    );
    assert_eq!(bal(&db, "psp_fees", None).await, e(107));
    assert_eq!(
        bal(&db, "psp_receivable", None).await,
        e(1018 + 2425 - 500 - 3)
    );
    assert_eq!(bal(&db, "reconciliation_adjustments", None).await, e(3));
    let w = query::wallet(&db, "c1", "seller-a").await.unwrap();
    assert_eq!(w.balances.len(), 1);
    assert_eq!(w.balances[0].balance_minor, 550);
    let b = query::buyer_totals(&db, "c1", "buyer-7").await.unwrap();
    assert_eq!((b[0].paid_minor, b[0].refunded_minor), (3550, 500));
    let payment = evs[0].payment_id.unwrap().to_string();
    let entries = query::payment_entries(&db, &payment).await.unwrap();
    assert_eq!(entries.len(), 3 + 3 + 2 + 2);
    let report = verify(&db).await;
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.transactions, 4);
}
both!(sample_story, sample_story_books_expected_balances);

async fn reapplying_leaves_tables_identical(db: Db) {
    let evs = stories("dup", 5);
    apply_both(&db, &evs, 7).await;
    let first = snapshot(&db).await;
    assert!(!first["ledger_entries"].is_empty());
    for batch in [1000, 3] {
        let outcomes = apply_both(&db, &evs, batch).await;
        let expected: Vec<Outcome> = evs.iter().map(again).collect();
        assert_eq!(outcomes, expected);
        assert!(outcomes.contains(&Outcome::Duplicate));
        assert_eq!(snapshot(&db).await, first);
    }
    // Duplicates inside one batch count once.
    let mut doubled = evs.clone();
    doubled.extend(evs.iter().cloned());
    let db2_outcomes = apply_both(&db, &doubled, 10_000).await;
    let expected: Vec<Outcome> = doubled.iter().map(again).collect();
    assert_eq!(db2_outcomes, expected);
    assert_eq!(snapshot(&db).await, first);
    assert!(verify(&db).await.is_ok());
}
both!(reapply, reapplying_leaves_tables_identical);

async fn in_batch_duplicates_apply_once(db: Db) {
    let evs = stories("inbatch", 2);
    let mut doubled = evs.clone();
    doubled.extend(evs.iter().cloned());
    let outcomes = apply_both(&db, &doubled, 10_000).await;
    let expected: Vec<Outcome> = evs.iter().map(again).collect();
    assert_eq!(outcomes[evs.len()..], expected[..]);
    let (db2, _d) = testkit::fresh_sqlite().await.unwrap();
    projections::migrate(&db2).await.unwrap();
    apply_both(&db2, &evs, 10_000).await;
    assert_eq!(snapshot(&db).await, snapshot(&db2).await);
}
both!(in_batch_duplicates, in_batch_duplicates_apply_once);

async fn rejected_events_leave_no_partial_write(db: Db) {
    let (req, p, o) = request("rej", "buyer-1", "seller-1", eur(1000), 10);
    let (_, p2, o2) = request("rej-unknown", "buyer-1", "seller-1", eur(1000), 10);
    let bad_fee = succeeded(p, o, "bad-fee", eur(1000), eur(1001), 20);
    let unknown = succeeded(p2, o2, "unknown", eur(1000), eur(1), 20);
    let wrong_ccy = succeeded(
        p,
        o,
        "ccy",
        Money::new(1000, Currency::USD),
        Money::new(1, Currency::USD),
        25,
    );
    let good = succeeded(p, o, "good", eur(1000), eur(30), 30);
    let refund = |tag: &str, amount| {
        envelope(
            Some(p),
            tag,
            40,
            RefundSucceeded {
                refund_id: RefundId::from_uuid(uuid::Uuid::new_v5(
                    &uuid::Uuid::nil(),
                    tag.as_bytes(),
                )),
                order_id: o,
                psp_reference: "rf".into(),
                amount,
            }
            .into(),
        )
    };
    let too_much = refund("refund-too-much", eur(1001));
    let ok_refund = refund("refund-ok", eur(400));
    let evs = vec![
        req,
        bad_fee.clone(),
        unknown.clone(),
        wrong_ccy,
        good,
        too_much,
        ok_refund,
    ];
    let outcomes = apply_both(&db, &evs, 100).await;
    let kinds: Vec<String> = outcomes
        .iter()
        .map(|o| match o {
            Outcome::Rejected { kind, .. } => kind.clone(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            "Applied",
            "invalid_fee",
            "unknown_order",
            "currency_mismatch",
            "Applied",
            "refund_exceeds_capture",
            "Applied"
        ]
    );
    let snap = snapshot(&db).await;
    assert_eq!(snap["ledger_transactions"].len(), 2, "{snap:?}");
    // Rejected events are recorded with their decision: a redelivery is
    // rejected (and dead-lettered) again, never silently skipped, and
    // never decided afresh.
    assert_eq!(snap["applied_events"].len(), 2 * 7);
    let rejected_rows: Vec<&String> = snap["applied_events"]
        .iter()
        .filter(|r| r.contains("|rejected|"))
        .collect();
    assert_eq!(rejected_rows.len(), 2 * 4, "{rejected_rows:?}");
    assert!(
        rejected_rows
            .iter()
            .any(|r| r.contains(&bad_fee.event_id.to_string()) && r.contains("|invalid_fee|"))
    );
    let again = apply_both(&db, &[unknown], 10).await;
    assert!(matches!(&again[0], Outcome::Rejected { kind, .. } if kind == "unknown_order"));
    assert_eq!(snapshot(&db).await, snap);
    assert_eq!(
        bal(&db, "merchant_payable:test-client/seller-1", None).await,
        vec![("EUR".into(), -600)]
    );
    assert!(verify(&db).await.is_ok());
}
both!(
    rejected_no_partial_write,
    rejected_events_leave_no_partial_write
);

fn settled(p: PaymentId, o: OrderId, tag: &str, amount: Money, at: i64) -> events::Envelope {
    envelope(
        Some(p),
        tag,
        at,
        OrderSettledByWebhook {
            order_id: o,
            psp_reference: format!("psp-{o}"),
            succeeded: true,
            amount,
            fee: Some(eur(5)),
            failure_reason: None,
        }
        .into(),
    )
}

async fn capture_is_booked_once_per_order(db: Db) {
    let evs = story();
    // OrderSettledByWebhook for an order after its OrderSucceeded: in
    // separate batches (batch size 1) and within one batch.
    for (key, batch) in [("twice", 1), ("twice-in-batch", 100)] {
        let seller = format!("seller-{key}");
        let (req, p, o) = request(key, "buyer-2", &seller, eur(500), 10);
        let a = succeeded(p, o, "first", eur(500), eur(5), 20);
        let b = settled(p, o, "second", eur(500), 30);
        assert!(matches!(b.event, Event::OrderSettledByWebhook(_)));
        let outcomes = apply_both(&db, &[req, a, b], batch).await;
        assert_eq!(
            outcomes,
            vec![Outcome::Applied, Outcome::Applied, Outcome::Ignored],
            "batch {batch}"
        );
        assert_eq!(
            bal(&db, &format!("merchant_payable:test-client/{seller}"), None).await,
            vec![("EUR".into(), -500)]
        );
    }
    apply_both(&db, &evs, 3).await;
    assert!(verify(&db).await.is_ok());
}
both!(capture_once, capture_is_booked_once_per_order);

async fn as_of_balances_match_recomputation(db: Db) {
    let evs = stories("asof", 4);
    apply_both(&db, &evs, 5).await;
    let mut times: Vec<i64> = evs.iter().map(|e| e.occurred_at.as_micros()).collect();
    times.push(0);
    times.sort_unstable();
    for &t in times.iter().step_by(3).chain(times.last()) {
        // Recompute from the events alone with the pure booking rules.
        let mut st = BookState::default();
        let mut expected: std::collections::BTreeMap<String, i64> = Default::default();
        for e in &evs {
            if let Decision::Apply(fx) = booking::decide(e, &st) {
                st.absorb(&fx);
                if e.occurred_at.as_micros() <= t {
                    for b in &fx.bookings {
                        for en in &b.entries {
                            *expected.entry(en.account.clone()).or_default() +=
                                en.amount.amount_minor();
                        }
                    }
                }
            }
        }
        for account in [
            "psp_receivable",
            "psp_fees",
            "merchant_payable:test-client/seller-a",
            "reconciliation_adjustments",
        ] {
            let got: i64 = bal(&db, account, Some(t)).await.iter().map(|b| b.1).sum();
            assert_eq!(
                got,
                expected.get(account).copied().unwrap_or(0),
                "{account} as of {t}"
            );
        }
    }
}
both!(as_of, as_of_balances_match_recomputation);

async fn history_pages_through_all_entries(db: Db) {
    let evs = stories("hist", 3);
    apply_both(&db, &evs, 50).await;
    let all = query::account_history(&db, "psp_receivable", None, 1000)
        .await
        .unwrap();
    assert_eq!(all.next_after, None);
    assert!(all.entries.len() >= 9);
    let mut paged = Vec::new();
    let mut after = None;
    loop {
        let page = query::account_history(&db, "psp_receivable", after, 2)
            .await
            .unwrap();
        assert!(page.entries.len() <= 2);
        paged.extend(page.entries);
        match page.next_after {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(paged, all.entries);
}
both!(history, history_pages_through_all_entries);

async fn verify_detects_tampering(db: Db) {
    apply_both(&db, &story(), 100).await;
    assert!(verify(&db).await.is_ok());
    // Entries are immutable.
    assert!(
        exec(
            &db,
            "UPDATE ledger_entries SET amount_minor = amount_minor + 1"
        )
        .await
        .is_err()
    );
    assert!(exec(&db, "DELETE FROM ledger_transactions").await.is_err());
    // Someone with table-owner rights goes around the guard.
    match db {
        Db::Postgres(_) => exec(
            &db,
            "ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_immutable",
        )
        .await
        .unwrap(),
        Db::Sqlite(_) => exec(&db, "DROP TRIGGER ledger_entries_no_update")
            .await
            .unwrap(),
    }
    exec(&db, "UPDATE ledger_entries SET amount_minor = amount_minor - 1 WHERE account = 'merchant_payable:c1/seller-a' AND line = 2").await.unwrap();
    let report = verify(&db).await;
    assert!(!report.is_ok());
    let failed: Vec<&str> = report
        .checks
        .iter()
        .filter(|c| c.violations > 0)
        .map(|c| c.name)
        .collect();
    assert_eq!(
        failed,
        vec![
            "transactions_balance",
            "ledger_sums_to_zero",
            "wallets_match_ledger",
            // The ledger's running total of the seller no longer matches.
            "totals_match",
            // The capture's merchant_payable credit no longer matches its order.
            "events_applied_once",
            "hash_chain"
        ],
        "{report}"
    );
    assert!(report.to_string().contains("VIOLATIONS FOUND"));
}
both!(tampering, verify_detects_tampering);

async fn wallet_lagging_ledger_is_reported(db: Db) {
    let evs = story();
    projections::apply_batch(&db, Projection::Ledger, &[])
        .await
        .unwrap();
    apply(&db, Projection::Ledger, &evs, 100).await;
    let report = verify(&db).await;
    assert_eq!(
        report
            .checks
            .iter()
            .find(|c| c.name == "wallets_match_ledger")
            .unwrap()
            .violations,
        2
    );
    apply(&db, Projection::Wallet, &evs, 100).await;
    assert!(verify(&db).await.is_ok());
}
both!(wallet_vs_ledger, wallet_lagging_ledger_is_reported);

fn refund_of(p: PaymentId, o: OrderId, tag: &str, amount: Money, at: i64) -> events::Envelope {
    envelope(
        Some(p),
        tag,
        at,
        RefundSucceeded {
            refund_id: RefundId::from_uuid(uuid::Uuid::new_v5(&uuid::Uuid::nil(), tag.as_bytes())),
            order_id: o,
            psp_reference: "rf".into(),
            amount,
        }
        .into(),
    )
}

fn kinds(outcomes: &[Outcome]) -> Vec<String> {
    outcomes
        .iter()
        .map(|o| match o {
            Outcome::Rejected { kind, .. } => kind.clone(),
            other => format!("{other:?}"),
        })
        .collect()
}

/// A redelivered batch (crash after the database commit, before the
/// offset commit) gets the same outcomes: a rejected event keeps its
/// stored rejection instead of being decided afresh against newer state.
async fn redelivered_rejection_is_not_redecided(db: Db) {
    let (req, p, o) = request("redeliver", "buyer-3", "seller-3", eur(1000), 10);
    apply_both(&db, &[req], 10).await;
    // The refund comes before the capture: rejected; the capture applies.
    let batch = vec![
        refund_of(p, o, "redeliver-refund", eur(400), 20),
        succeeded(p, o, "redeliver-capture", eur(1000), eur(10), 30),
    ];
    let first = apply_both(&db, &batch, 100).await;
    assert_eq!(kinds(&first), vec!["refund_exceeds_capture", "Applied"]);
    let snap = snapshot(&db).await;
    // Redelivered to the ledger only (the wallet had committed its offset).
    let again = apply(&db, Projection::Ledger, &batch, 100).await;
    assert_eq!(
        again[0], first[0],
        "the stored rejection, dead-lettered again"
    );
    assert_eq!(again[1], Outcome::Duplicate);
    assert_eq!(snapshot(&db).await, snap);
    let again = apply_both(&db, &batch, 1).await;
    assert_eq!(again[0], first[0]);
    assert_eq!(snapshot(&db).await, snap);
    assert_eq!(
        bal(&db, "merchant_payable:test-client/seller-3", None).await,
        vec![("EUR".into(), -1000)]
    );
    let report = verify(&db).await;
    assert!(report.is_ok(), "{report}");
}
both!(redelivery, redelivered_rejection_is_not_redecided);

/// Amounts above the bound are rejected as `overflow` by the pure
/// decision (never a database error), write nothing, and the batch goes on.
async fn huge_amounts_are_rejected_as_overflow(db: Db) {
    let huge = booking::MAX_AMOUNT_MINOR + 1;
    let (req, p, o) = request("huge", "buyer-4", "seller-4", eur(1000), 10);
    let (huge_req, _, _) = request("huge-order", "buyer-4", "seller-4", eur(huge), 10);
    let resolved = |tag: &str, x: i64| {
        envelope(
            Some(p),
            tag,
            50,
            ReconciliationDiscrepancyResolved {
                discrepancy_id: DiscrepancyId::from_uuid(uuid::Uuid::new_v5(
                    &uuid::Uuid::nil(),
                    tag.as_bytes(),
                )),
                action: ResolutionAction::AcceptPspAmount,
                reason: "test".into(),
                adjustment: Some(eur(x)),
                resolved_by: "test".into(),
            }
            .into(),
        )
    };
    let evs = vec![
        req,
        huge_req,
        succeeded(p, o, "huge-capture", eur(i64::MAX), eur(1), 20),
        succeeded(p, o, "capture", eur(1000), eur(10), 30),
        refund_of(p, o, "huge-refund", eur(huge), 40),
        resolved("huge-adjustment", -huge),
        refund_of(p, o, "refund", eur(100), 45),
        resolved("adjustment", -3),
    ];
    let outcomes = apply_both(&db, &evs, 100).await;
    assert_eq!(
        kinds(&outcomes),
        vec![
            "Applied", "overflow", "overflow", "Applied", "overflow", "overflow", "Applied",
            "Applied"
        ]
    );
    let snap = snapshot(&db).await;
    assert_eq!(snap["ledger_transactions"].len(), 3, "{snap:?}");
    assert_eq!(snap["projection_orders"].len(), 2, "{snap:?}");
    assert_eq!(
        bal(&db, "merchant_payable:test-client/seller-4", None).await,
        vec![("EUR".into(), -900)]
    );
    assert_eq!(
        bal(&db, "reconciliation_adjustments", None).await,
        vec![("EUR".into(), 3)]
    );
    let report = verify(&db).await;
    assert!(report.is_ok(), "{report}");
}
both!(overflow, huge_amounts_are_rejected_as_overflow);

/// A capture or refund must match its order: amount and payment.
async fn captures_and_refunds_must_match_their_order(db: Db) {
    let (req, p, o) = request("match", "buyer-5", "seller-5", eur(1000), 10);
    let (req2, p2, _) = request("match-other", "buyer-5", "seller-5", eur(1000), 10);
    let evs = vec![
        req,
        req2,
        succeeded(p, o, "less", eur(999), eur(1), 20),
        settled(p, o, "more", eur(1001), 21),
        succeeded(p2, o, "other-payment", eur(1000), eur(1), 22),
        succeeded(p, o, "capture", eur(1000), eur(10), 30),
        refund_of(p2, o, "refund-other-payment", eur(100), 40),
        refund_of(p, o, "refund", eur(100), 41),
    ];
    let outcomes = apply_both(&db, &evs, 100).await;
    assert_eq!(
        kinds(&outcomes),
        vec![
            "Applied",
            "Applied",
            "amount_mismatch",
            "amount_mismatch",
            "payment_mismatch",
            "Applied",
            "payment_mismatch",
            "Applied"
        ]
    );
    assert_eq!(
        bal(&db, "merchant_payable:test-client/seller-5", None).await,
        vec![("EUR".into(), -900)]
    );
    let report = verify(&db).await;
    assert!(report.is_ok(), "{report}");
}
both!(order_match, captures_and_refunds_must_match_their_order);

/// One order id listed twice in a request: identical details count once,
/// different details are a conflict.
async fn order_listed_twice_in_one_request(db: Db) {
    let (req, p, o) = request("listed-twice", "buyer-6", "seller-6", eur(1000), 10);
    let with_orders = |tag: &str, second: Money| {
        let mut e = req.clone();
        e.event_id = events::EventId::derive(p.as_uuid(), tag);
        let Event::PaymentRequested(pr) = &mut e.event else {
            unreachable!("request() builds a PaymentRequested")
        };
        pr.orders.push(PaymentOrder {
            order_id: o,
            seller_id: SellerId::parse("seller-6").unwrap(),
            amount: second,
        });
        e
    };
    let conflicting = with_orders("conflicting", eur(2000));
    let same = with_orders("same", eur(1000));
    let outcomes = apply_both(&db, &[conflicting], 10).await;
    assert_eq!(kinds(&outcomes), vec!["conflicting_order"]);
    assert!(snapshot(&db).await["projection_orders"].is_empty());
    let outcomes = apply_both(&db, &[same], 10).await;
    assert_eq!(kinds(&outcomes), vec!["Applied"]);
    let orders = snapshot(&db).await["projection_orders"].clone();
    assert_eq!(orders.len(), 2, "{orders:?}");
    assert!(orders.iter().all(|r| r.contains("|1000|0|0")), "{orders:?}");
}
both!(listed_twice, order_listed_twice_in_one_request);

/// INSERTs get around the UPDATE/DELETE triggers: balanced entries added
/// to an existing transaction (with a seq no transaction has) plus a
/// matching wallet row must still fail verify.
async fn verify_detects_inserted_entries(db: Db) {
    apply_both(&db, &story(), 100).await;
    assert!(verify(&db).await.is_ok());
    let refund = strings(
        &db,
        "SELECT id FROM ledger_transactions WHERE kind = 'refund'",
    )
    .await;
    assert_eq!(refund.len(), 1);
    let refund = &refund[0];
    exec(&db, &format!(
        "INSERT INTO ledger_entries (transaction_id, line, account, currency, amount_minor, occurred_at, seq) VALUES \
         ('{refund}', 10, 'merchant_payable:c1/seller-a', 'EUR', -100, 0, 1000000), \
         ('{refund}', 11, 'psp_receivable', 'EUR', 100, 0, 1000000), \
         ('{refund}', 12, 'MERCHANT_PAYABLE:c1/seller-a', 'EUR', -7, 0, 1000000), \
         ('{refund}', 13, 'psp_receivable', 'EUR', 7, 0, 1000000)"
    ))
    .await
    .unwrap();
    exec(
        &db,
        "UPDATE wallet_balances SET balance_minor = balance_minor + 100 WHERE seller_id = 'seller-a'",
    )
    .await
    .unwrap();
    let report = verify(&db).await;
    let failed: Vec<&str> = report
        .checks
        .iter()
        .filter(|c| c.violations > 0)
        .map(|c| c.name)
        .collect();
    // The upper-case account is no merchant_payable account (LIKE would
    // have counted it on SQLite), so the wallets still match; the running
    // totals the overflow check uses do not (neither projection booked the
    // inserted 100).
    assert_eq!(failed, vec!["totals_match", "hash_chain"], "{report}");
    let chain = report
        .checks
        .iter()
        .find(|c| c.name == "hash_chain")
        .unwrap();
    assert!(
        chain.examples.iter().any(|e| e.contains("has seq 1000000")),
        "{report}"
    );
}
both!(inserted_entries, verify_detects_inserted_entries);

/// `events_applied_once` can fail: an order whose capture booking is
/// missing from the ledger.
async fn applied_once_checks_captures_against_orders(db: Db) {
    apply_both(&db, &story(), 100).await;
    assert!(verify(&db).await.is_ok());
    exec(
        &db,
        "UPDATE projection_orders SET captured_minor = captured_minor + 1 WHERE projection = 'ledger' AND captured_minor > 0",
    )
    .await
    .unwrap();
    let report = verify(&db).await;
    let once = report
        .checks
        .iter()
        .find(|c| c.name == "events_applied_once")
        .unwrap();
    assert_eq!(once.violations, 2, "{report}");
}
both!(
    applied_once_orders,
    applied_once_checks_captures_against_orders
);
