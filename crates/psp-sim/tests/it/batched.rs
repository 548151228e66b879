//! `--durability batched` (the group commit) against `full`: the same
//! script of requests, sequential and concurrent, run against one
//! simulator of each, must give the same answers (ids and times aside),
//! and the answers must be the contract's.

use super::{KEY, Receiver, Sim, body, receiver, with_webhooks};
use psp_sim::Durability;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

/// One answer of the script: what the caller can see, raw.
fn entry(
    step: &str,
    status: StatusCode,
    headers: &reqwest::header::HeaderMap,
    body: Value,
) -> Value {
    let header = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_owned());
    json!({
        "step": step,
        "status": status.as_u16(),
        "replayed": header("idempotent-replayed"),
        "retry_after": header("retry-after"),
        "body": body,
    })
}

/// Records the answer and returns its body as JSON (Null when empty).
async fn record(t: &mut Vec<Value>, step: &str, r: reqwest::Response) -> (StatusCode, Value) {
    let (status, headers) = (r.status(), r.headers().clone());
    let bytes = r.bytes().await.unwrap();
    let v: Value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    t.push(entry(step, status, &headers, v.clone()));
    (status, v)
}

impl Sim {
    async fn post_charge(&self, key: &str, body: &Value) -> reqwest::Response {
        self.charge(key, body).await.unwrap()
    }
}

/// Sends the charge until it is not answered 409 (another request with
/// the key in flight); returns the final status, replay header and body.
async fn charge_until_final(s: &Sim, key: &str, body: &Value) -> (StatusCode, bool, Vec<u8>) {
    loop {
        let r = s.post_charge(key, body).await;
        if r.status() == StatusCode::CONFLICT {
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        }
        let replayed = r.headers().get("idempotent-replayed").is_some();
        return (r.status(), replayed, r.bytes().await.unwrap().to_vec());
    }
}

