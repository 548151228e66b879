//! A Payment Service Provider simulator: an HTTP API shaped like a real
//! PSP's (charges with idempotency keys, refunds, signed webhooks, daily
//! settlement files) with its own durable SQLite state, and configurable
//! misbehaviour (latency, declines, 5xx, 429/503 with Retry-After, dropped
//! connections, pending outcomes resolved days later) so paystream's
//! executor and reconciliation can be tested against the nasty cases.
//!
//! The HTTP contract is in `crates/psp-sim/README.md`.

mod api;
pub mod config;
pub mod error_code;
pub mod limits;
mod settlement;
mod store;
mod workers;
mod writer;

pub use config::{Account, Behaviour, Durability, LatencyMs, Matcher, Outcome, Resolution, Rule};
pub use error_code::ErrorCode;
pub use settlement::{Injected, InjectionSpec};
pub use writer::WriteBatches;

use crate::limits::CONNECTIONS_MAX;
use anyhow::Context as _;
use hmac::{Hmac, Mac};
use runtime::secret::{self, Secret};
use sha2::Sha256;
use sqlx::sqlite::SqliteSynchronous;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// `paystream serve psp-sim`.
#[derive(Debug, Clone, clap::Args)]
pub struct PspSimArgs {
    /// Address the simulator's HTTP API listens on.
    #[arg(long, env = "PAYSTREAM_PSP_LISTEN", default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,
    /// The simulator's own database (SQLite only).
    #[arg(long, env = "PAYSTREAM_PSP_DB", default_value = "sqlite://psp-sim.db")]
    pub db: String,
    /// Behaviour file (JSON): latency, outcome rules, accounts, webhook quirks.
    #[arg(long, env = "PAYSTREAM_PSP_BEHAVIOUR")]
    pub behaviour: Option<PathBuf>,
    /// Webhook URL of the default account (`acct_default`); none = no webhooks.
    #[arg(long, env = "PAYSTREAM_PSP_WEBHOOK_URL")]
    pub webhook_url: Option<String>,
    /// API key of the default account (clients send it as
    /// `Authorization: Bearer`). Required, at least 32 characters, no
    /// well-known value: generate one with `openssl rand -hex 32`.
    #[arg(long, env = "PAYSTREAM_PSP_API_KEY", hide_env_values = true)]
    pub api_key: Option<Secret>,
    /// Webhook signing secret of the default account. Required, same rules
    /// as the API key.
    #[arg(long, env = "PAYSTREAM_PSP_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<Secret>,
    /// `full` (default): every commit is fsynced, as a PSP's records must
    /// be. `relaxed`, for benchmarks: commits are not fsynced (the WAL is,
    /// at checkpoints); same idempotency and behaviour, survives a killed
    /// process but not a power cut. `batched`, for benchmarks: as
    /// `relaxed`, and concurrent requests' writes share one commit (a
    /// group commit), each request answered after it.
    #[arg(
        long,
        env = "PAYSTREAM_PSP_DURABILITY",
        value_enum,
        default_value_t = Durability::Full
    )]
    pub durability: Durability,
}

/// Everything one simulator run needs.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub listen: SocketAddr,
    pub db_url: String,
    pub behaviour: Behaviour,
    /// Key and webhook secret of `acct_default`, unless the behaviour
    /// configures that account itself.
    pub api_key: Secret,
    pub webhook_secret: Secret,
}

impl SimConfig {
    /// Random local port, default behaviour, the given database, and a
    /// freshly generated key and webhook secret for `acct_default`.
    pub fn for_tests(db_url: impl Into<String>) -> SimConfig {
        SimConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            db_url: db_url.into(),
            behaviour: Behaviour::default(),
            api_key: Secret::generate("sk_test_"),
            webhook_secret: Secret::generate("whsec_"),
        }
    }

    /// `serve psp-sim`'s configuration: refuses a missing, short or
    /// well-known key or secret, on the flags and on every account of the
    /// behaviour file.
    pub fn from_args(args: &PspSimArgs) -> anyhow::Result<SimConfig> {
        let api_key = secret::require(args.api_key.as_ref(), "--api-key / PAYSTREAM_PSP_API_KEY")?;
        let webhook_secret = secret::require(
            args.webhook_secret.as_ref(),
            "--webhook-secret / PAYSTREAM_PSP_WEBHOOK_SECRET",
        )?;
        let mut behaviour = match &args.behaviour {
            Some(path) => Behaviour::load(path)?,
            None => Behaviour::default(),
        };
        let mut accounts = behaviour.effective_accounts(&api_key, &webhook_secret);
        for a in &mut accounts {
            if a.id == config::DEFAULT_ACCOUNT {
                a.api_key = api_key.clone();
                a.webhook_secret = webhook_secret.clone();
                if args.webhook_url.is_some() {
                    a.webhook_url.clone_from(&args.webhook_url);
                }
            }
            secret::require(
                Some(&a.api_key),
                &format!("the api_key of account {:?}", a.id),
            )?;
            secret::require(
                Some(&a.webhook_secret),
                &format!("the webhook_secret of account {:?}", a.id),
            )?;
        }
        behaviour.accounts = accounts;
        if args.durability != Durability::Full {
            behaviour.durability = args.durability;
        }
        behaviour.validate()?;
        Ok(SimConfig {
            listen: args.listen,
            db_url: args.db.clone(),
            behaviour,
            api_key,
            webhook_secret,
        })
    }
}

