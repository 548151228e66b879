//! `serve reconciler --once`: fetches the day's file from the PSP over HTTP
//! and reconciles it, as the nightly run does.

use crate::harness::{count, reconciliation_events};
use clap::Parser;
use events::Event;
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    args: reconcile::ReconcilerArgs,
}

async fn once(db_url: String) {
    let k = testkit::TestKafka::new(1).await;
    let dir = tempfile::tempdir().unwrap();
    let sim = psp_sim::spawn(psp_sim::SimConfig::for_tests(format!(
        "sqlite://{}",
        dir.path().join("sim.db").display()
    )))
    .await
    .unwrap();
    let http = reqwest::Client::new();
    for i in 0..2 {
        let r = http
            .post(format!("{}/v1/charges", sim.base_url()))
            .bearer_auth(sim.api_key.expose())
            .header("Idempotency-Key", format!("{}-{i}", k.unique))
            .json(&json!({"amount_minor": 1000 + i, "currency": "EUR", "card_token": "tok_visa", "reference": format!("o-{}-{i}", k.unique)}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
    let today = reconcile::settlement::format_date(time::OffsetDateTime::now_utc().date());
    let cli = Cli::parse_from([
        "reconciler",
        "--psp-url",
        &sim.base_url(),
        "--psp-api-key",
        sim.api_key.expose(),
        "--once",
        "--date",
        &today,
    ]);
    reconcile::serve(k.cfg.clone(), &db_url, cli.args, CancellationToken::new())
        .await
        .unwrap();
    // The ledger knows neither charge.
    let evs = reconciliation_events(&k, 3).await;
    let classes: Vec<String> = evs
        .iter()
        .filter_map(|e| match &e.event {
            Event::ReconciliationDiscrepancyFound(f) => Some(f.class.as_str().to_owned()),
            _ => None,
        })
        .collect();
    assert_eq!(classes, ["missing_in_ledger", "missing_in_ledger"]);
    let db = storage::Db::connect(&db_url).await.unwrap();
    assert_eq!(count(&db, "SELECT COUNT(*) FROM reconcile_runs").await, 1);
    // A missing, short or well-known API key is refused before any work,
    // with how to make one.
    for bad in [None, Some("sk_wrong"), Some("sk_test_default")] {
        let mut argv = vec!["reconciler", "--psp-url", "http://127.0.0.1:1", "--once"];
        if let Some(key) = bad {
            argv.extend(["--psp-api-key", key]);
        }
        let e = reconcile::serve(
            k.cfg.clone(),
            &db_url,
            Cli::parse_from(argv).args,
            CancellationToken::new(),
        )
        .await
        .unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("PAYSTREAM_PSP_API_KEY") && e.contains("openssl rand -hex 32"),
            "{e}"
        );
    }
    // A wrong API key is a clear, final error (no retries on 401).
    let wrong = runtime::secret::Secret::generate("sk_test_");
    let cli = Cli::parse_from([
        "reconciler",
        "--psp-url",
        &sim.base_url(),
        "--psp-api-key",
        wrong.expose(),
        "--once",
    ]);
    let e = reconcile::serve(k.cfg.clone(), &db_url, cli.args, CancellationToken::new())
        .await
        .unwrap_err();
    // With its causes, as the binary prints it (`error: {e:#}`).
    let e = anyhow::Error::from(e);
    assert!(format!("{e:#}").contains("401"), "{e:#}");
    // A failed scheduled run does not move the watermark.
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM reconcile_watermark").await,
        0
    );
    // The schedule's catch-up (--once without --date): first start,
    // today - 1 only; the watermark moves there.
    let day = |n: i64| {
        reconcile::settlement::format_date(
            time::OffsetDateTime::now_utc().date() - time::Duration::days(n),
        )
    };
    let scheduled = || {
        Cli::parse_from([
            "reconciler",
            "--psp-url",
            &sim.base_url(),
            "--psp-api-key",
            sim.api_key.expose(),
            "--once",
        ])
        .args
    };
    reconcile::serve(
        k.cfg.clone(),
        &db_url,
        scheduled(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let watermark = || async {
        match &db {
            storage::Db::Postgres(p) => {
                sqlx::query_scalar::<_, String>("SELECT last_day FROM reconcile_watermark")
                    .fetch_one(p)
                    .await
            }
            storage::Db::Sqlite(p) => {
                sqlx::query_scalar::<_, String>("SELECT last_day FROM reconcile_watermark")
                    .fetch_one(p)
                    .await
            }
        }
        .unwrap()
    };
    assert_eq!(watermark().await, day(1));
    assert_eq!(count(&db, "SELECT COUNT(*) FROM reconcile_runs").await, 2);
    // Missed days (the watermark three days back): each is reconciled,
    // oldest first, and the watermark is back at today - 1.
    crate::harness::exec(
        &db,
        &format!("UPDATE reconcile_watermark SET last_day = '{}'", day(4)),
    )
    .await;
    reconcile::serve(
        k.cfg.clone(),
        &db_url,
        scheduled(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(watermark().await, day(1));
    for n in [3, 2] {
        assert_eq!(
            count(
                &db,
                &format!(
                    "SELECT COUNT(*) FROM reconcile_runs WHERE settlement_date = '{}'",
                    day(n)
                )
            )
            .await,
            1,
            "day {}",
            day(n)
        );
    }
    sim.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_once_fetches_and_reconciles_postgres() {
    once(testkit::fresh_postgres_url().await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_once_fetches_and_reconciles_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    once(format!("sqlite://{}", dir.path().join("r.db").display())).await;
}

/// A PSP answering 503 with `Retry-After: 86400` cannot park the fetch for
/// a day: the wait is capped (`PspSource::max_retry_after`, 60 s by
/// default; 100 ms here), and the next attempt gets the file.
#[tokio::test]
async fn retry_after_is_capped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        for n in 0.. {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let got = sock.read(&mut chunk).await.unwrap();
                if got == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..got]);
            }
            let answer = if n == 0 {
                "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 86400\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned()
            } else {
                "HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nfile".to_owned()
            };
            sock.write_all(answer.as_bytes()).await.unwrap();
            sock.shutdown().await.unwrap();
        }
    });
    let psp = reconcile::PspSource {
        max_retry_after: std::time::Duration::from_millis(100),
        ..reconcile::PspSource::simulator(
            &format!("http://{addr}"),
            runtime::secret::Secret::generate("sk_test_"),
        )
    };
    let date = time::OffsetDateTime::now_utc().date();
    let got = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        reconcile::fetch_settlement(&psp, date),
    )
    .await
    .expect("the fetch waited as long as Retry-After asked")
    .unwrap();
    assert_eq!(got, b"file");
    server.abort();
}
