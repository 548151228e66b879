use crate::harness::*;
use events::{Envelope, EventId, TopicKind, avro};
use rdkafka::message::OwnedHeaders;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use streaming::{BatchHandler, ConsumerSettings, Delivered, HandlerError, Outcome, run_consumer};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

fn ids(ds: &[Delivered]) -> BTreeSet<EventId> {
    ds.iter().map(|d| d.envelope.event_id).collect()
}

/// Receives a batch, reports it, then never finishes: the member "dies"
/// (its task is aborted) before it could commit.
struct DieBeforeCommit(mpsc::UnboundedSender<Delivered>);

impl BatchHandler for DieBeforeCommit {
    async fn handle(&mut self, batch: &[Delivered]) -> Result<Vec<Outcome>, HandlerError> {
        for d in batch {
            let _ = self.0.send(d.clone());
        }
        std::future::pending().await
    }
}

fn settings(k: &TestKafka, group: &str) -> ConsumerSettings {
    ConsumerSettings::new(k.group(group), vec![k.topic(TopicKind::Payments)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncommitted_events_are_delivered_again_and_committed_ones_are_not() {
    let k = TestKafka::new(2).await;
    let sent: Vec<Envelope> = k
        .samples("alo")
        .into_iter()
        .filter(|e| k.topology.topic_for(e) == k.topic(TopicKind::Payments))
        .collect();
    for e in &sent {
        k.producer.append(e).await.unwrap();
    }
    let expected: BTreeSet<_> = sent.iter().map(|e| e.event_id).collect();

    // Member A receives everything, then dies before committing.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let a = tokio::spawn(run_consumer(
        k.cfg.clone(),
        settings(&k, "alo"),
        k.producer.clone(),
        DieBeforeCommit(tx),
        CancellationToken::new(),
    ));
    let first = recv_n(&mut rx, 1, Duration::from_secs(60)).await;
    assert!(expected.contains(&first[0].envelope.event_id));
    a.abort();
    let _ = a.await;

    // Member B of the same group gets all of them again, and commits.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let b = tokio::spawn(run_consumer(
        k.cfg.clone(),
        settings(&k, "alo"),
        k.producer.clone(),
        Forward(tx),
        stop.clone(),
    ));
    let again = recv_n(&mut rx, sent.len(), Duration::from_secs(60)).await;
    assert_eq!(ids(&again), expected);
    stop.cancel();
    b.await.unwrap().unwrap();

    // Member C sees only what was appended after B committed.
    let marker = {
        let mut m = k.samples("alo-marker").remove(0);
        m.producer = "marker".into();
        m
    };
    k.producer.append(&marker).await.unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let c = tokio::spawn(run_consumer(
        k.cfg.clone(),
        settings(&k, "alo"),
        k.producer.clone(),
        Forward(tx),
        stop.clone(),
    ));
    let next = recv_n(&mut rx, 1, Duration::from_secs(60)).await;
    assert_eq!(
        next[0].envelope.event_id, marker.event_id,
        "a committed event was delivered again"
    );
    // The group committing the end of every partition means the handler
    // was given everything it would be given.
    testkit::wait_caught_up(&k.cfg, &k.group("alo"), &[k.topic(TopicKind::Payments)]).await;
    assert!(
        rx.try_recv().is_err(),
        "nothing but the marker after the commit"
    );
    stop.cancel();
    c.await.unwrap().unwrap();
}

/// Rejects events whose producer is "reject-me"; applies the rest.
struct RejectSome(mpsc::UnboundedSender<Delivered>);

