use crate::harness::*;
use events::EventType;
use reqwest::StatusCode;
use serde_json::Value;

async fn the_idempotency_matrix_holds_on_both_backends(backend: Backend) {
    let h = start(backend).await;
    let key = h.client("shop-a").await;
    let body = payment(
        "buyer-1",
        &[("seller-1", 1050, "EUR"), ("seller-2", 200, "EUR")],
    );

    let (s, hd, first) = h.post(Some(&key), Some("k-1"), &body).await;
    assert_eq!(s, StatusCode::CREATED, "{backend:?}: {first}");
    assert!(hd.get("idempotent-replayed").is_none());
    let v: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(v["status"], "processing");
    assert_eq!(v["orders"].as_array().unwrap().len(), 2);
    assert_eq!(v["total_minor"], 1250);

    // Same key, same body (reformatted): the stored response, byte for byte.
    let reformatted =
        serde_json::to_string_pretty(&serde_json::from_str::<Value>(&body).unwrap()).unwrap();
    let (s, hd, again) = h.post(Some(&key), Some("k-1"), &reformatted).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(hd.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(again, first);

    // Same key, different body.
    let (s, _, err) = h
        .post(
            Some(&key),
            Some("k-1"),
            &payment("buyer-1", &[("seller-1", 1051, "EUR")]),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(err.contains("idempotency_key_reused"), "{err}");

    // Missing or malformed key; missing or wrong credentials.
    assert_eq!(
        h.post(Some(&key), None, &body).await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        h.post(Some(&key), Some("has space"), &body).await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        h.post(Some(&key), Some(&"x".repeat(256)), &body).await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        h.post(None, Some("k-2"), &body).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        h.post(Some("psk_nope_nope"), Some("k-2"), &body).await.0,
        StatusCode::UNAUTHORIZED
    );

    // Keys are scoped per client: another client's "k-1" is another payment.
    let other = h.client("shop-b").await;
    let (s, _, theirs) = h.post(Some(&other), Some("k-1"), &body).await;
    assert_eq!(s, StatusCode::CREATED);
    let theirs: Value = serde_json::from_str(&theirs).unwrap();
    assert_ne!(theirs["payment_id"], v["payment_id"]);

    // A client reads only its own payments.
    let id = v["payment_id"].as_str().unwrap();
    let (s, got) = h.get_payment(&key, id).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(got["payment_id"], id);
    assert_eq!(h.get_payment(&other, id).await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        h.get_payment(&key, "not-a-uuid").await.0,
        StatusCode::NOT_FOUND
    );

    // Validation failures are sticky: the same key keeps its answer.
    let (s, _, bad) = h
        .post(
            Some(&key),
            Some("k-bad"),
            &payment("buyer-1", &[("seller-1", -5, "EUR")]),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let bad_v: Value = serde_json::from_str(&bad).unwrap();
    assert_eq!(bad_v["error"]["field"], "orders[0].amount_minor");
    let (s, hd, bad_again) = h
        .post(
            Some(&key),
            Some("k-bad"),
            &payment("buyer-1", &[("seller-1", -5, "EUR")]),
        )
        .await;
    assert_eq!(
        (s, bad_again.as_str()),
        (StatusCode::BAD_REQUEST, bad.as_str())
    );
    assert_eq!(hd.get("idempotent-replayed").unwrap(), "true");

    // Exactly one PaymentRequested per accepted payment on the topic.
    let evs = h.payment_events().await;
    assert_eq!(
        count_type(&evs, EventType::PaymentRequested),
        2,
        "{backend:?}"
    );
    assert_eq!(count_type(&evs, EventType::RiskApproved), 2);
}
testkit::both!(
    the_idempotency_matrix_holds_on_both_backends,
    the_idempotency_matrix_holds_on_both_backends
);

async fn fifty_concurrent_requests_with_one_key_make_one_payment(backend: Backend) {
    let h = start(backend).await;
    let key = h.client("shop-c").await;
    let body = payment("buyer-9", &[("seller-1", 999, "EUR")]);
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (http, base, key, body) = (h.http.clone(), h.base.clone(), key.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(format!("{base}/v1/payments"))
                .bearer_auth(key)
                .header("Idempotency-Key", "same-key")
                .body(body)
                .send()
                .await
                .unwrap();
            let replay = r.headers().get("idempotent-replayed").is_some();
            let retry_after = r.headers().get("retry-after").is_some();
            (r.status(), replay, retry_after, r.text().await.unwrap())
        }));
    }
    let mut originals = 0;
    let mut ids = std::collections::BTreeSet::new();
    for t in tasks {
        let (s, replay, retry_after, text) = t.await.unwrap();
        match s {
            StatusCode::CREATED => {
                if !replay {
                    originals += 1;
                }
                let v: Value = serde_json::from_str(&text).unwrap();
                ids.insert(v["payment_id"].as_str().unwrap().to_owned());
            }
            StatusCode::TOO_MANY_REQUESTS => assert!(retry_after, "429 without Retry-After"),
            other => panic!("{backend:?}: unexpected {other}: {text}"),
        }
    }
    assert_eq!(
        originals, 1,
        "{backend:?}: exactly one request did the work"
    );
    assert_eq!(ids.len(), 1);
    let evs = h.payment_events().await;
    assert_eq!(
        count_type(&evs, EventType::PaymentRequested),
        1,
        "{backend:?}"
    );
}
testkit::both!(
    fifty_concurrent_requests_with_one_key_make_one_payment,
    fifty_concurrent_requests_with_one_key_make_one_payment
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn risk_rejections_are_recorded_and_sticky() {
    let mut args = payment_handler::HandlerArgs::for_tests();
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        "name = \"test@1\"\nblocked_sellers = [\"bad-seller\"]\nallowed_currencies = [\"EUR\"]\n[max_order_minor]\nEUR = 10000\n[max_payment_minor]\nEUR = 100000\n[velocity]\nwindow_secs = 3600\nmax_count = 2\n",
    )
    .unwrap();
    args.risk_rules = Some(rules);
    let h = start_with(Backend::Postgres, args).await;
    let key = h.client("shop-r").await;

    let (s, _, body) = h
        .post(
            Some(&key),
            Some("r-1"),
            &payment("b1", &[("bad-seller", 100, "EUR")]),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "rejected");
    assert_eq!(v["rejection"]["rule"], "blocked_seller");
    assert_eq!(v["orders"][0]["status"], "rejected");
    let (_, hd, again) = h
        .post(
            Some(&key),
            Some("r-1"),
            &payment("b1", &[("bad-seller", 100, "EUR")]),
        )
        .await;
    assert_eq!(again, body);
    assert!(hd.get("idempotent-replayed").is_some());

    let (_, _, body) = h
        .post(
            Some(&key),
            Some("r-2"),
            &payment("b2", &[("s", 10001, "EUR")]),
        )
        .await;
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["rejection"]["rule"],
        "amount_limit_per_order"
    );

    // Velocity: b3 may pay twice in the window, not three times.
    for (i, expect) in [(1, "processing"), (2, "processing"), (3, "rejected")] {
        let (_, _, body) = h
            .post(
                Some(&key),
                Some(&format!("v-{i}")),
                &payment("b3", &[("s", 100, "EUR")]),
            )
            .await;
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap()["status"],
            expect,
            "payment {i}: {body}"
        );
    }

    let evs = h.payment_events().await;
    let rejected: Vec<_> = evs
        .iter()
        .filter_map(|e| match &e.event {
            events::Event::RiskRejected(r) => Some((r.rule.clone(), r.rule_set.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(rejected.len(), 3);
    assert!(rejected.iter().any(|(r, _)| r == "velocity_count"));
    assert!(rejected.iter().all(|(_, set)| set == "test@1"));
}
