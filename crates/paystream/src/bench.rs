//! `paystream bench`: the whole pipeline under load, next to the raw limits
//! of the same broker and database measured in the same run.
//!
//! In the spirit of `kafka-producer-perf-test` and `pgbench`: point it at
//! your broker and database. It never touches your data: it makes its own
//! topics (a fresh prefix), its own database (a new PostgreSQL database on
//! the server you name, or a new SQLite file next to the one you name) and
//! drops the database afterwards (`--keep` keeps it).
//!
//! Phases:
//! 1. **pipeline**: handler, executor, projections and the PSP simulator
//!    (0 ms by default, in-memory state) in this process; a load generator
//!    (its own runtime thread) POSTs payments, closed loop over
//!    `--concurrency` clients or open loop at `--rate`;
//! 2. **settle**: seconds until every payment is final (the handler's
//!    payment status) and until the ledger's consumer group has caught up;
//! 3. **raw limits**, on the same broker and database: (a) acked produce
//!    of the same events (the records the run wrote, re-sent as they are,
//!    batched, acks=all) and (b) the raw set-based SQL write of the same
//!    rows (every row the run left in every table, written again into
//!    copies with the same columns and indexes, one statement per table,
//!    one commit). The pipeline's rate is printed as a share of the smaller.

use anyhow::{Context, bail};
use futures::StreamExt;
use rdkafka::message::{Header, OwnedHeaders};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use storage::Db;
use streaming::KafkaConfig;
use tokio_util::sync::CancellationToken;

use crate::pipeline;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Payments to submit (ignored when --duration-secs is given).
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    payments: u64,
    /// Submit for this many seconds instead of a fixed count (a sustained
    /// run, e.g. 60).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    duration_secs: Option<u64>,
    /// Concurrent clients; each sends its next payment when the last one
    /// was answered (closed loop).
    #[arg(long, default_value_t = 64,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100_000))]
    concurrency: usize,
    /// Offered load in payments/s (open loop) instead of as fast as the
    /// clients get answers; latencies are then measured from each payment's
    /// scheduled time, so a stall shows in them.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    rate: Option<u64>,
    /// Orders per payment.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10))]
    orders: u32,
    /// Latency of the PSP simulator's answers, ms.
    #[arg(long, default_value_t = 0)]
    psp_latency_ms: u64,
    /// Topic partitions of the bench's own topics.
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(i32).range(1..=10_000))]
    partitions: i32,
    /// Skip the raw limits (pipeline figures only).
    #[arg(long)]
    no_raw: bool,
    /// Keep the bench's database (its URL is printed) instead of dropping it.
    #[arg(long)]
    keep: bool,
    /// Give up waiting for payments to become final after this long.
    #[arg(long, default_value_t = 600)]
    settle_timeout_secs: u64,
    /// One JSON object on stdout instead of the table (progress still goes
    /// to stderr).
    #[arg(long)]
    json: bool,
}

/// Statuses after which the handler's view of a payment no longer changes.
const FINAL: &[&str] = &["succeeded", "failed", "partially_succeeded", "rejected"];

/// Events read back for the raw produce limit at most (it is a rate).
const RAW_PRODUCE_EVENTS_MAX: usize = 400_000;
/// Events sent for the raw produce limit at least (the run's events again,
/// as often as needed), so a short run still measures a rate, not a warm-up.
const RAW_PRODUCE_EVENTS_MIN: usize = 100_000;
/// Produce requests in flight during the raw produce limit.
const RAW_PRODUCE_IN_FLIGHT: usize = 20_000;

