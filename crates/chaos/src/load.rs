//! The load: upstream order services that submit payments (and refunds)
//! with an Idempotency-Key and retry with the same key on every answer that
//! is not definite (429, 5xx, a dropped connection), as a real client would.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Card tokens (the PSP simulator's behaviour file maps them) and their
/// share per mille of the load.
pub const CARDS: &[(&str, u32)] = &[
    ("tok_visa", 480),
    ("tok_chaos_decline", 80),
    ("tok_chaos_5xx", 80),
    ("tok_chaos_429", 80),
    ("tok_chaos_timeout_nocharge", 60),
    ("tok_chaos_timeout_charged", 60),
    ("tok_chaos_pending_ok", 100),
    ("tok_chaos_pending_fail", 60),
];

/// What one key got: every answer, and when the first definite one came.
#[derive(Debug, Clone)]
pub struct KeyRecord {
    pub key: String,
    /// `/v1/payments` or `/v1/payments/{id}/refunds`.
    pub route: &'static str,
    pub path: String,
    pub body: String,
    pub first_sent: Instant,
    /// Definite answers: (status, payment or refund id, error code).
    pub answers: Vec<(u16, Option<String>, Option<String>)>,
    pub definite_at: Option<Instant>,
    /// 429 `idempotency_key_in_use` answers seen before the definite one.
    pub in_use: u32,
}

impl KeyRecord {
    pub fn first(&self) -> Option<&(u16, Option<String>, Option<String>)> {
        self.answers.first()
    }
}

/// Everything the clients saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub keys: Vec<KeyRecord>,
    /// (route, status) of every answer, for the OpenAPI check.
    pub statuses: BTreeSet<(&'static str, u16)>,
    /// Payment statuses seen in 201 answers.
    pub created_statuses: BTreeSet<String>,
}

#[derive(Debug, Clone)]
pub struct Client {
    pub http: reqwest::Client,
    pub base: String,
    pub api_key: String,
}

/// Sends until a definite answer (or `deadline`).
pub async fn submit(
    c: &Client,
    route: &'static str,
    path: &str,
    key: &str,
    body: &str,
    seen: &Mutex<Seen>,
    deadline: Instant,
) -> KeyRecord {
    let mut rec = KeyRecord {
        key: key.to_owned(),
        route,
        path: path.to_owned(),
        body: body.to_owned(),
        first_sent: Instant::now(),
        answers: Vec::new(),
        definite_at: None,
        in_use: 0,
    };
    resend(c, &mut rec, seen, deadline).await;
    rec
}

/// Sends the record's request again until one more definite answer.
pub async fn resend(c: &Client, rec: &mut KeyRecord, seen: &Mutex<Seen>, deadline: Instant) {
    while Instant::now() < deadline {
        let r = c
            .http
            .post(format!("{}{}", c.base, rec.path))
            .bearer_auth(&c.api_key)
            .header("Idempotency-Key", &rec.key)
            .header("content-type", "application/json")
            .body(rec.body.clone())
            .send()
            .await;
        let pause = match r {
            Err(_) => Duration::from_millis(250),
            Ok(r) => {
                let status = r.status().as_u16();
                let retry_after = r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                let v: Value = r.json().await.unwrap_or(Value::Null);
                seen.lock()
                    .expect("not poisoned")
                    .statuses
                    .insert((rec.route, status));
                match status {
                    200 | 201 => {
                        let id = v["payment_id"]
                            .as_str()
                            .or(v["refund_id"].as_str())
                            .map(str::to_owned);
                        if status == 201
                            && rec.route == "/v1/payments"
                            && let Some(s) = v["status"].as_str()
                        {
                            seen.lock()
                                .expect("not poisoned")
                                .created_statuses
                                .insert(s.to_owned());
                        }
                        rec.answers.push((status, id, None));
                        rec.definite_at.get_or_insert_with(Instant::now);
                        return;
                    }
                    429 | 500..=599 | 408 => {
                        if v["error"]["code"] == "idempotency_key_in_use" {
                            rec.in_use += 1;
                        }
                        Duration::from_millis(retry_after.map_or(250, |s| s.clamp(1, 2) * 1000))
                    }
                    _ => {
                        let code = v["error"]["code"].as_str().map(str::to_owned);
                        rec.answers.push((status, None, code));
                        rec.definite_at.get_or_insert_with(Instant::now);
                        return;
                    }
                }
            }
        };
        tokio::time::sleep(pause).await;
    }
}

/// The deterministic body of payment `i` of a run.
pub fn payment_body(seed: u64, i: usize) -> String {
    let mut rng = StdRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let orders: Vec<Value> = (0..rng.random_range(1..=3))
        .map(|_| {
            // 2 % above the default risk rules' per-order limit: rejected.
            let amount: i64 = if rng.random_range(0..100) < 2 {
                6_000_000
            } else {
                rng.random_range(100..50_000)
            };
            json!({"seller_id": format!("s-{:02}", rng.random_range(1..=20)),
                   "amount_minor": amount, "currency": "EUR"})
        })
        .collect();
    let mut r = rng.random_range(0..1000);
    let mut card = "tok_visa";
    for (token, share) in CARDS {
        if r < *share {
            card = token;
            break;
        }
        r -= share;
    }
    json!({
        "buyer_id": format!("b-{:03}", rng.random_range(1..=300)),
        "orders": orders,
        "metadata": {"card_token": card},
    })
    .to_string()
}

