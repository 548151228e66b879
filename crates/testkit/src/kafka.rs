//! Topics on a real broker: fresh topics with a unique prefix per test (so
//! tests run in parallel and never see each other's messages) and reading a
//! topic back. Moved here from `streaming::testing`.

use events::{Envelope, Timestamp, TopicKind, Topology};
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use std::time::Duration;
use streaming::reader::{End, Record, Start, TopicReader};
use streaming::{EventProducer, KafkaConfig};

/// The test broker: `PAYSTREAM_TEST_BROKERS`, default 127.0.0.1:9092.
pub fn brokers() -> String {
    std::env::var("PAYSTREAM_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// A configuration for the test broker under a new topic prefix, and the
/// unique part of that prefix; no topic created (for code under test that
/// creates its own).
pub fn fresh_config(partitions: i32) -> (KafkaConfig, String) {
    let unique = uuid::Uuid::now_v7().simple().to_string();
    let cfg = KafkaConfig::local(&brokers(), &format!("t{unique}."), partitions);
    (cfg, unique)
}

/// Fresh topics (unique prefix) on the test broker.
#[derive(Debug)]
pub struct TestKafka {
    pub cfg: KafkaConfig,
    pub topology: Topology,
    pub producer: EventProducer,
    pub unique: String,
}

impl TestKafka {
    /// Creates paystream's topics under a new prefix, `partitions` each.
    pub async fn new(partitions: i32) -> TestKafka {
        let (cfg, unique) = fresh_config(partitions);
        let topology = cfg.topology();
        streaming::admin::ensure_topics(&cfg, &topology.specs())
            .await
            .expect("creating test topics");
        let producer = EventProducer::new(&cfg, "test-producer").expect("test producer");
        TestKafka {
            cfg,
            topology,
            producer,
            unique,
        }
    }

    /// A consumer group name no other test uses.
    pub fn group(&self, name: &str) -> String {
        format!("g{}-{name}", self.unique)
    }

    pub fn topic(&self, kind: TopicKind) -> String {
        self.topology.name(kind)
    }

    /// One event of every type, ids unique to this test and `key`.
    pub fn samples(&self, key: &str) -> Vec<Envelope> {
        events::samples::one_of_each(
            "test-client",
            &format!("{}-{key}", self.unique),
            Timestamp::now(),
        )
    }

    /// Produces every envelope (concurrently, all acknowledged).
    pub async fn produce_all(&self, envs: &[Envelope]) {
        produce_all(&self.producer, envs).await;
    }
}

/// Produces every envelope (concurrently, 500 at a time, all acknowledged).
pub async fn produce_all(producer: &EventProducer, envs: &[Envelope]) {
    for chunk in envs.chunks(500) {
        let results = futures::future::join_all(chunk.iter().map(|e| producer.append(e))).await;
        for r in results {
            r.expect("append");
        }
    }
}

/// A consumer of `topics` from their beginning, in a group of its own that
/// commits nothing: it reads everything there is and everything to come.
pub fn tail(cfg: &KafkaConfig, topics: &[&str]) -> StreamConsumer {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .set("group.id", format!("reader-{}", uuid::Uuid::now_v7()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader consumer");
    consumer.subscribe(topics).expect("subscribing the reader");
    consumer
}

/// Every record of `topic` now (from the beginning to the end as of the
/// call).
pub async fn read_all(cfg: &KafkaConfig, topic: &str) -> Vec<Record> {
    let mut reader = TopicReader::open(
        cfg,
        &[topic.to_owned()],
        Start::Beginning,
        End::Latest,
        None,
    )
    .await
    .expect("opening a reader");
    drain(&mut reader).await
}

/// Every record a reader has left to read.
async fn drain(reader: &mut TopicReader) -> Vec<Record> {
    let mut out = Vec::new();
    while let Some(batch) = reader.next_batch(1000).await.expect("reading") {
        out.extend(batch);
    }
    out
}

/// Reads exactly `n` messages of `topic` from the beginning, waiting up to
/// 30 s for them to arrive, then checks that nothing more arrives for a
/// moment. Panics otherwise.
pub async fn read_topic(cfg: &KafkaConfig, topic: &str, n: usize) -> Vec<Record> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut reader = TopicReader::open(
            cfg,
            &[topic.to_owned()],
            Start::Beginning,
            End::Latest,
            None,
        )
        .await
        .expect("opening a reader");
        let total = usize::try_from(reader.total()).expect("fits");
        if total >= n || tokio::time::Instant::now() >= deadline {
            let out = drain(&mut reader).await;
            assert!(
                out.len() >= n,
                "timed out reading {topic}: {} of {n} messages",
                out.len()
            );
            if out.len() == n {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let again = streaming::reader::watermarks(cfg, topic).expect("watermarks");
                let now: i64 = again.iter().map(|(_, lo, hi)| hi - lo).sum();
                assert_eq!(
                    usize::try_from(now).expect("fits"),
                    n,
                    "unexpected extra messages in {topic}"
                );
            }
            assert_eq!(out.len(), n, "unexpected extra messages in {topic}");
            return out;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
