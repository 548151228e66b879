//! A component is alive only while all of its parts are: when one part (here
//! a consumer that cannot start) ends, the process must not go on serving
//! HTTP and looking healthy; it exits non-zero so an orchestrator restarts
//! it.

use crate::support::{Proc, free_port, handler, wait_healthy};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `group.id` is read only by consumers: with an empty one (applied after
/// the component's own settings) the producer and the admin client start
/// fine, and every consumer of the process fails to start.
const CONSUMERS_FAIL: &str = "group.id=";

fn exits_within(mut proc: Proc, limit: Duration) -> Option<(std::process::ExitStatus, String)> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = proc.0.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = proc.0.stderr.take() {
                std::io::Read::read_to_string(&mut e, &mut err).unwrap();
            }
            return Some((status, err));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

fn serve(component: &str, dir: &tempfile::TempDir, extra: &[&str]) -> Proc {
    let brokers = testkit::brokers();
    let listen = format!("127.0.0.1:{}", free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_paystream"))
        .args(["serve", component, "--listen", &listen])
        .args(extra)
        .env("PAYSTREAM_BROKERS", brokers)
        .env(
            "PAYSTREAM_TOPIC_PREFIX",
            format!("t{}.", uuid::Uuid::now_v7().simple()),
        )
        .env("PAYSTREAM_PARTITIONS", "2")
        .env(
            "PAYSTREAM_DATABASE_URL",
            format!("sqlite://{}", dir.path().join("state.db").display()),
        )
        .env("PAYSTREAM_PSP_URL", "http://127.0.0.1:9")
        .env(
            "PAYSTREAM_PSP_API_KEY",
            "sk_test_liveness_0123456789abcdef0123456789",
        )
        .env(
            "PAYSTREAM_PSP_WEBHOOK_SECRET",
            "whsec_liveness_0123456789abcdef0123456789",
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Proc(child)
}

#[test]
fn the_handler_exits_non_zero_when_a_consumer_cannot_run() {
    let dir = tempfile::tempdir().unwrap();
    let proc = serve("handler", &dir, &["--kafka-option", CONSUMERS_FAIL]);
    let (status, stderr) = exits_within(proc, Duration::from_secs(60))
        .expect("the handler kept running (serving HTTP) with a dead consumer");
    assert!(!status.success(), "exit status {status}: {stderr}");
    assert!(stderr.contains("consumer failed"), "{stderr}");
}

#[test]
fn the_executor_exits_non_zero_when_its_intake_cannot_run() {
    let dir = tempfile::tempdir().unwrap();
    let proc = serve("executor", &dir, &["--kafka-option", CONSUMERS_FAIL]);
    let (status, stderr) = exits_within(proc, Duration::from_secs(60))
        .expect("the executor kept running (serving webhooks) with a dead intake");
    assert!(!status.success(), "exit status {status}: {stderr}");
    assert!(stderr.contains("intake consumer failed"), "{stderr}");
}

#[test]
fn a_healthy_handler_keeps_running() {
    // The control: the same start without the bad option stays up.
    let dir = tempfile::tempdir().unwrap();
    let proc = serve("handler", &dir, &[]);
    assert!(
        exits_within(proc, Duration::from_secs(8)).is_none(),
        "a healthy handler exited"
    );
}

/// Issue 16's availability target: after a kill -9 of a consumer, its
/// partitions are processed again within 10 s of its restart. With a stable
/// `PAYSTREAM_INSTANCE_ID` (static membership) the restarted member takes
/// its partitions back at once; without it the group waits out the dead
/// member's 10 s session timeout first.
#[test]
fn a_consumer_restarted_after_kill_9_with_its_instance_id_resumes_within_10_s() {
    let dir = tempfile::tempdir().unwrap();
    let brokers = testkit::brokers();
    let prefix = format!("t{}.", uuid::Uuid::now_v7().simple());
    let db_url = format!("sqlite://{}", dir.path().join("projections.db").display());
    let start = || {
        Proc(
            Command::new(env!("CARGO_BIN_EXE_paystream"))
                .args(["serve", "projections", "--listen", "127.0.0.1:0"])
                .env("PAYSTREAM_BROKERS", &brokers)
                .env("PAYSTREAM_TOPIC_PREFIX", &prefix)
                .env("PAYSTREAM_PARTITIONS", "2")
                .env("PAYSTREAM_DATABASE_URL", &db_url)
                .env("PAYSTREAM_INSTANCE_ID", "projections-0")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let kafka = streaming::KafkaConfig::local(&brokers, &prefix, 2);
    let producer = streaming::EventProducer::new(&kafka, "liveness-test").unwrap();
    let append = |key: &str| {
        let first = events::samples::one_of_each("liveness-shop", key, events::Timestamp::now())
            .into_iter()
            .next()
            .unwrap();
        rt.block_on(producer.append(&first)).unwrap();
    };
    // Rows of applied_events: both projections record each event.
    let applied = || -> i64 {
        rt.block_on(async {
            let Ok(db) = storage::Db::open_existing(
                &db_url,
                storage::Needs {
                    what: "projections",
                    table: "applied_events",
                },
            )
            .await
            else {
                return 0;
            };
            let n = match &db {
                storage::Db::Sqlite(p) => {
                    sqlx::query_scalar::<_, i64>("SELECT count(*) FROM applied_events")
                        .fetch_one(p)
                        .await
                        .unwrap_or(0)
                }
                storage::Db::Postgres(_) => unreachable!("an SQLite URL"),
            };
            db.close().await;
            n
        })
    };
    let wait_for = |n: i64, limit: Duration| -> Option<Duration> {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if applied() >= n {
                return Some(t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    };

    let first = start();
    append("before-kill");
    wait_for(2, Duration::from_secs(60)).expect("the first event was never applied");
    drop(first); // SIGKILL: no leave-group, no clean shutdown

    let restarted = Instant::now();
    let _second = start();
    append("after-restart");
    wait_for(4, Duration::from_secs(40)).expect("the restarted projections never resumed");
    let resumed = restarted.elapsed();
    assert!(
        resumed < Duration::from_secs(10),
        "partitions processed again {resumed:?} after the restart (target: within 10 s)"
    );
}

/// Issue 16's availability target for the handler: a key held by a handler
/// that died (here: aborted right after appending, before answering) is
/// answered within 10 s of the restart, with the default 120 s lease: the
/// restarted instance sees that the holder's heartbeat stopped instead of
/// waiting the lease out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_a_dead_handler_are_answered_within_10_s_of_its_restart() {
    let brokers = testkit::brokers();
    let db = testkit::fresh_postgres_url().await.unwrap();
    let env = [
        ("PAYSTREAM_BROKERS", brokers),
        (
            "PAYSTREAM_TOPIC_PREFIX",
            format!("t{}.", uuid::Uuid::now_v7().simple()),
        ),
        ("PAYSTREAM_PARTITIONS", "2".to_owned()),
        ("PAYSTREAM_DATABASE_URL", db),
    ];
    let out = Command::new(env!("CARGO_BIN_EXE_paystream"))
        .args(["clients", "create", "shop-takeover"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    assert!(out.status.success());
    let api_key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let http = reqwest::Client::new();
    let body = r#"{"buyer_id":"b-takeover","orders":[{"seller_id":"s1","amount_minor":4200,"currency":"EUR"}],"metadata":{"card_token":"tok_visa"}}"#;
    let post = |base: &str| {
        http.post(format!("{base}/v1/payments"))
            .bearer_auth(&api_key)
            .header("Idempotency-Key", "takeover-key")
            .body(body)
            .send()
    };

    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut dying = handler(&env, port, true);
    wait_healthy(&http, &base).await;
    assert!(
        post(&base).await.is_err(),
        "the dying handler must not answer"
    );
    assert!(!dying.0.wait().unwrap().success());

    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let restarted = Instant::now();
    let _alive = handler(&env, port, false);
    wait_healthy(&http, &base).await;
    let answered = loop {
        let r = post(&base).await.unwrap();
        match r.status().as_u16() {
            201 => break restarted.elapsed(),
            429 => {
                assert!(
                    restarted.elapsed() < Duration::from_secs(30),
                    "still 429 after 30 s: the dead holder's key waits out its lease"
                );
                let wait = r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(1);
                tokio::time::sleep(Duration::from_secs(wait)).await;
            }
            other => panic!("unexpected {other}: {}", r.text().await.unwrap()),
        }
    };
    assert!(
        answered < Duration::from_secs(10),
        "the key was answered {answered:?} after the restart (target: within 10 s)"
    );
}
