//! `paystream up`: every component in one process on the embedded default
//! (SQLite), then a demo load of payments with mixed outcomes, and a
//! summary. For a laptop; deployments run each component alone with
//! `paystream serve ...`.

use anyhow::{Context, bail};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashSet};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use streaming::KafkaConfig;
use tokio_util::sync::CancellationToken;

use crate::pipeline;

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Payments in the demo load (0: none, just run).
    #[arg(long, default_value_t = 2000)]
    payments: usize,
    /// Concurrent clients of the demo load.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Keep everything running after the demo, printing the URLs, until
    /// Ctrl-C.
    #[arg(long)]
    keep_running: bool,
    /// Bind random free ports instead of 8080 (handler), 8081
    /// (projections), 8082 (executor) and 8090 (PSP simulator).
    #[arg(long)]
    random_ports: bool,
    /// Give up waiting for payments to become final after this long.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
}

/// The PSP simulator plays an outside party, so it keeps its own state:
/// `sqlite://dir/x.db` → `sqlite://dir/x-psp-sim.db` (any other URL: an
/// SQLite file `paystream-psp-sim.db` in the current folder). Our own
/// components share the one database the user named, so every `paystream`
/// command pointed at it afterwards finds the demo's data.
fn psp_sim_url(url: &str) -> String {
    match url
        .strip_prefix("sqlite://")
        .and_then(|p| p.strip_suffix(".db"))
    {
        Some(stem) => format!("sqlite://{stem}-psp-sim.db"),
        None => "sqlite://paystream-psp-sim.db".to_owned(),
    }
}

/// A small deterministic generator, so every demo run has the same mix.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Card tokens and their share (per mille) of the demo load: the PSP
/// simulator's built-in behaviours plus two fast pending ones.
const CARDS: &[(&str, u64)] = &[
    ("tok_visa", 720),
    ("tok_decline", 80),
    ("tok_flaky_500", 60),
    ("tok_rate_limited", 40),
    ("tok_demo_pending", 50),
    ("tok_demo_pending_fail", 20),
    ("tok_timeout", 30),
];

fn card(mix: &mut Mix) -> &'static str {
    let mut r = mix.below(1000);
    for (token, share) in CARDS {
        if r < *share {
            return token;
        }
        r -= share;
    }
    "tok_visa"
}

const FINAL: &[&str] = &["succeeded", "failed", "partially_succeeded", "rejected"];

