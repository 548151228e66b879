//! The group commit gives the answers the per-request path gives: the same
//! script answered alike with batching on and off, and under concurrency
//! (many keys at once, one key many times at once, one key with two bodies
//! at once, one buyer's velocity across a batch) on both backends.

use crate::harness::*;
use events::EventType;
use payment_handler::HandlerArgs;
use reqwest::StatusCode;
use serde_json::Value;

fn rules(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("rules.toml");
    std::fs::write(
        &path,
        "name = \"t@1\"\nallowed_currencies = [\"EUR\"]\n[max_order_minor]\nEUR = 100000\n\
         [max_payment_minor]\nEUR = 150000\n[velocity]\nwindow_secs = 3600\nmax_count = 3\n\
         [velocity.max_amount_minor]\nEUR = 1000000\n",
    )
    .unwrap();
    path
}

fn args(rules: &std::path::Path, group: bool) -> HandlerArgs {
    let mut a = HandlerArgs::for_tests();
    a.risk_rules = Some(rules.to_owned());
    if !group {
        a.group_commit_max = 0;
    }
    a
}

/// A body without its times (they differ between runs).
fn timeless(body: &str) -> String {
    match serde_json::from_str::<Value>(body) {
        Ok(mut v) => {
            if let Some(o) = v.as_object_mut() {
                o.remove("created_at");
                o.remove("updated_at");
            }
            v.to_string()
        }
        Err(_) => body.to_owned(),
    }
}

async fn a_script_gets_the_same_answers_with_and_without_batching(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let rules = rules(dir.path());
    let mut runs = Vec::new();
    for group in [false, true] {
        let h = start_with(backend, args(&rules, group)).await;
        let key = h.client("shop").await;
        let ok = payment("b1", &[("s1", 1000, "EUR"), ("s2", 250, "EUR")]);
        let script: Vec<(&str, String)> = vec![
            ("k1", ok.clone()),
            ("k1", ok.clone()),                               // replay
            ("k1", payment("b1", &[("s1", 999, "EUR")])),     // reused key
            ("k2", "{\"buyer_id\": 5}".into()),               // invalid body
            ("k2", "{\"buyer_id\": 5}".into()),               // its stored refusal
            ("k3", payment("b2", &[("s9", 100_001, "EUR")])), // over the order limit
            ("k4", payment("b1", &[("s1", 10, "EUR")])),      // b1's second
            ("k5", payment("b1", &[("s1", 10, "EUR")])),      // third
            ("k6", payment("b1", &[("s1", 10, "EUR")])),      // fourth: velocity_count
            ("k7", payment("b3", &[("s1", 10, "USD")])),      // currency not allowed
        ];
        let mut answers = Vec::new();
        for (k, body) in &script {
            let (s, hd, b) = h.post(Some(&key), Some(k), body).await;
            answers.push((
                s.as_u16(),
                hd.get("idempotent-replayed").is_some(),
                timeless(&b),
            ));
        }
        runs.push(answers);
    }
    assert_eq!(runs[0], runs[1], "{backend:?}: batching changed an answer");
    // And the script meant something.
    let statuses: Vec<u16> = runs[1].iter().map(|a| a.0).collect();
    assert_eq!(
        statuses,
        [201, 201, 422, 400, 400, 201, 201, 201, 201, 201],
        "{backend:?}"
    );
    assert!(
        runs[1][8].2.contains("velocity_count"),
        "{backend:?} {:?}",
        runs[1][8]
    );
}
testkit::both!(
    a_script_gets_the_same_answers_with_and_without_batching,
    a_script_gets_the_same_answers_with_and_without_batching
);

