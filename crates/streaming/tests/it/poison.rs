//! Poison never stalls a partition: deterministic failures (SQL data and
//! constraint errors, undecodable bytes, out-of-range values, a dead letter
//! too large to produce) are dead-lettered with their reason and the valid
//! messages behind them in the same partition are applied; transient
//! failures are retried, never dead-lettered. Real broker, real databases.

use crate::harness::*;
use events::{Envelope, Timestamp, TopicKind, avro};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use storage::{Db, with_pool};
use streaming::consumer::LoopStats;
use streaming::dlq;
use streaming::{BatchHandler, ConsumerSettings, Delivered, HandlerError, Outcome, run_consumer};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Records each event's `producer` in a table whose `note` column refuses
/// NUL bytes (PostgreSQL) and more than 64 characters (CHECK, both), one
/// transaction per batch, deduplicated by event id: a real handler in
/// miniature. With `gate`, each batch first updates a row the test may
/// hold locked (PostgreSQL lock timeout: a transient failure).
struct SqlHandler {
    db: Db,
    gate: bool,
    attempts: Arc<AtomicUsize>,
}

const SCHEMA: &str = "CREATE TABLE applied (event_id TEXT PRIMARY KEY, note TEXT NOT NULL CHECK (length(note) <= 64))";

async fn apply(db: &Db, batch: &[Delivered], gate: bool) -> Result<Vec<Outcome>, sqlx::Error> {
    with_pool!(db, p => {
        let mut tx = p.begin().await?;
        if gate {
            sqlx::query("SET LOCAL lock_timeout = '100ms'").execute(&mut *tx).await?;
            sqlx::query("UPDATE gate SET n = n + 1 WHERE id = 1").execute(&mut *tx).await?;
        }
        let mut out = Vec::with_capacity(batch.len());
        for d in batch {
            let n = sqlx::query(
                "INSERT INTO applied (event_id, note) VALUES ($1, $2) ON CONFLICT (event_id) DO NOTHING",
            )
            .bind(d.envelope.event_id.to_string())
            .bind(&d.envelope.producer)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            out.push(if n == 1 { Outcome::Applied } else { Outcome::Duplicate });
        }
        tx.commit().await?;
        Ok(out)
    })
}

impl BatchHandler for SqlHandler {
    async fn handle(&mut self, batch: &[Delivered]) -> Result<Vec<Outcome>, HandlerError> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        apply(&self.db, batch, self.gate).await.map_err(|e| {
            HandlerError::classified(storage::deterministic_kind(&e), format!("database: {e}"))
        })
    }
}

async fn applied_ids(db: &Db) -> Vec<String> {
    with_pool!(db, p => sqlx::query_scalar::<_, String>("SELECT event_id FROM applied ORDER BY event_id")
        .fetch_all(p)
        .await
        .unwrap())
}

fn settings(k: &TestKafka, group: &str, topic: TopicKind) -> ConsumerSettings {
    let mut s = ConsumerSettings::new(k.group(group), vec![k.topic(topic)]);
    // Everything produced before the start arrives in one batch, so the
    // poison sits in the middle of it.
    s.batch_linger = Duration::from_secs(1);
    s.retry_backoff = Duration::from_millis(50);
    s.retry_backoff_max = Duration::from_millis(200);
    s
}

/// `n` distinct events (all on the one partition of a 1-partition topic).
fn events_for(k: &TestKafka, key: &str, n: usize) -> Vec<Envelope> {
    let mut out = Vec::new();
    let mut i = 0;
    while out.len() < n {
        out.extend(k.samples(&format!("{key}-{i}")));
        i += 1;
    }
    out.truncate(n);
    for e in &mut out {
        e.producer = "test".into();
    }
    out
}

async fn wait_for<F: AsyncFnMut() -> bool>(what: &str, f: F) {
    testkit::wait_until(what, Duration::from_secs(60), f).await;
}

