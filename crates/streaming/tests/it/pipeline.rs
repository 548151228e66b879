//! The pipelined loop under rebalances and failures: batches decoded ahead
//! of the handler never leak past a revocation, and an offset is never
//! committed before the handler's effects. Real broker.

use crate::harness::*;
use events::{Envelope, TopicKind};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use streaming::{BatchHandler, ConsumerSettings, Delivered, HandlerError, Outcome, run_consumer};
use tokio_util::sync::CancellationToken;

/// One application of one event by one member.
#[derive(Debug, Clone)]
struct Applied {
    /// Global order of applications across all members.
    seq: u64,
    member: &'static str,
    partition: i32,
    offset: i64,
}

/// Takes `pause` per batch (so batches are in flight when the group
/// rebalances), then records each event as applied.
struct Recording {
    member: &'static str,
    seq: Arc<AtomicU64>,
    log: Arc<Mutex<Vec<Applied>>>,
    pause: Duration,
}

impl BatchHandler for Recording {
    async fn handle(&mut self, batch: &[Delivered]) -> Result<Vec<Outcome>, HandlerError> {
        tokio::time::sleep(self.pause).await;
        let mut log = self.log.lock().unwrap();
        for d in batch {
            log.push(Applied {
                seq: self.seq.fetch_add(1, Ordering::SeqCst),
                member: self.member,
                partition: d.meta.partition,
                offset: d.meta.offset,
            });
        }
        Ok(vec![Outcome::Applied; batch.len()])
    }
}

/// Distinct events, spread over partitions by payment.
fn stream(k: &TestKafka, payments: usize) -> Vec<Envelope> {
    (0..payments)
        .flat_map(|i| k.samples(&format!("p{i}")))
        .filter(|e| k.topology.topic_for(e) == k.topic(TopicKind::Payments))
        .collect()
}

async fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The group's committed offset of each partition (None: nothing yet).
fn committed(k: &TestKafka, group: &str, topic: &str, partitions: i32) -> Vec<Option<i64>> {
    let mut c = k.cfg.client_config("pipeline-test-offsets");
    c.set("group.id", group);
    c.set("enable.auto.commit", "false");
    let consumer: BaseConsumer = c.create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    (0..partitions)
        .map(|p| match got.find_partition(topic, p).unwrap().offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        })
        .collect()
}

