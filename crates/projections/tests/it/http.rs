//! The query API: authenticated (the handler's API keys), scoped by
//! client, operator-only ledger-wide reads, bounded concurrency.

use crate::both;
use crate::harness::*;
use events::{ClientId, Timestamp, samples};
use payment_handler::store::{self as keys, KeyRole};
use projections::QueryLimits;
use storage::Db;

async fn serve_with(db: Db, limits: QueryLimits) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, projections::router_with(db, limits)).await });
    format!("http://{addr}")
}

async fn serve(db: Db) -> String {
    serve_with(db, QueryLimits::default()).await
}

async fn key(db: &Db, client: &str, role: KeyRole) -> String {
    keys::migrate(db).await.expect("handler migrations");
    keys::create_client_with_role(db, &ClientId::parse(client).unwrap(), role)
        .await
        .unwrap()
}

/// GET with an optional bearer key: (status, JSON body).
async fn get(base: &str, key: Option<&str>, path: &str) -> (u16, serde_json::Value) {
    let mut r = reqwest::Client::new().get(format!("{base}{path}"));
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json::<serde_json::Value>().await.unwrap())
}

async fn queries_over_http(db: Db) {
    let start = 1_700_000_000_000_000;
    let evs = samples::one_of_each("c1", "http", Timestamp::from_micros(start));
    apply_both(&db, &evs, 100).await;
    let c1 = key(&db, "c1", KeyRole::Client).await;
    let base = serve(db).await;
    let get = |path: String| {
        let (base, c1) = (base.clone(), c1.clone());
        async move { get(&base, Some(&c1), &path).await }
    };
    let (s, w) = get("/v1/wallets/seller-a".into()).await;
    assert_eq!(s, 200);
    assert_eq!(w["client_id"], "c1");
    assert_eq!(w["balances"][0]["balance_minor"], 550);
    assert_eq!(w["balances"][0]["currency"], "EUR");

    let (s, b) = get("/v1/buyers/buyer-7".into()).await;
    assert_eq!(s, 200);
    assert_eq!(b["totals"][0]["paid_minor"], 3550);
    assert_eq!(b["totals"][0]["refunded_minor"], 500);

    let (s, b) = get("/v1/ledger/accounts/merchant_payable:c1%2Fseller-a/balance".into()).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["balances"][0]["balance_minor"], -550);
    // Before the refund (event 9 occurs at start + 9 * 1_000_001 µs).
    let before_refund = Timestamp::from_micros(start + 8 * 1_000_001).to_string();
    let (s, b) = get(format!(
        "/v1/ledger/accounts/merchant_payable:c1%2Fseller-a/balance?as_of={before_refund}"
    ))
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["balances"][0]["balance_minor"], -1050);

    let (s, e) =
        get("/v1/ledger/accounts/merchant_payable:c1%2Fseller-a/balance?as_of=yesterday".into())
            .await;
    assert_eq!(s, 400);
    assert_eq!(e["error"]["code"], "invalid_parameter");
    assert_eq!(e["error"]["field"], "as_of");

    let (s, e) = get("/v1/ledger/accounts/cash/balance".into()).await;
    assert_eq!(s, 400);
    assert_eq!(e["error"]["field"], "account");

    let payment = evs[0].payment_id.unwrap();
    let (s, p) = get(format!("/v1/ledger/payments/{payment}/entries")).await;
    assert_eq!(s, 200);
    assert_eq!(p["entries"].as_array().unwrap().len(), 10);
    let (s, e) = get("/v1/ledger/payments/not-a-uuid/entries".into()).await;
    assert_eq!(s, 400);
    assert_eq!(e["error"]["field"], "payment_id");

    let (s, h) =
        get("/v1/ledger/accounts/merchant_payable:c1%2Fseller-a/entries?limit=1".into()).await;
    assert_eq!(s, 200, "{h}");
    assert_eq!(h["entries"].as_array().unwrap().len(), 1);
    assert!(h["next_after"].is_i64());

    let (s, e) =
        get("/v1/ledger/accounts/merchant_payable:c1%2Fseller-a/entries?limit=abc".into()).await;
    assert_eq!(s, 400);
    assert_eq!(e["error"]["field"], "limit");

    let (s, e) = get("/v1/nope".into()).await;
    assert_eq!(s, 404);
    assert_eq!(e["error"]["code"], "not_found");
}
both!(http_queries, queries_over_http);

