use crate::both;
use crate::harness::*;
use events::{Currency, Money, RefundId, RefundSucceeded, Timestamp, samples};
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
    assert_eq!(bal(&db, "merchant_payable:seller-a", None).await, e(-550));
    assert_eq!(bal(&db, "merchant_payable:seller-b", None).await, e(-2500));
    assert_eq!(bal(&db, "psp_fees", None).await, e(107));
    assert_eq!(
        bal(&db, "psp_receivable", None).await,
        e(1018 + 2425 - 500 - 3)
    );
    assert_eq!(bal(&db, "reconciliation_adjustments", None).await, e(3));
    let w = query::wallet(&db, "seller-a").await.unwrap();
    assert_eq!(w.balances.len(), 1);
    assert_eq!(w.balances[0].balance_minor, 550);
    let b = query::buyer_totals(&db, "buyer-7").await.unwrap();
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
        let again = apply_both(&db, &evs, batch).await;
        assert!(again.iter().all(|o| *o == Outcome::Duplicate), "{again:?}");
        assert_eq!(snapshot(&db).await, first);
    }
    // Duplicates inside one batch count once.
    let mut doubled = evs.clone();
    doubled.extend(evs.iter().cloned());
    let db2_outcomes = apply_both(&db, &doubled, 10_000).await;
    assert!(db2_outcomes.iter().all(|o| *o == Outcome::Duplicate));
    assert_eq!(snapshot(&db).await, first);
    assert!(verify(&db).await.is_ok());
}
both!(reapply, reapplying_leaves_tables_identical);

async fn in_batch_duplicates_apply_once(db: Db) {
    let evs = stories("inbatch", 2);
    let mut doubled = evs.clone();
    doubled.extend(evs.iter().cloned());
    let outcomes = apply_both(&db, &doubled, 10_000).await;
    assert!(
        outcomes[evs.len()..]
            .iter()
            .all(|o| *o == Outcome::Duplicate)
    );
    let (db2, _d) = storage::testing::fresh_sqlite().await.unwrap();
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
    // Rejected events are not recorded as applied: a redelivery is
    // rejected (and dead-lettered) again, never silently skipped.
    assert_eq!(snap["applied_events"].len(), 2 * 3);
    assert!(
        !snap["applied_events"]
            .iter()
            .any(|r| r.contains(&bad_fee.event_id.to_string()))
    );
    let again = apply_both(&db, &[unknown], 10).await;
    assert!(matches!(&again[0], Outcome::Rejected { kind, .. } if kind == "unknown_order"));
    assert_eq!(
        bal(&db, "merchant_payable:seller-1", None).await,
        vec![("EUR".into(), -600)]
    );
    assert!(verify(&db).await.is_ok());
}
both!(
    rejected_no_partial_write,
    rejected_events_leave_no_partial_write
);

async fn capture_is_booked_once_per_order(db: Db) {
    let evs = story();
    // OrderSettledByWebhook for order A after OrderSucceeded for order A.
    let (req, p, o) = request("twice", "buyer-2", "seller-2", eur(500), 10);
    let a = succeeded(p, o, "first", eur(500), eur(5), 20);
    let b = succeeded(p, o, "second", eur(500), eur(5), 30);
    let outcomes = apply_both(&db, &[req, a, b], 1).await;
    assert_eq!(outcomes[2], Outcome::Ignored);
    assert_eq!(
        bal(&db, "merchant_payable:seller-2", None).await,
        vec![("EUR".into(), -500)]
    );
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
            "merchant_payable:seller-a",
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
    exec(&db, "UPDATE ledger_entries SET amount_minor = amount_minor - 1 WHERE account = 'merchant_payable:seller-a' AND line = 2").await.unwrap();
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