/// Final payment statuses of the handler's API.
pub const FINAL: &[&str] = &["succeeded", "failed", "partially_succeeded", "rejected"];

/// GET a payment until it answers (retrying through restarts).
pub async fn get_payment(c: &Client, id: &str, deadline: Instant) -> Option<Value> {
    while Instant::now() < deadline {
        if let Ok(r) = c
            .http
            .get(format!("{}/v1/payments/{id}", c.base))
            .bearer_auth(&c.api_key)
            .send()
            .await
            && r.status().as_u16() == 200
            && let Ok(v) = r.json::<Value>().await
        {
            return Some(v);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    None
}

/// Waits until the payment is final; its last view either way.
pub async fn wait_final(c: &Client, id: &str, deadline: Instant) -> Option<Value> {
    let mut last = None;
    while Instant::now() < deadline {
        let v = get_payment(c, id, deadline).await?;
        let done = v["status"].as_str().is_some_and(|s| FINAL.contains(&s));
        last = Some(v);
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    last
}

/// Settings of the load.
#[derive(Debug, Clone)]
pub struct Plan {
    pub seed: u64,
    pub clients: usize,
    /// At least this many payments; more while faults are still planned.
    pub payments: usize,
    /// Payments per second across all clients.
    pub rate: f64,
    /// Stop submitting after this long (a soak), if set.
    pub duration: Option<Duration>,
    /// Share (per mille) of succeeded payments that get a partial refund.
    pub refund_per_mille: u32,
}

/// Runs the clients until the plan is met and `faults_done` is set.
pub async fn run(c: Client, plan: Plan, faults_done: Arc<AtomicBool>, deadline: Instant) -> Seen {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    #[allow(clippy::float_arithmetic)] // pacing, not money
    let interval = Duration::from_secs_f64(plan.clients as f64 / plan.rate.max(0.1));
    let mut tasks = Vec::new();
    for client in 0..plan.clients {
        let (c, plan, seen, next, faults_done) = (
            c.clone(),
            plan.clone(),
            seen.clone(),
            next.clone(),
            faults_done.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(plan.seed ^ 0xc1 ^ client as u64);
            let mut mine = Vec::new();
            // Spread the clients over the first interval.
            tokio::time::sleep(interval.mul_f64(rng.random_range(0.0..1.0))).await;
            loop {
                let elapsed = started.elapsed();
                let i = next.load(Ordering::SeqCst);
                let enough = i >= plan.payments && faults_done.load(Ordering::SeqCst);
                let timed_out = plan.duration.is_some_and(|d| elapsed >= d);
                if (plan.duration.is_none() && enough) || timed_out || Instant::now() > deadline {
                    break;
                }
                let i = next.fetch_add(1, Ordering::SeqCst);
                let tick = Instant::now();
                let key = format!("pay-{}-{i}", plan.seed);
                let body = payment_body(plan.seed, i);
                let mut rec = submit(
                    &c,
                    "/v1/payments",
                    "/v1/payments",
                    &key,
                    &body,
                    &seen,
                    deadline,
                )
                .await;
                // Some clients send the same request twice (a retry after a
                // lost answer): the second must be the same payment.
                if rng.random_range(0..1000) < 100 {
                    resend(&c, &mut rec, &seen, deadline).await;
                }
                let created = rec
                    .first()
                    .and_then(|(s, id, _)| (*s == 201).then(|| id.clone()).flatten());
                mine.push(rec);
                if let Some(id) = created
                    && rng.random_range(0..1000) < plan.refund_per_mille
                    && let Some(v) = wait_final(&c, &id, deadline).await
                    && let Some(order) = v["orders"]
                        .as_array()
                        .and_then(|os| os.iter().find(|o| o["status"] == "succeeded"))
                {
                    let amount = order["amount_minor"].as_i64().unwrap_or(2) / 2;
                    let body = json!({"order_id": order["order_id"], "amount_minor": amount.max(1),
                                      "reason": "chaos partial refund"})
                    .to_string();
                    let path = format!("/v1/payments/{id}/refunds");
                    let key = format!("refund-{}-{i}", plan.seed);
                    mine.push(
                        submit(
                            &c,
                            "/v1/payments/{payment_id}/refunds",
                            &path,
                            &key,
                            &body,
                            &seen,
                            deadline,
                        )
                        .await,
                    );
                }
                let spent = tick.elapsed();
                if spent < interval {
                    tokio::time::sleep(interval - spent).await;
                }
            }
            mine
        }));
    }
    let mut keys = Vec::new();
    for t in tasks {
        if let Ok(mine) = t.await {
            keys.extend(mine);
        }
    }
    let mut seen = Arc::try_unwrap(seen)
        .map(|m| m.into_inner().expect("not poisoned"))
        .unwrap_or_default();
    seen.keys = keys;
    seen
}
