use events::{Envelope, Timestamp, TopicKind, Topology};
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use std::time::Duration;
use streaming::{BatchHandler, Delivered, EventProducer, HandlerError, KafkaConfig, Outcome};
use tokio::sync::mpsc;

pub fn brokers() -> String {
    std::env::var("PAYSTREAM_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// Fresh topics (unique prefix) on the test broker.
pub struct TestKafka {
    pub cfg: KafkaConfig,
    pub topology: Topology,
    pub producer: EventProducer,
    pub unique: String,
}

impl TestKafka {
    pub async fn new(partitions: i32) -> TestKafka {
        let unique = uuid::Uuid::now_v7().simple().to_string();
        let cfg = KafkaConfig::local(&brokers(), &format!("t{unique}."), partitions);
        let topology = cfg.topology();
        streaming::admin::ensure_topics(&cfg, &topology.specs())
            .await
            .expect("creating test topics");
        let producer = EventProducer::new(&cfg, "test-producer").unwrap();
        TestKafka {
            cfg,
            topology,
            producer,
            unique,
        }
    }

    pub fn group(&self, name: &str) -> String {
        format!("g{}-{name}", self.unique)
    }

    pub fn topic(&self, kind: TopicKind) -> String {
        self.topology.name(kind)
    }

    pub fn samples(&self, key: &str) -> Vec<Envelope> {
        events::samples::one_of_each(
            "test-client",
            &format!("{}-{key}", self.unique),
            Timestamp::now(),
        )
    }
}

/// A handler that forwards every event to a channel and applies it.
pub struct Forward(pub mpsc::UnboundedSender<Delivered>);

impl BatchHandler for Forward {
    async fn handle(&mut self, batch: &[Delivered]) -> Result<Vec<Outcome>, HandlerError> {
        for d in batch {
            let _ = self.0.send(d.clone());
        }
        Ok(vec![Outcome::Applied; batch.len()])
    }
}

/// Receives `n` items or panics after `timeout`.
pub async fn recv_n<T>(rx: &mut mpsc::UnboundedReceiver<T>, n: usize, timeout: Duration) -> Vec<T> {
    let mut out = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + timeout;
    while out.len() < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(x)) => out.push(x),
            Ok(None) => panic!("channel closed after {} of {n} items", out.len()),
            Err(_) => panic!("timed out after {} of {n} items", out.len()),
        }
    }
    out
}

/// A raw message read back from a topic.
#[derive(Debug, Clone)]
pub struct RawRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl RawRecord {
    pub fn header(&self, name: &str) -> Option<String> {
        streaming::dlq::header_str(&self.headers, name).map(str::to_owned)
    }
}

/// Reads exactly `n` messages of a topic from the beginning (own throwaway
/// group, nothing committed), then checks nothing more arrives for a moment.
pub async fn read_topic(cfg: &KafkaConfig, topic: &str, n: usize) -> Vec<RawRecord> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .set("group.id", format!("reader-{}", uuid::Uuid::now_v7()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while out.len() < n {
        let m = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out reading {topic}: {} of {n}", out.len()))
            .unwrap();
        out.push(RawRecord {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            headers: m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                        .collect()
                })
                .unwrap_or_default(),
        });
    }
    if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(1500), consumer.recv()).await {
        panic!(
            "unexpected extra message in {topic} at offset {}",
            m.offset()
        );
    }
    out
}