pub async fn run(
    kafka: KafkaConfig,
    database_url: &str,
    args: BenchArgs,
) -> anyhow::Result<ExitCode> {
    let run = uuid::Uuid::now_v7().simple().to_string();
    let run = &run[run.len() - 12..];
    let mut kafka = kafka;
    kafka.topic_prefix = format!("{}bench-{run}.", kafka.topic_prefix);
    kafka.partitions = args.partitions;
    let bench_db = BenchDb::create(database_url, run).await?;
    eprintln!(
        "bench: database {}, topics {}*",
        storage::redact(&bench_db.url),
        kafka.topic_prefix
    );
    let result = measure(&kafka, &bench_db.url, run, &args).await;
    if args.keep {
        eprintln!("bench: kept database {}", storage::redact(&bench_db.url));
    } else if let Err(e) = bench_db.drop().await {
        eprintln!("bench: could not drop the bench database: {e:#}");
    }
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(if report["ok"].as_bool() == Some(true) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn measure(
    kafka: &KafkaConfig,
    db_url: &str,
    run: &str,
    args: &BenchArgs,
) -> anyhow::Result<Value> {
    streaming::admin::ensure_topics(kafka, &kafka.topology().specs())
        .await
        .context("creating the bench's topics")?;
    let psp_dir = std::env::temp_dir().join(format!("paystream-bench-{run}"));
    std::fs::create_dir_all(&psp_dir).context("creating the simulator's folder")?;
    let stop = CancellationToken::new();
    let opts = pipeline::Options {
        handler: pipeline::port(true, 0)?,
        projections: pipeline::port(true, 0)?,
        executor: pipeline::port(true, 0)?,
        psp: pipeline::port(true, 0)?,
        psp_db_url: format!("sqlite://{}", psp_dir.join("psp-sim.db").display()),
        psp_rules: Vec::new(),
        // The simulator is an outside party, not what is measured: a
        // group commit without fsyncs.
        psp_durability: "batched",
        webhook_duplicate_percent: 0,
        pending_poll_after_secs: None,
        projection_batch: 1000,
    };
    let p = pipeline::start(kafka, db_url, with_latency(opts, args.psp_latency_ms), stop).await?;
    let api_key = pipeline::new_client(db_url, "bench-shop").await?;
    let db = Db::connect(db_url).await?;

    // 1. The load.
    let cpu_before = CpuSample::take();
    let cpu_stop = CancellationToken::new();
    let cpu_tracker = CpuSample::track(cpu_stop.clone());
    let load = Load::new(args);
    let started = Instant::now();
    let progress = spawn_progress(kafka.clone(), db.clone(), load.counters.clone(), started);
    let load_result = load.run(p.handler_url.clone(), api_key).await;
    let submit_secs = started.elapsed().as_secs_f64();
    cpu_stop.cancel();
    let cpu_after = cpu_tracker.await?;
    let load_out = load_result?;

    // 2. Settle: every payment final, the ledger caught up.
    let deadline = Instant::now() + Duration::from_secs(args.settle_timeout_secs);
    let mut final_secs = None;
    let mut ledger_secs = None;
    let ledger_group = kafka.topology().group("ledger");
    let topics = vec![
        kafka.topology().name(events::TopicKind::Payments),
        kafka.topology().name(events::TopicKind::Reconciliation),
    ];
    while Instant::now() < deadline && (final_secs.is_none() || ledger_secs.is_none()) {
        if final_secs.is_none() && not_final(&db).await? == 0 {
            final_secs = Some(started.elapsed().as_secs_f64());
        }
        if final_secs.is_some()
            && ledger_secs.is_none()
            && ledger_lag(kafka, &ledger_group, &topics).await? == 0
        {
            ledger_secs = Some(started.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    progress.abort();
    let open = not_final(&db).await?;
    p.stop().await?;
    let verify = {
        let pdb = projections::cli::open(db_url).await?;
        projections::verify(&pdb).await
    };

    let accepted = load_out.accepted;
    let rate = per_sec(accepted, submit_secs);
    let mut lat = load_out.latencies_us;
    lat.sort_unstable();
    let events = topic_events(kafka, &topics).await?;
    let events_per_payment = ratio(events, accepted);

    // 3. Raw limits on the same broker and database.
    let raw = if args.no_raw {
        None
    } else {
        eprintln!("bench: measuring the raw limits (same broker, same database)");
        let produce = raw_produce(kafka, &topics, events_per_payment).await?;
        let sql = raw_sql(&db, accepted).await?;
        Some((produce, sql))
    };
    db.close().await;
    let _ = std::fs::remove_dir_all(&psp_dir);

    let cpu = cpu_after.minus(&cpu_before, submit_secs);
    let mut report = json!({
        "payments": {
            "submitted": load_out.submitted,
            "accepted": accepted,
            "refused": load_out.refused,
            "errors": load_out.errors,
            "not_final": open,
            "orders_per_payment": args.orders,
            "events_per_payment": events_per_payment,
        },
        "load": {
            "concurrency": args.concurrency,
            "rate_offered": args.rate,
            "psp_latency_ms": args.psp_latency_ms,
            "partitions": args.partitions,
            "submit_secs": submit_secs,
        },
        "accepted_per_sec": rate,
        "post_latency_ms": {
            "p50": pct(&lat, 50.0),
            "p99": pct(&lat, 99.0),
            "max": lat.last().map(|&v| ms(v)),
        },
        "secs_until_all_final": final_secs,
        "secs_until_ledger_caught_up": ledger_secs,
        "ledger_verify_ok": verify.is_ok(),
        "cpu_percent_of_one_core_during_load": cpu,
        "backend": if db_url.starts_with("sqlite:") { "sqlite" } else { "postgres" },
        "run": run,
    });
    let mut ok = open == 0 && verify.is_ok() && load_out.errors == 0 && ledger_secs.is_some();
    if let Some((produce, sql)) = raw {
        let limit = produce.payments_per_sec.min(sql.payments_per_sec);
        report["raw"] = json!({
            "produce": produce.json(),
            "sql": sql.json(),
            "limit_payments_per_sec": limit,
            "limited_by": if produce.payments_per_sec <= sql.payments_per_sec { "produce" } else { "sql" },
        });
        #[allow(clippy::float_arithmetic)] // a rate's share, not money
        let share = rate / limit.max(f64::MIN_POSITIVE);
        report["share_of_raw_limit"] = json!(share);
    }
    if !verify.is_ok() {
        eprintln!("bench: ledger verify failed:\n{verify}");
    }
    ok &= accepted > 0;
    report["ok"] = json!(ok);
    Ok(report)
}

#[allow(clippy::float_arithmetic)] // rates, not money
fn per_sec(n: u64, secs: f64) -> f64 {
    n as f64 / secs.max(1e-9)
}

#[allow(clippy::float_arithmetic)]
fn ratio(a: u64, b: u64) -> f64 {
    a as f64 / (b.max(1)) as f64
}

#[allow(clippy::float_arithmetic)]
fn ms(us: u32) -> f64 {
    f64::from(us) / 1000.0
}

#[allow(
    clippy::float_arithmetic,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]
fn pct(sorted: &[u32], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 * p / 100.0).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some(ms(sorted[i]))
}

fn with_latency(mut opts: pipeline::Options, latency_ms: u64) -> pipeline::Options {
    if latency_ms > 0 {
        opts.psp_rules.push(json!({
            "match": {},
            "latency_ms": {"min": latency_ms, "max": latency_ms},
            "outcome": {"type": "succeed"}
        }));
    }
    opts
}

/// The bench's own database, dropped at the end.
struct BenchDb {
    url: String,
    admin: Option<String>,
    name: String,
}

impl BenchDb {
    async fn create(base_url: &str, run: &str) -> anyhow::Result<BenchDb> {
        if let Some(path) = base_url.strip_prefix("sqlite://") {
            let path = path.split('?').next().unwrap_or(path);
            let dir = std::path::Path::new(path)
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            let file = dir.join(format!("paystream-bench-{run}.db"));
            return Ok(BenchDb {
                url: format!("sqlite://{}", file.display()),
                admin: None,
                name: file.display().to_string(),
            });
        }
        if !(base_url.starts_with("postgres://") || base_url.starts_with("postgresql://")) {
            bail!("unsupported database URL {base_url:?}: expected postgres://... or sqlite://...");
        }
        let name = format!("paystream_bench_{run}");
        let admin = Db::connect(base_url)
            .await
            .context("connecting to the database server")?;
        let Db::Postgres(pool) = &admin else {
            bail!("expected PostgreSQL");
        };
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(pool)
            .await
            .with_context(|| format!("creating the bench database {name} (needs CREATEDB)"))?;
        admin.close().await;
        let (head, query) = match base_url.split_once('?') {
            Some((h, q)) => (h, format!("?{q}")),
            None => (base_url, String::new()),
        };
        let server = head
            .rsplit_once('/')
            .map(|(b, _)| b)
            .filter(|b| !b.ends_with('/'))
            .unwrap_or(head);
        Ok(BenchDb {
            url: format!("{server}/{name}{query}"),
            admin: Some(base_url.to_owned()),
            name,
        })
    }

    async fn drop(self) -> anyhow::Result<()> {
        match self.admin {
            None => {
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", self.name));
                }
                Ok(())
            }
            Some(admin) => {
                let db = Db::connect(&admin).await?;
                if let Db::Postgres(pool) = &db {
                    sqlx::query(&format!(
                        "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                        self.name
                    ))
                    .execute(pool)
                    .await?;
                }
                db.close().await;
                Ok(())
            }
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    submitted: AtomicU64,
    accepted: AtomicU64,
}

struct Load {
    payments: u64,
    duration: Option<Duration>,
    concurrency: usize,
    rate: Option<u64>,
    orders: u32,
    counters: Arc<Counters>,
}

#[derive(Debug, Default)]
struct LoadOut {
    submitted: u64,
    accepted: u64,
    refused: u64,
    errors: u64,
    latencies_us: Vec<u32>,
}

impl Load {
    fn new(args: &BenchArgs) -> Load {
        Load {
            payments: args.payments,
            duration: args.duration_secs.map(Duration::from_secs),
            concurrency: args.concurrency,
            rate: args.rate,
            orders: args.orders,
            counters: Arc::new(Counters::default()),
        }
    }

    /// Runs the load on a runtime of its own (thread `bench-load`), so its
    /// CPU is counted apart from the pipeline's.
    async fn run(self, base: String, api_key: String) -> anyhow::Result<LoadOut> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("bench-load".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("bench-load")
                    .enable_all()
                    .build();
                let out = match rt {
                    Ok(rt) => rt.block_on(self.drive(base, api_key)),
                    Err(e) => Err(e.into()),
                };
                let _ = tx.send(out);
            })
            .context("starting the load thread")?;
        rx.await
            .context("the load thread ended without an answer")?
    }

    async fn drive(self, base: String, api_key: String) -> anyhow::Result<LoadOut> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(self.concurrency)
            .build()?;
        let next = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let this = Arc::new(self);
        let mut tasks = Vec::new();
        for _ in 0..this.concurrency {
            let (this, http, next, base, key) = (
                this.clone(),
                http.clone(),
                next.clone(),
                base.clone(),
                api_key.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut out = LoadOut::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if this.duration.is_none() && i >= this.payments {
                        break;
                    }
                    let due = this.due(started, i);
                    if let Some(d) = this.duration
                        && due.duration_since(started) >= d
                    {
                        break;
                    }
                    tokio::time::sleep_until(due.into()).await;
                    let t0 = if this.rate.is_some() {
                        due
                    } else {
                        Instant::now()
                    };
                    out.submitted += 1;
                    this.counters.submitted.fetch_add(1, Ordering::Relaxed);
                    match post(&http, &base, &key, i, this.orders).await {
                        Ok(201) => {
                            out.accepted += 1;
                            this.counters.accepted.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => out.refused += 1,
                        Err(e) => {
                            if out.errors == 0 {
                                eprintln!("bench: a request failed: {e:#}");
                            }
                            out.errors += 1;
                        }
                    }
                    let us = t0.elapsed().as_micros();
                    out.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                }
                out
            }));
        }
        let mut all = LoadOut::default();
        for t in tasks {
            let o = t.await?;
            all.submitted += o.submitted;
            all.accepted += o.accepted;
            all.refused += o.refused;
            all.errors += o.errors;
            all.latencies_us.extend(o.latencies_us);
        }
        Ok(all)
    }

    /// When payment `i` is due: now (closed loop) or on the rate's schedule.
    fn due(&self, started: Instant, i: u64) -> Instant {
        match self.rate {
            None => Instant::now(),
            Some(rate) => started + Duration::from_nanos(i.saturating_mul(1_000_000_000) / rate),
        }
    }
}