async fn concurrent_requests_get_todays_answers(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let rules = rules(dir.path());
    let h = std::sync::Arc::new(start_with(backend, args(&rules, true)).await);
    let key = h.client("shop").await;
    let mut tasks = Vec::new();
    let spawn = |k: String, body: String| {
        let (h, key) = (h.clone(), key.clone());
        tokio::spawn(async move {
            let (s, hd, b) = h.post(Some(&key), Some(&k), &body).await;
            (k, body, s, hd.get("idempotent-replayed").is_some(), b)
        })
    };
    // 80 distinct payments, one key 8 times, one key with two bodies,
    // and 6 payments of one buyer (velocity max_count 3), all at once.
    for i in 0..80 {
        tasks.push(spawn(
            format!("many-{i}"),
            payment(&format!("buyer-{i}"), &[("s1", 100 + i, "EUR")]),
        ));
    }
    let same = payment("dup-buyer", &[("s1", 777, "EUR")]);
    for _ in 0..8 {
        tasks.push(spawn("dup".into(), same.clone()));
    }
    let (a, b) = (
        payment("ra", &[("s1", 1, "EUR")]),
        payment("rb", &[("s1", 2, "EUR")]),
    );
    tasks.push(spawn("reuse".into(), a.clone()));
    tasks.push(spawn("reuse".into(), b.clone()));
    for i in 0..6 {
        tasks.push(spawn(
            format!("vel-{i}"),
            payment("velo", &[("s1", 10, "EUR")]),
        ));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    // Every distinct payment: 201 processing, the body what GET shows.
    for (k, _, s, replayed, body) in answers.iter().filter(|a| a.0.starts_with("many-")) {
        assert_eq!(*s, StatusCode::CREATED, "{backend:?} {k}: {body}");
        assert!(!replayed);
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["status"], "processing");
        let (gs, got) = h.get_payment(&key, v["payment_id"].as_str().unwrap()).await;
        assert_eq!(gs, StatusCode::OK);
        assert_eq!(got, v, "{backend:?}: the 201 body is the stored view");
    }
    // One key at once: one decision; the rest replay it or are told it
    // is in flight; a retry afterwards replays it byte for byte.
    let dups: Vec<_> = answers.iter().filter(|a| a.0 == "dup").collect();
    let fresh: Vec<_> = dups
        .iter()
        .filter(|a| a.2 == StatusCode::CREATED && !a.3)
        .collect();
    assert_eq!(fresh.len(), 1, "{backend:?}: {dups:?}");
    for d in &dups {
        match d.2 {
            StatusCode::CREATED => assert_eq!(d.4, fresh[0].4),
            StatusCode::TOO_MANY_REQUESTS => assert!(d.4.contains("idempotency_key_in_use")),
            other => panic!("{backend:?}: {other} {}", d.4),
        }
    }
    let (s, hd, again) = h.post(Some(&key), Some("dup"), &same).await;
    assert_eq!(
        (s, hd.get("idempotent-replayed").is_some()),
        (StatusCode::CREATED, true)
    );
    assert_eq!(again, fresh[0].4);
    // One key, two bodies at once: one is decided; the other is refused
    // (reused key) or told to come back, and then refused.
    let reuse: Vec<_> = answers.iter().filter(|a| a.0 == "reuse").collect();
    let won: Vec<_> = reuse
        .iter()
        .filter(|a| a.2 == StatusCode::CREATED)
        .collect();
    assert_eq!(won.len(), 1, "{backend:?}: {reuse:?}");
    let lost = reuse.iter().find(|a| a.2 != StatusCode::CREATED).unwrap();
    assert!(
        lost.2 == StatusCode::UNPROCESSABLE_ENTITY || lost.2 == StatusCode::TOO_MANY_REQUESTS,
        "{backend:?}: {lost:?}"
    );
    let (s, _, body) = h.post(Some(&key), Some("reuse"), &lost.1).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body.contains("idempotency_key_reused"));
    // Velocity fails closed across the batch: never more than 3 of one
    // buyer approved, every refusal the count rule. None approved is a
    // right answer too: payments of one buyer go to different batches,
    // and batches that commit their velocity rows before any of them
    // reads the window each see all six (as concurrent requests did
    // before group commit).
    let vel: Vec<Value> = answers
        .iter()
        .filter(|a| a.0.starts_with("vel-"))
        .map(|a| {
            assert_eq!(a.2, StatusCode::CREATED, "{backend:?} {}", a.4);
            serde_json::from_str(&a.4).unwrap()
        })
        .collect();
    let approved = vel.iter().filter(|v| v["status"] == "processing").count();
    assert!(approved <= 3, "{backend:?}: {approved} approved");
    for v in vel.iter().filter(|v| v["status"] != "processing") {
        assert_eq!(v["rejection"]["rule"], "velocity_count", "{backend:?} {v}");
    }
    // On the topic: exactly one PaymentRequested per payment (the key
    // used 8 times and the key with two bodies included).
    let evs = h.payment_events().await;
    let requested: Vec<_> = evs
        .iter()
        .filter(|e| e.event_type() == EventType::PaymentRequested)
        .map(|e| e.payment_id.unwrap())
        .collect();
    let distinct: std::collections::HashSet<_> = requested.iter().collect();
    assert_eq!(
        requested.len(),
        distinct.len(),
        "{backend:?}: a payment requested twice"
    );
    assert_eq!(requested.len(), 80 + 1 + 1 + 6, "{backend:?}");
}
testkit::both!(
    concurrent_requests_get_todays_answers,
    concurrent_requests_get_todays_answers
);
