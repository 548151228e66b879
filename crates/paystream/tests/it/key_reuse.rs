//! Issue 12 / H1 end to end: handler, executor and the PSP simulator in one
//! process. An Idempotency-Key reused after the handler's retention with
//! more orders is refused (422) and the PSP records no extra charge.

use events::{ClientId, OrderId, PaymentId};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// (charges, create requests) the simulator saw for an order.
async fn charges(http: &reqwest::Client, sim: &str, order: OrderId) -> (i64, i64) {
    testkit::sim_stats(http, sim, &order.to_string()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_reused_after_the_retention_charges_nothing_more_at_the_psp() {
    let (kafka, _) = testkit::fresh_config(2);
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let dir = tempfile::tempdir().unwrap();
    let sim = psp_sim::spawn(psp_sim::SimConfig::for_tests(format!(
        "sqlite://{}",
        dir.path().join("sim.db").display()
    )))
    .await
    .unwrap();
    let exec_args = executor::ExecutorArgs::for_tests(
        &sim.base_url(),
        sim.api_key.clone(),
        sim.webhook_secret.clone(),
    );
    let exec_db = testkit::fresh_postgres_url().await.unwrap();
    let executor = executor::start(kafka.clone(), &exec_db, exec_args, stop.clone())
        .await
        .unwrap();
    tokio::spawn(executor.wait());
    let mut h_args = payment_handler::HandlerArgs::for_tests();
    h_args.idempotency_retention_secs = Some(1);
    let handler_db = testkit::fresh_postgres_url().await.unwrap();
    let handler = payment_handler::start(kafka.clone(), &handler_db, h_args, stop.clone())
        .await
        .unwrap();
    let base = format!("http://{}", handler.addr);
    tokio::spawn(handler.wait());
    let db = storage::Db::connect(&handler_db).await.unwrap();
    let client = ClientId::parse("shop-h1").unwrap();
    let api_key = payment_handler::store::create_client(&db, &client)
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let post = |body: serde_json::Value| {
        let (http, base, api_key) = (http.clone(), base.clone(), api_key.clone());
        async move {
            let r = http
                .post(format!("{base}/v1/payments"))
                .bearer_auth(api_key)
                .header("Idempotency-Key", "order-4711")
                .json(&body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let order = |seller: &str, minor: i64| serde_json::json!({"seller_id": seller, "amount_minor": minor, "currency": "EUR"});

    // Day 1: one order, charged.
    let day1 = serde_json::json!({"buyer_id": "b1", "orders": [order("s1", 1000)],
                                  "metadata": {"card_token": "tok_visa"}});
    let (s, b) = post(day1.clone()).await;
    assert_eq!(s, 201, "{b}");
    let payment = PaymentId::derive(&client, "order-4711");
    let first = OrderId::derive(payment, 0);
    let mut charged = false;
    for _ in 0..300 {
        let r = http
            .get(format!("{base}/v1/payments/{payment}"))
            .bearer_auth(&api_key)
            .send()
            .await
            .unwrap();
        let v: serde_json::Value = r.json().await.unwrap();
        if v["orders"][0]["status"] == "succeeded" {
            charged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(charged, "the first order was charged");

    // Day 2 (past the retention, the key row reaped): the same key, three
    // orders, another buyer. Refused; nothing more reaches the PSP.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    payment_handler::store::idem_reap(&db).await.unwrap();
    let day2 = serde_json::json!({"buyer_id": "b2",
        "orders": [order("s1", 1000), order("s2", 2000), order("s3", 3000)],
        "metadata": {"card_token": "tok_mastercard"}});
    let (s, b) = post(day2).await;
    assert_eq!(s, 422, "{b}");
    assert!(b.contains("idempotency_key_reused"), "{b}");
    // The same day-1 request still gets its payment.
    let (s, b) = post(day1).await;
    assert_eq!(s, 201, "{b}");

    // A wrongly accepted second decision would be on the payments topic by
    // now (the handler appends before it answers): wait until the executor
    // has taken in everything there and has nothing left to send to the
    // PSP, then look at what the PSP saw.
    testkit::wait_caught_up(
        &kafka,
        &kafka.topology().group("executor"),
        &[kafka.topology().name(events::TopicKind::Payments)],
    )
    .await;
    let exec = storage::Db::connect(&exec_db).await.unwrap();
    testkit::wait_until(
        "the executor to finish every order it took in",
        Duration::from_secs(60),
        async || {
            testkit::count(
                &exec,
                "SELECT COUNT(*) FROM executor_orders WHERE state IN ('ready', 'retry_wait', 'executing')",
            )
            .await
                == 0
        },
    )
    .await;
    let sim_url = sim.base_url();
    assert_eq!(charges(&http, &sim_url, first).await.0, 1, "one charge");
    for i in 1..3 {
        assert_eq!(
            charges(&http, &sim_url, OrderId::derive(payment, i)).await,
            (0, 0),
            "order {i} of the reused key never reached the PSP"
        );
    }
    stop.cancel();
}
