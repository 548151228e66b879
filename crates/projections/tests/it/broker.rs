//! Through the real broker: duplicate delivery, a crash mid-batch, dead
//! letters. Each test runs on both backends.

use crate::harness::*;
use events::{Envelope, TopicKind};
use projections::{Projection, ProjectionHandler, ProjectionsArgs};
use std::sync::Arc;
use std::time::Duration;
use storage::Db;
use streaming::{BatchHandler, Delivered, EventProducer, HandlerError, KafkaConfig, Outcome};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// A fresh database of the backend, as a URL (SQLite's directory is kept
/// alive by the returned guard).
async fn fresh_url(backend: Backend) -> (String, Option<tempfile::TempDir>) {
    testkit::FreshDb::new(backend).await.into_parts()
}

fn topics(cfg: &KafkaConfig) -> Vec<String> {
    let t = cfg.topology();
    vec![
        t.name(TopicKind::Payments),
        t.name(TopicKind::Reconciliation),
    ]
}

fn args(unique: &str, run: &str) -> ProjectionsArgs {
    ProjectionsArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        ledger_group: Some(format!("g{unique}-{run}-ledger")),
        wallet_group: Some(format!("g{unique}-{run}-wallet")),
        batch_size: 50,
    }
}

async fn duplicates_leave_tables_identical(backend: Backend) {
    let (cfg, unique) = test_kafka(3).await;
    let producer = EventProducer::new(&cfg, "test").unwrap();
    let evs = stories(&unique, 15);
    produce_all(&producer, &evs).await;
    let (url, _dir) = fresh_url(backend).await;
    let a = args(&unique, "dup");
    let stop = CancellationToken::new();
    let server = {
        let (cfg, url, a, stop) = (cfg.clone(), url.clone(), a.clone(), stop.clone());
        tokio::spawn(async move { projections::serve(cfg, &url, a, stop).await })
    };
    wait_caught_up(&cfg, a.ledger_group.as_deref().unwrap(), &topics(&cfg)).await;
    wait_caught_up(&cfg, a.wallet_group.as_deref().unwrap(), &topics(&cfg)).await;
    let db = Db::connect(&url).await.unwrap();
    let first = snapshot(&db).await;
    assert_eq!(first["ledger_transactions"].len(), 15 * 4);
    // The same events twice more: 3x in all.
    produce_all(&producer, &evs).await;
    produce_all(&producer, &evs).await;
    wait_caught_up(&cfg, a.ledger_group.as_deref().unwrap(), &topics(&cfg)).await;
    wait_caught_up(&cfg, a.wallet_group.as_deref().unwrap(), &topics(&cfg)).await;
    assert_eq!(snapshot(&db).await, first);
    let report = projections::verify(&db).await;
    assert!(report.is_ok(), "{report}");
    stop.cancel();
    server.await.unwrap().expect("serve ends cleanly");
}

testkit::both!(duplicates, duplicates_leave_tables_identical);

/// Applies `before_crash` batches normally, then applies one more and
/// "dies" before the loop can commit its offset: the task hangs until it is
/// aborted, exactly as a process killed between the database commit and
/// the Kafka commit.
struct CrashAfter {
    inner: ProjectionHandler,
    before_crash: usize,
    crashed: Arc<Notify>,
}

impl BatchHandler for CrashAfter {
    async fn handle(&mut self, batch: &[Delivered]) -> Result<Vec<Outcome>, HandlerError> {
        let out = self.inner.handle(batch).await?;
        if self.before_crash == 0 {
            self.crashed.notify_one();
            std::future::pending::<()>().await;
        }
        self.before_crash -= 1;
        Ok(out)
    }
}

async fn run_groups(cfg: &KafkaConfig, db: &Db, unique: &str, run: &str) {
    let stop = CancellationToken::new();
    let producer = EventProducer::new(cfg, "test").unwrap();
    let mut tasks = Vec::new();
    for p in [Projection::Ledger, Projection::Wallet] {
        let group = format!("g{unique}-{run}-{}", p.as_str());
        let mut s = projections::cli::consumer_settings(cfg, &group, 7);
        s.batch_linger = Duration::from_millis(5);
        tasks.push((
            group,
            tokio::spawn(streaming::run_consumer(
                cfg.clone(),
                s,
                producer.clone(),
                ProjectionHandler::new(db.clone(), p),
                stop.clone(),
            )),
        ));
    }
    for (group, _) in &tasks {
        wait_caught_up(cfg, group, &topics(cfg)).await;
    }
    stop.cancel();
    for (_, t) in tasks {
        t.await.unwrap().unwrap();
    }
}