fn high_watermarks(k: &TestKafka, topic: &str) -> BTreeMap<i32, i64> {
    streaming::reader::watermarks(&k.cfg, topic)
        .unwrap()
        .into_iter()
        .map(|(p, _, hi)| (p, hi))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_joining_and_leaving_mid_stream_lose_nothing_and_repeat_only_uncommitted_work() {
    const PARTITIONS: i32 = 4;
    let k = TestKafka::new(PARTITIONS).await;
    let topic = k.topic(TopicKind::Payments);
    let events = stream(&k, 300);
    let (first, rest) = events.split_at(events.len() / 2);
    for e in first {
        k.producer.append(e).await.unwrap();
    }
    let group = k.group("rebalance");
    let seq = Arc::new(AtomicU64::new(0));
    let log = Arc::new(Mutex::new(Vec::<Applied>::new()));
    let member = |name: &'static str, stop: &CancellationToken| {
        let mut s = ConsumerSettings::new(group.clone(), vec![topic.clone()]);
        // Small batches, two decoded ahead: several batches are in flight
        // (applying, queued, being decoded) whenever the group rebalances.
        s.batch_max = 25;
        s.batch_linger = Duration::from_millis(5);
        s.pipeline_depth = 2;
        tokio::spawn(run_consumer(
            k.cfg.clone(),
            s,
            k.producer.clone(),
            Recording {
                member: name,
                seq: seq.clone(),
                log: log.clone(),
                pause: Duration::from_millis(15),
            },
            stop.clone(),
        ))
    };
    let count = |who: &str| {
        log.lock()
            .unwrap()
            .iter()
            .filter(|a| a.member == who)
            .count()
    };

    let stop_a = CancellationToken::new();
    let a = member("a", &stop_a);
    wait_until("a applies", Duration::from_secs(180), || count("a") >= 200).await;
    // B joins while A is mid-stream, and more events arrive meanwhile.
    let stop_b = CancellationToken::new();
    let b = member("b", &stop_b);
    let producing = {
        let (p, rest) = (k.producer.clone(), rest.to_vec());
        tokio::spawn(async move {
            for e in &rest {
                p.append(e).await.unwrap();
            }
        })
    };
    wait_until("b applies", Duration::from_secs(180), || count("b") >= 200).await;
    // A leaves while B is mid-stream.
    stop_a.cancel();
    let stats_a = a.await.unwrap().unwrap();
    producing.await.unwrap();
    let total = events.len();
    wait_until("everything applied", Duration::from_secs(240), || {
        let log = log.lock().unwrap();
        let distinct: BTreeSet<(i32, i64)> = log.iter().map(|a| (a.partition, a.offset)).collect();
        distinct.len() >= total
    })
    .await;
    // B has committed the end of every partition: it applies nothing more
    // (a late second application would be in the log by now).
    testkit::wait_caught_up(&k.cfg, &group, std::slice::from_ref(&topic)).await;
    stop_b.cancel();
    let stats_b = b.await.unwrap().unwrap();

    let log = log.lock().unwrap().clone();
    assert_eq!(stats_a.applied + stats_b.applied, log.len() as u64);
    let ends = high_watermarks(&k, &topic);
    let mut handed_over = 0;
    for p in 0..PARTITIONS {
        let mut applied: Vec<&Applied> = log.iter().filter(|a| a.partition == p).collect();
        applied.sort_by_key(|a| a.seq);
        // In the order they happened, the partition's applications form
        // runs, one per owner: within a run the offsets are exactly
        // consecutive (nothing skipped, nothing applied twice, never out of
        // order); the first run starts at 0; each next owner starts no later
        // than right after where the previous one stopped (nothing lost) and
        // no earlier than the previous owner's start (at most what the
        // previous owner applied but had not committed yet is applied again:
        // at-least-once delivery, which consumers absorb by event id); the
        // last run ends at the high watermark. A member that went on
        // applying a partition it had handed over would interleave with the
        // new owner and break these runs.
        let shown = || {
            applied
                .iter()
                .map(|a| (a.member, a.offset))
                .collect::<Vec<_>>()
        };
        let mut runs: Vec<(&str, i64, i64)> = Vec::new();
        for a in &applied {
            match runs.last_mut() {
                Some((m, _, last)) if *m == a.member => {
                    assert_eq!(a.offset, *last + 1, "partition {p}: {:?}", shown());
                    *last = a.offset;
                }
                _ => runs.push((a.member, a.offset, a.offset)),
            }
        }
        assert_eq!(
            runs.first().map(|r| r.1),
            Some(0),
            "partition {p}: {:?}",
            shown()
        );
        for w in runs.windows(2) {
            let ((_, prev_start, prev_last), (_, start, _)) = (w[0], w[1]);
            assert!(
                prev_start <= start && start <= prev_last + 1,
                "partition {p}: {:?}",
                shown()
            );
        }
        assert_eq!(
            runs.last().map(|r| r.2),
            Some(ends[&p] - 1),
            "partition {p}: {:?}",
            shown()
        );
        let offsets: BTreeSet<i64> = applied.iter().map(|a| a.offset).collect();
        let expected: BTreeSet<i64> = (0..ends[&p]).collect();
        assert_eq!(offsets, expected, "partition {p}");
        handed_over += applied
            .windows(2)
            .filter(|w| w[0].member != w[1].member)
            .count();
    }
    assert!(
        handed_over >= 2,
        "partitions changed hands on the join and on the leave"
    );

    // Every offset was committed: a new member of the group gets nothing.
    assert_eq!(
        committed(&k, &group, &topic, PARTITIONS),
        (0..PARTITIONS).map(|p| Some(ends[&p])).collect::<Vec<_>>()
    );
}

/// Applies the first `good_batches` batches (recording the events as
/// durable), then fails transiently forever, like a database that went
/// away for good.
struct FailsAfter {
    good_batches: usize,
    calls: Arc<AtomicUsize>,
    durable: Arc<Mutex<BTreeSet<(i32, i64)>>>,
}