impl BatchHandler for RejectSome {
    async fn handle(&mut self, batch: &[Delivered]) -> Result<Vec<Outcome>, HandlerError> {
        Ok(batch
            .iter()
            .map(|d| {
                if d.envelope.producer == "reject-me" {
                    Outcome::rejected("rejected", "producer reject-me is not allowed")
                } else {
                    let _ = self.0.send(d.clone());
                    Outcome::Applied
                }
            })
            .collect())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_and_the_partition_moves_on() {
    let k = TestKafka::new(1).await;
    let topic = k.topic(TopicKind::Payments);
    let mut good = k.samples("poison");
    good.truncate(4);
    good[2].producer = "reject-me".into();
    let key = good[0].partition_key();
    let garbage = b"definitely not avro".to_vec();
    let mut unknown_schema = avro::header(0x1122_3344_5566_7788).to_vec();
    unknown_schema.extend_from_slice(b"\x02\x04");
    let send_raw = |payload: Vec<u8>| {
        let (p, topic, key) = (k.producer.clone(), topic.clone(), key.clone());
        async move {
            let h = OwnedHeaders::new().insert(rdkafka::message::Header {
                key: "origin",
                value: Some("test"),
            });
            p.send_raw(&topic, Some(key.as_bytes()), Some(&payload), h, None)
                .await
                .unwrap()
        }
    };
    // Offsets: 0 good0, 1 garbage, 2 good1, 3 unknown schema, 4 good2 (rejected), 5 good3
    k.producer.append(&good[0]).await.unwrap();
    let garbage_at = send_raw(garbage.clone()).await;
    k.producer.append(&good[1]).await.unwrap();
    let unknown_at = send_raw(unknown_schema.clone()).await;
    let rejected_at = k.producer.append(&good[2]).await.unwrap();
    k.producer.append(&good[3]).await.unwrap();

    let (tx, mut rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let mut s = settings(&k, "poison");
    s.batch_max = 2; // poison in several batches, not just one
    let task = tokio::spawn(run_consumer(
        k.cfg.clone(),
        s,
        k.producer.clone(),
        RejectSome(tx),
        stop.clone(),
    ));
    let applied = recv_n(&mut rx, 3, Duration::from_secs(60)).await;
    let applied_ids: Vec<_> = applied.iter().map(|d| d.envelope.event_id).collect();
    assert_eq!(
        applied_ids,
        vec![good[0].event_id, good[1].event_id, good[3].event_id]
    );

    let dlq = read_topic(&k.cfg, &k.topic(TopicKind::DeadLetter), 3).await;
    stop.cancel();
    let stats = task.await.unwrap().unwrap();
    assert_eq!(stats.dead_lettered, 3);
    assert_eq!(stats.applied, 3);

    let find = |offset: i64| {
        dlq.iter()
            .find(|r| r.header("dlq.original_offset") == Some(offset.to_string().as_str()))
            .unwrap_or_else(|| panic!("no dead letter for offset {offset}"))
    };
    let g = find(garbage_at.offset);
    assert_eq!(g.header("dlq.error_kind"), Some("not_single_object"));
    assert_eq!(g.payload, garbage, "original bytes kept");
    assert_eq!(g.header("origin"), Some("test"), "original headers kept");
    assert_eq!(g.key.as_deref(), Some(key.as_bytes()));
    let u = find(unknown_at.offset);
    assert_eq!(u.header("dlq.error_kind"), Some("unknown_schema"));
    assert!(u.header("dlq.reason").unwrap().contains("1122334455667788"));
    let r = find(rejected_at.offset);
    assert_eq!(r.header("dlq.error_kind"), Some("rejected"));
    assert_eq!(
        r.header("dlq.reason"),
        Some("producer reject-me is not allowed")
    );
    assert_eq!(avro::decode(&r.payload).unwrap(), good[2]);
    for d in &dlq {
        assert_eq!(d.header("dlq.original_topic"), Some(topic.as_str()));
        assert_eq!(d.header("dlq.original_partition"), Some("0"));
        assert_eq!(
            d.header("dlq.consumer_group"),
            Some(k.group("poison").as_str())
        );
        assert!(d.header("dlq.failed_at").unwrap().starts_with("20"));
    }
}

/// Fails the first `fail_times` calls (like a database outage), then applies.
struct Flaky {
    calls: Arc<AtomicUsize>,
    fail_times: usize,
    tx: mpsc::UnboundedSender<Delivered>,
}

impl BatchHandler for Flaky {
    async fn handle(&mut self, batch: &[Delivered]) -> Result<Vec<Outcome>, HandlerError> {
        if self.calls.fetch_add(1, Ordering::SeqCst) < self.fail_times {
            return Err(HandlerError("database unavailable".into()));
        }
        for d in batch {
            let _ = self.tx.send(d.clone());
        }
        Ok(vec![Outcome::Applied; batch.len()])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_batch_is_retried_not_dead_lettered() {
    let k = TestKafka::new(1).await;
    let e = k.samples("flaky").remove(0);
    k.producer.append(&e).await.unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let calls = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let mut s = settings(&k, "flaky");
    s.retry_backoff = Duration::from_millis(10);
    let h = Flaky {
        calls: calls.clone(),
        fail_times: 3,
        tx,
    };
    let task = tokio::spawn(run_consumer(
        k.cfg.clone(),
        s,
        k.producer.clone(),
        h,
        stop.clone(),
    ));
    let got = recv_n(&mut rx, 1, Duration::from_secs(60)).await;
    assert_eq!(got[0].envelope, e);
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    stop.cancel();
    let stats = task.await.unwrap().unwrap();
    assert_eq!(stats.dead_lettered, 0);
}

/// Signals when a batch starts, then takes its time before applying it.
struct Slow {
    started: Arc<Notify>,
    tx: mpsc::UnboundedSender<Delivered>,
}

impl BatchHandler for Slow {
    async fn handle(&mut self, batch: &[Delivered]) -> Result<Vec<Outcome>, HandlerError> {
        self.started.notify_one();
        tokio::time::sleep(Duration::from_millis(700)).await;
        for d in batch {
            let _ = self.tx.send(d.clone());
        }
        Ok(vec![Outcome::Applied; batch.len()])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_the_in_flight_batch_and_commits_it() {
    let k = TestKafka::new(1).await;
    let sent: Vec<Envelope> = k.samples("drain").into_iter().take(5).collect();
    for e in &sent {
        k.producer.append(e).await.unwrap();
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let started = Arc::new(Notify::new());
    let stop = CancellationToken::new();
    let task = tokio::spawn(run_consumer(
        k.cfg.clone(),
        settings(&k, "drain"),
        k.producer.clone(),
        Slow {
            started: started.clone(),
            tx,
        },
        stop.clone(),
    ));
    started.notified().await;
    stop.cancel(); // mid-batch
    let stats = task.await.unwrap().unwrap();
    assert!(stats.applied >= 1, "the in-flight batch was finished");
    let mut finished = BTreeSet::new();
    while let Ok(d) = rx.try_recv() {
        finished.insert(d.envelope.event_id);
    }
    assert_eq!(finished.len() as u64, stats.applied);

    // A new member of the group gets exactly the rest.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let rest_n = sent.len() - finished.len();
    let task = tokio::spawn(run_consumer(
        k.cfg.clone(),
        settings(&k, "drain"),
        k.producer.clone(),
        Forward(tx),
        stop.clone(),
    ));
    let mut rest = BTreeSet::new();
    if rest_n > 0 {
        rest = ids(&recv_n(&mut rx, rest_n, Duration::from_secs(60)).await);
    }
    // The group committing the end of every partition means the handler
    // was given everything it would be given.
    testkit::wait_caught_up(&k.cfg, &k.group("drain"), &[k.topic(TopicKind::Payments)]).await;
    assert!(
        rx.try_recv().is_err(),
        "the finished batch was committed, not redelivered"
    );
    stop.cancel();
    task.await.unwrap().unwrap();
    assert!(finished.is_disjoint(&rest));
    assert_eq!(finished.len() + rest.len(), sent.len());
}
