//! A real executor against the real broker, PostgreSQL (or SQLite) and the
//! PSP simulator; payments are produced straight to the payments topic, and
//! everything appended there is collected for the assertions.

use events::{
    BuyerId, ClientId, Envelope, Event, OrderId, PaymentId, PaymentOrder, PaymentRequested,
    RefundId, RefundRequested, RiskApproved, SellerId, TopicKind,
};
use executor::ExecutorArgs;
use psp_sim::{Behaviour, RunningSim, SimConfig};
use rdkafka::message::Message;
use runtime::secret::Secret;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use streaming::{EventProducer, KafkaConfig};
use tokio_util::sync::CancellationToken;

pub use testkit::{Backend, brokers, eur, free_port};

pub struct Env {
    pub producer: EventProducer,
    _sim: RunningSim,
    pub sim_url: String,
    /// The PSP's API key and webhook secret (generated per test).
    pub psp_key: Secret,
    pub webhook_secret: Secret,
    pub db_url: String,
    pub exec_base: String,
    pub http: reqwest::Client,
    pub stop: CancellationToken,
    pub seen: Arc<Mutex<Vec<Envelope>>>,
    /// Per partition of the payments topic, the offset after the last
    /// message the collector read.
    read_up_to: Arc<Mutex<BTreeMap<i32, i64>>>,
    kafka: KafkaConfig,
    sim_db: String,
    _db: Option<tempfile::TempDir>,
    _sim_dir: tempfile::TempDir,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Options of one test environment.
pub struct Setup {
    pub backend: Backend,
    pub behaviour: serde_json::Value,
    /// Point the simulator's webhooks at the executor.
    pub webhooks: bool,
    pub args: Box<dyn Fn(&mut ExecutorArgs)>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            backend: Backend::Postgres,
            behaviour: serde_json::json!({}),
            webhooks: false,
            args: Box::new(|_| {}),
        }
    }
}

pub async fn start(setup: Setup) -> Env {
    let sim_dir = tempfile::tempdir().unwrap();
    let sim_db = format!("sqlite://{}", sim_dir.path().join("sim.db").display());
    let port = free_port();
    let mut behaviour = setup.behaviour;
    let psp_key = Secret::generate("sk_test_");
    let webhook_secret = Secret::generate("whsec_");
    if setup.webhooks {
        behaviour["accounts"] = serde_json::json!([{
            "id": "acct_default", "api_key": psp_key.expose(), "webhook_secret": webhook_secret.expose(),
            "webhook_url": format!("http://127.0.0.1:{port}/v1/psp/webhooks")
        }]);
        if behaviour.get("webhooks").is_none() {
            behaviour["webhooks"] =
                serde_json::json!({"initial_backoff_ms": 100, "max_backoff_ms": 500});
        }
    }
    let behaviour: Behaviour = serde_json::from_value(behaviour).unwrap();
    let sim = psp_sim::spawn(SimConfig {
        behaviour,
        api_key: psp_key.clone(),
        webhook_secret: webhook_secret.clone(),
        ..SimConfig::for_tests(sim_db.clone())
    })
    .await
    .unwrap();
    let sim_url = sim.base_url();

    let (db_url, db_dir) = testkit::FreshDb::new(setup.backend).await.into_parts();
    let (kafka, _) = testkit::fresh_config(2);
    let producer = EventProducer::new(&kafka, "test-producer").unwrap();
    let stop = CancellationToken::new();
    let mut args = ExecutorArgs::for_tests(&sim_url, psp_key.clone(), webhook_secret.clone());
    args.listen = format!("127.0.0.1:{port}").parse().unwrap();
    (setup.args)(&mut args);
    let running = executor::start(kafka.clone(), &db_url, args, stop.clone())
        .await
        .unwrap();
    let exec_base = format!("http://{}", running.addr);
    tokio::spawn(running.wait());

    let seen = Arc::new(Mutex::new(Vec::new()));
    let read_up_to = Arc::new(Mutex::new(BTreeMap::new()));
    collect(&kafka, seen.clone(), read_up_to.clone(), stop.clone());
    Env {
        producer,
        _sim: sim,
        sim_url,
        psp_key,
        webhook_secret,
        db_url,
        exec_base,
        http: reqwest::Client::new(),
        stop,
        seen,
        read_up_to,
        kafka,
        sim_db,
        _db: db_dir,
        _sim_dir: sim_dir,
    }
}

