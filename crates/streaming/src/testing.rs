//! Helpers for integration tests against a real broker: fresh topics with a
//! unique prefix per test (so tests run in parallel and never see each
//! other's messages) and reading a topic back. Not used by the services.

use crate::reader::{End, Record, Start, TopicReader};
use crate::{EventProducer, KafkaConfig};
use events::{Envelope, Timestamp, TopicKind, Topology};
use std::time::Duration;

/// The test broker: `PAYSTREAM_TEST_BROKERS`, default 127.0.0.1:9092.
pub fn brokers() -> String {
    std::env::var("PAYSTREAM_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
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
        let unique = uuid::Uuid::now_v7().simple().to_string();
        let cfg = KafkaConfig::local(&brokers(), &format!("t{unique}."), partitions);
        let topology = cfg.topology();
        crate::admin::ensure_topics(&cfg, &topology.specs())
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
            let mut out = Vec::new();
            while let Some(batch) = reader.next_batch(1000).await.expect("reading") {
                out.extend(batch);
            }
            assert!(
                out.len() >= n,
                "timed out reading {topic}: {} of {n} messages",
                out.len()
            );
            if out.len() == n {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let again = crate::reader::watermarks(cfg, topic).expect("watermarks");
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