/// 401 without a key, with a malformed, unknown or revoked key; a client
/// sees only its own payments, sellers and buyers; ledger-wide reads and
/// verify need an operator key.
async fn reads_are_authenticated_and_scoped(db: Db) {
    let start = 1_700_000_000_000_000;
    let evs = samples::one_of_each("c1", "scope", Timestamp::from_micros(start));
    apply_both(&db, &evs, 100).await;
    let c1 = key(&db, "c1", KeyRole::Client).await;
    let c2 = key(&db, "c2", KeyRole::Client).await;
    let ops = key(&db, "ops", KeyRole::Operator).await;
    let base = serve(db.clone()).await;
    let payment = evs[0].payment_id.unwrap();
    let entries = format!("/v1/ledger/payments/{payment}/entries");

    // Unauthenticated.
    for k in [
        None,
        Some("psk_nope"),
        Some(&*format!("psk_{}_{}", "0".repeat(16), "0".repeat(64))),
        // Right key id, wrong secret.
        Some(&*format!(
            "{}{}",
            &c1[..c1.len() - 1],
            if c1.ends_with('0') { "1" } else { "0" }
        )),
    ] {
        let (s, e) = get(&base, k, &entries).await;
        assert_eq!(s, 401, "{k:?}: {e}");
        assert_eq!(e["error"]["code"], "unauthenticated");
    }

    // The owner reads its payment; another client gets 404, as if the
    // payment did not exist.
    assert_eq!(get(&base, Some(&c1), &entries).await.0, 200);
    let (s, e) = get(&base, Some(&c2), &entries).await;
    assert_eq!(s, 404, "{e}");
    assert_eq!(e["error"]["code"], "not_found");

    // Wallets and buyer totals are the caller's client's: c2's seller-a
    // is another seller than c1's.
    let (s, w) = get(&base, Some(&c2), "/v1/wallets/seller-a").await;
    assert_eq!(s, 200);
    assert_eq!(w["client_id"], "c2");
    assert_eq!(w["balances"].as_array().unwrap().len(), 0, "{w}");
    let (s, b) = get(&base, Some(&c2), "/v1/buyers/buyer-7").await;
    assert_eq!(s, 200);
    assert_eq!(b["totals"].as_array().unwrap().len(), 0, "{b}");
    // Naming another client is an operator's read.
    for path in [
        "/v1/wallets/seller-a?client_id=c1",
        "/v1/buyers/buyer-7?client_id=c1",
        "/v1/ledger/accounts/merchant_payable:c1%2Fseller-a/balance",
        "/v1/ledger/accounts/merchant_payable:c1%2Fseller-a/entries",
        "/v1/ledger/accounts/psp_receivable/balance",
        "/v1/ledger/accounts/psp_receivable/entries",
        "/v1/ledger/verify",
    ] {
        let (s, e) = get(&base, Some(&c2), path).await;
        assert_eq!(s, 403, "{path}: {e}");
        assert_eq!(e["error"]["code"], "forbidden");
    }
    // Ledger-wide reads: c1's own key is no operator key either.
    for path in [
        "/v1/ledger/accounts/psp_receivable/entries",
        "/v1/ledger/verify",
    ] {
        assert_eq!(get(&base, Some(&c1), path).await.0, 403, "{path}");
    }

    // The operator reads across clients and verifies.
    let (s, w) = get(&base, Some(&ops), "/v1/wallets/seller-a?client_id=c1").await;
    assert_eq!(s, 200);
    assert_eq!(w["balances"][0]["balance_minor"], 550);
    let (s, b) = get(&base, Some(&ops), "/v1/buyers/buyer-7?client_id=c1").await;
    assert_eq!(s, 200);
    assert_eq!(b["totals"][0]["paid_minor"], 3550);
    assert_eq!(get(&base, Some(&ops), &entries).await.0, 200);
    let (s, h) = get(
        &base,
        Some(&ops),
        "/v1/ledger/accounts/psp_receivable/entries?limit=1",
    )
    .await;
    assert_eq!(s, 200, "{h}");
    assert_eq!(h["entries"].as_array().unwrap().len(), 1);
    let (s, v) = get(&base, Some(&ops), "/v1/ledger/verify").await;
    assert_eq!(s, 200, "{v}");
    assert!(
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["violations"] == 0)
    );

    // Revoked (as `paystream clients revoke` does): refused at once.
    let key_id = c1.split('_').nth(1).unwrap();
    assert!(keys::revoke_key(&db, key_id).await.unwrap());
    let (s, e) = get(&base, Some(&c1), &entries).await;
    assert_eq!(s, 401, "{e}");
    assert_eq!(
        keys::revoke_client_keys(&db, &ClientId::parse("ops").unwrap())
            .await
            .unwrap(),
        1
    );
    assert_eq!(get(&base, Some(&ops), "/v1/ledger/verify").await.0, 401);
    assert_eq!(get(&base, Some(&c2), "/v1/wallets/seller-a").await.0, 200);
}
both!(http_auth_and_scope, reads_are_authenticated_and_scoped);