/// Reads the payments topic from the start into `seen` until `stop`,
/// noting in `read_up_to` how far it has read each partition.
fn collect(
    kafka: &KafkaConfig,
    seen: Arc<Mutex<Vec<Envelope>>>,
    read_up_to: Arc<Mutex<BTreeMap<i32, i64>>>,
    stop: CancellationToken,
) {
    let consumer = testkit::tail(kafka, &[&kafka.topology().name(TopicKind::Payments)]);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                m = consumer.recv() => {
                    let Ok(m) = m else { continue };
                    if let Some(p) = m.payload()
                        && let Ok(env) = events::avro::decode(p)
                    {
                        seen.lock().unwrap().push(env);
                    }
                    read_up_to.lock().unwrap().insert(m.partition(), m.offset() + 1);
                }
            }
        }
    });
}

pub fn envelope(payment: PaymentId, discriminator: &str, event: Event) -> Envelope {
    testkit::envelope_now(payment, discriminator, event)
}

impl Env {
    /// Appends an approved payment with one order per amount; returns its
    /// order ids.
    pub async fn pay(&self, card_token: &str, amounts: &[i64]) -> (PaymentId, Vec<OrderId>) {
        self.pay_as(PaymentId::new_random(), card_token, amounts)
            .await
    }

    /// [`Env::pay`] with a given payment id (order `i` is
    /// `OrderId::derive(payment, i)`).
    pub async fn pay_as(
        &self,
        payment: PaymentId,
        card_token: &str,
        amounts: &[i64],
    ) -> (PaymentId, Vec<OrderId>) {
        let orders: Vec<PaymentOrder> = amounts
            .iter()
            .enumerate()
            .map(|(i, a)| PaymentOrder {
                order_id: OrderId::derive(payment, i),
                seller_id: SellerId::parse(&format!("seller-{i}")).unwrap(),
                amount: eur(*a),
            })
            .collect();
        let ids = orders.iter().map(|o| o.order_id).collect();
        let requested = envelope(
            payment,
            "requested",
            PaymentRequested {
                client_id: ClientId::parse("shop").unwrap(),
                idempotency_key: None,
                buyer_id: BuyerId::parse("buyer-1").unwrap(),
                orders,
                metadata: BTreeMap::from([("card_token".to_owned(), card_token.to_owned())]),
            }
            .into(),
        );
        let approved = envelope(
            payment,
            "risk",
            RiskApproved {
                rule_set: "test".into(),
            }
            .into(),
        );
        self.producer.append(&requested).await.unwrap();
        self.producer.append(&approved).await.unwrap();
        (payment, ids)
    }

    pub async fn refund(&self, payment: PaymentId, order: OrderId, minor: i64) -> RefundId {
        let refund = RefundId::new_random();
        let env = envelope(
            payment,
            &format!("refund-{refund}"),
            RefundRequested {
                refund_id: refund,
                order_id: order,
                amount: eur(minor),
                reason: "customer asked".into(),
            }
            .into(),
        );
        self.producer.append(&env).await.unwrap();
        refund
    }

    pub fn events(&self) -> Vec<Envelope> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits for the positive sign that every event the executor has
    /// produced so far is in [`Env::events`]: its outbox is empty (an event
    /// leaves it only once appended) and the collector has read each
    /// partition of the payments topic up to its end as of then. An absence
    /// check ("no second settlement") asserts after this, not after a sleep.
    pub async fn collected_everything(&self) {
        let db = storage::Db::connect(&self.db_url).await.unwrap();
        let topic = self.kafka.topology().name(TopicKind::Payments);
        testkit::wait_until(
            "the executor's outbox to drain and the collector to read every appended event",
            Duration::from_secs(30),
            async || {
                if testkit::count(&db, "SELECT COUNT(*) FROM executor_outbox").await != 0 {
                    return false;
                }
                let ends = streaming::reader::watermarks(&self.kafka, &topic).unwrap();
                let read = self.read_up_to.lock().unwrap();
                ends.iter()
                    .all(|(p, low, high)| high <= low || read.get(p).is_some_and(|r| r >= high))
            },
        )
        .await;
        db.close().await;
    }