/// One payment: a distinct buyer per 64 payments (the default velocity
/// rule allows a buyer 10 per minute, so buyers never trip it in a bench),
/// 100 sellers, amounts within the default limits.
async fn post(
    http: &reqwest::Client,
    base: &str,
    api_key: &str,
    i: u64,
    orders: u32,
) -> anyhow::Result<u16> {
    let orders: Vec<Value> = (0..u64::from(orders))
        .map(|o| {
            json!({"seller_id": format!("seller-{:03}", (i + o) % 100),
                   "amount_minor": 100 + (i * 7919 + o) % 40_000,
                   "currency": "EUR"})
        })
        .collect();
    let body = json!({
        "buyer_id": format!("buyer-{i}"),
        "orders": orders,
        "metadata": {"card_token": "tok_visa"},
    });
    let key = format!("bench-{i}");
    for _ in 0..100 {
        let r = http
            .post(format!("{base}/v1/payments"))
            .bearer_auth(api_key)
            .header("Idempotency-Key", &key)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await;
        match r {
            Ok(r) if matches!(r.status().as_u16(), 429 | 503) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Ok(r) => {
                let status = r.status().as_u16();
                if status != 201 {
                    bail!(
                        "payment {key}: {status} {}",
                        r.text().await.unwrap_or_default()
                    );
                }
                return Ok(status);
            }
            Err(e) => return Err(e).context("POST /v1/payments"),
        }
    }
    bail!("payment {key}: still 429/503 after 100 tries")
}