/// Without the handler's key table the API cannot check keys: 503 with a
/// clear message (after 401 for requests without a key).
async fn missing_key_table_is_503(db: Db) {
    let base = serve(db).await;
    let (s, _) = get(&base, None, "/v1/wallets/s1").await;
    assert_eq!(s, 401);
    let k = format!("psk_{}_{}", "a".repeat(16), "b".repeat(64));
    let (s, e) = get(&base, Some(&k), "/v1/wallets/s1").await;
    assert_eq!(s, 503, "{e}");
    assert_eq!(e["error"]["code"], "auth_unavailable");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("handler_api_keys"),
        "{e}"
    );
}
both!(http_missing_key_table, missing_key_table_is_503);

/// One verification at a time, and a bounded number of requests in
/// flight: beyond either, 503 with Retry-After. A verification is held
/// up by an exclusive lock on the ledger taken in another session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_limits_postgres() {
    let url = testkit::fresh_postgres_url().await.unwrap();
    let db = Db::connect(&url).await.unwrap();
    projections::migrate(&db).await.unwrap();
    apply_both(
        &db,
        &samples::one_of_each("c1", "limits", Timestamp::from_micros(0)),
        100,
    )
    .await;
    let ops = key(&db, "ops", KeyRole::Operator).await;
    let one = serve_with(db.clone(), QueryLimits { max_in_flight: 1 }).await;
    let many = serve(db.clone()).await;

    let Db::Postgres(pool) = &db else {
        unreachable!()
    };
    let mut locker = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE ledger_transactions IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await
        .unwrap();
    let started = |base: String, ops: String| {
        tokio::spawn(async move { get(&base, Some(&ops), "/v1/ledger/verify").await })
    };
    let held_one = started(one.clone(), ops.clone());
    let held_many = started(many.clone(), ops.clone());
    // Both verifications are held up by the lock.
    testkit::wait_until(
        "both verifications to wait on the ledger lock",
        std::time::Duration::from_secs(30),
        async || lock_waiters(&db).await >= 2,
    )
    .await;

    let busy = |base: String, path: &'static str| {
        let ops = ops.clone();
        async move {
            let r = reqwest::Client::new()
                .get(format!("{base}{path}"))
                .bearer_auth(&ops)
                .send()
                .await
                .unwrap();
            let retry = r.headers().get("retry-after").cloned();
            (
                r.status().as_u16(),
                retry,
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    // The limited server is saturated by the one verification.
    let (s, retry, e) = busy(one.clone(), "/v1/wallets/seller-a").await;
    assert_eq!(s, 503, "{e}");
    assert!(retry.is_some());
    assert_eq!(e["error"]["code"], "overloaded");
    // The other serves reads, but no second verification.
    let (s, _, _) = busy(many.clone(), "/v1/wallets/seller-a").await;
    assert_eq!(s, 200);
    let (s, retry, e) = busy(many.clone(), "/v1/ledger/verify").await;
    assert_eq!(s, 503, "{e}");
    assert!(retry.is_some());
    assert_eq!(e["error"]["code"], "verify_in_progress");

    locker.rollback().await.unwrap();
    assert_eq!(held_one.await.unwrap().0, 200);
    assert_eq!(held_many.await.unwrap().0, 200);
    // Free again.
    assert_eq!(busy(one, "/v1/ledger/verify").await.0, 200);
}
