//! Authentication from memory (issue 12 item 9): requests with made-up keys
//! are refused without a database query each; a new key works at once; a
//! revoked one stops working within seconds.

use crate::harness::*;
use reqwest::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_keys_cost_no_query_each_and_revocation_takes_seconds() {
    let h = start(Backend::Postgres).await;
    let key = h.client("shop-keys").await;
    // A key created a moment ago works at once.
    let (s, _, body) = h
        .post(Some(&key), Some("k1"), &payment("b", &[("s", 100, "EUR")]))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");

    // 200 requests at once with well-formed keys nobody issued: they share
    // a few reloads of the key copy, not a query each.
    let before = h.app.keys.reloads();
    let started = std::time::Instant::now();
    let fakes = (0..200).map(|i| {
        let fake = format!("psk_{i:016x}_{}", "0".repeat(64));
        let h = &h;
        async move {
            h.post(Some(&fake), Some("k2"), &payment("b", &[("s", 100, "EUR")]))
                .await
                .0
        }
    });
    for s in futures::future::join_all(fakes).await {
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    let reloads = h.app.keys.reloads() - before;
    let bound = 2 + started.elapsed().as_millis() / 250;
    assert!(
        u128::from(reloads) <= bound,
        "{reloads} key reloads for 200 unknown keys in {:?} (at most {bound})",
        started.elapsed()
    );
    // A key created right after a made-up one works at once.
    let other = h.client("shop-keys-2").await;
    let (s, _, body) = h
        .post(
            Some(&other),
            Some("k5"),
            &payment("b", &[("s", 100, "EUR")]),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    // Malformed tokens never touch the directory's source.
    let before = h.app.keys.reloads();
    for bad in ["nope", "psk_", "psk_abc", "Bearer psk_x_y_z"] {
        let (s, _, _) = h
            .post(Some(bad), Some("k3"), &payment("b", &[("s", 100, "EUR")]))
            .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{bad}");
    }
    assert!(h.app.keys.reloads() - before <= 1);

    // Revoked: refused within the refresh interval.
    let key_id = key
        .strip_prefix("psk_")
        .and_then(|r| r.split_once('_'))
        .map(|(id, _)| id.to_owned())
        .unwrap();
    assert!(
        payment_handler::store::revoke_key(&h.app.db, &key_id)
            .await
            .unwrap()
    );
    tokio::time::sleep(payment_handler::keys::REFRESH + std::time::Duration::from_millis(300))
        .await;
    let (s, _, _) = h
        .post(Some(&key), Some("k4"), &payment("b", &[("s", 100, "EUR")]))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "a revoked key still works");
}
