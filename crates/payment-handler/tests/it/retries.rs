//! Retries after a failure between the append and the stored answer: the
//! retry re-appends the events decided the first time, never decides again.

use crate::harness::*;
use events::EventType;
use payment_handler::HandlerArgs;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;

fn faulty(rules: Option<&std::path::Path>) -> HandlerArgs {
    let mut args = HandlerArgs::for_tests();
    args.fault_inject = Some("fail_after_append_once".into());
    args.risk_rules = rules.map(std::path::Path::to_path_buf);
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_keeps_the_first_risk_decision() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        "name = \"t@1\"\nallowed_currencies = [\"EUR\"]\n[max_order_minor]\nEUR = 100000\n[max_payment_minor]\nEUR = 100000\n[velocity]\nwindow_secs = 3600\nmax_count = 1\n",
    )
    .unwrap();
    let h = start_with(Backend::Postgres, faulty(Some(&rules))).await;
    let key = h.client("shop-retry").await;

    // Approved and appended, then the answer is lost (503).
    let (s, _, _) = h
        .post(
            Some(&key),
            Some("first"),
            &payment("buyer-v", &[("s", 100, "EUR")]),
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    // Meanwhile the buyer's velocity budget is used up by the first payment
    // itself once the status consumer applied it; a second payment is rejected.
    for _ in 0..100 {
        let (s, _, body) = h
            .post(
                Some(&key),
                Some(&format!("probe-{}", uuid::Uuid::now_v7())),
                &payment("buyer-v", &[("s", 1, "EUR")]),
            )
            .await;
        if s == StatusCode::CREATED
            && serde_json::from_str::<Value>(&body).unwrap()["status"] == "rejected"
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The retry must answer with the decision that was appended: approved.
    let (s, hd, body) = h
        .post(
            Some(&key),
            Some("first"),
            &payment("buyer-v", &[("s", 100, "EUR")]),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    assert!(hd.get("idempotent-replayed").is_none());
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "processing", "the retry re-decided: {body}");
    let evs = h.payment_events().await;
    let first = v["payment_id"].as_str().unwrap();
    let decisions: std::collections::BTreeSet<_> = evs
        .iter()
        .filter(|e| e.payment_id.map(|p| p.to_string()).as_deref() == Some(first))
        .filter(|e| {
            matches!(
                e.event_type(),
                EventType::RiskApproved | EventType::RiskRejected
            )
        })
        .map(|e| e.event_type())
        .collect();
    assert_eq!(
        decisions,
        std::collections::BTreeSet::from([EventType::RiskApproved])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_decisions_are_swept_onto_the_topic() {
    let h = start_with(Backend::Sqlite, faulty(None)).await;
    let key = h.client("shop-sweep").await;
    let (s, _, _) = h
        .post(
            Some(&key),
            Some("gone"),
            &payment("b", &[("s", 100, "EUR")]),
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    // The client never comes back; the sweeper re-appends and applies.
    assert_eq!(
        payment_handler::service::sweep_abandoned(&h.app)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        payment_handler::service::sweep_abandoned(&h.app)
            .await
            .unwrap(),
        0,
        "swept once"
    );
    let client = events::ClientId::parse("shop-sweep").unwrap();
    let id = events::PaymentId::derive(&client, "gone").to_string();
    assert_eq!(h.get_payment(&key, &id).await.0, StatusCode::OK);
    // A late retry still gets its answer (not a second payment).
    let (s, _, body) = h
        .post(
            Some(&key),
            Some("gone"),
            &payment("b", &[("s", 100, "EUR")]),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["payment_id"],
        id
    );
    // Appended by the request, the sweep and the late retry: one event id.
    let requested: std::collections::BTreeSet<_> = h
        .payment_events()
        .await
        .into_iter()
        .filter(|e| e.event_type() == EventType::PaymentRequested)
        .map(|e| e.event_id)
        .collect();
    assert_eq!(requested.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_refunds_never_exceed_the_capture() {
    let h = start(Backend::Postgres).await;
    let key = h.client("shop-cr").await;
    let (_, _, body) = h
        .post(Some(&key), Some("p"), &payment("b", &[("s", 1000, "EUR")]))
        .await;
    let p: Value = serde_json::from_str(&body).unwrap();
    let (pid, oid) = (
        p["payment_id"].as_str().unwrap().to_owned(),
        p["orders"][0]["order_id"].as_str().unwrap().to_owned(),
    );
    crate::refunds::succeed(&h, &pid, &oid, 1000).await;
    crate::refunds::wait_succeeded(&h, &key, &pid).await;
    let mut tasks = Vec::new();
    for i in 0..6 {
        let (http, base, key, pid, oid) = (
            h.http.clone(),
            h.base.clone(),
            key.clone(),
            pid.clone(),
            oid.clone(),
        );
        tasks.push(tokio::spawn(async move {
            http.post(format!("{base}/v1/payments/{pid}/refunds"))
                .bearer_auth(key)
                .header("Idempotency-Key", format!("refund-{i}"))
                .body(json!({"order_id": oid, "amount_minor": 400}).to_string())
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    let mut created = 0;
    for t in tasks {
        match t.await.unwrap() {
            StatusCode::CREATED => created += 1,
            StatusCode::UNPROCESSABLE_ENTITY => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(created, 2, "2 × 400 fit into 1000, a third does not");
    let total: i64 = h
        .payment_events()
        .await
        .iter()
        .filter_map(|e| match &e.event {
            events::Event::RefundRequested(r) => Some(r.amount.amount_minor()),
            _ => None,
        })
        .sum();
    assert_eq!(total, 800);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_retried_after_its_append_is_not_refused() {
    let h = start_with(Backend::Postgres, HandlerArgs::for_tests()).await;
    let key = h.client("shop-rr").await;
    let (_, _, body) = h
        .post(Some(&key), Some("p"), &payment("b", &[("s", 1000, "EUR")]))
        .await;
    let p: Value = serde_json::from_str(&body).unwrap();
    let (pid, oid) = (
        p["payment_id"].as_str().unwrap().to_owned(),
        p["orders"][0]["order_id"].as_str().unwrap().to_owned(),
    );
    crate::refunds::succeed(&h, &pid, &oid, 1000).await;
    crate::refunds::wait_succeeded(&h, &key, &pid).await;
    // A second handler on the same database and topics fails once after the append.
    let mut args = faulty(None);
    args.listen = "127.0.0.1:0".parse().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let other = payment_handler::start(h.kafka.clone(), &h.db_url, args, stop.clone())
        .await
        .unwrap();
    let url = format!("http://{}/v1/payments/{pid}/refunds", other.addr);
    let send = |url: String| {
        let (http, key, oid) = (h.http.clone(), key.clone(), oid.clone());
        async move {
            let r = http
                .post(url)
                .bearer_auth(key)
                .header("Idempotency-Key", "all")
                .body(json!({"order_id": oid}).to_string())
                .send()
                .await
                .unwrap();
            (r.status(), r.text().await.unwrap())
        }
    };
    assert_eq!(send(url.clone()).await.0, StatusCode::SERVICE_UNAVAILABLE);
    let (s, body) = send(url).await;
    assert_eq!(
        s,
        StatusCode::CREATED,
        "the retry must not count its own refund against itself: {body}"
    );
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["amount_minor"],
        1000
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_payments_cannot_slip_past_the_velocity_limit() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        "name = \"t@1\"\nallowed_currencies = [\"EUR\"]\n[max_order_minor]\nEUR = 100000\n[max_payment_minor]\nEUR = 100000\n[velocity]\nwindow_secs = 3600\nmax_count = 2\n",
    )
    .unwrap();
    let mut args = HandlerArgs::for_tests();
    args.risk_rules = Some(rules);
    let h = start_with(Backend::Postgres, args).await;
    let key = h.client("shop-vel").await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (http, base, key) = (h.http.clone(), h.base.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(format!("{base}/v1/payments"))
                .bearer_auth(key)
                .header("Idempotency-Key", format!("vel-{i}"))
                .body(payment("same-buyer", &[("s", 100, "EUR")]))
                .send()
                .await
                .unwrap();
            r.json::<Value>().await.unwrap()["status"]
                .as_str()
                .unwrap()
                .to_owned()
        }));
    }
    let mut approved = 0;
    for t in tasks {
        if t.await.unwrap() == "processing" {
            approved += 1;
        }
    }
    assert!(
        approved <= 2,
        "{approved} payments approved with a limit of 2 per window"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_that_cannot_be_swept_does_not_stop_the_others() {
    let h = start_with(Backend::Sqlite, faulty(None)).await;
    let key = h.client("shop-sweep-poison").await;
    let (s, _, _) = h
        .post(
            Some(&key),
            Some("gone"),
            &payment("b", &[("s", 100, "EUR")]),
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    // An older abandoned key whose stored events are corrupt: the sweeper
    // takes it first (oldest lease first) and cannot decode it.
    let far = i64::MAX / 2;
    storage::with_pool!(&h.app.db, p => sqlx::query(
        "INSERT INTO handler_idempotency_keys (client_id, idem_key, request_sha256, state, lease_until_ms, created_ms, expires_ms, owner, pending_events) \
         VALUES ('shop-sweep-poison', 'corrupt', 'x', 'in_flight', 1, 0, $1, 'o', 'not stored events')",
    ).bind(far).execute(p).await.unwrap().rows_affected());
    assert_eq!(
        payment_handler::service::sweep_abandoned(&h.app)
            .await
            .unwrap(),
        1,
        "the valid abandoned key behind the corrupt one is swept"
    );
    let client = events::ClientId::parse("shop-sweep-poison").unwrap();
    let id = events::PaymentId::derive(&client, "gone").to_string();
    assert_eq!(h.get_payment(&key, &id).await.0, StatusCode::OK);
}