pub async fn run(kafka: KafkaConfig, database_url: &str, args: UpArgs) -> anyhow::Result<ExitCode> {
    let stop = CancellationToken::new();
    let opts = pipeline::Options {
        handler: pipeline::port(args.random_ports, 8080)?,
        projections: pipeline::port(args.random_ports, 8081)?,
        executor: pipeline::port(args.random_ports, 8082)?,
        psp: pipeline::port(args.random_ports, 8090)?,
        psp_db_url: psp_sim_url(database_url),
        psp_rules: vec![
            json!({"match": {"card_token": "tok_demo_pending"},
                   "outcome": {"type": "pending", "resolve_after_ms": 3000, "then": "succeed"}}),
            json!({"match": {"card_token": "tok_demo_pending_fail"},
                   "outcome": {"type": "pending", "resolve_after_ms": 3000, "then": "fail"}}),
        ],
        psp_durability: "full",
        webhook_duplicate_percent: 10,
        // Demo: resolve pending orders by polling soon if a webhook is lost.
        pending_poll_after_secs: Some(30),
        projection_batch: 1000,
    };
    let p = pipeline::start(&kafka, database_url, opts, stop.clone()).await?;
    let urls = [
        ("payment API", p.handler_url.clone()),
        ("ledger & wallet API", p.projections_url.clone()),
        ("executor (PSP webhooks)", p.executor_url.clone()),
        ("PSP simulator", p.psp_url.clone()),
    ];
    for (what, url) in &urls {
        println!("{what:<24} {url}");
    }
    let (psp_url, psp_key) = (p.psp_url.clone(), p.psp_key.clone());
    let handler_db = database_url.to_owned();
    let projections_db_url = database_url.to_owned();

    let mut ok = true;
    let first_day = time::OffsetDateTime::now_utc().date();
    let api_key = pipeline::new_client(&handler_db, "demo-shop").await?;
    if args.payments > 0 {
        ok = demo(&api_key, &p.handler_url, &projections_db_url, &args).await?;
        ok &= reconcile_days(&kafka, &projections_db_url, &psp_url, &psp_key, first_day).await?;
    }
    print_next_steps(&kafka, database_url, &urls, &api_key, args.keep_running);
    if args.keep_running {
        println!("running; Ctrl-C to stop");
        runtime::shutdown::on_signals().cancelled().await;
    }
    p.stop().await?;
    println!("stopped cleanly");
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Reconciles the simulator's settlement files of the demo's day(s) (two
/// when it ran over midnight UTC) against the ledger, as the nightly
/// reconciler would; true when nothing is left unresolved.
async fn reconcile_days(
    kafka: &KafkaConfig,
    projections_db_url: &str,
    psp_url: &str,
    psp_key: &runtime::secret::Secret,
    first_day: time::Date,
) -> anyhow::Result<bool> {
    let db = storage::Db::connect(projections_db_url).await?;
    reconcile::migrate(&db).await?;
    let producer = streaming::EventProducer::new(kafka, "paystream-up-reconcile")?;
    let psp = reconcile::PspSource::simulator(psp_url, psp_key.clone());
    let mut clean = true;
    let mut day = first_day;
    while day <= time::OffsetDateTime::now_utc().date() {
        let report = reconcile::reconcile_from_psp(
            &db,
            &producer,
            &psp,
            day,
            reconcile::matching::Tolerance::default(),
        )
        .await
        .with_context(|| format!("reconciling {day}"))?;
        println!(
            "reconciliation {}: {} settlement rows, {} matched, {} discrepancies, {} unresolved: {}",
            report.settlement_date,
            report.rows,
            report.matched,
            report.discrepancies.len(),
            report.unresolved,
            if report.unresolved == 0 && report.discrepancies.is_empty() {
                "clean"
            } else {
                "DIFFERENCES"
            }
        );
        if report.unresolved > 0 || !report.discrepancies.is_empty() {
            println!("{}", report.table());
            clean = false;
        }
        day = day.next_day().context("date overflow")?;
    }
    Ok(clean)
}

struct Submitted {
    payment_id: String,
    key: String,
}

/// The end of the summary: what a new user can try next, ready to paste.
fn print_next_steps(
    kafka: &KafkaConfig,
    database_url: &str,
    urls: &[(&str, String)],
    api_key: &str,
    keep_running: bool,
) {
    let bin_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.display().to_string()));
    let payment_api = urls
        .iter()
        .find(|(what, _)| *what == "payment API")
        .map(|(_, u)| u.clone())
        .unwrap_or_default();
    println!();
    println!("what to try next:");
    if let Some(dir) = bin_dir {
        println!("  export PATH=\"{dir}:$PATH\"   # `paystream` is the binary that just ran");
    }
    // Only what differs from the defaults, so the commands below find the
    // demo's broker, topics and database as written in the README.
    if database_url != DEFAULT_DATABASE_URL {
        println!("  export PAYSTREAM_DATABASE_URL='{database_url}'");
    }
    if kafka.brokers != "localhost:9092" && kafka.brokers != "127.0.0.1:9092" {
        println!("  export PAYSTREAM_BROKERS='{}'", kafka.brokers);
    }
    if kafka.topic_prefix != events::topics::DEFAULT_PREFIX {
        println!("  export PAYSTREAM_TOPIC_PREFIX='{}'", kafka.topic_prefix);
    }
    println!("  paystream projection status      # groups, offsets, lag, rows, dead letters");
    println!("  paystream ledger verify          # the ledger's invariants, exit 1 on a violation");
    println!("  paystream replay --topic payments --format jsonl --out payments.jsonl");
    println!("  paystream dlq list               # what was dead-lettered, and why");
    if keep_running {
        println!("  while this runs, the APIs answer with the demo client's key:");
    } else {
        println!(
            "  the APIs answer while `paystream up --payments 0 --keep-running` runs; the demo client's key stays valid:"
        );
    }
    println!(
        "  curl -s {payment_api}/v1/payments -H 'Authorization: Bearer {api_key}' \\\n    \
         -H 'Idempotency-Key: try-1' -H 'content-type: application/json' \\\n    \
         -d '{{\"buyer_id\":\"b1\",\"orders\":[{{\"seller_id\":\"s1\",\"amount_minor\":1050,\"currency\":\"EUR\"}}],\"metadata\":{{\"card_token\":\"tok_visa\"}}}}'"
    );
}

