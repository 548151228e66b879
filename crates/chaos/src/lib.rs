//! `paystream chaos`: the system's own fault suite.
//!
//! Runs the whole system the way it runs in production, as separate
//! processes (a broker on durable storage, the PSP simulator misbehaving on
//! purpose, the payment handler, two executors, the projections and the
//! reconciler, all on one database), drives a load of payments and refunds
//! from clients that retry with the same Idempotency-Key on every answer
//! that is not definite, injects faults on a schedule drawn from a printed
//! seed (kill -9 and restart of every component and of the broker, database
//! connections cut, a rebalance, poison and oversized messages on every
//! topic, a forged webhook), waits for the system to settle, and then checks
//! the money from the outside: no order charged twice at the PSP, the PSP
//! and paystream agreeing on every charge, one payment per key, nothing
//! left non-final, `ledger verify` green, wallets equal to the PSP's captures
//! minus refunds, reconciliation clean, every poison message dead-lettered
//! with its reason, no event lost. Exit status 0 only if every check holds.

mod checks;
mod faults;
mod load;
mod procs;

use anyhow::{Context, bail};
use faults::{Fault, Planted};
use procs::{Proc, free_port};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use streaming::KafkaConfig;

/// Which database the system runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    Postgres,
    Sqlite,
}

#[derive(Debug, clap::Args)]
pub struct ChaosArgs {
    /// Seed of the fault schedule and of the load (printed; the same seed
    /// reproduces the same run). Default: a random one.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Payments to submit at least (more while planned faults remain).
    #[arg(long, default_value_t = 300)]
    pub payments: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 12)]
    pub clients: usize,
    /// Run a soak this long instead (e.g. 30m, 90s): faults keep coming and
    /// clients keep submitting until then.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Payments per second offered by all clients together. Default: the
    /// --payments spread over the fault schedule (a short run), or as fast
    /// as the clients go (a soak with --duration: the figure printed is the
    /// throughput held under faults).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Seconds between two faults.
    #[arg(long, default_value_t = 2.5)]
    pub fault_every_secs: f64,
    /// Database of the system under test.
    #[arg(long, value_enum, default_value = "postgres")]
    pub backend: Backend,
    /// PostgreSQL server (any database on it): the run creates its own
    /// database there and drops it afterwards (kept on failure).
    #[arg(
        long,
        env = "PAYSTREAM_CHAOS_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub postgres_url: String,
    /// The Kafka-protocol broker to run (Nisshi; `scripts/lib.sh`
    /// `ensure_nisshi` installs it).
    #[arg(long, env = "PAYSTREAM_CHAOS_BROKER_BIN", default_value = "nisshi")]
    pub broker_bin: String,
    /// Partitions per topic.
    #[arg(long, default_value_t = 6)]
    pub partitions: i32,
    /// Give up waiting for the system to settle after this long.
    #[arg(long, default_value_t = 300)]
    pub settle_timeout_secs: u64,
    /// Keep the work folder (logs, broker and simulator state) and the
    /// database even when every check passes.
    #[arg(long)]
    pub keep: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("expected e.g. 90s, 30m or 2h, got {s:?}"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("expected e.g. 90s, 30m or 2h, got {s:?}")),
    };
    Ok(Duration::from_secs(secs))
}

/// The running system and what the faults left behind.
#[derive(Debug)]
pub struct System {
    procs: BTreeMap<String, Proc>,
    pub kafka: KafkaConfig,
    /// (server URL, database name) on PostgreSQL.
    pub postgres: Option<(String, String)>,
    pub db_url: String,
    pub executor_port: u16,
    pub planted: Vec<Planted>,
    pub forged_answers: Vec<u16>,
    /// Components that exited without being killed by us.
    pub unexpected_exits: Vec<String>,
    pub client: events::ClientId,
    pub seed: u64,
    /// The PSP's URL and API key, for the operator's `reconcile`.
    psp: (String, String),
    paystream: PathBuf,
    work: PathBuf,
}

impl System {
    pub fn proc(&mut self, name: &str) -> anyhow::Result<&mut Proc> {
        self.procs
            .get_mut(name)
            .with_context(|| format!("no component {name}"))
    }

