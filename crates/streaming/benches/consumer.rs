//! Events per second through `run_consumer` next to a raw rdkafka read +
//! Avro decode of the same topic, measured in the same run on the same
//! broker. Prints figures; asserts nothing about time.
//!
//! Three readers of one topic (`PAYSTREAM_BENCH_EVENTS` events, default
//! 100,000, a mix of every event type, 4 partitions):
//!
//! - raw: one `BaseConsumer` assigned every partition from the beginning,
//!   decoding each payload (no group, no copies, no commits): the ceiling;
//! - loop, trivial handler: `run_consumer` with a handler that only counts
//!   (batches of 1000, the projections' size);
//! - loop, 10 µs/event handler: a handler that takes 10 ms per 1000 events
//!   (an awaited sleep, like a database round trip), so the apply alone
//!   allows 100k events/s; the loop's figure shows how much of the decode
//!   and commit work hides behind it.
//!
//! Each rate is taken from the first event seen to the last, so group join
//! time is not counted against the loop.
//!
//! `cargo bench -p streaming --bench consumer` (needs a broker on
//! 127.0.0.1:9092 or PAYSTREAM_TEST_BROKERS).

#![allow(clippy::float_arithmetic)] // rates for printing

use events::{Envelope, Timestamp};
use futures::StreamExt;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use streaming::{BatchHandler, ConsumerSettings, Delivered, HandlerError, Outcome, run_consumer};
use testkit::TestKafka;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const PARTITIONS: i32 = 4;

fn events(unique: &str, n: usize) -> Vec<Envelope> {
    let mut out = Vec::with_capacity(n + 16);
    let mut i = 0usize;
    while out.len() < n {
        out.extend(events::samples::one_of_each(
            "bench",
            &format!("{unique}-{i}"),
            Timestamp::now(),
        ));
        i += 1;
    }
    out.truncate(n);
    out
}

/// Counts events; with `per_event`, takes that long per event of a batch
/// (one awaited sleep per batch).
struct Counting {
    seen: Arc<AtomicUsize>,
    first: watch::Sender<Option<Instant>>,
    done: watch::Sender<Option<Instant>>,
    target: usize,
    per_event: Duration,
}

impl BatchHandler for Counting {
    async fn handle(&mut self, batch: &[Delivered]) -> Result<Vec<Outcome>, HandlerError> {
        if self.first.borrow().is_none() {
            self.first.send_replace(Some(Instant::now()));
        }
        if !self.per_event.is_zero() {
            let n = u32::try_from(batch.len()).expect("batch fits u32");
            tokio::time::sleep(self.per_event * n).await;
        }
        let seen = self.seen.fetch_add(batch.len(), Ordering::SeqCst) + batch.len();
        if seen >= self.target && self.done.borrow().is_none() {
            self.done.send_replace(Some(Instant::now()));
        }
        Ok(vec![Outcome::Applied; batch.len()])
    }
}

#[allow(clippy::cast_precision_loss)] // a rate for printing
fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

/// Reads `n` messages of `topic` with a group-less consumer, decoding each.
fn raw_read(k: &TestKafka, topic: &str, n: usize) -> Duration {
    let mut c = k.cfg.client_config("bench-raw");
    c.set("group.id", "bench-raw-unused");
    c.set("enable.auto.commit", "false");
    c.set("queued.max.messages.kbytes", "65536");
    c.set("fetch.wait.max.ms", "100");
    let consumer: BaseConsumer = c.create().expect("raw consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let mut got = 0usize;
    let mut first = None;
    while got < n {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                first.get_or_insert_with(Instant::now);
                let env = events::avro::decode(m.payload().unwrap_or_default()).expect("decodes");
                std::hint::black_box(env);
                got += 1;
            }
            Some(Err(e)) => panic!("raw read: {e}"),
            None => {}
        }
    }
    first.expect("read something").elapsed()
}

async fn through_loop(
    k: &TestKafka,
    topic: &str,
    n: usize,
    name: &str,
    per_event: Duration,
) -> Duration {
    let (first_tx, first_rx) = watch::channel(None);
    let (done_tx, mut done_rx) = watch::channel(None);
    let mut settings = ConsumerSettings::new(k.group(name), vec![topic.to_owned()]);
    settings.batch_max = 1000;
    let stop = CancellationToken::new();
    let task = tokio::spawn(run_consumer(
        k.cfg.clone(),
        settings,
        k.producer.clone(),
        Counting {
            seen: Arc::new(AtomicUsize::new(0)),
            first: first_tx,
            done: done_tx,
            target: n,
            per_event,
        },
        stop.clone(),
    ));
    let done = tokio::time::timeout(Duration::from_secs(600), done_rx.wait_for(Option::is_some))
        .await
        .expect("loop finished in time")
        .expect("handler alive")
        .expect("set");
    let first = first_rx.borrow().expect("first batch seen");
    stop.cancel();
    let stats = task.await.expect("loop task").expect("loop");
    assert!(usize::try_from(stats.applied).expect("fits") >= n);
    done - first
}

fn main() {
    let n: usize = std::env::var("PAYSTREAM_BENCH_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let k = TestKafka::new(PARTITIONS).await;
        let topic = k.topic(events::TopicKind::Payments);
        let evs = events(&k.unique, n);
        let t = Instant::now();
        let p = &k.producer;
        let topic_ref = &topic;
        futures::stream::iter(evs.iter())
            .map(|e| async move { p.append_to(topic_ref, e).await.expect("append") })
            .buffer_unordered(5_000)
            .for_each(|_| async {})
            .await;
        println!("produced {n} events in {:.1} s", t.elapsed().as_secs_f64());

        let raw = {
            let (k2, topic2) = (&k, topic.clone());
            tokio::task::block_in_place(|| raw_read(k2, &topic2, n))
        };
        let trivial = through_loop(&k, &topic, n, "trivial", Duration::ZERO).await;
        let slow = through_loop(&k, &topic, n, "slow", Duration::from_micros(10)).await;
        let raw_rate = rate(n, raw);
        println!("raw read + decode:             {:>9.0} events/s", raw_rate);
        let t_rate = rate(n, trivial);
        println!(
            "run_consumer, trivial handler: {:>9.0} events/s ({:.0} % of raw)",
            t_rate,
            100.0 * t_rate / raw_rate
        );
        let s_rate = rate(n, slow);
        println!(
            "run_consumer, 10 µs/event:     {:>9.0} events/s ({:.0} % of the handler's own limit of 100000/s; {:.0} % of raw)",
            s_rate,
            100.0 * s_rate / 100_000.0,
            100.0 * s_rate / raw_rate
        );
    });
}
