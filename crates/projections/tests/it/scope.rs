//! Issue 12: sellers and buyers scoped by client (M2), running totals
//! that cannot overflow in the database (M4), and migration 3004 moving
//! existing data.

use crate::both;
use crate::harness::*;
use events::{RefundId, RefundSucceeded};
use projections::{query, verify};
use std::borrow::Cow;
use storage::Db;
use streaming::Outcome;

async fn wallet(db: &Db, client: &str, seller: &str) -> Vec<(String, i64)> {
    query::wallet(db, client, seller)
        .await
        .unwrap()
        .balances
        .into_iter()
        .map(|b| (b.currency, b.balance_minor))
        .collect()
}

async fn account(db: &Db, account: &str) -> Vec<(String, i64)> {
    query::account_balance(db, account, None)
        .await
        .unwrap()
        .balances
        .into_iter()
        .map(|b| (b.currency, b.balance_minor))
        .collect()
}

fn e(m: i64) -> Vec<(String, i64)> {
    vec![("EUR".to_owned(), m)]
}

/// Two clients' seller `s1` (and buyer `b1`) are separate: separate
/// wallets, buyer totals and merchant accounts, and verify is green.
/// Ids may contain ':', so client "a:b" + seller "c" must not meet client
/// "a" + seller "b:c".
async fn same_seller_of_two_clients(db: Db) {
    let mut evs = Vec::new();
    for (client, seller, amount) in [
        ("shop-a", "s1", 1000),
        ("shop-b", "s1", 2500),
        ("a:b", "c", 7),
        ("a", "b:c", 11),
    ] {
        let (req, p, o) = request_for(client, "k1", "b1", seller, eur(amount), 10);
        evs.push(req);
        evs.push(succeeded(p, o, "captured", eur(amount), eur(0), 20));
    }
    let out = apply_both(&db, &evs, 100).await;
    assert!(out.iter().all(|o| *o == Outcome::Applied), "{out:?}");
    assert_eq!(wallet(&db, "shop-a", "s1").await, e(1000));
    assert_eq!(wallet(&db, "shop-b", "s1").await, e(2500));
    assert_eq!(wallet(&db, "a:b", "c").await, e(7));
    assert_eq!(wallet(&db, "a", "b:c").await, e(11));
    assert_eq!(account(&db, "merchant_payable:shop-a/s1").await, e(-1000));
    assert_eq!(account(&db, "merchant_payable:shop-b/s1").await, e(-2500));
    assert_eq!(account(&db, "merchant_payable:a:b/c").await, e(-7));
    assert_eq!(account(&db, "merchant_payable:a/b:c").await, e(-11));
    let paid = |client: &'static str| {
        let db = db.clone();
        async move {
            query::buyer_totals(&db, client, "b1")
                .await
                .unwrap()
                .iter()
                .map(|t| t.paid_minor)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(paid("shop-a").await, vec![1000]);
    assert_eq!(paid("shop-b").await, vec![2500]);
    let report = verify(&db).await;
    assert!(report.is_ok(), "{report}");
    // Running totals that drifted from what they sum are caught (the
    // overflow check would compare against a wrong stored value).
    exec(
        &db,
        "UPDATE projection_totals SET total_minor = total_minor + 1 WHERE projection = 'wallet' AND kind = 'buyer_paid' AND client_id = 'shop-a'",
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
    assert_eq!(failed, vec!["totals_match"], "{report}");
    exec(
        &db,
        "UPDATE projection_totals SET total_minor = total_minor - 1 WHERE projection = 'wallet' AND kind = 'buyer_paid' AND client_id = 'shop-a'",
    )
    .await
    .unwrap();
    assert!(verify(&db).await.is_ok());
    // A wallet moved to another client is caught.
    exec(
        &db,
        "UPDATE wallet_balances SET client_id = 'shop-b', balance_minor = 1 WHERE client_id = 'a' AND seller_id = 'b:c'",
    )
    .await
    .unwrap();
    assert!(!verify(&db).await.is_ok());
}
both!(client_scoped_sellers, same_seller_of_two_clients);

/// A capture that would take a seller's balance (or a buyer's total)
/// beyond i64 is rejected as total_overflow by both projections alike,
/// and the events after it in the batch apply. (Without the check the
/// wallet's UPSERT fails in the database and the batch is retried
/// forever.)
async fn total_overflow_is_rejected(db: Db) {
    let (r1, p1, o1) = request("big-1", "buyer-big", "seller-big", eur(1000), 10);
    let c1 = succeeded(p1, o1, "captured", eur(1000), eur(0), 11);
    apply_both(&db, &[r1, c1], 100).await;
    // Stored totals close to the end of i64 (as after ~9,000 maximal
    // payments), the same in the wallet and in both projections' totals.
    let near = i64::MAX - 500;
    exec(
        &db,
        &format!("UPDATE projection_totals SET total_minor = {near} WHERE party_id = 'seller-big' AND kind = 'seller_balance'"),
    )
    .await
    .unwrap();
    exec(
        &db,
        &format!(
            "UPDATE wallet_balances SET balance_minor = {near} WHERE seller_id = 'seller-big'"
        ),
    )
    .await
    .unwrap();

    let (r2, p2, o2) = request("big-2", "buyer-2", "seller-big", eur(1000), 20);
    let c2 = succeeded(p2, o2, "captured", eur(1000), eur(0), 21);
    let (r3, p3, o3) = request("big-3", "buyer-3", "seller-ok", eur(400), 30);
    let c3 = succeeded(p3, o3, "captured", eur(400), eur(0), 31);
    // A buyer's paid total at the end of i64, too.
    exec(
        &db,
        &format!("INSERT INTO projection_totals (projection, party_id, client_id, kind, currency, total_minor) \
                  SELECT projection, 'buyer-4', 'test-client', 'buyer_paid', 'EUR', {near} FROM projection_totals \
                  WHERE party_id = 'seller-big'"),
    )
    .await
    .unwrap();
    let (r4, p4, o4) = request("big-4", "buyer-4", "seller-ok", eur(900), 40);
    let c4 = succeeded(p4, o4, "captured", eur(900), eur(0), 41);
    let out = apply_both(&db, &[r2, c2, r3, c3, r4, c4], 100).await;
    assert_eq!(out[0], Outcome::Applied);
    assert!(
        matches!(&out[1], Outcome::Rejected { kind, reason } if kind == "total_overflow" && reason.contains("seller-big")),
        "{out:?}"
    );
    assert_eq!(out[2], Outcome::Applied);
    assert_eq!(out[3], Outcome::Applied);
    assert_eq!(out[4], Outcome::Applied);
    assert!(
        matches!(&out[5], Outcome::Rejected { kind, reason } if kind == "total_overflow" && reason.contains("buyer-4")),
        "{out:?}"
    );
    assert_eq!(wallet(&db, "test-client", "seller-big").await, e(near));
    assert_eq!(wallet(&db, "test-client", "seller-ok").await, e(400));
    assert_eq!(
        account(&db, "merchant_payable:test-client/seller-ok").await,
        e(-400)
    );
    // Neither projection booked the refused captures.
    let rows = strings(
        &db,
        "SELECT projection || '|' || COALESCE(error_kind, '-') FROM applied_events WHERE outcome = 'rejected'",
    )
    .await;
    assert_eq!(
        rows,
        vec![
            "ledger|total_overflow",
            "ledger|total_overflow",
            "wallet|total_overflow",
            "wallet|total_overflow"
        ]
    );
}
both!(total_overflow, total_overflow_is_rejected);

/// Migration 3004 on a database with data from before it: wallets and
/// buyer totals keep their rows (client ""), running totals are filled
/// from the orders, a later refund of an old order stays on its unscoped
/// account (wallet = ledger still holds), and new payments are scoped.
async fn migration_moves_existing_data(db: Db) {
    let (pg, lite) = (
        sqlx::migrate!("migrations/postgres"),
        sqlx::migrate!("migrations/sqlite"),
    );
    let upto = |mut m: sqlx::migrate::Migrator| {
        m.migrations = Cow::Owned(
            m.migrations
                .iter()
                .filter(|x| x.version < 3004)
                .cloned()
                .collect(),
        );
        storage::component_migrator(m)
    };
    db.migrate(&upto(pg), &upto(lite)).await.unwrap();
    let (_, p, o) = request("legacy", "b1", "s1", eur(1000), 10);
    for proj in ["ledger", "wallet"] {
        exec(
            &db,
            &format!(
                "INSERT INTO projection_orders (projection, order_id, payment_id, buyer_id, seller_id, currency, amount_minor, captured_minor, refunded_minor) \
                 VALUES ('{proj}', '{o}', '{p}', 'b1', 's1', 'EUR', 1000, 1000, 0)"
            ),
        )
        .await
        .unwrap();
    }
    exec(&db, "INSERT INTO wallet_balances (seller_id, currency, balance_minor) VALUES ('s1', 'EUR', 1000)").await.unwrap();
    exec(&db, "INSERT INTO buyer_totals (buyer_id, currency, paid_minor, refunded_minor) VALUES ('b1', 'EUR', 1000, 0)").await.unwrap();
    exec(
        &db,
        &format!(
            "INSERT INTO ledger_transactions (seq, id, booking_key, event_id, payment_id, kind, occurred_at, booked_at, prev_hash, hash) \
             VALUES (1, 't1', 'capture:{o}', 'e1', '{p}', 'capture', 10, 10, '0', 'h1')"
        ),
    )
    .await
    .unwrap();
    exec(
        &db,
        "INSERT INTO ledger_entries (transaction_id, line, account, currency, amount_minor, occurred_at, seq) VALUES \
         ('t1', 0, 'psp_receivable', 'EUR', 1000, 10, 1), ('t1', 1, 'merchant_payable:s1', 'EUR', -1000, 10, 1)",
    )
    .await
    .unwrap();
    exec(&db, "UPDATE ledger_chain_head SET seq = 1, hash = 'h1'")
        .await
        .unwrap();

    projections::migrate(&db).await.unwrap();
    assert_eq!(wallet(&db, "", "s1").await, e(1000));
    let totals = strings(
        &db,
        "SELECT projection || '|' || kind || '|' || client_id || '|' || party_id || '|' || CAST(total_minor AS TEXT) FROM projection_totals",
    )
    .await;
    assert_eq!(
        totals,
        vec![
            "ledger|buyer_paid||b1|1000",
            "ledger|seller_balance||s1|1000",
            "wallet|buyer_paid||b1|1000",
            "wallet|seller_balance||s1|1000",
        ]
    );

    // A refund of the old order: its unscoped account, its client "" wallet.
    let refund = envelope(
        Some(p),
        "refund",
        20,
        RefundSucceeded {
            refund_id: RefundId::from_uuid(uuid::Uuid::new_v5(&uuid::Uuid::nil(), b"legacy")),
            order_id: o,
            psp_reference: "rf-legacy".into(),
            amount: eur(300),
        }
        .into(),
    );
    // A new payment of test-client for the same seller id.
    let (r2, p2, o2) = request("new", "b1", "s1", eur(500), 30);
    let c2 = succeeded(p2, o2, "captured", eur(500), eur(0), 31);
    let out = apply_both(&db, &[refund, r2, c2], 100).await;
    assert!(out.iter().all(|o| *o == Outcome::Applied), "{out:?}");
    assert_eq!(wallet(&db, "", "s1").await, e(700));
    assert_eq!(account(&db, "merchant_payable:s1").await, e(-700));
    assert_eq!(wallet(&db, "test-client", "s1").await, e(500));
    assert_eq!(
        account(&db, "merchant_payable:test-client/s1").await,
        e(-500)
    );
    let report = verify(&db).await;
    let wallets = report
        .checks
        .iter()
        .find(|c| c.name == "wallets_match_ledger")
        .unwrap();
    assert_eq!(wallets.violations, 0, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_3004_postgres() {
    let db = testkit::fresh_postgres().await.unwrap();
    migration_moves_existing_data(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_3004_sqlite() {
    let (db, _dir) = testkit::fresh_sqlite().await.unwrap();
    migration_moves_existing_data(db).await;
}