    /// An order id of the run's first payment (whatever its fate).
    pub fn some_order_id(&self) -> String {
        let payment = events::PaymentId::derive(&self.client, &format!("pay-{}-0", self.seed));
        events::OrderId::derive(payment, 0).to_string()
    }

    /// Restarts components that exited on their own, noting each.
    async fn revive(&mut self) -> anyhow::Result<()> {
        for (name, p) in &mut self.procs {
            if name == "executor-3" {
                continue;
            }
            if !p.is_running() {
                self.unexpected_exits
                    .push(format!("{name}: exited on its own:\n{}", p.log_tail(15)));
                p.start().await?;
            }
        }
        Ok(())
    }

    /// Runs `paystream ARGS` against the system; (exit code, stdout+stderr).
    async fn paystream(&self, args: &[&str]) -> anyhow::Result<(i32, String)> {
        let out = tokio::process::Command::new(&self.paystream)
            .args(args)
            .env("PAYSTREAM_BROKERS", &self.kafka.brokers)
            .env("PAYSTREAM_TOPIC_PREFIX", &self.kafka.topic_prefix)
            .env("PAYSTREAM_PARTITIONS", self.kafka.partitions.to_string())
            .env("PAYSTREAM_DATABASE_URL", &self.db_url)
            .env("PAYSTREAM_PSP_URL", &self.psp.0)
            .env("PAYSTREAM_PSP_API_KEY", &self.psp.1)
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .current_dir(&self.work)
            .output()
            .await
            .with_context(|| format!("running paystream {args:?}"))?;
        Ok((
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ))
    }

    async fn stop_all(&mut self) {
        for p in self.procs.values_mut().rev() {
            p.terminate(Duration::from_secs(20)).await;
        }
    }
}

/// The PSP simulator's behaviour in a chaos run: every kind of
/// misbehaviour, keyed by card token (see `load::CARDS`).
fn behaviour() -> serde_json::Value {
    serde_json::json!({
        "latency_ms": {"min": 0, "max": 30},
        "rules": [
            {"match": {"card_token": "tok_chaos_decline"}, "outcome": {"type": "decline", "code": "card_declined"}},
            {"match": {"card_token": "tok_chaos_5xx"}, "outcome": {"type": "error", "status": 503, "times": 2}},
            {"match": {"card_token": "tok_chaos_429"}, "outcome": {"type": "rate_limit", "status": 429, "retry_after_s": 1, "times": 2}},
            {"match": {"card_token": "tok_chaos_timeout_nocharge"}, "outcome": {"type": "timeout", "hold_ms": 2500, "charge_created": false, "times": 1}},
            {"match": {"card_token": "tok_chaos_timeout_charged"}, "outcome": {"type": "timeout", "hold_ms": 2500, "charge_created": true, "times": 1}},
            {"match": {"card_token": "tok_chaos_pending_ok"}, "outcome": {"type": "pending", "resolve_after_ms": 3000, "then": "succeed"}},
            {"match": {"card_token": "tok_chaos_pending_fail"}, "outcome": {"type": "pending", "resolve_after_ms": 3000, "then": "fail"}}
        ],
        "webhooks": {"initial_backoff_ms": 200, "max_backoff_ms": 2000,
                     "duplicate_percent": 30, "delay_percent": 30, "delay_max_ms": 2000}
    })
}

