//! The simulator over real HTTP on a random port, with its own SQLite file;
//! webhooks go to a small axum receiver that verifies signatures.

mod batched;

use psp_sim::{Account, Behaviour, Durability, RunningSim, SimConfig};
use reqwest::StatusCode;
use runtime::secret::Secret;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The default account's API key: generated once per test run (there is
/// no built-in one).
static KEY: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| Secret::generate("sk_test_").expose().to_owned());

/// A test configuration whose default account has [`KEY`].
fn config(db_url: impl Into<String>) -> SimConfig {
    SimConfig {
        api_key: Secret::new(KEY.as_str()),
        ..SimConfig::for_tests(db_url)
    }
}

struct Sim {
    sim: RunningSim,
    db_url: String,
    _dir: tempfile::TempDir,
    http: reqwest::Client,
}

async fn sqlite_url() -> (String, tempfile::TempDir) {
    let (db, dir) = testkit::fresh_sqlite().await.unwrap();
    db.close().await;
    let url = format!("sqlite://{}", dir.path().join("test.db").display());
    (url, dir)
}

impl Sim {
    async fn start(behaviour: Behaviour) -> Sim {
        Sim::start_with(behaviour, Durability::Full).await
    }

    async fn start_with(behaviour: Behaviour, durability: Durability) -> Sim {
        let (db_url, dir) = sqlite_url().await;
        let sim = psp_sim::spawn(SimConfig {
            behaviour: Behaviour {
                durability,
                ..behaviour
            },
            ..config(db_url.clone())
        })
        .await
        .unwrap();
        Sim {
            sim,
            db_url,
            _dir: dir,
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.sim.base_url())
    }

    async fn charge(&self, key: &str, body: &Value) -> reqwest::Result<reqwest::Response> {
        self.http
            .post(self.url("/v1/charges"))
            .bearer_auth(KEY.as_str())
            .header("Idempotency-Key", key)
            .json(body)
            .send()
            .await
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .bearer_auth(KEY.as_str())
            .send()
            .await
            .unwrap()
    }

    async fn refund(&self, charge: &str, key: &str, body: Option<Value>) -> reqwest::Response {
        let req = self
            .http
            .post(self.url(&format!("/v1/charges/{charge}/refunds")))
            .bearer_auth(KEY.as_str())
            .header("Idempotency-Key", key);
        let req = match body {
            Some(b) => req.json(&b),
            None => req,
        };
        req.send().await.unwrap()
    }