async fn crash_mid_batch_then_restart(backend: Backend) {
    let (cfg, unique) = test_kafka(2).await;
    let producer = EventProducer::new(&cfg, "test").unwrap();
    let evs: Vec<Envelope> = stories(&unique, 10);
    produce_all(&producer, &evs).await;

    let (url, _dir) = fresh_url(backend).await;
    let db = projections::cli::open(&url).await.unwrap();
    // Crash both projections at different points.
    for (p, before) in [(Projection::Ledger, 3usize), (Projection::Wallet, 5)] {
        let crashed = Arc::new(Notify::new());
        let group = format!("g{unique}-crash-{}", p.as_str());
        let mut s = projections::cli::consumer_settings(&cfg, &group, 7);
        s.batch_linger = Duration::from_millis(5);
        let task = tokio::spawn(streaming::run_consumer(
            cfg.clone(),
            s,
            producer.clone(),
            CrashAfter {
                inner: ProjectionHandler::new(db.clone(), p),
                before_crash: before,
                crashed: crashed.clone(),
            },
            CancellationToken::new(),
        ));
        tokio::time::timeout(Duration::from_secs(60), crashed.notified())
            .await
            .expect("the handler reached its crash point");
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
    }
    let partial = snapshot(&db).await;
    assert!(!partial["applied_events"].is_empty());
    // Restart: the same groups pick up from the last commit.
    run_groups(&cfg, &db, &unique, "crash").await;

    let (clean_url, _clean_dir) = fresh_url(backend).await;
    let clean = projections::cli::open(&clean_url).await.unwrap();
    run_groups(&cfg, &clean, &unique, "clean").await;
    let clean_snap = snapshot(&clean).await;
    assert_eq!(clean_snap["ledger_transactions"].len(), 10 * 4);
    assert_eq!(snapshot(&db).await, clean_snap);
    let report = projections::verify(&db).await;
    assert!(report.is_ok(), "{report}");
}

testkit::both!(crash, crash_mid_batch_then_restart);

async fn bad_events_go_to_the_dlq(backend: Backend) {
    let (cfg, unique) = test_kafka(1).await;
    let producer = EventProducer::new(&cfg, "test").unwrap();
    let topology = cfg.topology();
    let (req, p, o) = request(
        &format!("{unique}-dlq"),
        "buyer-1",
        "seller-1",
        eur(1000),
        10,
    );
    let (_, p2, o2) = request(
        &format!("{unique}-dlq-unknown"),
        "buyer-1",
        "seller-1",
        eur(1000),
        10,
    );
    let bad_fee = succeeded(p, o, "bad-fee", eur(1000), eur(2000), 20);
    let unknown = succeeded(p2, o2, "unknown", eur(1000), eur(1), 20);
    let good = succeeded(p, o, "good", eur(1000), eur(30), 30);
    produce_all(&producer, &[req, bad_fee, unknown]).await;
    producer
        .send_raw(
            &topology.name(TopicKind::Payments),
            Some(b"garbage".as_slice()),
            Some(b"not avro at all".as_slice()),
            rdkafka::message::OwnedHeaders::new(),
            None,
        )
        .await
        .unwrap();
    produce_all(&producer, &[good]).await;

    let (url, _dir) = fresh_url(backend).await;
    let db = projections::cli::open(&url).await.unwrap();
    run_groups(&cfg, &db, &unique, "dlq").await;
    // The partition went on past the bad events: the good capture is booked.
    let snap = snapshot(&db).await;
    assert_eq!(snap["ledger_transactions"].len(), 1, "{snap:?}");
    assert!(projections::verify(&db).await.is_ok());
    // 3 dead letters per group (two rejected, one undecodable), 2 groups.
    let dead = read_dlq(&cfg, 6).await;
    let mut kinds: Vec<String> = dead.iter().map(|(k, _)| k.clone()).collect();
    kinds.sort();
    assert_eq!(
        kinds.iter().filter(|k| *k == "invalid_fee").count(),
        2,
        "{kinds:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| *k == "unknown_order").count(),
        2,
        "{kinds:?}"
    );
    assert!(dead.iter().all(|(_, reason)| !reason.is_empty()));
}

/// (error kind, reason) of `n` dead letters.
async fn read_dlq(cfg: &KafkaConfig, n: usize) -> Vec<(String, String)> {
    use rdkafka::message::Message;
    let consumer = testkit::tail(cfg, &[&cfg.topology().name(TopicKind::DeadLetter)]);
    let mut out = Vec::new();
    while out.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("dead letters arrive")
            .unwrap();
        let headers = streaming::dlq::owned_headers(m.headers());
        let h = |k| {
            streaming::dlq::header_str(&headers, k)
                .unwrap_or_default()
                .to_owned()
        };
        out.push((h("dlq.error_kind"), h("dlq.reason")));
    }
    out
}