/// The CLI's default database (`--database-url`): the embedded default.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://paystream.db";

async fn demo(
    api_key: &str,
    base: &str,
    projections_db_url: &str,
    args: &UpArgs,
) -> anyhow::Result<bool> {
    let api_key = api_key.to_owned();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let run = uuid::Uuid::now_v7().simple().to_string();
    let mut mix = Mix(0x9e37_79b9_7f4a_7c15);
    let requests: Vec<(String, String)> = (0..args.payments)
        .map(|i| {
            // 2 % above the default risk rules' per-order limit (50,000 EUR).
            let too_big = mix.below(100) < 2;
            let orders: Vec<Value> = (0..=mix.below(3))
                .map(|_| {
                    let amount = if too_big {
                        6_000_000
                    } else {
                        100 + mix.below(50_000)
                    };
                    json!({"seller_id": format!("seller-{:02}", mix.below(20) + 1),
                           "amount_minor": amount,
                           "currency": "EUR"})
                })
                .collect();
            let body = json!({
                "buyer_id": format!("buyer-{:03}", mix.below(500) + 1),
                "orders": orders,
                "metadata": {"card_token": card(&mut mix)},
            });
            (format!("demo-{run}-{i}"), body.to_string())
        })
        .collect();
    let duplicate_every = 20; // 5 % of the requests are sent twice

    println!(
        "submitting {} payments ({} concurrent clients)...",
        args.payments, args.concurrency
    );
    let started = Instant::now();
    let progress = runtime::progress::Progress::new(
        "payments submitted",
        u64::try_from(requests.len()).unwrap_or(0),
    );
    let chunks: Vec<Vec<(usize, (String, String))>> = {
        let mut c: Vec<Vec<_>> = (0..args.concurrency.max(1)).map(|_| Vec::new()).collect();
        for (i, r) in requests.into_iter().enumerate() {
            c[i % args.concurrency.max(1)].push((i, r));
        }
        c
    };
    let mut tasks = Vec::new();
    for chunk in chunks {
        let (http, base, api_key, progress) = (
            http.clone(),
            base.to_owned(),
            api_key.clone(),
            progress.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut replays = 0u64;
            for (i, (key, body)) in chunk {
                let sends = if i % duplicate_every == 0 { 2 } else { 1 };
                for attempt in 0..sends {
                    let v = post_with_retry(&http, &base, &api_key, &key, &body).await?;
                    if attempt == 0 {
                        let id = v.0["payment_id"]
                            .as_str()
                            .context("payment id in the answer")?
                            .to_owned();
                        out.push(Submitted {
                            payment_id: id,
                            key: key.clone(),
                        });
                    } else if v.1 {
                        replays += 1;
                    }
                }
                progress.inc(1);
            }
            anyhow::Ok((out, replays))
        }));
    }
    let mut submitted = Vec::new();
    let mut replays = 0;
    for t in tasks {
        let (out, r) = t.await??;
        submitted.extend(out);
        replays += r;
    }
    progress.finish();
    let submit_secs = started.elapsed().as_secs_f64();

    // Wait until every payment is final.
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut statuses: BTreeMap<String, (String, Value)> = BTreeMap::new();
    let mut open: HashSet<String> = submitted.iter().map(|s| s.payment_id.clone()).collect();
    while !open.is_empty() && Instant::now() < deadline {
        for id in open.clone() {
            let v: Value = http
                .get(format!("{base}/v1/payments/{id}"))
                .bearer_auth(&api_key)
                .send()
                .await?
                .json()
                .await?;
            let status = v["status"].as_str().unwrap_or("unknown").to_owned();
            if FINAL.contains(&status.as_str()) {
                open.remove(&id);
            }
            statuses.insert(id, (status, v));
        }
        if !open.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let final_secs = started.elapsed().as_secs_f64();

    // A few refunds: half of the first order of every 50th succeeded payment.
    let mut refunds = 0;
    for (i, s) in submitted.iter().enumerate().filter(|(i, _)| i % 50 == 0) {
        let Some((status, v)) = statuses.get(&s.payment_id) else {
            continue;
        };
        if status != "succeeded" {
            continue;
        }
        let order = &v["orders"][0];
        let body = json!({"order_id": order["order_id"], "amount_minor": order["amount_minor"].as_i64().unwrap_or(2) / 2, "reason": "demo partial refund"});
        let r = http
            .post(format!("{base}/v1/payments/{}/refunds", s.payment_id))
            .bearer_auth(&api_key)
            .header("Idempotency-Key", format!("{}-refund-{i}", s.key))
            .body(body.to_string())
            .send()
            .await?;
        if r.status().as_u16() == 201 {
            refunds += 1;
        }
    }

    // Summary.
    let mut by_status: BTreeMap<&str, usize> = BTreeMap::new();
    for (status, _) in statuses.values() {
        *by_status.entry(status.as_str()).or_default() += 1;
    }
    println!();
    println!("payments by final status:");
    for (status, n) in &by_status {
        println!("  {status:<22} {n:>6}");
    }
    println!("  {:<22} {:>6}", "not final", open.len());
    println!("duplicate client retries answered from the idempotency store: {replays}");
    println!("refunds requested: {refunds}");
    #[allow(clippy::float_arithmetic)] // rates, not money
    {
        println!(
            "throughput: {:.0} payments/s accepted; all final after {:.1} s",
            submitted.len() as f64 / submit_secs.max(0.001),
            final_secs
        );
    }

    // Let the projections and refunds settle, then verify the ledger.
    let pdb = projections::cli::open(projections_db_url).await?;
    let mut report = projections::verify(&pdb).await;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let next = projections::verify(&pdb).await;
        let settled = next.is_ok() && format!("{next}") == format!("{report}");
        report = next;
        if settled {
            break;
        }
    }
    let mut sellers = Vec::new();
    for n in 1..=20 {
        let seller = format!("seller-{n:02}");
        let w = projections::query::wallet(&pdb, "demo-shop", &seller).await?;
        let eur = w
            .balances
            .iter()
            .find(|b| b.currency == "EUR")
            .map(|b| b.balance_minor)
            .unwrap_or(0);
        sellers.push((eur, seller));
    }
    sellers.sort_by(|a, b| b.cmp(a));
    println!("top sellers' balances:");
    for (minor, seller) in sellers.iter().take(5) {
        println!(
            "  {seller:<12} {}",
            events::Money::new(*minor, events::Currency::EUR)
        );
    }
    println!(
        "ledger verify: {}",
        if report.is_ok() { "ok" } else { "VIOLATIONS" }
    );
    println!("{report}");
    let all_final = open.is_empty();
    if !all_final {
        println!(
            "{} payments did not become final within {} s",
            open.len(),
            args.timeout_secs
        );
    }
    Ok(all_final && report.is_ok())
}

async fn post_with_retry(
    http: &reqwest::Client,
    base: &str,
    api_key: &str,
    key: &str,
    body: &str,
) -> anyhow::Result<(Value, bool)> {
    for _ in 0..50 {
        let r = http
            .post(format!("{base}/v1/payments"))
            .bearer_auth(api_key)
            .header("Idempotency-Key", key)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await;
        match r {
            Ok(r) if r.status().as_u16() == 201 => {
                let replay = r.headers().get("idempotent-replayed").is_some();
                return Ok((r.json().await?, replay));
            }
            Ok(r) if matches!(r.status().as_u16(), 429 | 503) => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Ok(r) => bail!(
                "payment {key}: {} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            ),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    bail!("payment {key}: no answer after 50 tries")
}