async fn deterministic_sql_error_case(db: Db, poison_note: &str, expected_kind: &str) {
    with_pool!(&db, p => { sqlx::query(SCHEMA).execute(p).await.unwrap(); });
    let k = TestKafka::new(1).await;
    let topic = k.topic(TopicKind::Payments);
    let mut evs = events_for(&k, "sql", 7);
    evs[3].producer = poison_note.to_owned();
    for e in &evs {
        k.producer.append_to(&topic, e).await.unwrap();
    }
    let attempts = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let task = tokio::spawn(run_consumer(
        k.cfg.clone(),
        settings(&k, "sql", TopicKind::Payments),
        k.producer.clone(),
        SqlHandler {
            db: db.clone(),
            gate: false,
            attempts: attempts.clone(),
        },
        stop.clone(),
    ));
    let mut expected: Vec<String> = evs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3)
        .map(|(_, e)| e.event_id.to_string())
        .collect();
    expected.sort();
    wait_for("the valid events", async || {
        applied_ids(&db).await == expected
    })
    .await;
    let dead = read_topic(&k.cfg, &k.topic(TopicKind::DeadLetter), 1).await;
    stop.cancel();
    let stats: LoopStats = task.await.unwrap().unwrap();

    let d = &dead[0];
    assert_eq!(d.header(dlq::H_ERROR_KIND), Some(expected_kind));
    assert_eq!(d.header(dlq::H_ORIGINAL_OFFSET), Some("3"));
    assert_eq!(d.header(dlq::H_TRUNCATED), None, "a whole copy");
    assert!(
        d.header(dlq::H_REASON).unwrap().starts_with("database: "),
        "{:?}",
        d.header(dlq::H_REASON)
    );
    assert_eq!(d.payload, avro::encode(&evs[3]).unwrap());
    // Every valid event applied once (the failed attempts rolled back).
    assert_eq!(stats.applied, 6, "{stats:?}");
    assert_eq!(stats.duplicates, 0, "{stats:?}");
    assert_eq!(stats.dead_lettered, 1, "{stats:?}");
    assert!(
        attempts.load(Ordering::SeqCst) > 2,
        "the batch was narrowed down"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_byte_on_postgres_dead_letters_only_that_message() {
    let db = testkit::fresh_postgres().await.unwrap();
    // 22021: PostgreSQL text cannot hold 0x00.
    deterministic_sql_error_case(db, "bad\0byte", storage::KIND_DATA).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_violation_on_sqlite_dead_letters_only_that_message() {
    let (db, _dir) = testkit::fresh_sqlite().await.unwrap();
    deterministic_sql_error_case(db, &"x".repeat(65), storage::KIND_INTEGRITY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_timeout_is_retried_not_dead_lettered() {
    let db = testkit::fresh_postgres().await.unwrap();
    let Db::Postgres(p) = &db else { unreachable!() };
    sqlx::query(SCHEMA).execute(p).await.unwrap();
    sqlx::query("CREATE TABLE gate (id INT PRIMARY KEY, n INT NOT NULL)")
        .execute(p)
        .await
        .unwrap();
    sqlx::query("INSERT INTO gate VALUES (1, 0)")
        .execute(p)
        .await
        .unwrap();
    // Hold the gate row: every batch fails with 55P03 until released.
    let mut holder = p.begin().await.unwrap();
    sqlx::query("SELECT n FROM gate WHERE id = 1 FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();

    let k = TestKafka::new(1).await;
    let topic = k.topic(TopicKind::Payments);
    let evs = events_for(&k, "lock", 4);
    for e in &evs {
        k.producer.append_to(&topic, e).await.unwrap();
    }
    let attempts = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let task = tokio::spawn(run_consumer(
        k.cfg.clone(),
        settings(&k, "lock", TopicKind::Payments),
        k.producer.clone(),
        SqlHandler {
            db: db.clone(),
            gate: true,
            attempts: attempts.clone(),
        },
        stop.clone(),
    ));
    wait_for("two failed attempts", async || {
        attempts.load(Ordering::SeqCst) >= 3
    })
    .await;
    assert!(applied_ids(&db).await.is_empty());
    holder.rollback().await.unwrap();

    let mut expected: Vec<String> = evs.iter().map(|e| e.event_id.to_string()).collect();
    expected.sort();
    wait_for("the events", async || applied_ids(&db).await == expected).await;
    // Nothing was dead-lettered.
    read_topic(&k.cfg, &k.topic(TopicKind::DeadLetter), 0).await;
    stop.cancel();
    let stats = task.await.unwrap().unwrap();
    assert_eq!((stats.applied, stats.dead_lettered), (4, 0), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_undecodable_message_is_dead_lettered_as_a_stub() {
    let k = TestKafka::new(1).await;
    let topic = k.topic(TopicKind::Inbound);
    // An upstream writer with a large message.max.bytes and compression:
    // 2 MB of junk compresses far below the broker's limit.
    let mut c = k.cfg.client_config("big-writer");
    c.set("compression.type", "lz4");
    c.set("message.max.bytes", "8000000");
    let writer: FutureProducer = c.create().unwrap();
    let junk: Vec<u8> = (0..2_000_000u32)
        .map(|i| b"not avro at all "[(i % 16) as usize])
        .collect();
    let valid = events_for(&k, "big", 1).remove(0);
    let key = valid.partition_key();
    writer
        .send(
            FutureRecord::to(&topic)
                .key(key.as_bytes())
                .payload(&junk)
                .headers(OwnedHeaders::new().insert(Header {
                    key: "origin",
                    value: Some("upstream"),
                })),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("the broker takes the compressed message");
    k.producer.append_to(&topic, &valid).await.unwrap();

    let (tx, mut rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let task = tokio::spawn(run_consumer(
        k.cfg.clone(),
        settings(&k, "big", TopicKind::Inbound),
        k.producer.clone(),
        Forward(tx),
        stop.clone(),
    ));
    let got = recv_n(&mut rx, 1, Duration::from_secs(60)).await;
    assert_eq!(got[0].envelope.event_id, valid.event_id);
    let dead = read_topic(&k.cfg, &k.topic(TopicKind::DeadLetter), 1).await;
    stop.cancel();
    let stats = task.await.unwrap().unwrap();
    assert_eq!((stats.applied, stats.dead_lettered), (1, 1), "{stats:?}");

    let d = &dead[0];
    let sha: String = Sha256::digest(&junk)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(d.header(dlq::H_TRUNCATED), Some("true"));
    assert_eq!(d.header(dlq::H_ORIGINAL_SIZE), Some("2000000"));
    assert_eq!(d.header(dlq::H_ORIGINAL_SHA256), Some(sha.as_str()));
    assert_eq!(d.header(dlq::H_ERROR_KIND), Some("not_single_object"));
    assert_eq!(d.header(dlq::H_ORIGINAL_OFFSET), Some("0"));
    assert_eq!(
        d.header("origin"),
        Some("upstream"),
        "original headers kept"
    );
    assert!(d.header(dlq::H_STUB_CAUSE).is_some());
    assert_eq!(d.key.as_deref(), Some(key.as_bytes()));
    assert_eq!(d.payload, junk[..dlq::STUB_PAYLOAD_MAX]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_and_out_of_range_timestamps_are_dead_lettered() {
    let k = TestKafka::new(1).await;
    let topic = k.topic(TopicKind::Payments);
    let mut evs = events_for(&k, "bytes", 3);
    // Invalid UTF-8 in a string field: same length, so the Avro length
    // prefix stays right.
    evs[0].producer = "UTF8MARK".into();
    let mut bad_utf8 = avro::encode(&evs[0]).unwrap();
    let at = bad_utf8
        .windows(8)
        .position(|w| w == b"UTF8MARK")
        .expect("marker encoded");
    bad_utf8[at..at + 8].copy_from_slice(b"\xff\xfe\xfd\xfc\xff\xfe\xfd\xfc");
    evs[1].occurred_at = Timestamp::from_micros(i64::MAX);
    let bad_ts = avro::encode(&evs[1]).unwrap();
    let key = evs[2].partition_key();
    for payload in [&bad_utf8, &bad_ts] {
        k.producer
            .send_raw(
                &topic,
                Some(key.as_bytes()),
                Some(payload),
                OwnedHeaders::new(),
                None,
            )
            .await
            .unwrap();
    }
    k.producer.append_to(&topic, &evs[2]).await.unwrap();

    let (tx, mut rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let task = tokio::spawn(run_consumer(
        k.cfg.clone(),
        settings(&k, "bytes", TopicKind::Payments),
        k.producer.clone(),
        Forward(tx),
        stop.clone(),
    ));
    let got = recv_n(&mut rx, 1, Duration::from_secs(60)).await;
    assert_eq!(got[0].envelope.event_id, evs[2].event_id);
    let mut dead = read_topic(&k.cfg, &k.topic(TopicKind::DeadLetter), 2).await;
    stop.cancel();
    let stats = task.await.unwrap().unwrap();
    assert_eq!((stats.applied, stats.dead_lettered), (1, 2), "{stats:?}");
    dead.sort_by_key(|d| d.header(dlq::H_ORIGINAL_OFFSET).map(str::to_owned));
    assert_eq!(dead[0].payload, bad_utf8);
    assert!(dead[0].header(dlq::H_ERROR_KIND).is_some());
    assert_eq!(dead[1].payload, bad_ts);
    assert_eq!(dead[1].header(dlq::H_ERROR_KIND), Some("invalid_field"));
    assert!(
        dead[1]
            .header(dlq::H_REASON)
            .unwrap()
            .contains("occurred_at"),
        "{:?}",
        dead[1].header(dlq::H_REASON)
    );
}