async fn not_final(db: &Db) -> anyhow::Result<i64> {
    let list = FINAL
        .iter()
        .map(|s| format!("'{s}'"))
        .collect::<Vec<_>>()
        .join(",");
    let sql = format!("SELECT count(*) FROM handler_payments WHERE status NOT IN ({list})");
    let n: i64 = storage::with_pool!(db, p => sqlx::query_scalar(&sql).fetch_one(p).await)?;
    Ok(n)
}

async fn ledger_lag(kafka: &KafkaConfig, group: &str, topics: &[String]) -> anyhow::Result<i64> {
    let rows = ops::groups::offsets(kafka, group, topics).await?;
    Ok(rows.iter().map(ops::groups::PartitionOffsets::lag).sum())
}

async fn topic_events(kafka: &KafkaConfig, topics: &[String]) -> anyhow::Result<u64> {
    let mut n = 0u64;
    for t in topics {
        let (kafka, t) = (kafka.clone(), t.clone());
        let marks = tokio::task::spawn_blocking(move || streaming::reader::watermarks(&kafka, &t))
            .await??;
        n += marks
            .iter()
            .map(|(_, lo, hi)| u64::try_from(hi - lo).unwrap_or(0))
            .sum::<u64>();
    }
    Ok(n)
}

fn spawn_progress(
    kafka: KafkaConfig,
    db: Db,
    counters: Arc<Counters>,
    started: Instant,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let group = kafka.topology().group("ledger");
        let topics = vec![kafka.topology().name(events::TopicKind::Payments)];
        let mut last = (0u64, Instant::now());
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let accepted = counters.accepted.load(Ordering::Relaxed);
            let now = Instant::now();
            #[allow(clippy::float_arithmetic)]
            let rate = (accepted - last.0) as f64 / now.duration_since(last.1).as_secs_f64();
            last = (accepted, now);
            let open = not_final(&db).await.unwrap_or(-1);
            let lag = ledger_lag(&kafka, &group, &topics).await.unwrap_or(-1);
            eprintln!(
                "bench: {:>5.0} s  {accepted} accepted ({rate:.0}/s)  {open} not final  ledger lag {lag}",
                started.elapsed().as_secs_f64()
            );
        }
    })
}

