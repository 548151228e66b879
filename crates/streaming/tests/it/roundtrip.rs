use crate::harness::*;
use events::{EventType, TopicKind, avro};
use std::collections::BTreeMap;
use std::time::Duration;
use streaming::{ConsumerSettings, run_consumer};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_type_round_trips_through_a_consumer_group() {
    runtime::metrics::install();
    let k = TestKafka::new(3).await;
    let sent = k.samples("rt");
    for env in &sent {
        k.producer.append(env).await.unwrap();
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let settings = ConsumerSettings::new(
        k.group("rt"),
        vec![
            k.topic(TopicKind::Payments),
            k.topic(TopicKind::Reconciliation),
        ],
    );
    let task = tokio::spawn(run_consumer(
        k.cfg.clone(),
        settings,
        k.producer.clone(),
        Forward(tx),
        stop.clone(),
    ));
    let got = recv_n(&mut rx, sent.len(), Duration::from_secs(60)).await;
    stop.cancel();
    let stats = task.await.unwrap().unwrap();
    assert_eq!(stats.applied, sent.len() as u64);
    assert_eq!(stats.dead_lettered, 0);
    let m = runtime::metrics::render();
    let line = m
        .lines()
        .find(|l| {
            l.starts_with("paystream_events_total")
                && l.contains(&k.group("rt"))
                && l.contains("outcome=\"applied\"")
        })
        .unwrap_or_else(|| panic!("no applied counter for the group in {m}"));
    assert!(line.ends_with(&format!(" {}", sent.len())), "{line}");

    let by_id: BTreeMap<_, _> = got.iter().map(|d| (d.envelope.event_id, d)).collect();
    assert_eq!(by_id.len(), sent.len(), "no duplicates in one clean run");
    for env in &sent {
        let d = by_id
            .get(&env.event_id)
            .unwrap_or_else(|| panic!("{} missing", env.event_type()));
        assert_eq!(&d.envelope, env, "{} changed in transit", env.event_type());
        let expected_topic = match env.event_type() {
            EventType::ReconciliationDiscrepancyFound
            | EventType::ReconciliationDiscrepancyResolved
            | EventType::ReconciliationRunCompleted => k.topic(TopicKind::Reconciliation),
            _ => k.topic(TopicKind::Payments),
        };
        assert_eq!(d.meta.topic, expected_topic);
    }
    // All events of one payment share a key, hence one partition, in order.
    let payments: Vec<_> = got
        .iter()
        .filter(|d| d.meta.topic == k.topic(TopicKind::Payments))
        .collect();
    assert!(
        payments
            .windows(2)
            .all(|w| w[0].meta.partition == w[1].meta.partition)
    );
    assert!(
        payments
            .windows(2)
            .all(|w| w[0].meta.offset < w[1].meta.offset)
    );
    let order: Vec<_> = payments.iter().map(|d| d.envelope.event_id).collect();
    let sent_order: Vec<_> = sent
        .iter()
        .filter(|e| k.topology.topic_for(e) == k.topic(TopicKind::Payments))
        .map(|e| e.event_id)
        .collect();
    assert_eq!(order, sent_order);
}

#[tokio::test]
async fn appended_messages_carry_key_headers_and_single_object_bytes() {
    let k = TestKafka::new(2).await;
    let env = k.samples("hdr").remove(0);
    let at = k.producer.append(&env).await.unwrap();
    assert!(at.offset >= 0);
    let recs = read_topic(&k.cfg, &k.topic(TopicKind::Payments), 1).await;
    let r = &recs[0];
    assert_eq!((r.partition, r.offset), (at.partition, at.offset));
    assert_eq!(
        r.key.as_deref(),
        Some(env.payment_id.unwrap().to_string().as_bytes())
    );
    assert_eq!(r.header("paystream.event_type"), Some("PaymentRequested"));
    assert_eq!(
        r.header("paystream.event_id"),
        Some(env.event_id.to_string().as_str())
    );
    assert_eq!(r.payload[..2], [0xC3, 0x01]);
    assert_eq!(
        avro::read_header(&r.payload).unwrap(),
        avro::current_fingerprint()
    );
    assert_eq!(avro::decode(&r.payload).unwrap(), env);
}