/// Runs the simulator until `shutdown` is cancelled.
pub async fn serve(args: PspSimArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = SimConfig::from_args(&args)?;
    let (addr, run) = start(config, shutdown).await?;
    tracing::info!(%addr, "psp simulator listening");
    run.await
}

/// A simulator running in the background (tests).
#[derive(Debug)]
pub struct RunningSim {
    pub addr: SocketAddr,
    /// The API key and webhook secret of `acct_default`.
    pub api_key: Secret,
    pub webhook_secret: Secret,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    batches: Option<Arc<writer::BatchCounters>>,
}

impl RunningSim {
    /// The group commit's counters so far; None unless the durability is
    /// `batched`.
    pub fn write_batches(&self) -> Option<WriteBatches> {
        self.batches.as_ref().map(|b| b.snapshot())
    }

    /// `http://127.0.0.1:<port>`
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, drops open connections, stops the workers and
    /// closes the database; returns once all of that is done.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await.context("simulator task panicked")?
    }
}

/// Starts a simulator (bound before this returns, so `addr` is usable).
pub async fn spawn(config: SimConfig) -> anyhow::Result<RunningSim> {
    let shutdown = CancellationToken::new();
    let default = config
        .behaviour
        .effective_accounts(&config.api_key, &config.webhook_secret)
        .into_iter()
        .find(|a| a.id == config::DEFAULT_ACCOUNT)
        .expect("acct_default is always in effect");
    let (addr, run, batches) = start_counted(config, shutdown.clone()).await?;
    let task = tokio::spawn(run);
    Ok(RunningSim {
        addr,
        api_key: default.api_key,
        webhook_secret: default.webhook_secret,
        shutdown,
        task,
        batches,
    })
}

