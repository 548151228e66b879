use events::{EventType, TopicKind, avro};
use payment_handler::HandlerArgs;
use reqwest::StatusCode;
use serde_json::{Value, json};
use streaming::KafkaConfig;
use tokio_util::sync::CancellationToken;

pub use testkit::Backend;

pub struct Handler {
    pub base: String,
    pub kafka: KafkaConfig,
    pub db_url: String,
    pub http: reqwest::Client,
    pub stop: CancellationToken,
    pub app: payment_handler::service::App,
    _db: testkit::FreshDb,
}

impl Drop for Handler {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub async fn start(backend: Backend) -> Handler {
    start_with(backend, HandlerArgs::for_tests()).await
}

pub async fn start_with(backend: Backend, args: HandlerArgs) -> Handler {
    let fresh = testkit::FreshDb::new(backend).await;
    let db_url = fresh.url.clone();
    let (kafka, _) = testkit::fresh_config(2);
    let stop = CancellationToken::new();
    let running = payment_handler::start(kafka.clone(), &db_url, args, stop.clone())
        .await
        .unwrap();
    let base = format!("http://{}", running.addr);
    let app = running.app.clone();
    tokio::spawn(running.wait());
    Handler {
        app,
        base,
        kafka,
        db_url,
        http: reqwest::Client::new(),
        stop,
        _db: fresh,
    }
}

impl Handler {
    /// Registers a client and returns its API key.
    pub async fn client(&self, name: &str) -> String {
        let db = storage::Db::connect(&self.db_url).await.unwrap();
        payment_handler::store::create_client(&db, &events::ClientId::parse(name).unwrap())
            .await
            .unwrap()
    }

    pub async fn post(
        &self,
        api_key: Option<&str>,
        idem: Option<&str>,
        body: &str,
    ) -> (StatusCode, reqwest::header::HeaderMap, String) {
        let mut req = self
            .http
            .post(format!("{}/v1/payments", self.base))
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(k) = api_key {
            req = req.bearer_auth(k);
        }
        if let Some(i) = idem {
            req = req.header("Idempotency-Key", i);
        }
        let r = req.send().await.unwrap();
        let (s, h) = (r.status(), r.headers().clone());
        (s, h, r.text().await.unwrap())
    }

    pub async fn get_payment(&self, api_key: &str, id: &str) -> (StatusCode, Value) {
        let r = self
            .http
            .get(format!("{}/v1/payments/{id}", self.base))
            .bearer_auth(api_key)
            .send()
            .await
            .unwrap();
        let s = r.status();
        (s, r.json().await.unwrap())
    }

    /// Waits for the positive sign that the handler's consumers have
    /// handled everything on their topics so far: the inbound group has
    /// committed the end of the inbound topic, then the status group the
    /// end of the payments topic (a consumer commits only once its effects
    /// and dead letters are written). What the HTTP API appends is on the
    /// topic before it answers.
    pub async fn consumers_caught_up(&self) {
        let t = self.kafka.topology();
        testkit::wait_caught_up(
            &self.kafka,
            &t.group("handler-inbound"),
            &[t.name(TopicKind::Inbound)],
        )
        .await;
        testkit::wait_caught_up(
            &self.kafka,
            &t.group("payment-status"),
            &[t.name(TopicKind::Payments)],
        )
        .await;
    }

    /// Every event on the payments topic, decoded, once the consumers have
    /// caught up.
    pub async fn payment_events(&self) -> Vec<events::Envelope> {
        self.consumers_caught_up().await;
        testkit::read_all(
            &self.kafka,
            &self.kafka.topology().name(TopicKind::Payments),
        )
        .await
        .iter()
        .map(|r| avro::decode(&r.payload).unwrap())
        .collect()
    }

    /// Every dead letter, once the consumers have caught up.
    pub async fn dead_letters(&self) -> Vec<streaming::reader::Record> {
        self.consumers_caught_up().await;
        testkit::read_all(
            &self.kafka,
            &self.kafka.topology().name(TopicKind::DeadLetter),
        )
        .await
    }
}

pub fn count_type(evs: &[events::Envelope], t: EventType) -> usize {
    evs.iter().filter(|e| e.event_type() == t).count()
}

pub fn payment(buyer: &str, orders: &[(&str, i64, &str)]) -> String {
    let orders: Vec<_> = orders
        .iter()
        .map(|(s, a, c)| json!({"seller_id": s, "amount_minor": a, "currency": c}))
        .collect();
    json!({"buyer_id": buyer, "orders": orders, "metadata": {"card_token": "tok_visa"}}).to_string()
}
