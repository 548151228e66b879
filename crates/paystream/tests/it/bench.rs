//! `paystream bench` end to end on both backends: a small load, every
//! payment accepted and final, the ledger verified, and the raw limits
//! measured in the same run, in the JSON a machine reads. The bench leaves
//! no database behind.

use serde_json::Value;
use std::process::Command;

fn bench(database_url: &str) -> Value {
    let brokers = testkit::brokers();
    let out = Command::new(env!("CARGO_BIN_EXE_paystream"))
        .args([
            "bench",
            "--payments",
            "150",
            "--concurrency",
            "8",
            "--partitions",
            "3",
            "--json",
        ])
        .env("PAYSTREAM_BROKERS", brokers)
        .env(
            "PAYSTREAM_TOPIC_PREFIX",
            format!("t{}.", uuid::Uuid::now_v7().simple()),
        )
        .env("PAYSTREAM_DATABASE_URL", database_url)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // Progress goes to stderr; stdout is one JSON document.
    assert!(
        stderr.contains("bench: measuring the raw limits"),
        "{stderr}"
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[allow(clippy::float_arithmetic)] // rates, not money
fn check(r: &Value) {
    assert_eq!(r["ok"], true, "{r:#}");
    assert_eq!(r["payments"]["accepted"], 150, "{r:#}");
    assert_eq!(r["payments"]["not_final"], 0, "{r:#}");
    assert_eq!(r["payments"]["errors"], 0, "{r:#}");
    // Requested, approved, started, succeeded: four events per payment.
    assert_eq!(r["payments"]["events_per_payment"], 4.0, "{r:#}");
    assert_eq!(r["ledger_verify_ok"], true, "{r:#}");
    let p50 = r["post_latency_ms"]["p50"].as_f64().unwrap();
    let p99 = r["post_latency_ms"]["p99"].as_f64().unwrap();
    let max = r["post_latency_ms"]["max"].as_f64().unwrap();
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{r:#}");
    let rate = r["accepted_per_sec"].as_f64().unwrap();
    let produce = r["raw"]["produce"]["payments_per_sec"].as_f64().unwrap();
    let sql = r["raw"]["sql"]["payments_per_sec"].as_f64().unwrap();
    let limit = r["raw"]["limit_payments_per_sec"].as_f64().unwrap();
    assert!(rate > 0.0 && produce > 0.0 && sql > 0.0, "{r:#}");
    assert_eq!(limit, produce.min(sql), "{r:#}");
    let share = r["share_of_raw_limit"].as_f64().unwrap();
    assert!((share - rate / limit).abs() < 1e-9, "{r:#}");
    // The raw SQL write copied every row the run left: at least the
    // handler's, executor's and ledger's rows of each payment.
    assert!(
        r["raw"]["sql"]["items"].as_u64().unwrap() >= 150 * 5,
        "{r:#}"
    );
    // The load's and the pipeline's CPU were seen.
    let cpu = r["cpu_percent_of_one_core_during_load"]
        .as_object()
        .unwrap();
    assert!(cpu.keys().any(|k| k.starts_with("pipeline")), "{r:#}");
    assert!(cpu.keys().any(|k| k.starts_with("load generator")), "{r:#}");
}

#[test]
fn bench_on_sqlite_reports_the_pipeline_beside_its_raw_limits() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("mine.db").display());
    check(&bench(&url));
    // Its own database file, removed afterwards; the named one untouched.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn bench_on_postgres_reports_the_pipeline_beside_its_raw_limits() {
    let admin = std::env::var("PAYSTREAM_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let r = bench(&admin);
    check(&r);
    assert_eq!(r["backend"], "postgres");
    // Its own database, dropped afterwards.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let left: i64 = rt.block_on(async {
        let pool = sqlx::PgPool::connect(&admin).await.unwrap();
        sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
            .bind(format!("paystream_bench_{}", r["run"].as_str().unwrap()))
            .fetch_one(&pool)
            .await
            .unwrap()
    });
    assert_eq!(left, 0);
}