    /// Waits until the simulator has had every webhook it queued (each
    /// duplicate copy included) acknowledged by the executor.
    pub async fn webhooks_delivered(&self) {
        let sim = storage::Db::connect(&self.sim_db).await.unwrap();
        testkit::wait_until(
            "the simulator's webhooks to be acknowledged",
            Duration::from_secs(30),
            async || {
                testkit::count(
                    &sim,
                    "SELECT COUNT(*) FROM psp_webhook_deliveries WHERE delivered_at_ms IS NULL",
                )
                .await
                    == 0
            },
        )
        .await;
        sim.close().await;
    }

    /// Waits until `pred` holds for the events seen so far (panics after
    /// `secs`), and returns them.
    pub async fn wait_for(
        &self,
        secs: u64,
        what: &str,
        pred: impl Fn(&[Envelope]) -> bool,
    ) -> Vec<Envelope> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let evs = self.events();
            if pred(&evs) {
                return evs;
            }
            if tokio::time::Instant::now() > deadline {
                let names: Vec<String> = evs.iter().map(|e| format!("{:?}", e.event)).collect();
                panic!("timed out waiting for {what}; seen: {names:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// (charges, create requests) the simulator saw for an order.
    pub async fn sim_stats(&self, order: OrderId) -> (i64, i64) {
        testkit::sim_stats(&self.http, &self.sim_url, &order.to_string()).await
    }

    pub async fn advance_sim_clock(&self, ms: u64) {
        let r = self
            .http
            .post(format!("{}/_sim/clock/advance", self.sim_url))
            .json(&serde_json::json!({ "ms": ms }))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }

    /// A `Psp-Signature` for `body` at time `t`, with the PSP's secret.
    pub fn sign(&self, t: i64, body: &str) -> String {
        psp_sim::sign(self.webhook_secret.expose().as_bytes(), t, body.as_bytes())
    }

    pub async fn post_webhook(
        &self,
        signature: Option<&str>,
        body: &str,
    ) -> (u16, serde_json::Value) {
        let mut req = self
            .http
            .post(format!("{}/v1/psp/webhooks", self.exec_base))
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(s) = signature {
            req = req.header("Psp-Signature", s);
        }
        let r = req.send().await.unwrap();
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(serde_json::Value::Null))
    }
}

/// Events about one order (by its id inside the event).
pub fn of_order(evs: &[Envelope], order: OrderId) -> Vec<&Event> {
    evs.iter()
        .map(|e| &e.event)
        .filter(|e| match e {
            Event::OrderExecutionStarted(x) => x.order_id == order,
            Event::OrderSucceeded(x) => x.order_id == order,
            Event::OrderFailed(x) => x.order_id == order,
            Event::OrderPending(x) => x.order_id == order,
            Event::OrderSettledByWebhook(x) => x.order_id == order,
            _ => false,
        })
        .collect()
}

/// Whether the order reached a final state in the events.
pub fn is_final(evs: &[Envelope], order: OrderId) -> bool {
    of_order(evs, order).iter().any(|e| match e {
        Event::OrderSucceeded(_) | Event::OrderSettledByWebhook(_) => true,
        Event::OrderFailed(f) => !f.retryable,
        _ => false,
    })
}

/// Distinct events (by event id): the view of a deduplicating consumer.
pub fn distinct(evs: &[Envelope]) -> Vec<Envelope> {
    let mut seen = std::collections::BTreeSet::new();
    evs.iter()
        .filter(|e| seen.insert(e.event_id))
        .cloned()
        .collect()
}
