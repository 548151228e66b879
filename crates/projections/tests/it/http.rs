use crate::both;
use crate::harness::*;
use events::{Timestamp, samples};
use storage::Db;

async fn serve(db: Db) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, projections::router(db)).await });
    format!("http://{addr}")
}

async fn queries_over_http(db: Db) {
    let start = 1_700_000_000_000_000;
    let evs = samples::one_of_each("c1", "http", Timestamp::from_micros(start));
    apply_both(&db, &evs, 100).await;
    let base = serve(db).await;
    let c = reqwest::Client::new();
    let get = |path: String| {
        let c = c.clone();
        let url = format!("{base}{path}");
        async move {
            let r = c.get(url).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (s, w) = get("/v1/wallets/seller-a".into()).await;
    assert_eq!(s, 200);
    assert_eq!(w["balances"][0]["balance_minor"], 550);
    assert_eq!(w["balances"][0]["currency"], "EUR");

    let (s, b) = get("/v1/buyers/buyer-7".into()).await;
    assert_eq!(s, 200);
    assert_eq!(b["totals"][0]["paid_minor"], 3550);
    assert_eq!(b["totals"][0]["refunded_minor"], 500);

    let (s, b) = get("/v1/ledger/accounts/merchant_payable:seller-a/balance".into()).await;
    assert_eq!(s, 200);
    assert_eq!(b["balances"][0]["balance_minor"], -550);
    // Before the refund (event 9 occurs at start + 9 * 1_000_001 µs).
    let before_refund = Timestamp::from_micros(start + 8 * 1_000_001).to_string();
    let (s, b) = get(format!(
        "/v1/ledger/accounts/merchant_payable:seller-a/balance?as_of={before_refund}"
    ))
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["balances"][0]["balance_minor"], -1050);

    let (s, e) = get("/v1/ledger/accounts/psp_receivable/balance?as_of=yesterday".into()).await;
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

    let (s, h) = get("/v1/ledger/accounts/psp_receivable/entries?limit=1".into()).await;
    assert_eq!(s, 200);
    assert_eq!(h["entries"].as_array().unwrap().len(), 1);
    assert!(h["next_after"].is_i64());

    let (s, e) = get("/v1/ledger/accounts/psp_receivable/entries?limit=abc".into()).await;
    assert_eq!(s, 400);
    assert_eq!(e["error"]["field"], "limit");

    let (s, v) = get("/v1/ledger/verify".into()).await;
    assert_eq!(s, 200);
    assert!(
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["violations"] == 0)
    );

    let (s, e) = get("/v1/nope".into()).await;
    assert_eq!(s, 404);
    assert_eq!(e["error"]["code"], "not_found");
}
both!(http_queries, queries_over_http);