fn secret() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// Starts every process of the system.
async fn start_system(args: &ChaosArgs, seed: u64, work: &Path) -> anyhow::Result<System> {
    let paystream = std::env::current_exe().context("locating the paystream binary")?;
    let broker_port = free_port()?;
    let brokers = format!("127.0.0.1:{broker_port}");
    let kafka = KafkaConfig {
        brokers: brokers.clone(),
        kafka_options: Vec::new(),
        topic_prefix: format!("chaos{seed}."),
        partitions: args.partitions,
        replication_factor: 1,
        instance_id: None,
    };
    let (db_url, postgres) = match args.backend {
        Backend::Sqlite => (
            format!("sqlite://{}", work.join("paystream.db").display()),
            None,
        ),
        Backend::Postgres => {
            let name = format!("paystream_chaos_{}", uuid::Uuid::now_v7().simple());
            let admin = storage::Db::connect(&args.postgres_url)
                .await
                .context("connecting to the PostgreSQL server (--postgres-url)")?;
            if let storage::Db::Postgres(p) = &admin {
                sqlx::query(&format!("CREATE DATABASE \"{name}\""))
                    .execute(p)
                    .await?;
            }
            admin.close().await;
            let base = args
                .postgres_url
                .rsplit_once('/')
                .map_or(args.postgres_url.as_str(), |(b, _)| b);
            (
                format!("{base}/{name}"),
                Some((args.postgres_url.clone(), name)),
            )
        }
    };
    let (psp_key, webhook_secret) = (secret(), secret());
    let ports: BTreeMap<&str, u16> = [
        "psp-sim",
        "handler",
        "executor-1",
        "executor-2",
        "executor-3",
        "projections",
    ]
    .into_iter()
    .map(|n| Ok((n, free_port()?)))
    .collect::<anyhow::Result<_>>()?;
    std::fs::write(work.join("behaviour.json"), behaviour().to_string())?;
    let psp_url = format!("http://127.0.0.1:{}", ports["psp-sim"]);
    let common = |instance: &str| -> Vec<(String, String)> {
        [
            ("PAYSTREAM_BROKERS", brokers.as_str()),
            ("PAYSTREAM_TOPIC_PREFIX", kafka.topic_prefix.as_str()),
            ("PAYSTREAM_DATABASE_URL", db_url.as_str()),
            ("PAYSTREAM_INSTANCE_ID", instance),
            ("PAYSTREAM_PSP_URL", psp_url.as_str()),
            ("PAYSTREAM_PSP_API_KEY", psp_key.as_str()),
            ("PAYSTREAM_PSP_WEBHOOK_SECRET", webhook_secret.as_str()),
            ("PAYSTREAM_PSP_TIMEOUT_MS", "2000"),
            ("PAYSTREAM_EXECUTOR_LEASE_SECS", "36"),
            ("PAYSTREAM_EXECUTOR_PENDING_POLL_AFTER_SECS", "5"),
            ("PAYSTREAM_EXECUTOR_BACKOFF_BASE_MS", "100"),
            ("PAYSTREAM_EXECUTOR_BACKOFF_CAP_MS", "2000"),
            ("RUST_LOG", "info"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .chain([(
            "PAYSTREAM_PARTITIONS".to_owned(),
            kafka.partitions.to_string(),
        )])
        .collect()
    };
    let listen = |name: &str| format!("127.0.0.1:{}", ports[name]);
    let mut procs = BTreeMap::new();
    let broker_url = format!("tcp://{brokers}");
    let broker = Proc::new(
        "broker",
        Path::new(&args.broker_bin),
        &[
            "broker",
            "--listener-url",
            &broker_url,
            "--advertised-listener-url",
            &broker_url,
            "--storage-engine",
            "sqlite://broker.db",
            "--group-initial-rebalance-delay",
            "0s",
        ],
        &[],
        work,
        Some(broker_port),
    );
    procs.insert("broker".to_owned(), broker);
    let psp_db = format!("sqlite://{}", work.join("psp-sim.db").display());
    let behaviour_path = work.join("behaviour.json").display().to_string();
    let webhook_url = format!("http://127.0.0.1:{}/v1/psp/webhooks", ports["executor-1"]);
    let psp_listen = listen("psp-sim");
    procs.insert(
        "psp-sim".to_owned(),
        Proc::new(
            "psp-sim",
            &paystream,
            &[
                "serve",
                "psp-sim",
                "--listen",
                &psp_listen,
                "--db",
                &psp_db,
                "--behaviour",
                &behaviour_path,
                "--webhook-url",
                &webhook_url,
            ],
            &common("psp-sim"),
            work,
            Some(ports["psp-sim"]),
        ),
    );
    for name in ["executor-1", "executor-2", "executor-3"] {
        let l = listen(name);
        procs.insert(
            name.to_owned(),
            Proc::new(
                name,
                &paystream,
                &["serve", "executor", "--listen", &l],
                &common(name),
                work,
                Some(ports[name]),
            ),
        );
    }
    let l = listen("handler");
    procs.insert(
        "handler".to_owned(),
        Proc::new(
            "handler",
            &paystream,
            &["serve", "handler", "--listen", &l],
            &common("handler"),
            work,
            Some(ports["handler"]),
        ),
    );
    let l = listen("projections");
    procs.insert(
        "projections".to_owned(),
        Proc::new(
            "projections",
            &paystream,
            &["serve", "projections", "--listen", &l],
            &common("projections"),
            work,
            Some(ports["projections"]),
        ),
    );
    // Scheduled half a day away: it idles (and is killed) during the run;
    // the day is reconciled by hand at the end.
    let at = time::OffsetDateTime::now_utc() + time::Duration::hours(12);
    let at = format!("{:02}:{:02}", at.hour(), at.minute());
    procs.insert(
        "reconciler".to_owned(),
        Proc::new(
            "reconciler",
            &paystream,
            &["serve", "reconciler", "--at", &at],
            &common("reconciler"),
            work,
            None,
        ),
    );
    let mut sys = System {
        procs,
        kafka,
        postgres,
        db_url,
        executor_port: ports["executor-1"],
        planted: Vec::new(),
        forged_answers: Vec::new(),
        unexpected_exits: Vec::new(),
        client: events::ClientId::parse("chaos-shop")?,
        seed,
        psp: (psp_url.clone(), psp_key.clone()),
        paystream,
        work: work.to_path_buf(),
    };
    for name in [
        "broker",
        "psp-sim",
        "handler",
        "executor-1",
        "executor-2",
        "projections",
        "reconciler",
    ] {
        sys.proc(name)?
            .start()
            .await
            .with_context(|| format!("starting {name}"))?;
    }
    Ok(sys)
}

/// Runs the suite; exit status 0 when every check holds.
pub async fn run(args: ChaosArgs) -> anyhow::Result<ExitCode> {
    let seed = args
        .seed
        .unwrap_or_else(|| rand::rng().random_range(1..1_000_000));
    println!("chaos seed {seed} (the same --seed reproduces this run)");
    let work = std::env::temp_dir().join(format!(
        "paystream-chaos-{seed}-{}",
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::create_dir_all(&work)?;
    println!("work folder {} (logs of every process)", work.display());
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let mut sys = start_system(&args, seed, &work).await?;
    println!(
        "started: broker, psp-sim, handler, executor-1, executor-2, projections, reconciler ({:.1} s)",
        started.elapsed().as_secs_f64()
    );

    let (code, out) = sys.paystream(&["clients", "create", "chaos-shop"]).await?;
    let api_key = out
        .split_whitespace()
        .find(|w| w.starts_with("psk_"))
        .map(str::to_owned)
        .with_context(|| format!("no API key from `clients create` (exit {code}): {out}"))?;
    let client = load::Client {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()?,
        base: format!(
            "http://127.0.0.1:{}",
            sys.proc("handler")?.port.unwrap_or(0)
        ),
        api_key: api_key.clone(),
    };

    let postgres = sys.postgres.is_some();
    let schedule = faults::schedule(&mut rng, postgres);
    let every = Duration::from_secs_f64(args.fault_every_secs.max(0.1));
    let window = every * u32::try_from(schedule.len() + 1).unwrap_or(u32::MAX);
    #[allow(clippy::float_arithmetic)] // pacing, not money
    let rate = match (args.rate, args.duration) {
        (Some(r), _) => r,
        (None, Some(_)) => 10_000.0,
        (None, None) => args.payments as f64 / window.as_secs_f64(),
    };
    let plan = load::Plan {
        seed,
        clients: args.clients.max(1),
        payments: args.payments,
        rate: rate.max(1.0),
        duration: args.duration,
        refund_per_mille: 150,
    };
    let hard_deadline = Instant::now()
        + args.duration.unwrap_or(Duration::ZERO)
        + window
        + Duration::from_secs(args.settle_timeout_secs + 300);
    let faults_done = Arc::new(AtomicBool::new(false));
    let load_started = Instant::now();
    let load = tokio::spawn(load::run(
        client.clone(),
        plan,
        faults_done.clone(),
        hard_deadline,
    ));

    let mut injected: Vec<(String, String)> = Vec::new();
    let mut handler_restarts: Vec<Instant> = Vec::new();
    let mut queue = schedule.into_iter();
    loop {
        tokio::time::sleep(every).await;
        let fault = match queue.next() {
            Some(f) => f,
            None if args.duration.is_some_and(|d| load_started.elapsed() < d) => {
                faults::random(&mut rng, postgres)
            }
            None => break,
        };
        let line = faults::inject(&mut sys, &fault, &mut rng)
            .await
            .with_context(|| format!("injecting {fault}"))?;
        if fault == Fault::Kill("handler") {
            handler_restarts.push(Instant::now());
        }
        println!("  [{:>6.1} s] {line}", load_started.elapsed().as_secs_f64());
        injected.push((fault_kind(&fault), line));
        sys.revive().await?;
    }
    faults_done.store(true, Ordering::SeqCst);
    let faults_end = Instant::now();
    let seen = load.await.context("the load")?;
    let load_secs = load_started.elapsed().as_secs_f64();
    sys.revive().await?;
    println!(
        "load done: {} keys in {:.1} s; {} faults injected; settling...",
        seen.keys.len(),
        load_secs,
        injected.len()
    );

    let report = checks::run(
        &mut sys,
        &client,
        &seen,
        &handler_restarts,
        Duration::from_secs(args.settle_timeout_secs),
    )
    .await?;

    // Figures.
    let answered: Vec<f64> = seen
        .keys
        .iter()
        .filter_map(|k| k.definite_at.map(|d| (d - k.first_sent).as_secs_f64()))
        .collect();
    let payments = seen
        .keys
        .iter()
        .filter(|k| k.route == "/v1/payments")
        .count();
    let accepted_during_faults = seen
        .keys
        .iter()
        .filter(|k| k.route == "/v1/payments" && k.definite_at.is_some_and(|d| d <= faults_end))
        .count();
    println!();
    println!("faults injected (kind x count):");
    let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
    for (kind, _) in &injected {
        *by_kind.entry(kind.as_str()).or_default() += 1;
    }
    for (kind, n) in &by_kind {
        println!("  {kind:<34} {n:>4}");
    }
    #[allow(clippy::float_arithmetic)] // figures, not money
    {
        println!(
            "load: {payments} payments, {} refunds; {:.1} payments/s answered while faults were injected",
            seen.keys.len() - payments,
            accepted_during_faults as f64 / (faults_end - load_started).as_secs_f64().max(0.001)
        );
        println!(
            "time to a definite answer per key: p50 {:.2} s, p99 {:.2} s, max {:.2} s",
            percentile(&answered, 0.50),
            percentile(&answered, 0.99),
            percentile(&answered, 1.0)
        );
    }
    println!();
    println!("checks:");
    let mut ok = true;
    for c in &report {
        println!(
            "  {} {:<44} {}",
            if c.ok { "ok  " } else { "FAIL" },
            c.name,
            c.detail
        );
        ok &= c.ok;
    }
    sys.stop_all().await;
    if ok && !args.keep {
        if let Some((admin, name)) = &sys.postgres
            && let Ok(db) = storage::Db::connect(admin).await
        {
            if let storage::Db::Postgres(p) = &db {
                let drop = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                let _ = sqlx::query(&drop).execute(p).await;
            }
            db.close().await;
        }
        let _ = std::fs::remove_dir_all(&work);
    } else {
        println!(
            "kept for inspection: {} and {}",
            work.display(),
            storage::redact(&sys.db_url)
        );
    }
    println!(
        "chaos seed {seed}: {}",
        if ok {
            "all checks passed"
        } else {
            "CHECKS FAILED"
        }
    );
    let passed = report.iter().filter(|c| c.ok).count();
    println!("chaos: {passed} passed, {} failed", report.len() - passed);
    if !ok {
        bail!("chaos run with seed {seed} failed its checks");
    }
    Ok(ExitCode::SUCCESS)
}

fn fault_kind(f: &Fault) -> String {
    match f {
        Fault::Kill(c) => format!("kill -9 {c}"),
        other => other.to_string(),
    }
}

#[allow(clippy::float_arithmetic, clippy::cast_possible_truncation)] // figures
fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let i = ((s.len() - 1) as f64 * q).round() as usize;
    s[i.min(s.len() - 1)]
}
