//! The executor against the real broker, PostgreSQL/SQLite and the PSP
//! simulator.

mod harness;
mod intake;
mod poison;
mod store;
mod webhooks;

use events::{Event, EventType};
use harness::{Backend, Setup, distinct, is_final, of_order, start};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Raw count (no deduplication): a duplicate append would be a bug here.
fn count(evs: &[events::Envelope], t: EventType) -> usize {
    evs.iter().filter(|e| e.event_type() == t).count()
}

async fn charges_each_order_once(backend: Backend) {
    let env = start(Setup {
        backend,
        ..Setup::default()
    })
    .await;
    let (_, ok_orders) = env.pay("tok_visa", &[1050, 2000]).await;
    let (_, declined) = env.pay("tok_decline", &[700]).await;
    let all: Vec<_> = ok_orders.iter().chain(&declined).copied().collect();
    let evs = env
        .wait_for(60, "all orders final", |evs| {
            all.iter().all(|o| is_final(evs, *o))
        })
        .await;
    let evs = distinct(&evs);
    for (o, amount) in ok_orders.iter().zip([1050i64, 2000]) {
        let mine = of_order(&evs, *o);
        assert!(
            matches!(mine[0], Event::OrderExecutionStarted(s) if s.attempt == 1),
            "{mine:?}"
        );
        let ok = mine
            .iter()
            .find_map(|e| match e {
                Event::OrderSucceeded(s) => Some(s.clone()),
                _ => None,
            })
            .expect("succeeded");
        assert_eq!(ok.amount.amount_minor(), amount);
        // acct_default: 290 bps rounded half up, plus 30.
        assert_eq!(ok.fee.amount_minor(), (amount * 290 + 5_000) / 10_000 + 30);
        assert!(ok.psp_reference.starts_with("ch_"), "{}", ok.psp_reference);
        assert_eq!(env.sim_stats(*o).await.0, 1);
    }
    let mine = of_order(&evs, declined[0]);
    assert!(
        mine.iter().any(
            |e| matches!(e, Event::OrderFailed(f) if !f.retryable && f.code == "card_declined")
        ),
        "{mine:?}"
    );
    assert!(!mine.iter().any(|e| matches!(e, Event::OrderSucceeded(_))));
    // Orders of one payment stay in order: the second order starts after the
    // first one's outcome.
    let pos = |pred: &dyn Fn(&Event) -> bool| evs.iter().position(|e| pred(&e.event)).unwrap();
    let first_done = pos(&|e| matches!(e, Event::OrderSucceeded(s) if s.order_id == ok_orders[0]));
    let second_started =
        pos(&|e| matches!(e, Event::OrderExecutionStarted(s) if s.order_id == ok_orders[1]));
    assert!(first_done < second_started);
}