/// The `Psp-Signature` header value: `t=<t>,v1=<hex HMAC-SHA256(secret,
/// "<t>.<body>")>`.
pub fn sign(secret: &[u8], t: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// The simulator's clock: wall time plus an offset that
/// `POST /_sim/clock/advance` moves forward, so "resolves after 3 days" is
/// testable without waiting. Webhook retry timing and signature timestamps
/// use the wall clock (they concern the receiver's real time).
#[derive(Debug, Clone, Default)]
pub(crate) struct SimClock {
    offset_ms: Arc<AtomicI64>,
    pub(crate) advanced: Arc<Notify>,
}

impl SimClock {
    pub(crate) fn now_ms(&self) -> i64 {
        wall_ms().saturating_add(self.offset_ms.load(Ordering::SeqCst))
    }

    pub(crate) fn advance(&self, ms: i64) {
        assert!(ms >= 0, "the simulator clock only moves forward");
        self.offset_ms.fetch_add(ms, Ordering::SeqCst);
        self.advanced.notify_waiters();
    }
}

pub(crate) fn wall_ms() -> i64 {
    let nanos = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
    i64::try_from(nanos).expect("wall clock within i64 milliseconds")
}

/// Shared by handlers and workers.
#[derive(Debug)]
pub(crate) struct AppState {
    /// Reads; writes go through `writer`.
    pub(crate) db: sqlx::SqlitePool,
    /// Commits the writes, one transaction each or in groups.
    pub(crate) writer: writer::Writer,
    pub(crate) behaviour: Behaviour,
    pub(crate) accounts: Vec<Account>,
    pub(crate) clock: SimClock,
    /// Wakes the webhook worker when a delivery was enqueued.
    pub(crate) webhooks_due: Notify,
}

impl AppState {
    pub(crate) fn account(&self, id: &str) -> Option<&Account> {
        self.accounts.iter().find(|a| a.id == id)
    }
}

async fn start(
    config: SimConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, impl Future<Output = anyhow::Result<()>>)> {
    let (addr, run, _) = start_counted(config, shutdown).await?;
    Ok((addr, run))
}

/// [`start`], and the group commit's counters (`batched` only).
async fn start_counted(
    config: SimConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<(
    SocketAddr,
    impl Future<Output = anyhow::Result<()>>,
    Option<Arc<writer::BatchCounters>>,
)> {
    config.behaviour.validate()?;
    let mut pool = match storage::Db::connect(&config.db_url).await? {
        storage::Db::Sqlite(pool) => pool,
        storage::Db::Postgres(p) => {
            p.close().await;
            anyhow::bail!("the PSP simulator keeps its state in SQLite; use a sqlite:// URL");
        }
    };
    storage::component_migrator(sqlx::migrate!("migrations/sqlite"))
        .run(&pool)
        .await
        .context("migrating the simulator database")?;
    // A previous process died while handling these keys; nobody works on
    // them any more, so later requests may retry them.
    store::release_all_in_flight(&pool).await?;
    let writer = match config.behaviour.durability {
        Durability::Full => writer::Writer::Direct(pool.clone()),
        Durability::Relaxed => {
            // `synchronous` is per connection: reopen the pool with it (the
            // file and its migrations are the same).
            pool.close().await;
            pool = single_writer_pool(&config.db_url, SqliteSynchronous::Normal).await?;
            tracing::info!("psp simulator: relaxed durability (commits are not fsynced)");
            writer::Writer::Direct(pool.clone())
        }
        Durability::Batched => {
            // Reads stay on the pool (which writes nothing any more); the
            // committer writes on a connection of its own, with
            // `synchronous=NORMAL` as `relaxed`.
            let committer = single_writer_pool(&config.db_url, SqliteSynchronous::Normal).await?;
            let conn = committer
                .acquire()
                .await
                .context("opening the committer's connection")?;
            tracing::info!(
                "psp simulator: batched durability (group commit, commits are not fsynced)"
            );
            writer::Writer::batched(conn)
        }
    };
    let batches = writer.counters();

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    let accounts = config
        .behaviour
        .effective_accounts(&config.api_key, &config.webhook_secret);
    let state = Arc::new(AppState {
        db: pool,
        writer,
        behaviour: config.behaviour,
        accounts,
        clock: SimClock::default(),
        webhooks_due: Notify::new(),
    });
    let run = async move {
        let workers = [
            tokio::spawn(workers::deliver_webhooks(state.clone(), shutdown.clone())),
            tokio::spawn(workers::resolve_pending(state.clone(), shutdown.clone())),
        ];
        accept_loop(listener, api::router(state.clone()), shutdown.clone()).await;
        for w in workers {
            if let Err(e) = w.await {
                tracing::error!(error = %e, "simulator worker panicked");
            }
        }
        state.writer.close().await;
        state.db.close().await;
        Ok(())
    };
    Ok((addr, run, batches))
}

/// A pool of one connection with the given `synchronous` (`relaxed`: see
/// [`Durability::Relaxed`]; the committer's of `batched`); otherwise as
/// `storage::Db::connect` opens it.
async fn single_writer_pool(
    db_url: &str,
    synchronous: SqliteSynchronous,
) -> anyhow::Result<sqlx::SqlitePool> {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
    use std::str::FromStr as _;
    let opts = SqliteConnectOptions::from_str(db_url)
        .context("parsing the simulator's database URL")?
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(synchronous)
        .busy_timeout(storage::SQLITE_BUSY_TIMEOUT)
        .foreign_keys(true);
    SqlitePoolOptions::new()
        // One connection: nearly every request writes, and SQLite has one
        // writer at a time anyway; queueing on the pool costs less than
        // connections taking turns at the file's lock. (Relaxed is for
        // benchmarks; `full` keeps `storage::Db::connect`'s pool.)
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        // As `storage::Db::connect`: a writer waiting for the lock is woken
        // by the commit that frees it.
        .after_connect(|conn, _| {
            Box::pin(storage::lock_wait::install(
                conn,
                storage::SQLITE_BUSY_TIMEOUT,
            ))
        })
        .connect_with(opts)
        .await
        .context("opening the simulator's database")
}

/// Closes the connection it is attached to without an answer: the
/// `timeout` outcome's "the PSP never answered".
#[derive(Debug, Clone)]
pub(crate) struct ConnKill(pub(crate) CancellationToken);

/// Our own accept loop (instead of `axum::serve`) so a handler can drop its
/// TCP connection without writing a response.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    shutdown: CancellationToken,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        if conns.len() >= CONNECTIONS_MAX {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = conns.join_next() => continue,
            }
        }
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // e.g. out of file descriptors: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let router = router.clone();
        let shutdown = shutdown.clone();
        conns.spawn(async move {
            let kill = CancellationToken::new();
            let kill_ext = ConnKill(kill.clone());
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(kill_ext.clone());
                    tower::ServiceExt::oneshot(router.clone(), req)
                },
            );
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                },
                // Dropping the connection future closes the socket unanswered.
                _ = kill.cancelled() => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
    conns.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        psp: PspSimArgs,
    }

    const KEY: &str = "sk_test_4f1c2a9be07d35e8a6b1c9d0e2f3a4b5c6d7e8f9";
    const WHSEC: &str = "whsec_0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d";

    #[test]
    fn cli_flags_configure_the_default_account() {
        let cli = Cli::try_parse_from([
            "x",
            "--webhook-url",
            "http://127.0.0.1:1/wh",
            "--api-key",
            KEY,
            "--webhook-secret",
            WHSEC,
        ])
        .unwrap();
        assert_eq!(cli.psp.listen, SocketAddr::from(([127, 0, 0, 1], 8090)));
        assert_eq!(cli.psp.db, "sqlite://psp-sim.db");
        let config = SimConfig::from_args(&cli.psp).unwrap();
        let accounts = &config.behaviour.accounts;
        let default = accounts
            .iter()
            .find(|a| a.id == config::DEFAULT_ACCOUNT)
            .unwrap();
        assert_eq!(
            default.webhook_url.as_deref(),
            Some("http://127.0.0.1:1/wh")
        );
        assert_eq!(default.webhook_secret.expose(), WHSEC);
        assert_eq!(default.api_key.expose(), KEY);
        // Neither shows in the configuration's Debug output.
        let shown = format!("{config:?}");
        assert!(!shown.contains(KEY) && !shown.contains(WHSEC), "{shown}");
    }

    #[test]
    fn missing_short_or_well_known_secrets_are_refused() {
        let refused = |args: &[&str]| {
            let mut all = vec!["x"];
            all.extend_from_slice(args);
            let cli = Cli::try_parse_from(all).unwrap();
            SimConfig::from_args(&cli.psp).unwrap_err().to_string()
        };
        let e = refused(&["--webhook-secret", WHSEC]);
        assert!(
            e.contains("PAYSTREAM_PSP_API_KEY") && e.contains("openssl rand"),
            "{e}"
        );
        let e = refused(&["--api-key", KEY]);
        assert!(e.contains("PAYSTREAM_PSP_WEBHOOK_SECRET"), "{e}");
        let e = refused(&["--api-key", "sk_test_default", "--webhook-secret", WHSEC]);
        assert!(e.contains("well-known") && !e.contains(WHSEC), "{e}");
        let e = refused(&["--api-key", KEY, "--webhook-secret", "whsec_default"]);
        assert!(e.contains("well-known"), "{e}");
        let e = refused(&["--api-key", KEY, "--webhook-secret", "tooshort123"]);
        assert!(
            e.contains("at least 32") && !e.contains("tooshort123"),
            "{e}"
        );
        // A behaviour file's accounts are held to the same rules.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("b.json");
        std::fs::write(
            &file,
            r#"{"accounts":[{"id":"acct_b","api_key":"sk_test_b","webhook_secret":"whsec_b"}]}"#,
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let e = refused(&[
            "--api-key",
            KEY,
            "--webhook-secret",
            WHSEC,
            "--behaviour",
            path,
        ]);
        assert!(e.contains("acct_b"), "{e}");
    }

    #[test]
    fn durability_comes_from_the_flag_or_the_behaviour_file() {
        for (name, want) in [
            ("full", Durability::Full),
            ("relaxed", Durability::Relaxed),
            ("batched", Durability::Batched),
        ] {
            let cli = Cli::try_parse_from([
                "x",
                "--api-key",
                KEY,
                "--webhook-secret",
                WHSEC,
                "--durability",
                name,
            ])
            .unwrap();
            let config = SimConfig::from_args(&cli.psp).unwrap();
            assert_eq!(config.behaviour.durability, want);
            let b: Behaviour =
                serde_json::from_value(serde_json::json!({ "durability": name })).unwrap();
            assert_eq!(b.durability, want);
        }
        let cli = Cli::try_parse_from(["x", "--durability", "memory"]);
        assert!(cli.is_err(), "no such mode");
    }

    #[test]
    fn signature_matches_a_known_vector() {
        // printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac test_vector_key
        let s = sign(b"test_vector_key", 1_700_000_000, br#"{"a":1}"#);
        assert_eq!(
            s,
            "t=1700000000,v1=918aec12949218c8a1190280eecdd59d44f1fda47f5ac7c8e20ced9458f7d1cc"
        );
        assert_ne!(s, sign(b"whsec_other", 1_700_000_000, br#"{"a":1}"#));
    }
}