testkit::both!(dlq, bad_events_go_to_the_dlq);

/// The child process of `kill_9_mid_run`: runs `serve` until killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by kill_9_mid_run::* as a child process"]
async fn kill9_child() {
    // Outside `kill_9_mid_run` (e.g. `cargo test -- --ignored`) there is
    // nothing to do.
    let Ok(url) = std::env::var("PROJ_CHILD_URL") else {
        return;
    };
    let prefix = std::env::var("PROJ_CHILD_PREFIX").expect("PROJ_CHILD_PREFIX");
    let unique = std::env::var("PROJ_CHILD_UNIQUE").expect("PROJ_CHILD_UNIQUE");
    let cfg = KafkaConfig::local(&brokers(), &prefix, 2);
    let mut a = args(&unique, "kill");
    a.batch_size = 5;
    projections::serve(cfg, &url, a, CancellationToken::new())
        .await
        .unwrap();
}

async fn count_applied(db: &Db) -> usize {
    snapshot(db).await["applied_events"].len()
}

/// A real `kill -9` of a process running `serve`, in the middle of its
/// work; a restart must converge to the tables of a clean run.
async fn kill_9_mid_run(backend: Backend) {
    let (cfg, unique) = test_kafka(2).await;
    let producer = EventProducer::new(&cfg, "test").unwrap();
    let evs = stories(&unique, 40);
    produce_all(&producer, &evs).await;
    let (url, _dir) = fresh_url(backend).await;
    let db = projections::cli::open(&url).await.unwrap();

    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "broker::kill9_child", "--ignored", "--quiet"])
        .env("PROJ_CHILD_URL", &url)
        .env("PROJ_CHILD_PREFIX", &cfg.topic_prefix)
        .env("PROJ_CHILD_UNIQUE", &unique)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    // Both projections together record 2 rows per applied event.
    while count_applied(&db).await < 60 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "child made no progress"
        );
        assert!(child.try_wait().unwrap().is_none(), "child exited early");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let at_kill = count_applied(&db).await;
    assert!(at_kill < 2 * evs.len(), "killed too late to test anything");

    // Restart in-process with the same groups.
    let a = args(&unique, "kill");
    let stop = CancellationToken::new();
    let server = {
        let (cfg, url, a, stop) = (cfg.clone(), url.clone(), a.clone(), stop.clone());
        tokio::spawn(async move { projections::serve(cfg, &url, a, stop).await })
    };
    wait_caught_up(&cfg, a.ledger_group.as_deref().unwrap(), &topics(&cfg)).await;
    wait_caught_up(&cfg, a.wallet_group.as_deref().unwrap(), &topics(&cfg)).await;
    stop.cancel();
    server.await.unwrap().unwrap();

    let (clean_url, _clean_dir) = fresh_url(backend).await;
    let clean = projections::cli::open(&clean_url).await.unwrap();
    run_groups(&cfg, &clean, &unique, "clean").await;
    assert_eq!(snapshot(&db).await, snapshot(&clean).await);
    let report = projections::verify(&db).await;
    assert!(report.is_ok(), "{report}");
}

testkit::both!(kill_9_mid_run, kill_9_mid_run);

