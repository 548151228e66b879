//! `streaming::reader::TopicReader`: bounded reads without a group.

use events::{Timestamp, TopicKind};
use std::collections::BTreeMap;
use streaming::reader::{End, Start, TopicReader};
use testkit::TestKafka;

async fn read_all(r: &mut TopicReader) -> Vec<streaming::reader::Record> {
    let mut out = Vec::new();
    while let Some(b) = r.next_batch(7).await.unwrap() {
        out.extend(b);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_exactly_the_planned_ranges_and_terminates() {
    let k = TestKafka::new(3).await;
    let topic = k.topic(TopicKind::Payments);
    let mut produced = 0usize;
    for i in 0..8 {
        for e in k.samples(&format!("p{i}")) {
            if k.topology.topic_for(&e) == topic {
                k.producer.append(&e).await.unwrap();
                produced += 1;
            }
        }
    }
    let topics = [topic.clone()];
    let mut all = TopicReader::open(&k.cfg, &topics, Start::Beginning, End::Latest, None)
        .await
        .unwrap();
    assert_eq!(all.total(), u64::try_from(produced).unwrap());
    let got = read_all(&mut all).await;
    assert_eq!(got.len(), produced);
    // Offsets per partition are consecutive from 0, each once.
    let mut per: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for r in &got {
        per.entry(r.partition).or_default().push(r.offset);
    }
    for offsets in per.values() {
        assert_eq!(
            *offsets,
            (0..i64::try_from(offsets.len()).unwrap()).collect::<Vec<_>>()
        );
    }

    // [1, 3) in every partition.
    let mut mid = TopicReader::open(&k.cfg, &topics, Start::Offset(1), End::Offset(3), None)
        .await
        .unwrap();
    let got = read_all(&mut mid).await;
    let expect: usize = per.values().map(|o| o.len().clamp(1, 3) - 1).sum();
    assert_eq!(got.len(), expect);
    assert!(got.iter().all(|r| (1..3).contains(&r.offset)));

    // Explicit starts override per partition: the last message of each.
    let starts: BTreeMap<(String, i32), i64> = per
        .iter()
        .map(|(p, o)| ((topic.clone(), *p), i64::try_from(o.len()).unwrap() - 1))
        .collect();
    let mut last = TopicReader::open(
        &k.cfg,
        &topics,
        Start::Beginning,
        End::Latest,
        Some(&starts),
    )
    .await
    .unwrap();
    assert_eq!(read_all(&mut last).await.len(), per.len());

    // A time after every message: nothing to read, and it says so at once.
    let later = Timestamp::now().as_micros() / 1000 + 3_600_000;
    let mut none = TopicReader::open(&k.cfg, &topics, Start::Timestamp(later), End::Latest, None)
        .await
        .unwrap();
    assert_eq!(none.total(), 0);
    assert!(none.next_batch(10).await.unwrap().is_none());
}