    /// (charges, create_requests) for a reference.
    async fn stats(&self, reference: &str) -> (i64, i64) {
        let v: Value = self
            .http
            .get(self.url("/_sim/stats"))
            .query(&[("reference", reference)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (
            v["charges"].as_i64().unwrap(),
            v["create_requests"].as_i64().unwrap(),
        )
    }

    async fn advance_clock(&self, ms: u64) {
        let r = self
            .http
            .post(self.url("/_sim/clock/advance"))
            .json(&json!({ "ms": ms }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
}

fn order() -> String {
    format!("ord_{}", uuid::Uuid::new_v4().simple())
}

fn body(reference: &str, amount: i64, token: &str) -> Value {
    json!({"amount_minor": amount, "currency": "EUR", "card_token": token, "reference": reference})
}

fn behaviour(v: Value) -> Behaviour {
    let b: Behaviour = serde_json::from_value(v).unwrap();
    b.validate().unwrap();
    b
}

async fn error_code(r: reqwest::Response) -> String {
    let v: Value = r.json().await.unwrap();
    v["error"]["code"].as_str().unwrap().to_owned()
}

/// A webhook receiver: verifies signatures, records every delivery, and
/// answers 500 to the first `fail_first` deliveries.
#[derive(Clone)]
struct Receiver {
    got: Arc<Mutex<Vec<(Value, bool)>>>,
    fail_first: Arc<AtomicUsize>,
    url: String,
}

const SECRET: &str = "whsec_test_secret";

fn verify(header: &str, body: &[u8]) -> bool {
    let Some((t, _)) = header
        .strip_prefix("t=")
        .and_then(|rest| rest.split_once(','))
    else {
        return false;
    };
    let Ok(t) = t.parse::<i64>() else {
        return false;
    };
    psp_sim::sign(SECRET.as_bytes(), t, body) == header
}

async fn receiver(fail_first: usize) -> Receiver {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rx = Receiver {
        got: Arc::default(),
        fail_first: Arc::new(AtomicUsize::new(fail_first)),
        url: format!("http://{}/webhooks/psp", listener.local_addr().unwrap()),
    };
    let state = rx.clone();
    let app = axum::Router::new().route(
        "/webhooks/psp",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let state = state.clone();
                async move {
                    let sig = headers
                        .get("psp-signature")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    let valid = verify(sig, &body);
                    let event: Value = serde_json::from_slice(&body).unwrap();
                    state.got.lock().unwrap().push((event, valid));
                    let failing = state
                        .fail_first
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                    if failing {
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        axum::http::StatusCode::OK
                    }
                }
            },
        ),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    rx
}

impl Receiver {
    /// Waits (bounded) until `n` deliveries arrived; returns them.
    async fn wait_for(&self, n: usize) -> Vec<(Value, bool)> {
        for _ in 0..300 {
            {
                let got = self.got.lock().unwrap();
                if got.len() >= n {
                    return got.clone();
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "expected {n} webhook deliveries, got {:?}",
            self.got.lock().unwrap()
        );
    }
}

fn with_webhooks(url: &str) -> Behaviour {
    let mut b = behaviour(json!({
        "webhooks": {"initial_backoff_ms": 50, "max_backoff_ms": 200}
    }));
    b.accounts = vec![Account {
        webhook_url: Some(url.to_owned()),
        ..Account::new(
            psp_sim::config::DEFAULT_ACCOUNT,
            Secret::new(KEY.as_str()),
            Secret::new(SECRET),
        )
    }];
    b
}

#[tokio::test]
async fn same_key_replays_the_first_answer_and_rejects_another_body() {
    let s = Sim::start(Behaviour::default()).await;
    let ord = order();
    let first = s.charge(&ord, &body(&ord, 1050, "tok_visa")).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first_body = first.bytes().await.unwrap();
    let charge: Value = serde_json::from_slice(&first_body).unwrap();
    assert_eq!(charge["status"], "succeeded");
    assert_eq!(charge["amount_minor"], 1050);
    assert_eq!(charge["fee_minor"], 60); // 30.45 -> 30, + 30
    assert_eq!(charge["reference"], ord.as_str());
    assert_eq!(charge["refunded_minor"], 0);
    assert!(charge["id"].as_str().unwrap().starts_with("ch_"));
    assert!(charge["settled_at"].is_string());
    assert!(charge["decline_code"].is_null());

    let again = s.charge(&ord, &body(&ord, 1050, "tok_visa")).await.unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.bytes().await.unwrap(), first_body);

    let other = s.charge(&ord, &body(&ord, 2000, "tok_visa")).await.unwrap();
    assert_eq!(other.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error_code(other).await, "idempotency_key_reused");
    assert_eq!(s.stats(&ord).await, (1, 3));

    let id = charge["id"].as_str().unwrap();
    let got: Value = s
        .get(&format!("/v1/charges/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(got, charge);
    let list: Value = s
        .get(&format!("/v1/charges?reference={ord}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"], json!([charge]));
    s.sim.stop().await.unwrap();
}

#[tokio::test]
async fn twenty_concurrent_creates_with_one_key_make_one_charge() {
    // Latency keeps the first request in flight while the others arrive.
    let s = Arc::new(Sim::start(behaviour(json!({"latency_ms": {"min": 300, "max": 300}}))).await);
    let ord = order();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let s = s.clone();
        let ord = ord.clone();
        tasks.push(tokio::spawn(async move {
            s.charge(&ord, &body(&ord, 500, "tok_visa"))
                .await
                .unwrap()
                .status()
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let created = statuses
        .iter()
        .filter(|s| **s == StatusCode::CREATED)
        .count();
    assert_eq!(created, 1, "{statuses:?}");
    assert!(
        statuses
            .iter()
            .all(|s| [StatusCode::CREATED, StatusCode::OK, StatusCode::CONFLICT].contains(s)),
        "{statuses:?}"
    );
    let replayed = s.charge(&ord, &body(&ord, 500, "tok_visa")).await.unwrap();
    assert_eq!(replayed.status(), StatusCode::OK);
    assert_eq!(s.stats(&ord).await, (1, 21));
}

#[tokio::test]
async fn in_flight_key_answers_409() {
    let s =
        Arc::new(Sim::start(behaviour(json!({"latency_ms": {"min": 1500, "max": 1500}}))).await);
    let ord = order();
    let first = {
        let (s, ord) = (s.clone(), ord.clone());
        tokio::spawn(async move { s.charge(&ord, &body(&ord, 500, "tok_visa")).await.unwrap() })
    };
    // The first request holds the key for 1.5 s; wait until it is recorded.
    for _ in 0..100 {
        if s.stats(&ord).await.1 == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let second = s.charge(&ord, &body(&ord, 500, "tok_visa")).await.unwrap();
    let first = first.await.unwrap();
    // Whichever claimed the key first (almost surely the first request) got
    // the charge; the other was told the key is in use.
    let (winner, loser) = if first.status() == StatusCode::CREATED {
        (first, second)
    } else {
        (second, first)
    };
    assert_eq!(winner.status(), StatusCode::CREATED);
    assert_eq!(loser.status(), StatusCode::CONFLICT);
    assert_eq!(error_code(loser).await, "idempotency_key_in_use");
    assert_eq!(s.stats(&ord).await, (1, 2));
}

#[tokio::test]
async fn duplicate_deliveries_repeat_the_same_event() {
    let rx = receiver(0).await;
    let mut b = with_webhooks(&rx.url);
    b.webhooks.duplicate_percent = 100;
    let s = Sim::start(b).await;
    let ord = order();
    let c: Value = s
        .charge(&ord, &body(&ord, 1000, "tok_visa"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let r = s
        .refund(
            c["id"].as_str().unwrap(),
            "rf",
            Some(json!({"amount_minor": 1})),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let got = rx.wait_for(2).await;
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].0, got[1].0);
    assert!(got.iter().all(|(_, valid)| *valid));
}

#[tokio::test]
async fn declines_are_final_answers_stored_under_the_key() {
    let s = Sim::start(behaviour(json!({"rules": [
        {"match": {"amount_min": 9000, "amount_max": 9999}, "outcome": {"type": "decline", "code": "do_not_honor"}}
    ]})))
    .await;
    let ord = order();
    let r = s
        .charge(&ord, &body(&ord, 700, "tok_decline"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let first = r.bytes().await.unwrap();
    let c: Value = serde_json::from_slice(&first).unwrap();
    assert_eq!(c["status"], "declined");
    assert_eq!(c["decline_code"], "card_declined");
    assert_eq!(c["fee_minor"], 0);
    assert!(c["settled_at"].is_null());
    let again = s
        .charge(&ord, &body(&ord, 700, "tok_decline"))
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(again.bytes().await.unwrap(), first);

    let ord2 = order();
    let c: Value = s
        .charge(&ord2, &body(&ord2, 9500, "tok_visa"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(c["decline_code"], "do_not_honor");
    // Not refundable.
    let r = s.refund(c["id"].as_str().unwrap(), "rf1", None).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error_code(r).await, "charge_not_refundable");
}

#[tokio::test]
async fn errors_n_times_then_the_retry_succeeds() {
    let s = Sim::start(Behaviour::default()).await;
    let ord = order();
    for _ in 0..2 {
        let r = s
            .charge(&ord, &body(&ord, 100, "tok_flaky_500"))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(error_code(r).await, "psp_unavailable");
    }
    assert_eq!(s.stats(&ord).await, (0, 2));
    let r = s
        .charge(&ord, &body(&ord, 100, "tok_flaky_500"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(s.stats(&ord).await, (1, 3));
}

#[tokio::test]
async fn rate_limit_carries_retry_after() {
    let s = Sim::start(behaviour(json!({"rules": [
        {"match": {"card_token_prefix": "tok_busy"}, "outcome": {"type": "rate_limit", "status": 503, "retry_after_s": 7, "times": 1}}
    ]})))
    .await;
    let ord = order();
    let r = s
        .charge(&ord, &body(&ord, 100, "tok_rate_limited"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(error_code(r).await, "rate_limited");
    let r = s
        .charge(&ord, &body(&ord, 100, "tok_rate_limited"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    let ord = order();
    let r = s
        .charge(&ord, &body(&ord, 100, "tok_busy_1"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()["retry-after"], "7");
    assert_eq!(s.stats(&ord).await, (0, 1));
}

#[tokio::test]
async fn timeout_after_the_charge_was_made_replays_it_on_retry() {
    let s = Sim::start(behaviour(json!({"rules": [
        {"match": {"card_token": "tok_lost"}, "outcome": {"type": "timeout", "hold_ms": 100, "charge_created": true, "times": 1}},
        {"match": {"card_token": "tok_never"}, "outcome": {"type": "timeout", "hold_ms": 100, "charge_created": false, "times": 1}}
    ]})))
    .await;
    let ord = order();
    let lost = s.charge(&ord, &body(&ord, 4200, "tok_lost")).await;
    let err = lost.expect_err("the connection is dropped without an answer");
    assert!(!err.is_status(), "{err:?}");
    assert_eq!(s.stats(&ord).await, (1, 1));
    let retry = s.charge(&ord, &body(&ord, 4200, "tok_lost")).await.unwrap();
    assert_eq!(retry.status(), StatusCode::OK);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    let c: Value = retry.json().await.unwrap();
    assert_eq!(c["status"], "succeeded");
    assert_eq!(s.stats(&ord).await, (1, 2));

    let ord = order();
    assert!(
        s.charge(&ord, &body(&ord, 4200, "tok_never"))
            .await
            .is_err()
    );
    assert_eq!(s.stats(&ord).await, (0, 1));
    let retry = s
        .charge(&ord, &body(&ord, 4200, "tok_never"))
        .await
        .unwrap();
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert_eq!(s.stats(&ord).await, (1, 2));
}

#[tokio::test]
async fn pending_resolves_after_days_of_simulated_time_with_a_signed_webhook() {
    let rx = receiver(0).await;
    let s = Sim::start(with_webhooks(&rx.url)).await;
    let ord = order();
    let c: Value = s
        .charge(&ord, &body(&ord, 2500, "tok_pending_days"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(c["status"], "pending");
    assert!(c["settled_at"].is_null());
    let id = c["id"].as_str().unwrap().to_owned();
    // A failing one too, on the same advance.
    let ord2 = order();
    let failing: Value = s
        .charge(&ord2, &body(&ord2, 2500, "tok_pending_fail"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rx.got.lock().unwrap().is_empty(), "nothing resolves early");

    s.advance_clock(3 * 24 * 3600 * 1000).await;
    let got = rx.wait_for(2).await;
    assert!(got.iter().all(|(_, valid)| *valid), "{got:?}");
    let by_type = |t: &str| got.iter().find(|(e, _)| e["type"] == t).unwrap().0.clone();
    let ok = by_type("charge.succeeded");
    assert!(ok["id"].as_str().unwrap().starts_with("evt_"));
    assert_eq!(ok["data"]["id"], id.as_str());
    assert_eq!(ok["data"]["status"], "succeeded");
    assert!(ok["created"].as_i64().unwrap() > 0);
    let failed = by_type("charge.failed");
    assert_eq!(failed["data"]["id"], failing["id"]);
    assert_eq!(failed["data"]["status"], "declined");
    assert_eq!(failed["data"]["fee_minor"], 0);

    let now: Value = s
        .get(&format!("/v1/charges/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(now["status"], "succeeded");
    assert!(now["settled_at"].is_string());
}

#[tokio::test]
async fn webhooks_are_redelivered_until_acknowledged() {
    let rx = receiver(2).await;
    let s = Sim::start(with_webhooks(&rx.url)).await;
    let ord = order();
    let c: Value = s
        .charge(&ord, &body(&ord, 1000, "tok_visa"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let r = s.refund(c["id"].as_str().unwrap(), "refund-1", None).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let got = rx.wait_for(3).await;
    assert!(
        got.iter().all(|(e, valid)| *valid && e == &got[0].0),
        "{got:?}"
    );
    assert_eq!(got[0].0["type"], "refund.succeeded");
    assert_eq!(got[0].0["data"]["amount_minor"], 1000);
    // Acknowledged: no fourth delivery.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(rx.got.lock().unwrap().len(), 3);
    // /metrics shows the attempts and the charge (the recorder is shared by
    // the tests of this binary, so at least these).
    let text = s.get("/metrics").await.text().await.unwrap();
    let value = |series: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{series} not in /metrics:\n{text}"))
    };
    assert!(value("paystream_psp_sim_webhook_deliveries_total{result=\"failed\"}") >= 2);
    assert!(value("paystream_psp_sim_webhook_deliveries_total{result=\"delivered\"}") >= 1);
    assert!(value("paystream_psp_sim_charges_total{outcome=\"succeeded\"}") >= 1);
    assert!(
        text.contains("paystream_http_requests_total{component=\"psp-sim\",route=\"/v1/charges\",status=\"201\"}"),
        "{text}"
    );
}

#[tokio::test]
async fn refunds_partial_full_and_over_refund() {
    let s = Sim::start(Behaviour::default()).await;
    let ord = order();
    let c: Value = s
        .charge(&ord, &body(&ord, 1000, "tok_visa"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = c["id"].as_str().unwrap();
    let r = s.refund(id, "r1", Some(json!({"amount_minor": 300}))).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let first = r.bytes().await.unwrap();
    let refund: Value = serde_json::from_slice(&first).unwrap();
    assert_eq!(refund["amount_minor"], 300);
    assert_eq!(refund["charge_id"], id);
    assert_eq!(refund["currency"], "EUR");
    assert_eq!(refund["status"], "succeeded");
    assert!(refund["id"].as_str().unwrap().starts_with("re_"));
    // Replay.
    let again = s.refund(id, "r1", Some(json!({"amount_minor": 300}))).await;
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(again.bytes().await.unwrap(), first);
    // Over-refund.
    let over = s.refund(id, "r2", Some(json!({"amount_minor": 701}))).await;
    assert_eq!(over.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error_code(over).await, "amount_exceeds_refundable");
    // Full refund of the rest.
    let rest: Value = s.refund(id, "r3", None).await.json().await.unwrap();
    assert_eq!(rest["amount_minor"], 700);
    let after: Value = s
        .get(&format!("/v1/charges/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(after["refunded_minor"], 1000);
    let nothing_left = s.refund(id, "r4", Some(json!({"amount_minor": 1}))).await;
    assert_eq!(error_code(nothing_left).await, "amount_exceeds_refundable");
    let missing = s.refund("ch_nope", "r5", None).await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(missing).await, "not_found");
}

fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut r = csv::Reader::from_reader(text.as_bytes());
    assert_eq!(
        r.headers().unwrap().iter().collect::<Vec<_>>(),
        [
            "psp_reference",
            "order_id",
            "amount_minor",
            "currency",
            "status",
            "fee_minor",
            "settled_at"
        ]
    );
    r.records()
        .map(|rec| rec.unwrap().iter().map(str::to_owned).collect())
        .collect()
}

#[tokio::test]
async fn settlement_file_with_and_without_injected_discrepancies() {
    let s = Sim::start(Behaviour::default()).await;
    let mut charges = Vec::new();
    for amount in [1000, 2000, 3000, 4000, 5000, 6000] {
        let ord = order();
        let c: Value = s
            .charge(&ord, &body(&ord, amount, "tok_visa"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        charges.push(c);
    }
    let ord = order();
    s.charge(&ord, &body(&ord, 999, "tok_decline"))
        .await
        .unwrap();
    let refunded = charges[0]["id"].as_str().unwrap();
    let refund: Value = s
        .refund(refunded, "rf", Some(json!({"amount_minor": 250})))
        .await
        .json()
        .await
        .unwrap();
    let day = &charges[0]["settled_at"].as_str().unwrap()[..10];

    let r = s.get(&format!("/v1/settlements/{day}.csv")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let rows = parse_csv(&r.text().await.unwrap());
    assert_eq!(rows.len(), 7, "six charges and one refund: {rows:?}");
    for c in &charges {
        let row = rows
            .iter()
            .find(|r| r[0] == c["id"].as_str().unwrap())
            .unwrap();
        assert_eq!(row[1], c["reference"].as_str().unwrap());
        assert_eq!(row[2], c["amount_minor"].to_string());
        assert_eq!(row[3], "EUR");
        assert_eq!(row[4], "succeeded");
        assert_eq!(row[5], c["fee_minor"].to_string());
    }
    let rrow = rows
        .iter()
        .find(|r| r[0] == refund["id"].as_str().unwrap())
        .unwrap();
    assert_eq!(rrow[1], charges[0]["reference"].as_str().unwrap());
    assert_eq!(rrow[2], "-250");
    assert_eq!(rrow[4], "refunded");

    let q = "inject=missing:2,extra:1,wrong_amount:1,wrong_fee:1&seed=42";
    let r = s.get(&format!("/v1/settlements/{day}.csv?{q}")).await;
    let header: Value =
        serde_json::from_str(r.headers()["psp-injected"].to_str().unwrap()).unwrap();
    let bad = parse_csv(&r.text().await.unwrap());
    let sidecar: Value = s
        .get(&format!("/v1/settlements/{day}/injected.json?{q}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(header, sidecar);
    assert_eq!(bad.len(), 7 - 2 + 1);
    for m in sidecar["missing"].as_array().unwrap() {
        assert!(
            rows.iter()
                .any(|r| r[0] == m["psp_reference"].as_str().unwrap())
        );
        assert!(
            !bad.iter()
                .any(|r| r[0] == m["psp_reference"].as_str().unwrap())
        );
    }
    assert_eq!(sidecar["missing"].as_array().unwrap().len(), 2);
    let extra = &sidecar["extra"][0];
    let row = bad
        .iter()
        .find(|r| r[0] == extra["psp_reference"].as_str().unwrap())
        .unwrap();
    assert_eq!(row[2], extra["amount_minor"].to_string());
    let wrong = &sidecar["wrong_amount"][0];
    let row = bad
        .iter()
        .find(|r| r[0] == wrong["psp_reference"].as_str().unwrap())
        .unwrap();
    assert_eq!(row[2], wrong["reported_minor"].to_string());
    assert_ne!(wrong["reported_minor"], wrong["true_minor"]);
    let fee = &sidecar["wrong_fee"][0];
    let row = bad
        .iter()
        .find(|r| r[0] == fee["psp_reference"].as_str().unwrap())
        .unwrap();
    assert_eq!(row[5], fee["reported_minor"].to_string());
    // Deterministic.
    let again = s.get(&format!("/v1/settlements/{day}.csv?{q}")).await;
    assert_eq!(parse_csv(&again.text().await.unwrap()), bad);
    // Another day is empty.
    let r = s.get("/v1/settlements/2001-01-01.csv").await;
    assert!(parse_csv(&r.text().await.unwrap()).is_empty());
}

#[tokio::test]
async fn state_survives_a_restart_on_the_same_file() {
    let s = Sim::start(Behaviour::default()).await;
    let ord = order();
    let first = s
        .charge(&ord, &body(&ord, 1234, "tok_visa"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let c: Value = serde_json::from_slice(&first).unwrap();
    let Sim {
        sim,
        db_url,
        _dir,
        http,
    } = s;
    sim.stop().await.unwrap();

    let sim = psp_sim::spawn(config(db_url.clone())).await.unwrap();
    let s = Sim {
        sim,
        db_url,
        _dir,
        http,
    };
    let got: Value = s
        .get(&format!("/v1/charges/{}", c["id"].as_str().unwrap()))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(got, c);
    let replay = s.charge(&ord, &body(&ord, 1234, "tok_visa")).await.unwrap();
    assert_eq!(replay.status(), StatusCode::OK);
    assert_eq!(replay.bytes().await.unwrap(), first);
    assert_eq!(s.stats(&ord).await, (1, 2));
}

#[tokio::test]
async fn bad_requests_get_stable_error_codes() {
    let s = Sim::start(Behaviour::default()).await;
    let ord = order();
    let no_key = s
        .http
        .post(s.url("/v1/charges"))
        .bearer_auth(KEY.as_str())
        .json(&body(&ord, 100, "tok_visa"))
        .send()
        .await
        .unwrap();
    assert_eq!(no_key.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(no_key).await, "idempotency_key_missing");

    let bad_auth = s
        .http
        .post(s.url("/v1/charges"))
        .bearer_auth("sk_wrong")
        .header("Idempotency-Key", &ord)
        .json(&body(&ord, 100, "tok_visa"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_auth.status(), StatusCode::UNAUTHORIZED);

    for (b, field) in [
        (
            json!({"amount_minor": 100, "currency": "XXX", "card_token": "t", "reference": ord}),
            "currency",
        ),
        (
            json!({"amount_minor": 0, "currency": "EUR", "card_token": "t", "reference": ord}),
            "amount_minor",
        ),
        (
            json!({"amount_minor": 1.5, "currency": "EUR", "card_token": "t", "reference": ord}),
            "amount_minor",
        ),
        (
            json!({"amount_minor": 100, "currency": "EUR", "reference": ord}),
            "card_token",
        ),
        (
            json!({"amount_minor": 100, "currency": "EUR", "card_token": "t"}),
            "reference",
        ),
    ] {
        let r = s.charge(&ord, &b).await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_request");
        assert_eq!(v["error"]["field"], field, "{v}");
    }
    let long_key = "k".repeat(256);
    let r = s
        .charge(&long_key, &body(&ord, 100, "tok_visa"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // None of those created anything.
    assert_eq!(s.stats(&ord).await.0, 0);
    let r = s.get("/v1/charges/ch_unknown").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(r).await, "not_found");
}

#[tokio::test]
async fn a_restarted_simulator_keeps_retrying_undelivered_webhooks() {
    let rx = receiver(usize::MAX).await;
    let s = Sim::start(with_webhooks(&rx.url)).await;
    let ord = order();
    let c: Value = s
        .charge(&ord, &body(&ord, 1000, "tok_visa"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let r = s.refund(c["id"].as_str().unwrap(), "rf", None).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    rx.wait_for(1).await;
    let Sim {
        sim, db_url, _dir, ..
    } = s;
    sim.stop().await.unwrap();

    // The receiver recovers; a new simulator on the same file delivers.
    rx.fail_first.store(0, Ordering::SeqCst);
    let before = rx.got.lock().unwrap().len();
    let sim = psp_sim::spawn(SimConfig {
        behaviour: with_webhooks(&rx.url),
        ..config(db_url)
    })
    .await
    .unwrap();
    let got = rx.wait_for(before + 1).await;
    let last = &got.last().unwrap().0;
    assert_eq!(last["type"], "refund.succeeded");
    assert_eq!(last["data"]["charge_id"], c["id"]);
    // Acknowledged now: no more deliveries.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rx.got.lock().unwrap().len(), before + 1);
    sim.stop().await.unwrap();
}

/// The API key selects the account and must match exactly (compared in
/// constant time): a missing key, another scheme, a key differing in its
/// last character, a prefix of it or a longer one get 401; a second
/// account's key sees only that account's charges.
#[tokio::test]
async fn api_keys_must_match_exactly_and_select_the_account() {
    let other_key = Secret::generate("sk_test_");
    let b = Behaviour {
        accounts: vec![Account::new(
            "acct_other",
            other_key.clone(),
            Secret::generate("whsec_"),
        )],
        ..Behaviour::default()
    };
    let s = Sim::start(b).await;
    let ord = order();
    let created = s.charge(&ord, &body(&ord, 500, "tok_visa")).await.unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let c: Value = created.json().await.unwrap();
    let path = format!("/v1/charges/{}", c["id"].as_str().unwrap());
    let key = KEY.as_str();
    let mut last_changed = key.to_owned();
    let last = last_changed.pop().unwrap();
    last_changed.push(if last == '0' { '1' } else { '0' });
    let get = |auth: Option<String>| {
        let mut req = s.http.get(s.url(&path));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        req.send()
    };
    for auth in [
        None,
        Some(format!("Basic {key}")),
        Some(format!("Bearer {last_changed}")),
        Some(format!("Bearer {}", &key[..key.len() - 1])),
        Some(format!("Bearer {key}0")),
        Some("Bearer ".to_owned()),
    ] {
        let r = get(auth.clone()).await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{auth:?}");
        assert_eq!(error_code(r).await, "unauthorized");
    }
    let r = get(Some(format!("Bearer {key}"))).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // The other account does not see the default account's charge.
    let r = get(Some(format!("Bearer {}", other_key.expose())))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

/// The benchmark mode (`--durability relaxed`) changes only how commits
/// reach the disk: one key still makes one charge under concurrency, a
/// replay is byte-identical, many keys at once each make exactly one
/// charge, and the state is still there after a restart on the same file.
#[tokio::test]
async fn relaxed_durability_keeps_idempotency() {
    let s = Arc::new(
        Sim::start_with(
            behaviour(json!({"latency_ms": {"min": 300, "max": 300}})),
            Durability::Relaxed,
        )
        .await,
    );
    let ord = order();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let s = s.clone();
        let ord = ord.clone();
        tasks.push(tokio::spawn(async move {
            s.charge(&ord, &body(&ord, 500, "tok_visa"))
                .await
                .unwrap()
                .status()
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let created = statuses
        .iter()
        .filter(|s| **s == StatusCode::CREATED)
        .count();
    assert_eq!(created, 1, "{statuses:?}");
    assert_eq!(s.stats(&ord).await, (1, 20));

    // 100 keys at once, each sent twice concurrently: one charge per key.
    let keys: Vec<String> = (0..100).map(|_| order()).collect();
    let answers = futures::future::join_all(keys.iter().flat_map(|k| {
        let s = s.clone();
        let s2 = s.clone();
        [
            tokio::spawn({
                let k = k.clone();
                async move {
                    s.charge(&k, &body(&k, 700, "tok_visa"))
                        .await
                        .unwrap()
                        .status()
                }
            }),
            tokio::spawn({
                let k = k.clone();
                async move {
                    s2.charge(&k, &body(&k, 700, "tok_visa"))
                        .await
                        .unwrap()
                        .status()
                }
            }),
        ]
    }))
    .await;
    let created = answers
        .iter()
        .filter(|a| *a.as_ref().unwrap() == StatusCode::CREATED)
        .count();
    assert_eq!(created, 100, "one 201 per key");
    for k in &keys {
        assert_eq!(s.stats(k).await.0, 1, "one charge for {k}");
    }

    // A replay after a restart (relaxed again) is the first answer.
    let first = s.charge(&ord, &body(&ord, 500, "tok_visa")).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let first = first.bytes().await.unwrap();
    let Ok(Sim {
        sim,
        db_url,
        _dir,
        http,
    }) = Arc::try_unwrap(s)
    else {
        panic!("every task is done");
    };
    sim.stop().await.unwrap();
    let sim = psp_sim::spawn(SimConfig {
        behaviour: Behaviour {
            durability: Durability::Relaxed,
            ..Behaviour::default()
        },
        ..config(db_url.clone())
    })
    .await
    .unwrap();
    let s = Sim {
        sim,
        db_url,
        _dir,
        http,
    };
    let replay = s.charge(&ord, &body(&ord, 500, "tok_visa")).await.unwrap();
    assert_eq!(replay.status(), StatusCode::OK);
    assert_eq!(replay.bytes().await.unwrap(), first);
    assert_eq!(s.stats(&ord).await, (1, 22));
    let other = s.charge(&ord, &body(&ord, 501, "tok_visa")).await.unwrap();
    assert_eq!(other.status(), StatusCode::UNPROCESSABLE_ENTITY);
}
