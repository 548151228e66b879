use crate::harness::*;
use payment_handler::api::{OPENAPI_JSON, ROUTES};
use reqwest::StatusCode;
use serde_json::Value;
use std::collections::BTreeSet;

#[test]
fn openapi_lists_exactly_the_routes() {
    let doc: Value = serde_json::from_str(OPENAPI_JSON).unwrap();
    let mut documented = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            documented.insert((method.clone(), path.clone()));
        }
    }
    let routed: BTreeSet<_> = ROUTES
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(documented, routed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_route_is_served() {
    let h = start(Backend::Sqlite).await;
    let key = h.client("shop-o").await;
    for (method, path) in ROUTES {
        let url = format!(
            "{}{}",
            h.base,
            path.replace("{payment_id}", &uuid::Uuid::now_v7().to_string())
        );
        let req = match *method {
            "get" => h.http.get(&url),
            "post" => h
                .http
                .post(&url)
                .header("Idempotency-Key", "route-check")
                .body("{}"),
            other => panic!("unexpected method {other}"),
        };
        let r = req.bearer_auth(&key).send().await.unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert!(
            !text.contains("\"code\":\"not_found\""),
            "{method} {path} is not routed: {text}"
        );
    }
    // The served document is the checked-in one.
    let served = h
        .http
        .get(format!("{}/openapi.json", h.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(served, OPENAPI_JSON);
    // Unknown routes and methods get JSON errors too.
    let r = h.http.get(format!("{}/nope", h.base)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(r.text().await.unwrap().contains("not_found"));
    let r = h
        .http
        .delete(format!("{}/v1/payments", h.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_and_body_limit() {
    let h = start(Backend::Postgres).await;
    let r = h
        .http
        .get(format!("{}/readyz", h.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["database"].as_str(), v["broker"].as_str()),
        (Some("ok"), Some("ok"))
    );
    let key = h.client("shop-l").await;
    let huge = format!("{{\"buyer_id\":\"b\",\"pad\":\"{}\"}}", "x".repeat(70_000));
    let (s, _, body) = h.post(Some(&key), Some("big"), &huge).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(body.contains("payload_too_large"), "{body}");
}

#[tokio::test]
async fn expired_idempotency_keys_are_reaped() {
    use payment_handler::store::{
        Begin, IdempotencyPolicy, idem_begin, idem_finish, idem_reap, migrate,
    };
    let db = testkit::fresh_postgres().await.unwrap();
    migrate(&db).await.unwrap();
    let c = events::ClientId::parse("c").unwrap();
    let short = IdempotencyPolicy {
        lease_ms: 1000,
        retention_ms: 1,
    };
    let long = IdempotencyPolicy {
        lease_ms: 1000,
        retention_ms: 60_000,
    };
    let owned = |b: Begin| match b {
        Begin::Owned { token, .. } => token,
        other => panic!("expected to own the key, got {other:?}"),
    };
    let token = owned(idem_begin(&db, &c, "k", "fp", short).await.unwrap());
    idem_finish(&db, &c, "k", &token, 201, "{}").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert_eq!(idem_reap(&db).await.unwrap(), 1);
    // A reaped key is free again.
    let token = owned(idem_begin(&db, &c, "k", "other", long).await.unwrap());
    idem_finish(&db, &c, "k", &token, 201, "{}").await.unwrap();
    assert_eq!(idem_reap(&db).await.unwrap(), 0, "unexpired keys stay");
    // A key still being worked on survives the reaper and a new request,
    // even past its retention.
    let live = owned(idem_begin(&db, &c, "live", "fp", short).await.unwrap());
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert_eq!(idem_reap(&db).await.unwrap(), 0);
    assert!(matches!(
        idem_begin(&db, &c, "live", "fp", short).await.unwrap(),
        Begin::InFlight { .. }
    ));
    // A request that lost its key can neither finish nor release it.
    assert!(
        idem_finish(&db, &c, "live", "not-the-owner", 201, "{}")
            .await
            .is_err()
    );
    idem_finish(&db, &c, "live", &live, 201, "{}")
        .await
        .unwrap();
}

/// Found by the fault suite (issue 16): a key taken over after its handler
/// died answers 201 with the payment's current view, whatever its status
/// (e.g. `succeeded`); the document must say so for every status.
#[test]
fn the_201_of_a_payment_describes_every_status_it_can_carry() {
    let doc: serde_json::Value = serde_json::from_str(payment_handler::api::OPENAPI_JSON).unwrap();
    let statuses = doc["components"]["schemas"]["Payment"]["properties"]["status"]["enum"]
        .as_array()
        .unwrap()
        .clone();
    assert!(statuses.len() >= 6);
    let described = doc["paths"]["/v1/payments"]["post"]["responses"]["201"]["description"]
        .as_str()
        .unwrap();
    for s in statuses {
        let s = s.as_str().unwrap();
        assert!(
            described.contains(s),
            "201 does not describe status {s}: {described}"
        );
    }
}

/// Review L8: the velocity table holds one window, not all history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn velocity_rows_older_than_the_window_are_pruned() {
    use payment_handler::store::{migrate, note_velocity, now_ms, recent_activity, velocity_prune};
    let db = testkit::fresh_postgres().await.unwrap();
    migrate(&db).await.unwrap();
    let c = events::ClientId::parse("c").unwrap();
    let old = events::PaymentId::derive(&c, "old");
    let new = events::PaymentId::derive(&c, "new");
    note_velocity(&db, &c, old, "b", "EUR", 100).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    let cut = now_ms();
    note_velocity(&db, &c, new, "b", "EUR", 200).await.unwrap();
    let other = events::PaymentId::derive(&c, "x");
    assert_eq!(
        recent_activity(&db, &c, "b", "EUR", 0, other)
            .await
            .unwrap(),
        (2, 300)
    );
    assert_eq!(velocity_prune(&db, cut).await.unwrap(), 1);
    assert_eq!(
        recent_activity(&db, &c, "b", "EUR", 0, other)
            .await
            .unwrap(),
        (1, 200)
    );
    assert_eq!(velocity_prune(&db, cut).await.unwrap(), 0);
}