impl BatchHandler for FailsAfter {
    async fn handle(&mut self, batch: &[Delivered]) -> Result<Vec<Outcome>, HandlerError> {
        if self.calls.fetch_add(1, Ordering::SeqCst) >= self.good_batches {
            return Err(HandlerError::transient("database gone"));
        }
        let mut durable = self.durable.lock().unwrap();
        for d in batch {
            durable.insert((d.meta.partition, d.meta.offset));
        }
        Ok(vec![Outcome::Applied; batch.len()])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offset_is_never_committed_before_the_handlers_effects() {
    const PARTITIONS: i32 = 2;
    let k = TestKafka::new(PARTITIONS).await;
    let topic = k.topic(TopicKind::Payments);
    let events = stream(&k, 40);
    for e in &events {
        k.producer.append(e).await.unwrap();
    }
    let group = k.group("durable");
    let mut s = ConsumerSettings::new(group.clone(), vec![topic.clone()]);
    s.batch_max = 10;
    s.batch_linger = Duration::from_millis(5);
    s.pipeline_depth = 2;
    s.retry_backoff = Duration::from_millis(20);
    s.retry_backoff_max = Duration::from_millis(50);
    let calls = Arc::new(AtomicUsize::new(0));
    let durable = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = CancellationToken::new();
    let task = tokio::spawn(run_consumer(
        k.cfg.clone(),
        s.clone(),
        k.producer.clone(),
        FailsAfter {
            good_batches: 3,
            calls: calls.clone(),
            durable: durable.clone(),
        },
        stop.clone(),
    ));
    // The fourth batch keeps failing while later ones wait decoded in the
    // pipeline; the asynchronous commits of the first three land.
    wait_until("the handler fails", Duration::from_secs(60), || {
        calls.load(Ordering::SeqCst) >= 6
    })
    .await;
    // Committed offsets, while it runs and after it stopped, only ever
    // cover durable events: every offset below the committed one of its
    // partition was applied.
    let check = |committed: &[Option<i64>]| {
        let durable = durable.lock().unwrap();
        for (p, c) in (0..PARTITIONS).zip(committed) {
            for o in 0..c.unwrap_or(0) {
                assert!(
                    durable.contains(&(p, o)),
                    "partition {p}: offset {o} committed (up to {c:?}) but never applied"
                );
            }
        }
    };
    for _ in 0..5 {
        check(&committed(&k, &group, &topic, PARTITIONS));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    let stats = task.await.unwrap().unwrap();
    assert_eq!(stats.batches, 3);
    let after = committed(&k, &group, &topic, PARTITIONS);
    check(&after);
    // ...and it reaches exactly the durable ones: the sync commit at
    // shutdown covers every durable batch.
    let durable_now = durable.lock().unwrap().clone();
    for (p, c) in (0..PARTITIONS).zip(&after) {
        let applied = durable_now.iter().filter(|(q, _)| *q == p).count();
        assert_eq!(
            c.unwrap_or(0),
            i64::try_from(applied).unwrap(),
            "partition {p}"
        );
    }

    // A new member of the group gets exactly what was not durable.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let task = tokio::spawn(run_consumer(
        k.cfg.clone(),
        s,
        k.producer.clone(),
        Forward(tx),
        stop.clone(),
    ));
    let rest_n = events.len() - durable_now.len();
    let rest = recv_n(&mut rx, rest_n, Duration::from_secs(60)).await;
    // The group committing the end of every partition means the handler
    // was given everything it would be given.
    testkit::wait_caught_up(&k.cfg, &group, std::slice::from_ref(&topic)).await;
    assert!(
        rx.try_recv().is_err(),
        "a durable event was delivered again"
    );
    let rest: BTreeSet<(i32, i64)> = rest
        .iter()
        .map(|d| (d.meta.partition, d.meta.offset))
        .collect();
    assert_eq!(rest.len(), rest_n);
    assert!(rest.is_disjoint(&durable_now));
    stop.cancel();
    task.await.unwrap().unwrap();
}