/// The script. Asserts the contract's answers as it goes, and returns the
/// transcript for the comparison between modes.
#[allow(clippy::too_many_lines)]
async fn script(s: Arc<Sim>, rx: &Receiver) -> Vec<Value> {
    let mut t = Vec::new();
    let ord = |i: u32| format!("ord_mixed_{i}");

    // A charge, its replay, the key with another body.
    let first = s.post_charge("k1", &body(&ord(1), 1050, "tok_visa")).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let first_bytes = first.bytes().await.unwrap();
    let c1: Value = serde_json::from_slice(&first_bytes).unwrap();
    t.push(entry(
        "create",
        StatusCode::CREATED,
        &Default::default(),
        c1.clone(),
    ));
    let again = s.post_charge("k1", &body(&ord(1), 1050, "tok_visa")).await;
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let headers = again.headers().clone();
    assert_eq!(
        again.bytes().await.unwrap(),
        first_bytes,
        "byte-identical replay"
    );
    t.push(entry("replay", StatusCode::OK, &headers, c1.clone()));
    let (st, v) = record(
        &mut t,
        "other body",
        s.post_charge("k1", &body(&ord(1), 2000, "tok_visa")).await,
    )
    .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["error"]["code"], "idempotency_key_reused");

    // Declines are answers, stored and replayed.
    let (st, c2) = record(
        &mut t,
        "decline",
        s.post_charge("k2", &body(&ord(2), 1200, "tok_decline"))
            .await,
    )
    .await;
    assert_eq!(
        (st, c2["status"].as_str()),
        (StatusCode::CREATED, Some("declined"))
    );
    let (st, v) = record(
        &mut t,
        "decline replay",
        s.post_charge("k2", &body(&ord(2), 1200, "tok_decline"))
            .await,
    )
    .await;
    assert_eq!((st, &v), (StatusCode::OK, &c2));
    let (_, v) = record(
        &mut t,
        "insufficient funds",
        s.post_charge("k3", &body(&ord(3), 700, "tok_insufficient_funds"))
            .await,
    )
    .await;
    assert_eq!(v["decline_code"], "insufficient_funds");

    // Failure injection: 500 twice, then the charge; 429, then the charge.
    for want in [500, 500, 201] {
        let (st, _) = record(
            &mut t,
            "flaky",
            s.post_charge("k4", &body(&ord(4), 800, "tok_flaky_500"))
                .await,
        )
        .await;
        assert_eq!(st.as_u16(), want);
    }
    for want in [429, 201] {
        let (st, _) = record(
            &mut t,
            "rate limited",
            s.post_charge("k5", &body(&ord(5), 900, "tok_rate_limited"))
                .await,
        )
        .await;
        assert_eq!(st.as_u16(), want);
    }

    // Pending, resolved days later by webhook.
    let (_, c6) = record(
        &mut t,
        "pending",
        s.post_charge("k6", &body(&ord(6), 2500, "tok_pending_days"))
            .await,
    )
    .await;
    assert_eq!(c6["status"], "pending");
    let (_, c7) = record(
        &mut t,
        "pending fail",
        s.post_charge("k7", &body(&ord(7), 2600, "tok_pending_fail"))
            .await,
    )
    .await;

    // Reads right after the writes.
    let id1 = c1["id"].as_str().unwrap().to_owned();
    let (st, v) = record(&mut t, "get", s.get(&format!("/v1/charges/{id1}")).await).await;
    assert_eq!((st, &v), (StatusCode::OK, &c1));
    let (_, v) = record(
        &mut t,
        "list",
        s.get(&format!("/v1/charges?reference={}", ord(1))).await,
    )
    .await;
    assert_eq!(v["data"], json!([c1]));
    let (st, _) = record(&mut t, "get unknown", s.get("/v1/charges/ch_unknown").await).await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    // Refunds: partial, its replay, the key with another body, the rest,
    // then every refusal.
    let refund = |charge: String, key: &'static str, b: Option<Value>| {
        let s = s.clone();
        async move { s.refund(&charge, key, b).await }
    };
    let (st, r1) = record(
        &mut t,
        "refund",
        refund(id1.clone(), "r1", Some(json!({"amount_minor": 300}))).await,
    )
    .await;
    assert_eq!(
        (st, r1["amount_minor"].as_i64()),
        (StatusCode::CREATED, Some(300))
    );
    let (st, v) = record(
        &mut t,
        "refund replay",
        refund(id1.clone(), "r1", Some(json!({"amount_minor": 300}))).await,
    )
    .await;
    assert_eq!((st, &v), (StatusCode::OK, &r1));
    let (_, v) = record(
        &mut t,
        "refund other body",
        refund(id1.clone(), "r1", Some(json!({"amount_minor": 400}))).await,
    )
    .await;
    assert_eq!(v["error"]["code"], "idempotency_key_reused");
    let (_, v) = record(
        &mut t,
        "refund the rest",
        refund(id1.clone(), "r2", None).await,
    )
    .await;
    assert_eq!(v["amount_minor"], 750);
    let (_, v) = record(
        &mut t,
        "over-refund",
        refund(id1.clone(), "r3", Some(json!({"amount_minor": 100}))).await,
    )
    .await;
    assert_eq!(v["error"]["code"], "amount_exceeds_refundable");
    let declined = c2["id"].as_str().unwrap().to_owned();
    let (_, v) = record(
        &mut t,
        "refund declined",
        refund(declined, "r4", None).await,
    )
    .await;
    assert_eq!(v["error"]["code"], "charge_not_refundable");
    let pending = c6["id"].as_str().unwrap().to_owned();
    let (_, v) = record(
        &mut t,
        "refund pending",
        refund(pending.clone(), "r5", None).await,
    )
    .await;
    assert_eq!(v["error"]["code"], "charge_not_refundable");
    let (st, _) = record(
        &mut t,
        "refund unknown",
        refund("ch_unknown".into(), "r6", None).await,
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (_, v) = record(
        &mut t,
        "refunded",
        s.get(&format!("/v1/charges/{id1}")).await,
    )
    .await;
    assert_eq!(v["refunded_minor"], 1050);

    for i in 1..=7 {
        let (charges, requests) = s.stats(&ord(i)).await;
        t.push(
            json!({"step": "stats", "reference": ord(i), "charges": charges, "requests": requests}),
        );
    }

    // Three days later: the pending charges resolve; every webhook (two
    // refunds, two resolutions) arrives, signed.
    s.advance_clock(3 * 24 * 3600 * 1000).await;
    let mut got = rx.wait_for(4).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rx.got.lock().unwrap().len(), 4, "one delivery per event");
    assert!(got.iter().all(|(_, valid)| *valid), "{got:?}");
    got.sort_by_key(|(e, _)| {
        (
            e["type"].as_str().unwrap().to_owned(),
            e["data"]["amount_minor"].as_i64(),
        )
    });
    for (event, _) in got {
        t.push(json!({"step": "webhook", "event": event}));
    }
    let (_, resolved) = record(
        &mut t,
        "resolved",
        s.get(&format!("/v1/charges/{pending}")).await,
    )
    .await;
    assert_eq!(resolved["status"], "succeeded");
    let (_, v) = record(
        &mut t,
        "resolved fail",
        s.get(&format!("/v1/charges/{}", c7["id"].as_str().unwrap()))
            .await,
    )
    .await;
    assert_eq!(v["decline_code"], "review_rejected");

    // Settlement files of the first day and of three days later.
    let day = |v: &Value| v["settled_at"].as_str().unwrap()[..10].to_owned();
    for date in [day(&c1), day(&resolved)] {
        let r = s.get(&format!("/v1/settlements/{date}.csv")).await;
        assert_eq!(r.status(), StatusCode::OK);
        t.push(json!({"step": "settlement", "csv": r.text().await.unwrap()}));
    }

    // 64 concurrent requests with one key: one charge, one 201, and every
    // other answer the byte-identical replay.
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                charge_until_final(&s, "kc", &body("ord_conc", 600, "tok_visa")).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    let created: Vec<_> = answers
        .iter()
        .filter(|a| a.0 == StatusCode::CREATED)
        .collect();
    assert_eq!(created.len(), 1, "one 201");
    assert!(!created[0].1);
    assert!(
        answers.iter().all(|a| a.2 == created[0].2
            && (a.0 == StatusCode::CREATED || (a.0 == StatusCode::OK && a.1))),
        "every other answer is the replay"
    );
    let charges = s.stats("ord_conc").await.0;
    assert_eq!(charges, 1, "one charge for 64 concurrent requests");
    t.push(json!({"step": "one key, 64 at once", "created": created.len(), "answers": answers.len(),
                  "charges": charges, "charge": serde_json::from_slice::<Value>(&created[0].2).unwrap()}));

    // 100 keys at once, each sent twice concurrently: one charge per key.
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                let key = format!("km{}", i / 2);
                charge_until_final(&s, &key, &body(&key, 1000 + i / 2, "tok_visa")).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    for pair in answers.chunks(2) {
        assert_eq!(
            pair[0].2, pair[1].2,
            "both requests of a key get the same charge"
        );
        let mut statuses = [pair[0].0, pair[1].0];
        statuses.sort();
        assert_eq!(statuses, [StatusCode::OK, StatusCode::CREATED]);
    }
    let mut charges = 0;
    for i in 0..100 {
        charges += s.stats(&format!("km{i}")).await.0;
    }
    assert_eq!(charges, 100);
    t.push(json!({"step": "100 keys twice at once", "charges": charges}));

    // 20 concurrent refunds of 100 on a charge of 1000, each with its own
    // key: exactly ten fit.
    let c: Value = s
        .post_charge("kr", &body("ord_refunds", 1000, "tok_visa"))
        .await
        .json()
        .await
        .unwrap();
    let id = c["id"].as_str().unwrap().to_owned();
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let (s, id) = (s.clone(), id.clone());
            tokio::spawn(async move {
                let key = format!("rc{i}");
                let r = s
                    .http
                    .post(s.url(&format!("/v1/charges/{id}/refunds")))
                    .bearer_auth(KEY.as_str())
                    .header("Idempotency-Key", key)
                    .json(&json!({"amount_minor": 100}))
                    .send()
                    .await
                    .unwrap();
                let status = r.status();
                let v: Value = r.json().await.unwrap();
                (status, v["error"]["code"].as_str().map(str::to_owned))
            })
        })
        .collect();
    let mut outcomes: BTreeMap<(u16, Option<String>), usize> = BTreeMap::new();
    for task in tasks {
        let (status, code) = task.await.unwrap();
        *outcomes.entry((status.as_u16(), code)).or_default() += 1;
    }
    let want = BTreeMap::from([
        ((201, None), 10),
        ((422, Some("amount_exceeds_refundable".to_owned())), 10),
    ]);
    assert_eq!(outcomes, want);
    let v: Value = s
        .get(&format!("/v1/charges/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["refunded_minor"], 1000);
    t.push(json!({"step": "20 refunds at once", "outcomes": format!("{outcomes:?}"), "charge": v}));
    t
}

/// Replaces what differs between two runs (ids, times) by placeholders:
/// ids by their order of first appearance, times by `<time>`.
#[derive(Default)]
struct Normalise {
    ids: HashMap<String, String>,
}

impl Normalise {
    fn id(&mut self, s: &str) -> Option<String> {
        let (prefix, rest) = s.split_once('_')?;
        let is_id = ["ch", "re", "evt"].contains(&prefix)
            && rest.len() == 32
            && rest.bytes().all(|b| b.is_ascii_hexdigit());
        if !is_id {
            return None;
        }
        let n = self.ids.len() + 1;
        Some(
            self.ids
                .entry(s.to_owned())
                .or_insert_with(|| format!("{prefix}#{n}"))
                .clone(),
        )
    }

    fn csv(&mut self, text: &str) -> Value {
        let mut lines = text.lines();
        let header = lines.next().unwrap_or_default().to_owned();
        let mut rows: Vec<String> = lines
            .map(|line| {
                let mut fields: Vec<String> = line
                    .split(',')
                    .map(|f| self.id(f).unwrap_or_else(|| f.to_owned()))
                    .collect();
                // settled_at
                fields[6] = "<time>".into();
                fields.join(",")
            })
            .collect();
        // Rows within one millisecond are ordered by id, which differs.
        rows.sort();
        json!({"header": header, "rows": rows})
    }

    fn value(&mut self, v: &Value) -> Value {
        match v {
            Value::String(s) => Value::String(self.id(s).unwrap_or_else(|| s.clone())),
            Value::Array(a) => Value::Array(a.iter().map(|v| self.value(v)).collect()),
            Value::Object(o) => Value::Object(
                o.iter()
                    .map(|(k, v)| {
                        let v = match k.as_str() {
                            "created_at" | "settled_at" | "created" if !v.is_null() => {
                                json!("<time>")
                            }
                            "csv" => self.csv(v.as_str().unwrap()),
                            _ => self.value(v),
                        };
                        (k.clone(), v)
                    })
                    .collect(),
            ),
            _ => v.clone(),
        }
    }
}

fn normalised(transcript: &[Value]) -> Vec<Value> {
    let mut n = Normalise::default();
    transcript.iter().map(|v| n.value(v)).collect()
}

async fn run(durability: Durability) -> (Vec<Value>, Option<psp_sim::WriteBatches>) {
    let rx = receiver(0).await;
    let s = Arc::new(Sim::start_with(with_webhooks(&rx.url), durability).await);
    let transcript = script(s.clone(), &rx).await;
    let batches = s.sim.write_batches();
    let Ok(s) = Arc::try_unwrap(s) else {
        panic!("every task is done");
    };
    s.sim.stop().await.unwrap();
    (transcript, batches)
}

/// The group commit answers every request of a mixed script (charges,
/// replays, a key reused with another body, declines, injected 500s and
/// 429s, pending charges resolved by webhook, refunds and their refusals,
/// reads, settlement files, and concurrent requests on one key, on many
/// keys and on one charge's refunds) exactly as `full` does, and its
/// writes did share transactions.
#[tokio::test]
async fn batched_durability_answers_as_full_does() {
    let (full, none) = run(Durability::Full).await;
    assert_eq!(none, None, "full commits one write at a time");
    let (batched, batches) = run(Durability::Batched).await;
    let batches = batches.expect("batched counts its commits");
    assert!(
        batches.largest > 1 && batches.batches < batches.writes,
        "concurrent writes shared transactions: {batches:?}"
    );
    assert_eq!(batches.retried_alone, 0, "{batches:?}");
    let (full, batched) = (normalised(&full), normalised(&batched));
    assert_eq!(full.len(), batched.len());
    for (f, b) in full.iter().zip(&batched) {
        assert_eq!(f, b, "full (left) and batched (right) answer differently");
    }
}