#[derive(Debug)]
struct RawFigure {
    what: &'static str,
    items: u64,
    secs: f64,
    payments_per_sec: f64,
}

impl RawFigure {
    fn json(&self) -> Value {
        json!({"what": self.what, "items": self.items, "secs": self.secs,
               "payments_per_sec": self.payments_per_sec})
    }
}

/// (a) The run's own records, re-sent as they are to a topic of the same
/// partitions: batched, idempotent, acks=all, as our producers send.
async fn raw_produce(
    kafka: &KafkaConfig,
    topics: &[String],
    events_per_payment: f64,
) -> anyhow::Result<RawFigure> {
    let mut reader = streaming::reader::TopicReader::open(
        kafka,
        &topics[..1],
        streaming::reader::Start::Beginning,
        streaming::reader::End::Latest,
        None,
    )
    .await?;
    let mut records = Vec::new();
    while records.len() < RAW_PRODUCE_EVENTS_MAX {
        match reader.next_batch(10_000).await? {
            Some(b) => records.extend(b),
            None => break,
        }
    }
    records.truncate(RAW_PRODUCE_EVENTS_MAX);
    let raw_topic = format!("{}raw-produce", kafka.topic_prefix);
    streaming::admin::ensure_topics(
        kafka,
        &[events::topics::TopicSpec {
            kind: events::TopicKind::Payments,
            name: raw_topic.clone(),
            partitions: kafka.partitions,
        }],
    )
    .await?;
    if records.is_empty() {
        bail!("the run left no events to measure the raw produce limit with");
    }
    let producer = streaming::EventProducer::new(kafka, "paystream-bench-raw")?;
    // Warm up: connections and metadata, outside the measurement.
    for r in records.iter().take(100) {
        producer
            .send_raw(
                &raw_topic,
                r.key.as_deref(),
                Some(&r.payload),
                OwnedHeaders::new(),
                r.timestamp_ms,
            )
            .await?;
    }
    let target = records
        .len()
        .clamp(RAW_PRODUCE_EVENTS_MIN, RAW_PRODUCE_EVENTS_MAX);
    let started = Instant::now();
    let mut sends = futures::stream::iter(records.iter().cycle().take(target).map(|r| {
        let mut headers = OwnedHeaders::new();
        for (k, v) in &r.headers {
            headers = headers.insert(Header {
                key: k,
                value: v.as_deref(),
            });
        }
        producer.send_raw(
            &raw_topic,
            r.key.as_deref(),
            Some(&r.payload),
            headers,
            r.timestamp_ms,
        )
    }))
    .buffer_unordered(RAW_PRODUCE_IN_FLIGHT);
    let mut n = 0u64;
    while let Some(r) = sends.next().await {
        r?;
        n += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    #[allow(clippy::float_arithmetic)]
    let payments_per_sec = per_sec(n, secs) / events_per_payment.max(f64::MIN_POSITIVE);
    Ok(RawFigure {
        what: "acked produce of the run's events (acks=all, idempotent, batched)",
        items: n,
        secs,
        payments_per_sec,
    })
}

/// (b) Every row the run left in the database written again, set-based:
/// into copies of each table with the same columns and indexes, one
/// `INSERT … SELECT` per table, all in one transaction (one commit).
async fn raw_sql(db: &Db, payments: u64) -> anyhow::Result<RawFigure> {
    let tables: Vec<String> = match db {
        Db::Postgres(p) => {
            sqlx::query_scalar(
                "SELECT tablename::text FROM pg_tables WHERE schemaname = current_schema() \
                 AND tablename NOT LIKE '\\_sqlx%' ORDER BY 1",
            )
            .fetch_all(p)
            .await?
        }
        Db::Sqlite(p) => {
            sqlx::query_scalar(
                "SELECT name FROM sqlite_master WHERE type = 'table' \
                 AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' AND name NOT LIKE '\\_sqlx%' ESCAPE '\\' ORDER BY 1",
            )
            .fetch_all(p)
            .await?
        }
    };
    let mut copies = Vec::new();
    let mut rows = 0u64;
    for t in &tables {
        let sql = format!("SELECT count(*) FROM \"{t}\"");
        let n: i64 = storage::with_pool!(db, p => sqlx::query_scalar(&sql).fetch_one(p).await)?;
        if n == 0 {
            continue;
        }
        rows += u64::try_from(n).unwrap_or(0);
        let raw = format!("bench_raw_{t}");
        create_copy(db, t, &raw).await?;
        copies.push((t.clone(), raw));
    }
    let started = Instant::now();
    match db {
        Db::Postgres(p) => {
            let mut tx = p.begin().await?;
            for (t, raw) in &copies {
                sqlx::query(&format!(
                    "INSERT INTO \"{raw}\" OVERRIDING SYSTEM VALUE SELECT * FROM \"{t}\""
                ))
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
        }
        Db::Sqlite(p) => {
            let mut c = p.acquire().await?;
            sqlx::query("BEGIN IMMEDIATE").execute(&mut *c).await?;
            for (t, raw) in &copies {
                sqlx::query(&format!("INSERT INTO \"{raw}\" SELECT * FROM \"{t}\""))
                    .execute(&mut *c)
                    .await?;
            }
            sqlx::query("COMMIT").execute(&mut *c).await?;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(RawFigure {
        what: "set-based SQL write of the run's rows (same columns and indexes, one commit)",
        items: rows,
        secs,
        payments_per_sec: per_sec(payments, secs),
    })
}

/// An empty table like `t`, with its columns, constraints and indexes (not
/// its foreign keys on PostgreSQL, nor its triggers: they cost nothing on
/// insert here).
async fn create_copy(db: &Db, t: &str, raw: &str) -> anyhow::Result<()> {
    match db {
        Db::Postgres(p) => {
            sqlx::query(&format!(
                "CREATE TABLE \"{raw}\" (LIKE \"{t}\" INCLUDING ALL)"
            ))
            .execute(p)
            .await?;
        }
        Db::Sqlite(p) => {
            let ddl: Vec<(String, Option<String>)> = sqlx::query_as(
                "SELECT type, sql FROM sqlite_master WHERE tbl_name = ? AND type IN ('table','index') \
                 ORDER BY type = 'index'",
            )
            .bind(t)
            .fetch_all(p)
            .await?;
            for (kind, sql) in ddl {
                let Some(sql) = sql else { continue };
                let sql = if kind == "table" {
                    rename_table_ddl(&sql, t, raw)
                } else {
                    rename_index_ddl(&sql, t, raw)
                }
                .with_context(|| format!("copying the schema of {t}: {sql}"))?;
                sqlx::query(&sql).execute(p).await?;
            }
        }
    }
    Ok(())
}

/// `CREATE TABLE [IF NOT EXISTS] t (...)` → the same for `raw`.
fn rename_table_ddl(sql: &str, t: &str, raw: &str) -> anyhow::Result<String> {
    let open = sql.find('(').context("no column list")?;
    let head = &sql[..open];
    if !head.contains(t) {
        bail!("table name not found");
    }
    Ok(format!("{}{}", head.replacen(t, raw, 1), &sql[open..]))
}

/// `CREATE [UNIQUE] INDEX name ON t (...)` → index `raw_name` on `raw`.
fn rename_index_ddl(sql: &str, t: &str, raw: &str) -> anyhow::Result<String> {
    let on = sql.find(" ON ").context("no ON clause")?;
    let open = sql[on..].find('(').context("no column list")? + on;
    let head = &sql[..on];
    let name_at = head.rfind(' ').context("no index name")? + 1;
    let name = head[name_at..].trim_matches('"');
    if sql[on + 4..open].trim().trim_matches('"') != t {
        bail!("the index is not on {t}");
    }
    Ok(format!(
        "{}\"bench_raw_{name}\" ON \"{raw}\" {}",
        &head[..name_at],
        &sql[open..]
    ))
}

/// CPU time in ns of every thread of this process (`schedstat`: exact, so
/// a thread that worked a few ms still counts) and of the broker's and
/// PostgreSQL's processes (`stat`: utime + stime, in clock ticks), keyed by
/// thread/process id. Threads that end between samples keep their last
/// reading, so a sampler that runs during the load (`track`) accounts for
/// them too.
#[derive(Debug, Clone, Default)]
struct CpuSample(BTreeMap<String, (&'static str, u64)>);

const NS_PER_CLOCK_TICK: u64 = 10_000_000;

impl CpuSample {
    fn take() -> CpuSample {
        let mut s = CpuSample::default();
        s.update();
        s
    }

    fn update(&mut self) {
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for t in tasks.flatten() {
                if let Some((comm, ticks)) = stat(&t.path().join("stat")) {
                    let ns = std::fs::read_to_string(t.path().join("schedstat"))
                        .ok()
                        .and_then(|s| s.split(' ').next()?.parse().ok())
                        .unwrap_or(ticks * NS_PER_CLOCK_TICK);
                    let key = format!("t{}", t.file_name().to_string_lossy());
                    self.0.insert(key, (thread_group(&comm), ns));
                }
            }
        }
        if let Ok(procs) = std::fs::read_dir("/proc") {
            for p in procs.flatten() {
                let name = p.file_name().to_string_lossy().into_owned();
                if !name.bytes().all(|b| b.is_ascii_digit()) {
                    continue;
                }
                if let Some((comm, ticks)) = stat(&p.path().join("stat")) {
                    let group = match comm.as_str() {
                        "nisshi" => "broker (nisshi)",
                        c if c.starts_with("postgres") => "PostgreSQL",
                        _ => continue,
                    };
                    self.0
                        .insert(format!("p{name}"), (group, ticks * NS_PER_CLOCK_TICK));
                }
            }
        }
    }

    /// Samples every 250 ms until `stop`, then once more.
    fn track(stop: CancellationToken) -> tokio::task::JoinHandle<CpuSample> {
        tokio::spawn(async move {
            let mut s = CpuSample::take();
            while !stop.is_cancelled() {
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
                s.update();
            }
            s
        })
    }

    /// % of one core per group between two samples `secs` apart.
    #[allow(clippy::float_arithmetic)]
    fn minus(&self, before: &CpuSample, secs: f64) -> BTreeMap<String, f64> {
        let mut by_group: BTreeMap<&str, u64> = BTreeMap::new();
        for (k, (group, v)) in &self.0 {
            let b = before.0.get(k).map(|(_, b)| *b).unwrap_or(0);
            *by_group.entry(group).or_default() += v.saturating_sub(b);
        }
        by_group
            .into_iter()
            .map(|(k, d)| {
                let pct = d as f64 / 1e9 / secs.max(1e-9) * 100.0;
                (k.to_owned(), (pct * 10.0).round() / 10.0)
            })
            .filter(|(_, v)| *v > 0.0)
            .collect()
    }
}

fn thread_group(comm: &str) -> &'static str {
    if comm.starts_with("bench-load") {
        "load generator (this process)"
    } else if comm.starts_with("rdk:")
        || comm.starts_with("paystream-poll")
        || comm.starts_with("producer poll")
    {
        "Kafka client threads: librdkafka, polling (this process)"
    } else if comm.starts_with("sqlx-sqlite") {
        "SQLite threads (this process)"
    } else if comm.starts_with("tokio-r") {
        "pipeline: handler, executor, projections, simulator (this process)"
    } else {
        "other threads (this process)"
    }
}

/// (comm, utime + stime) from a `/proc/.../stat` file.
fn stat(path: &std::path::Path) -> Option<(String, u64)> {
    let s = std::fs::read_to_string(path).ok()?;
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s[open + 1..close].to_owned();
    let fields: Vec<&str> = s[close + 2..].split(' ').collect();
    // After the comm: state is field 3; utime and stime are fields 14, 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

#[allow(clippy::float_arithmetic)] // a share in %, not money
fn print_report(r: &Value) {
    let f = |v: &Value| {
        v.as_f64()
            .map(|x| format!("{x:.1}"))
            .unwrap_or_else(|| "-".into())
    };
    let pay = &r["payments"];
    println!("paystream bench ({})", r["backend"].as_str().unwrap_or("?"));
    println!(
        "  payments        {} accepted, {} refused, {} errors, {} not final  ({} order(s), {:.2} events each)",
        pay["accepted"],
        pay["refused"],
        pay["errors"],
        pay["not_final"],
        pay["orders_per_payment"],
        pay["events_per_payment"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  load            {} clients{}, PSP {} ms, {} partitions, {} s",
        r["load"]["concurrency"],
        r["load"]["rate_offered"]
            .as_u64()
            .map(|x| format!(" at {x}/s offered"))
            .unwrap_or_default(),
        r["load"]["psp_latency_ms"],
        r["load"]["partitions"],
        f(&r["load"]["submit_secs"])
    );
    println!("  accepted        {} payments/s", f(&r["accepted_per_sec"]));
    println!(
        "  POST latency    p50 {} ms  p99 {} ms  max {} ms",
        f(&r["post_latency_ms"]["p50"]),
        f(&r["post_latency_ms"]["p99"]),
        f(&r["post_latency_ms"]["max"])
    );
    println!("  all final after {} s", f(&r["secs_until_all_final"]));
    println!(
        "  ledger caught up after {} s",
        f(&r["secs_until_ledger_caught_up"])
    );
    println!(
        "  ledger verify   {}",
        if r["ledger_verify_ok"].as_bool() == Some(true) {
            "ok"
        } else {
            "VIOLATIONS"
        }
    );
    if let Some(raw) = r.get("raw") {
        println!("  raw limits, same broker and database, this run:");
        for k in ["produce", "sql"] {
            let x = &raw[k];
            println!(
                "    {:<8} {:>10} payments/s  ({} items in {} s: {})",
                k,
                f(&x["payments_per_sec"]),
                x["items"],
                f(&x["secs"]),
                x["what"].as_str().unwrap_or("")
            );
        }
        println!(
            "    limit    {:>10} payments/s ({}); the pipeline reached {:.0} % of it",
            f(&raw["limit_payments_per_sec"]),
            raw["limited_by"].as_str().unwrap_or(""),
            r["share_of_raw_limit"].as_f64().unwrap_or(0.0) * 100.0
        );
    }
    println!("  where the cores went during the load (% of one core):");
    if let Some(cpu) = r["cpu_percent_of_one_core_during_load"].as_object() {
        for (k, v) in cpu {
            println!("    {:>6}  {k}", f(v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_ddl_is_renamed_to_the_copy() {
        let t = rename_table_ddl(
            "CREATE TABLE ledger_entries (seq INTEGER, account TEXT REFERENCES ledger_accounts(id))",
            "ledger_entries",
            "bench_raw_ledger_entries",
        )
        .unwrap();
        assert_eq!(
            t,
            "CREATE TABLE bench_raw_ledger_entries (seq INTEGER, account TEXT REFERENCES ledger_accounts(id))"
        );
        let i = rename_index_ddl(
            "CREATE UNIQUE INDEX \"entries_by_account\" ON ledger_entries (account, seq)",
            "ledger_entries",
            "bench_raw_ledger_entries",
        )
        .unwrap();
        assert_eq!(
            i,
            "CREATE UNIQUE INDEX \"bench_raw_entries_by_account\" ON \"bench_raw_ledger_entries\" (account, seq)"
        );
        assert!(rename_table_ddl("CREATE TABLE x AS SELECT 1", "y", "z").is_err());
    }

    #[test]
    fn zero_or_out_of_range_loads_are_refused_with_the_flag_named() {
        use clap::Parser;
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchArgs,
        }
        assert!(Cli::try_parse_from(["bench"]).is_ok());
        for (flag, value) in [
            ("--payments", "0"),
            ("--duration-secs", "0"),
            ("--concurrency", "0"),
            ("--rate", "0"),
            ("--orders", "11"),
            ("--partitions", "0"),
        ] {
            let e = Cli::try_parse_from(["bench", flag, value]).unwrap_err();
            assert!(e.to_string().contains(flag), "{flag}: {e}");
        }
    }

    #[test]
    fn percentiles_pick_the_rank() {
        let v: Vec<u32> = (1..=100).map(|x| x * 1000).collect();
        assert_eq!(pct(&v, 50.0), Some(50.0));
        assert_eq!(pct(&v, 99.0), Some(99.0));
        assert_eq!(pct(&v, 100.0), Some(100.0));
        assert_eq!(pct(&[], 50.0), None);
    }

    #[test]
    fn thread_names_map_to_groups() {
        assert!(thread_group("tokio-rt-worker").starts_with("pipeline"));
        assert!(thread_group("bench-load").starts_with("load"));
        assert!(thread_group("rdk:broker-1").starts_with("Kafka"));
        assert!(thread_group("sqlx-sqlite-wor").starts_with("SQLite"));
    }
}