/// M4 through the broker: a capture that would take a seller's stored
/// balance beyond i64 is dead-lettered (total_overflow) by both groups and
/// the payment behind it in the same partition is booked. Without the
/// check the wallet's UPSERT fails in the database and the consumer
/// retries the batch forever (the groups never catch up).
async fn total_overflow_is_dead_lettered(backend: Backend) {
    let (cfg, unique) = test_kafka(1).await;
    let producer = EventProducer::new(&cfg, "test").unwrap();
    let (r1, p1, o1) = request(&format!("{unique}-1"), "b1", "seller-big", eur(1000), 10);
    let c1 = succeeded(p1, o1, "captured", eur(1000), eur(0), 11);
    produce_all(&producer, &[r1, c1]).await;
    let (url, _dir) = fresh_url(backend).await;
    let db = projections::cli::open(&url).await.unwrap();
    run_groups(&cfg, &db, &unique, "overflow").await;
    // As after ~9,000 maximal payments to this seller.
    let near = i64::MAX - 500;
    exec(
        &db,
        &format!("UPDATE projection_totals SET total_minor = {near} WHERE party_id = 'seller-big' AND kind = 'seller_balance'"),
    )
    .await
    .unwrap();
    exec(
        &db,
        &format!(
            "UPDATE wallet_balances SET balance_minor = {near} WHERE seller_id = 'seller-big'"
        ),
    )
    .await
    .unwrap();
    let (r2, p2, o2) = request(&format!("{unique}-2"), "b2", "seller-big", eur(1000), 20);
    let c2 = succeeded(p2, o2, "captured", eur(1000), eur(0), 21);
    let (r3, p3, o3) = request(&format!("{unique}-3"), "b3", "seller-ok", eur(400), 30);
    let c3 = succeeded(p3, o3, "captured", eur(400), eur(0), 31);
    produce_all(&producer, &[r2, c2, r3, c3]).await;
    run_groups(&cfg, &db, &unique, "overflow").await;

    let ok = projections::query::wallet(&db, "test-client", "seller-ok")
        .await
        .unwrap();
    assert_eq!(ok.balances[0].balance_minor, 400);
    let big = projections::query::wallet(&db, "test-client", "seller-big")
        .await
        .unwrap();
    assert_eq!(big.balances[0].balance_minor, near);
    let dead = read_dlq(&cfg, 2).await;
    assert!(
        dead.iter()
            .all(|(k, r)| k == "total_overflow" && r.contains("seller-big")),
        "{dead:?}"
    );
}

testkit::both!(total_overflow_dlq, total_overflow_is_dead_lettered);

/// H5: the query API has its own small pool. Queries stuck behind a lock
/// on the ledger (an exclusive lock taken in another session, standing in
/// for slow queries) hold every query connection, yet the wallet group
/// keeps applying events. With one pool shared by queries and consumers,
/// the stuck queries would hold all its connections and the wallet
/// consumer could not get one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_cannot_starve_consumers_postgres() {
    let (cfg, unique) = test_kafka(1).await;
    let (url, _dir) = fresh_url(Backend::Postgres).await;
    let db = projections::cli::open(&url).await.unwrap();
    payment_handler::store::migrate(&db).await.unwrap();
    let ops = payment_handler::store::create_client_with_role(
        &db,
        &events::ClientId::parse("ops").unwrap(),
        payment_handler::store::KeyRole::Operator,
    )
    .await
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut a = args(&unique, "starve");
    a.listen = format!("127.0.0.1:{port}").parse().unwrap();
    let stop = CancellationToken::new();
    let server = {
        let (cfg, url, a, stop) = (cfg.clone(), url.clone(), a.clone(), stop.clone());
        tokio::spawn(async move { projections::serve(cfg, &url, a, stop).await })
    };
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    for i in 0.. {
        if http
            .get(format!("{base}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        assert!(i < 300, "the query API did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let Db::Postgres(pool) = &db else {
        unreachable!()
    };
    let mut locker = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE ledger_transactions IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await
        .unwrap();
    // More stuck queries than the consumers' pool has connections (16).
    let stuck: Vec<_> = (0..40)
        .map(|_| {
            let (http, base, ops) = (http.clone(), base.clone(), ops.clone());
            tokio::spawn(async move {
                http.get(format!("{base}/v1/ledger/accounts/psp_receivable/entries"))
                    .bearer_auth(&ops)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            })
        })
        .collect();
    // Every query connection is stuck behind the lock before any event
    // comes (otherwise the wallet's progress would prove nothing).
    testkit::wait_until(
        "the query pool's connections to wait on the ledger lock",
        Duration::from_secs(30),
        async || lock_waiters(&db).await >= i64::from(projections::cli::QUERY_CONNECTIONS),
    )
    .await;

    let producer = EventProducer::new(&cfg, "test").unwrap();
    produce_all(&producer, &stories(&unique, 10)).await;
    // The wallet does not touch the locked ledger table: it catches up.
    wait_caught_up(&cfg, a.wallet_group.as_deref().unwrap(), &topics(&cfg)).await;
    let w = projections::query::wallet(&db, "test-client", "seller-a")
        .await
        .unwrap();
    assert!(!w.balances.is_empty());

    locker.rollback().await.unwrap();
    wait_caught_up(&cfg, a.ledger_group.as_deref().unwrap(), &topics(&cfg)).await;
    for s in stuck {
        let status = s.await.unwrap().unwrap();
        // Served once the lock went, or refused while saturated.
        assert!(status == 200 || status == 503, "{status}");
    }
    assert!(projections::verify(&db).await.is_ok());
    stop.cancel();
    server.await.unwrap().expect("serve ends cleanly");
}
