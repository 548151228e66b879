//! Hardening of the executor's HTTP side against the real PSP simulator:
//! a correctly signed webhook that does not match the order settles
//! nothing (the PSP is polled instead), a forged one causes no database
//! work, health answers carry no raw errors, and the PSP client reads no
//! unbounded answer.

use crate::harness::{Setup, is_final, of_order, start};
use events::{Event, OrderId};
use std::time::Duration;

/// `paystream_webhook_mismatches_total{field}` as the executor's /metrics
/// shows it (0 before the first one).
async fn mismatches(env: &crate::harness::Env, field: &str) -> u64 {
    let text = env
        .http
        .get(format!("{}/metrics", env.exec_base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let prefix = format!("paystream_webhook_mismatches_total{{field=\"{field}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

fn settlements(env: &crate::harness::Env, order: OrderId) -> Vec<events::OrderSettledByWebhook> {
    of_order(&env.events(), order)
        .into_iter()
        .filter_map(|e| match e {
            Event::OrderSettledByWebhook(s) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

/// Signed (the test knows the secret) `charge.succeeded` webhooks claiming
/// success for a pending order with a wrong amount, a wrong currency and a
/// wrong charge id: each changes nothing and is counted; the order is
/// polled from the PSP instead, stays pending while the PSP says pending,
/// and is settled only with the PSP's real answer once it has one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_webhooks_that_do_not_match_the_order_settle_nothing() {
    // No scheduled poll within the test: only a mismatch makes one happen.
    let env = start(Setup {
        args: Box::new(|a| a.pending_poll_after_secs = 3_600),
        ..Setup::default()
    })
    .await;
    let (_, o) = env.pay("tok_pending", &[900]).await;
    let evs = env
        .wait_for(30, "pending", |evs| {
            of_order(evs, o[0])
                .iter()
                .any(|e| matches!(e, Event::OrderPending(_)))
        })
        .await;
    let charge_id = of_order(&evs, o[0])
        .into_iter()
        .find_map(|e| match e {
            Event::OrderPending(p) => Some(p.psp_reference.clone()),
            _ => None,
        })
        .unwrap();
    let body = |evt: &str, id: &str, amount: i64, currency: &str| {
        serde_json::json!({"id": evt, "type": "charge.succeeded", "created": 0, "data": {
            "id": id, "status": "succeeded", "amount_minor": amount, "currency": currency,
            "fee_minor": 1, "reference": o[0].to_string(), "card_token": "tok_pending",
            "created_at": "2026-11-25T14:20:01.123Z", "settled_at": "2026-11-25T14:20:01.123Z",
            "decline_code": null, "refunded_minor": 0}})
        .to_string()
    };
    let now = events::Timestamp::now().as_millis() / 1000;
    let fields = ["amount", "currency", "charge_id"];
    // Before the first mismatch: the poll it triggers reschedules the
    // order after this.
    let first_post_ms = executor::store::now_ms();
    let mut before = Vec::new();
    for f in fields {
        before.push(mismatches(&env, f).await);
    }
    let forged = [
        body("evt_amount", &charge_id, 90_000, "EUR"),
        body("evt_currency", &charge_id, 900, "USD"),
        body("evt_charge", "ch_not_ours", 900, "EUR"),
    ];
    for b in &forged {
        let (s, v) = env.post_webhook(Some(&env.sign(now, b)), b).await;
        assert_eq!((s, v["status"].as_str()), (200, Some("mismatch")), "{v}");
    }
    for (f, b) in fields.iter().zip(&before) {
        assert_eq!(mismatches(&env, f).await, b + 1, "{f}");
    }
    // Each mismatch made the executor ask the PSP, which still says
    // pending: nothing is settled, the order is still pending. The sign
    // that the poll has run: it rescheduled the next one an hour (the
    // pending poll interval) after the mismatches.
    let db = storage::Db::connect(&env.db_url).await.unwrap();
    let row = testkit::wait_for(
        "the poll the mismatches triggered",
        Duration::from_secs(30),
        async || {
            let row = executor::store::order(&db, &o[0].to_string())
                .await
                .unwrap()
                .unwrap();
            row.next_attempt_ms
                .is_some_and(|at| at >= first_post_ms + 3_600_000)
                .then_some(row)
        },
    )
    .await;
    env.collected_everything().await;
    assert!(settlements(&env, o[0]).is_empty());
    assert!(!is_final(&env.events(), o[0]));
    assert_eq!(row.state, "pending");

    // The PSP decides (no webhook configured: only a poll can learn it).
    // Another mismatching webhook, now claiming a decline, triggers the
    // poll; the order is settled with the PSP's answer (succeeded, its
    // charge id and fee), not with the webhook's.
    env.advance_sim_clock(61_000).await;
    let declined = serde_json::json!({"id": "evt_declined", "type": "charge.failed", "created": 0,
        "data": {"id": "ch_not_ours", "status": "declined", "amount_minor": 900, "currency": "EUR",
        "fee_minor": 0, "reference": o[0].to_string(), "card_token": "tok_pending",
        "created_at": "2026-11-25T14:20:01.123Z", "settled_at": null,
        "decline_code": "card_declined", "refunded_minor": 0}})
    .to_string();
    let (s, v) = env
        .post_webhook(Some(&env.sign(now, &declined)), &declined)
        .await;
    assert_eq!((s, v["status"].as_str()), (200, Some("mismatch")), "{v}");
    env.wait_for(30, "settled by the poll", |evs| is_final(evs, o[0]))
        .await;
    env.collected_everything().await;
    let settled = settlements(&env, o[0]);
    assert_eq!(settled.len(), 1, "{settled:?}");
    assert!(settled[0].succeeded);
    assert_eq!(settled[0].psp_reference, charge_id);
    assert_eq!(settled[0].amount.amount_minor(), 900);
    assert_eq!(
        settled[0].fee.unwrap().amount_minor(),
        (900 * 290 + 5_000) / 10_000 + 30
    );
    assert_eq!(env.sim_stats(o[0]).await.0, 1);
    db.close().await;
}

/// A webhook with a bad signature that names a pending order is refused
/// before anything is read from it: the order's row is untouched (no poll
/// scheduled, nothing recorded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_webhook_does_no_database_work() {
    let env = start(Setup {
        args: Box::new(|a| a.pending_poll_after_secs = 3_600),
        ..Setup::default()
    })
    .await;
    let (_, o) = env.pay("tok_pending", &[700]).await;
    env.wait_for(30, "pending", |evs| {
        of_order(evs, o[0])
            .iter()
            .any(|e| matches!(e, Event::OrderPending(_)))
    })
    .await;
    let db = storage::Db::connect(&env.db_url).await.unwrap();
    let id = o[0].to_string();
    // The pending event is appended right after the row is written.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = executor::store::order(&db, &id).await.unwrap().unwrap();
    let b =
        serde_json::json!({"id": "evt_forged", "type": "charge.succeeded", "created": 0, "data": {
        "id": before.psp_charge_id, "status": "succeeded", "amount_minor": 700, "currency": "EUR",
        "fee_minor": 1, "reference": id, "card_token": "tok_pending",
        "created_at": "2026-11-25T14:20:01.123Z", "settled_at": null, "decline_code": null,
        "refunded_minor": 0}})
        .to_string();
    let now = events::Timestamp::now().as_millis() / 1000;
    let forged = psp_sim::sign(b"not-the-secret-not-the-secret-000", now, b.as_bytes());
    let (s, v) = env.post_webhook(Some(&forged), &b).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("invalid_signature"))
    );
    env.collected_everything().await;
    let after = executor::store::order(&db, &id).await.unwrap().unwrap();
    assert_eq!(after.state, "pending");
    assert_eq!(
        after.next_attempt_ms, before.next_attempt_ms,
        "a forged webhook rescheduled the order"
    );
    assert!(settlements(&env, o[0]).is_empty());
    db.close().await;
}

/// `/healthz` says the database is unavailable without the database's own
/// error text (which names databases, hosts and users).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_does_not_leak_raw_errors() {
    let env = start(Setup::default()).await;
    let r = env
        .http
        .get(format!("{}/healthz", env.exec_base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // Take the database away under the running executor.
    let name = env.db_url.rsplit('/').next().unwrap().to_owned();
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&testkit::admin_url())
        .await
        .unwrap();
    sqlx::query(&format!("DROP DATABASE \"{name}\" WITH (FORCE)"))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let r = env
        .http
        .get(format!("{}/healthz", env.exec_base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let text = r.text().await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["message"], "database unavailable", "{text}");
    assert!(!text.contains(&name), "{text}");
}

/// A PSP answer larger than the limit is not read into memory: the call
/// fails as an unreadable answer whose outcome is unknown.
#[tokio::test]
async fn oversized_psp_answers_are_not_read() {
    use executor::psp::{MAX_ANSWER_BYTES, PspClient, PspError};
    async fn huge() -> String {
        // Valid JSON, so only the size can make it fail.
        format!("{{\"pad\":\"{}\"}}", "x".repeat(MAX_ANSWER_BYTES + 10))
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = axum::Router::new().route("/v1/charges", axum::routing::get(huge));
    let server = tokio::spawn(async move { axum::serve(listener, router).await });
    let psp = PspClient::new(
        &format!("http://{addr}"),
        runtime::secret::Secret::generate("sk_test_"),
        Duration::from_secs(5),
    )
    .unwrap();
    let e = psp.charges_for("ord").await.unwrap_err();
    match &e {
        PspError::Transient {
            code,
            outcome_unknown,
            ..
        } => {
            assert_eq!(code, "psp_bad_answer");
            assert!(outcome_unknown);
            assert!(e.reason().contains("longer than"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    server.abort();
}