testkit::both!(
    charges_each_order_once_and_reports_declines,
    charges_each_order_once
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_then_given_up() {
    let env = start(Setup {
        behaviour: serde_json::json!({"rules": [
            {"match": {"card_token": "tok_always_down"}, "outcome": {"type": "error", "status": 503, "times": 1000}}
        ]}),
        args: Box::new(|a| {
            a.max_attempts = 3;
            a.backoff_base_ms = 20;
        }),
        ..Setup::default()
    })
    .await;
    let (_, flaky) = env.pay("tok_flaky_500", &[500]).await;
    let (_, limited) = env.pay("tok_rate_limited", &[600]).await;
    let (_, down) = env.pay("tok_always_down", &[700]).await;
    let (_, timeout) = env.pay("tok_timeout", &[800]).await;
    let all = [flaky[0], limited[0], down[0], timeout[0]];
    let evs = env
        .wait_for(60, "all orders final", |evs| {
            all.iter().all(|o| is_final(evs, *o))
        })
        .await;
    let evs = distinct(&evs);

    // 500 twice, then success on attempt 3.
    let mine = of_order(&evs, flaky[0]);
    let retryable = mine
        .iter()
        .filter(|e| matches!(e, Event::OrderFailed(f) if f.retryable))
        .count();
    assert_eq!(retryable, 2, "{mine:?}");
    assert!(mine.iter().any(|e| matches!(e, Event::OrderSucceeded(_))));
    assert_eq!(env.sim_stats(flaky[0]).await, (1, 3));

    // 429 with Retry-After: 1 → the next attempt starts at least 1 s later.
    let failed_at = evs
        .iter()
        .find(|e| matches!(&e.event, Event::OrderFailed(f) if f.order_id == limited[0] && f.attempt == 1))
        .expect("attempt 1 failed")
        .occurred_at;
    let retried_at = evs
        .iter()
        .find(|e| matches!(&e.event, Event::OrderExecutionStarted(s) if s.order_id == limited[0] && s.attempt == 2))
        .expect("attempt 2 started")
        .occurred_at;
    let gap_ms = (retried_at.as_micros() - failed_at.as_micros()) / 1000;
    assert!(
        gap_ms >= 1000,
        "Retry-After: 1 not honoured, gap {gap_ms} ms"
    );
    assert!(
        of_order(&evs, limited[0])
            .iter()
            .any(|e| matches!(e, Event::OrderSucceeded(_)))
    );
    assert_eq!(env.sim_stats(limited[0]).await.0, 1);

    // Always 503: three attempts, then a final failure with the reason.
    let mine = of_order(&evs, down[0]);
    let final_failure = mine
        .iter()
        .find_map(|e| match e {
            Event::OrderFailed(f) if !f.retryable => Some(f.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(final_failure.code, "retries_exhausted");
    assert_eq!(final_failure.attempt, 3);
    assert!(
        final_failure.reason.contains("psp_unavailable"),
        "{}",
        final_failure.reason
    );
    assert_eq!(env.sim_stats(down[0]).await, (0, 3));

    // A timeout after the charge was made: the retry gets it replayed.
    assert!(
        of_order(&evs, timeout[0])
            .iter()
            .any(|e| matches!(e, Event::OrderSucceeded(_)))
    );
    assert_eq!(env.sim_stats(timeout[0]).await.0, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_orders_settle_once_by_webhook() {
    let env = start(Setup {
        webhooks: true,
        behaviour: serde_json::json!({"webhooks": {"initial_backoff_ms": 100, "max_backoff_ms": 500, "duplicate_percent": 100}}),
        ..Setup::default()
    })
    .await;
    let (_, ok) = env.pay("tok_pending", &[1200]).await;
    let (_, bad) = env.pay("tok_pending_fail", &[1300]).await;
    env.wait_for(30, "both pending", |evs| {
        [ok[0], bad[0]].iter().all(|o| {
            of_order(evs, *o)
                .iter()
                .any(|e| matches!(e, Event::OrderPending(_)))
        })
    })
    .await;
    env.advance_sim_clock(61_000).await;
    let evs = env
        .wait_for(30, "both settled", |evs| {
            is_final(evs, ok[0]) && is_final(evs, bad[0])
        })
        .await;
    // Duplicated deliveries keep coming for a moment: wait until the
    // simulator has had every copy acknowledged and everything the
    // executor appended for them is collected.
    env.webhooks_delivered().await;
    env.collected_everything().await;
    let evs2 = env.events();
    let settled: Vec<_> = evs2
        .iter()
        .filter_map(|e| match &e.event {
            Event::OrderSettledByWebhook(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(settled.len(), 2, "one settlement per order: {settled:?}");
    let s_ok = settled.iter().find(|s| s.order_id == ok[0]).unwrap();
    assert!(s_ok.succeeded);
    assert_eq!(
        s_ok.fee.unwrap().amount_minor(),
        (1200 * 290 + 5_000) / 10_000 + 30
    );
    let s_bad = settled.iter().find(|s| s.order_id == bad[0]).unwrap();
    assert!(!s_bad.succeeded);
    assert_eq!(s_bad.failure_reason.as_deref(), Some("review_rejected"));
    assert!(!evs.is_empty());
    assert_eq!(env.sim_stats(ok[0]).await.0, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_stale_and_duplicate_webhooks_change_nothing() {
    let env = start(Setup {
        args: Box::new(|a| a.pending_poll_after_secs = 3_600),
        ..Setup::default()
    })
    .await;
    let (_, o) = env.pay("tok_pending", &[900]).await;
    env.wait_for(30, "pending", |evs| {
        of_order(evs, o[0])
            .iter()
            .any(|e| matches!(e, Event::OrderPending(_)))
    })
    .await;
    let charge_id = match of_order(&env.events(), o[0])
        .iter()
        .find(|e| matches!(e, Event::OrderPending(_)))
        .unwrap()
    {
        Event::OrderPending(p) => p.psp_reference.clone(),
        _ => unreachable!(),
    };
    let body = |evt: &str, status: &str| {
        serde_json::json!({"id": evt, "type": "charge.succeeded", "created": 0, "data": {
            "id": charge_id, "status": status, "amount_minor": 900, "currency": "EUR", "fee_minor": 56,
            "reference": o[0].to_string(), "card_token": "tok_pending", "created_at": "2026-11-25T14:20:01.123Z",
            "settled_at": null, "decline_code": null, "refunded_minor": 0}})
        .to_string()
    };
    let now = events::Timestamp::now().as_millis() / 1000;
    let b = body("evt_forged", "succeeded");
    // Wrong secret, no signature, stale timestamp: 401, nothing appended.
    let forged = psp_sim::sign(b"whsec_wrong", now, b.as_bytes());
    assert_eq!(env.post_webhook(Some(&forged), &b).await.0, 401);
    let (s, v) = env.post_webhook(None, &b).await;
    assert_eq!(s, 401);
    assert_eq!(v["error"]["code"], "invalid_signature");
    let stale = env.sign(now - 3_600, &b);
    assert_eq!(env.post_webhook(Some(&stale), &b).await.0, 401);
    // Nothing is settled (and the order was not even looked at:
    // `webhooks::a_forged_webhook_does_no_database_work`).
    env.collected_everything().await;
    assert_eq!(count(&env.events(), EventType::OrderSettledByWebhook), 0);

    // Now the PSP resolves it (no webhook configured); a genuine delivery,
    // sent three times, settles it once.
    env.advance_sim_clock(61_000).await;
    let good = body("evt_good", "succeeded");
    for _ in 0..3 {
        let sig = env.sign(now, &good);
        assert_eq!(env.post_webhook(Some(&sig), &good).await.0, 200);
    }
    // Another genuine event id for the same, already settled order.
    let again = body("evt_other", "succeeded");
    let sig = env.sign(now, &again);
    let (s, v) = env.post_webhook(Some(&sig), &again).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("duplicate")));
    env.wait_for(15, "settled", |evs| is_final(evs, o[0])).await;
    env.collected_everything().await;
    assert_eq!(count(&env.events(), EventType::OrderSettledByWebhook), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_orders_are_polled_when_no_webhook_comes() {
    let env = start(Setup {
        args: Box::new(|a| a.pending_poll_after_secs = 1),
        ..Setup::default()
    })
    .await;
    let (_, o) = env.pay("tok_pending", &[1500]).await;
    env.wait_for(30, "pending", |evs| {
        of_order(evs, o[0])
            .iter()
            .any(|e| matches!(e, Event::OrderPending(_)))
    })
    .await;
    env.advance_sim_clock(61_000).await;
    let evs = env
        .wait_for(30, "settled by poll", |evs| is_final(evs, o[0]))
        .await;
    let settled = of_order(&distinct(&evs), o[0])
        .into_iter()
        .find_map(|e| match e {
            Event::OrderSettledByWebhook(s) => Some(s.clone()),
            _ => None,
        })
        .unwrap();
    assert!(settled.succeeded);
    assert_eq!(env.sim_stats(o[0]).await.0, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_never_exceed_what_was_captured() {
    // Through a (lossless) proxy that records what reaches the PSP.
    let proxy = LossyProxy::new(false);
    let (proxy_url, server) = proxy.spawn().await;
    let env = start(Setup {
        args: Box::new(move |a| a.psp_url = proxy_url.clone()),
        ..Setup::default()
    })
    .await;
    proxy.upstream.set(env.sim_url.clone()).unwrap();
    let (payment, o) = env.pay("tok_visa", &[1000]).await;
    env.wait_for(30, "charged", |evs| is_final(evs, o[0])).await;
    let first = env.refund(payment, o[0], 600).await;
    let evs = env
        .wait_for(30, "first refund", |evs| {
            evs.iter()
                .any(|e| matches!(&e.event, Event::RefundSucceeded(r) if r.refund_id == first))
        })
        .await;
    let ok = evs
        .iter()
        .find_map(|e| match &e.event {
            Event::RefundSucceeded(r) if r.refund_id == first => Some(r.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(ok.amount.amount_minor(), 600);
    assert!(ok.psp_reference.starts_with("re_"), "{}", ok.psp_reference);
    let second = env.refund(payment, o[0], 500).await;
    let third = env.refund(payment, o[0], 400).await;
    let evs = env
        .wait_for(30, "second and third refund", |evs| {
            let done = |id| {
                evs.iter().any(|e| match &e.event {
                    Event::RefundSucceeded(r) => r.refund_id == id,
                    Event::RefundFailed(r) => r.refund_id == id,
                    _ => false,
                })
            };
            done(second) && done(third)
        })
        .await;
    assert!(evs.iter().any(
        |e| matches!(&e.event, Event::RefundFailed(r) if r.refund_id == second && r.code == "amount_exceeds_refundable")
    ));
    // What is left (400) can still be refunded.
    assert!(
        evs.iter()
            .any(|e| matches!(&e.event, Event::RefundSucceeded(r) if r.refund_id == third))
    );
    // The over-limit refund was refused here; the PSP never saw it.
    let keys = proxy.refund_keys.lock().unwrap().clone();
    assert!(keys.contains(&first.to_string()), "{keys:?}");
    assert!(keys.contains(&third.to_string()), "{keys:?}");
    assert!(!keys.contains(&second.to_string()), "{keys:?}");
    server.abort();
}

/// The PSP takes longer than our timeout: attempt 1 times out, attempt 2
/// gets 409 (the first request is still being processed), and the charge
/// appears only after the attempts are used up. The order must end
/// succeeded, never failed, with the one charge the PSP made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_outcomes_are_looked_up_until_the_psp_answers() {
    let env = start(Setup {
        behaviour: serde_json::json!({"rules": [
            {"match": {"card_token": "tok_slow_charge"}, "latency_ms": {"min": 1500, "max": 1500},
             "outcome": {"type": "succeed"}}
        ]}),
        args: Box::new(|a| {
            a.psp_timeout_ms = 300;
            a.max_attempts = 2;
            a.backoff_base_ms = 20;
            a.backoff_cap_ms = 50;
            a.unknown_outcome_grace_ms = Some(5_000);
        }),
        ..Setup::default()
    })
    .await;
    let (_, o) = env.pay("tok_slow_charge", &[1234]).await;
    let evs = env
        .wait_for(60, "order final", |evs| is_final(evs, o[0]))
        .await;
    let evs = distinct(&evs);
    let mine = of_order(&evs, o[0]);
    assert!(
        !mine
            .iter()
            .any(|e| matches!(e, Event::OrderFailed(f) if !f.retryable)),
        "an order the PSP may still charge was failed: {mine:?}"
    );
    // Both attempts failed with an unknown outcome before the charge showed.
    assert_eq!(
        mine.iter()
            .filter(|e| matches!(e, Event::OrderFailed(f) if f.retryable))
            .count(),
        2,
        "{mine:?}"
    );
    let ok = mine
        .iter()
        .find_map(|e| match e {
            Event::OrderSucceeded(s) => Some(s.clone()),
            _ => None,
        })
        .expect("succeeded");
    assert_eq!(ok.amount.amount_minor(), 1234);
    let (charges, _) = env.sim_stats(o[0]).await;
    assert_eq!(charges, 1);
    let listed: serde_json::Value = env
        .http
        .get(format!("{}/v1/charges", env.sim_url))
        .query(&[("reference", o[0].to_string())])
        .bearer_auth(env.psp_key.expose())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        listed["data"][0]["id"].as_str(),
        Some(ok.psp_reference.as_str())
    );
}

/// A charge.succeeded webhook for an order we reported failed is a
/// discrepancy: answered as such (and logged at ERROR), never booked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_success_webhook_for_a_failed_order_is_a_discrepancy() {
    let env = start(Setup::default()).await;
    let (_, o) = env.pay("tok_decline", &[700]).await;
    env.wait_for(30, "declined", |evs| is_final(evs, o[0]))
        .await;
    let body = serde_json::json!({"id": "evt_late_success", "type": "charge.succeeded", "created": 0, "data": {
        "id": "ch_unexpected", "status": "succeeded", "amount_minor": 700, "currency": "EUR", "fee_minor": 50,
        "reference": o[0].to_string(), "card_token": "tok_decline", "created_at": "2026-11-25T14:20:01.123Z",
        "settled_at": "2026-11-25T14:20:01.123Z", "decline_code": null, "refunded_minor": 0}})
    .to_string();
    let now = events::Timestamp::now().as_millis() / 1000;
    let sig = env.sign(now, &body);
    let (s, v) = env.post_webhook(Some(&sig), &body).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("discrepancy")));
    env.collected_everything().await;
    let evs = distinct(&env.events());
    let mine = of_order(&evs, o[0]);
    assert!(
        !mine.iter().any(|e| matches!(
            e,
            Event::OrderSucceeded(_) | Event::OrderSettledByWebhook(_)
        )),
        "{mine:?}"
    );
}

/// A 422 `idempotency_key_reused` means a charge was made under the order's
/// key: the executor must look it up and resolve the order from it rather
/// than fail it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_key_is_resolved_from_the_charge_it_names() {
    let env = start(Setup::default()).await;
    let payment = events::PaymentId::new_random();
    let order = events::OrderId::derive(payment, 0);
    // Someone (an earlier version of the request) charged under the key
    // with a different body.
    let earlier: serde_json::Value = env
        .http
        .post(format!("{}/v1/charges", env.sim_url))
        .bearer_auth(env.psp_key.expose())
        .header("Idempotency-Key", order.to_string())
        .json(&serde_json::json!({"amount_minor": 999, "currency": "EUR",
            "card_token": "tok_visa", "reference": order.to_string()}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let charge_id = earlier["id"].as_str().unwrap().to_owned();
    env.pay_as(payment, "tok_visa", &[1000]).await;
    let evs = env
        .wait_for(30, "order final", |evs| is_final(evs, order))
        .await;
    let evs = distinct(&evs);
    let mine = of_order(&evs, order);
    assert!(
        !mine
            .iter()
            .any(|e| matches!(e, Event::OrderFailed(f) if !f.retryable)),
        "{mine:?}"
    );
    assert!(
        mine.iter()
            .any(|e| matches!(e, Event::OrderSucceeded(s) if s.psp_reference == charge_id)),
        "{mine:?}"
    );
    assert_eq!(env.sim_stats(order).await.0, 1);
}

/// 408, 425 and 4xx the contract does not name may go away: transient.
/// 400 is a validation error; 422 is final but not a validation error.
#[tokio::test]
async fn only_known_final_4xx_are_final() {
    use axum::http::StatusCode;
    use executor::psp::{PspClient, PspError};
    async fn answer(
        axum::extract::Path(status): axum::extract::Path<u16>,
    ) -> (StatusCode, axum::Json<serde_json::Value>) {
        let code = if status == 422 {
            "idempotency_key_reused"
        } else {
            "whatever"
        };
        (
            StatusCode::from_u16(status).unwrap(),
            axum::Json(serde_json::json!({"error": {"code": code, "message": "m"}})),
        )
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = axum::Router::new().route("/{status}/v1/charges", axum::routing::post(answer));
    let server = tokio::spawn(async move { axum::serve(listener, router).await });
    for (status, transient, validation) in [
        (408, true, false),
        (425, true, false),
        (403, true, false),
        (409, true, false),
        (400, false, true),
        (422, false, false),
    ] {
        let psp = PspClient::new(
            &format!("http://{addr}/{status}"),
            runtime::secret::Secret::new("sk"),
            Duration::from_secs(5),
        )
        .unwrap();
        let e = psp.charge("ord", 100, "EUR", "tok").await.unwrap_err();
        assert_eq!(
            matches!(e, PspError::Transient { .. }),
            transient,
            "{status}: {e:?}"
        );
        assert_eq!(e.is_validation(), validation, "{status}: {e:?}");
    }
    server.abort();
}

/// Sits between the executor and the simulator and loses the answer to the
/// first refund request (after the simulator made the refund): a 502
/// without the PSP's error body, as a proxy in trouble would send.
#[derive(Clone)]
struct LossyProxy {
    upstream: Arc<OnceLock<String>>,
    refunds_seen: Arc<AtomicUsize>,
    /// Lose the answer to the first refund request.
    lose_first_refund: bool,
    /// Idempotency keys of the refund requests passed on.
    refund_keys: Arc<Mutex<Vec<String>>>,
    http: reqwest::Client,
}

impl LossyProxy {
    fn new(lose_first_refund: bool) -> LossyProxy {
        LossyProxy {
            upstream: Arc::default(),
            refunds_seen: Arc::default(),
            lose_first_refund,
            refund_keys: Arc::default(),
            http: reqwest::Client::new(),
        }
    }

    /// Serves on a random port; returns its base URL.
    async fn spawn(&self) -> (String, tokio::task::JoinHandle<std::io::Result<()>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let router = axum::Router::new()
            .fallback(lossy_proxy)
            .with_state(self.clone());
        let server = tokio::spawn(async move { axum::serve(listener, router).await });
        (url, server)
    }
}

async fn lossy_proxy(
    axum::extract::State(st): axum::extract::State<LossyProxy>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let upstream = st.upstream.get().expect("upstream set before use");
    let mut req = st
        .http
        .request(method.clone(), format!("{upstream}{uri}"))
        .body(body);
    for (k, v) in &headers {
        if k != "host" && k != "content-length" {
            req = req.header(k, v);
        }
    }
    let resp = req.send().await.unwrap();
    let is_refund = method == axum::http::Method::POST && uri.path().ends_with("/refunds");
    if is_refund {
        let key = headers
            .get("Idempotency-Key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        st.refund_keys.lock().unwrap().push(key.to_owned());
    }
    if is_refund && st.refunds_seen.fetch_add(1, Ordering::SeqCst) == 0 && st.lose_first_refund {
        return axum::http::StatusCode::BAD_GATEWAY.into_response();
    }
    let status = resp.status();
    let mut out = axum::http::HeaderMap::new();
    for (k, v) in resp.headers() {
        if k != "content-length" && k != "transfer-encoding" && k != "connection" {
            out.insert(k, v.clone());
        }
    }
    let bytes = resp.bytes().await.unwrap();
    (status, out, bytes).into_response()
}

/// A refund whose answer was lost must not be recorded as failed while the
/// PSP may have made it: the executor retries (same key) and learns it
/// succeeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_with_a_lost_answer_is_not_given_up() {
    let proxy = LossyProxy::new(true);
    let (proxy_url, server) = proxy.spawn().await;
    let env = start(Setup {
        args: Box::new(move |a| {
            a.psp_url = proxy_url.clone();
            a.max_attempts = 1;
            a.backoff_base_ms = 20;
            a.unknown_outcome_grace_ms = Some(200);
        }),
        ..Setup::default()
    })
    .await;
    proxy.upstream.set(env.sim_url.clone()).unwrap();
    let (payment, o) = env.pay("tok_visa", &[1000]).await;
    env.wait_for(30, "charged", |evs| is_final(evs, o[0])).await;
    let refund = env.refund(payment, o[0], 400).await;
    let evs = env
        .wait_for(30, "refund final", |evs| {
            evs.iter().any(|e| match &e.event {
                Event::RefundSucceeded(r) => r.refund_id == refund,
                Event::RefundFailed(r) => r.refund_id == refund,
                _ => false,
            })
        })
        .await;
    assert!(
        !evs.iter()
            .any(|e| matches!(&e.event, Event::RefundFailed(r) if r.refund_id == refund)),
        "a refund the PSP made was recorded as failed"
    );
    assert!(proxy.refunds_seen.load(Ordering::SeqCst) >= 2);
    let charge_id = evs
        .iter()
        .find_map(|e| match &e.event {
            Event::OrderSucceeded(s) => Some(s.psp_reference.clone()),
            _ => None,
        })
        .unwrap();
    let charge: serde_json::Value = env
        .http
        .get(format!("{}/v1/charges/{charge_id}", env.sim_url))
        .bearer_auth(env.psp_key.expose())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(charge["refunded_minor"], 400);
    server.abort();
}
