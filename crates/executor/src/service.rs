//! Configuration, shared state and `serve`/`start`.

use crate::limits;
use crate::psp::PspClient;
use crate::store;
use anyhow::Context;
use runtime::secret::{self, Secret};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use storage::Db;
use streaming::{ConsumerSettings, EventProducer, KafkaConfig};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub(crate) const PRODUCER: &str = concat!("executor/", env!("CARGO_PKG_VERSION"));

/// The old name of [`limits::PAYMENTS_IN_FLIGHT_MAX_DEFAULT`], which the
/// benches use.
pub use crate::limits::PAYMENTS_IN_FLIGHT_MAX_DEFAULT as DEFAULT_MAX_IN_FLIGHT;

/// `paystream serve executor` options.
#[derive(Debug, Clone, clap::Args)]
pub struct ExecutorArgs {
    /// Address of the executor's HTTP server (PSP webhooks, health).
    #[arg(
        long = "listen",
        env = "PAYSTREAM_EXECUTOR_HTTP_ADDR",
        default_value = "127.0.0.1:8082"
    )]
    pub listen: SocketAddr,
    /// Base URL of the PSP.
    #[arg(
        long,
        env = "PAYSTREAM_PSP_URL",
        default_value = "http://127.0.0.1:8090"
    )]
    pub psp_url: String,
    /// API key for the PSP (sent as a bearer token). Required, at least 32
    /// characters, no well-known value: generate one with
    /// `openssl rand -hex 32`.
    #[arg(long, env = "PAYSTREAM_PSP_API_KEY", hide_env_values = true)]
    pub psp_api_key: Option<Secret>,
    /// Secret the PSP signs its webhooks with. Required, same rules as the
    /// API key.
    #[arg(long, env = "PAYSTREAM_PSP_WEBHOOK_SECRET", hide_env_values = true)]
    pub psp_webhook_secret: Option<Secret>,
    /// Timeout of one PSP request.
    #[arg(long, env = "PAYSTREAM_PSP_TIMEOUT_MS", default_value_t = limits::PSP_TIMEOUT_MS_DEFAULT)]
    pub psp_timeout_ms: u64,
    /// Most payments executed at once (orders of one payment run one after
    /// the other). The default hides 50 ms of PSP latency at the raw limit
    /// of the executor's own rows and events (about 2,700 orders/s measured
    /// on a shared 2-core box): by Little's law that rate needs rate ×
    /// (PSP latency + the round's own work: two commits and an acked
    /// append, some tens of ms) ≈ 2,700/s × 0.1 s ≈ 270 payments in flight;
    /// 512 is two full batches of 256, so one batch's commits and appends
    /// overlap the other's PSP calls. The PSP sees at most this many calls
    /// at once.
    #[arg(long, env = "PAYSTREAM_EXECUTOR_MAX_IN_FLIGHT", default_value_t = limits::PAYMENTS_IN_FLIGHT_MAX_DEFAULT)]
    pub max_in_flight: usize,
    /// Most PSP attempts per order or refund before it fails for good.
    #[arg(long, env = "PAYSTREAM_EXECUTOR_MAX_ATTEMPTS", default_value_t = limits::ATTEMPTS_MAX_DEFAULT)]
    pub max_attempts: u32,
    /// Most time from the first attempt after which transient errors are
    /// no longer retried.
    #[arg(long, env = "PAYSTREAM_EXECUTOR_MAX_RETRY_SECS", default_value_t = limits::RETRY_SECS_MAX_DEFAULT)]
    pub max_retry_secs: u64,
    /// First retry delay (full jitter below it); doubles per attempt.
    #[arg(
        long,
        env = "PAYSTREAM_EXECUTOR_BACKOFF_BASE_MS",
        default_value_t = limits::BACKOFF_BASE_MS_DEFAULT
    )]
    pub backoff_base_ms: u64,
    /// Largest retry delay (Retry-After may ask for more and gets it).
    #[arg(
        long,
        env = "PAYSTREAM_EXECUTOR_BACKOFF_CAP_MS",
        default_value_t = limits::BACKOFF_CAP_MS_DEFAULT
    )]
    pub backoff_cap_ms: u64,
    /// Pending orders are polled at the PSP when no webhook resolved them
    /// within this time (and again every such period).
    #[arg(
        long,
        env = "PAYSTREAM_EXECUTOR_PENDING_POLL_AFTER_SECS",
        default_value_t = 300
    )]
    pub pending_poll_after_secs: u64,
    /// Accepted difference between a webhook signature's time and ours.
    #[arg(
        long,
        env = "PAYSTREAM_EXECUTOR_WEBHOOK_TOLERANCE_SECS",
        default_value_t = 300
    )]
    pub webhook_tolerance_secs: u64,
    /// How long a payment claimed by an executor is reserved to it; a
    /// crashed executor's payments are retaken after this.
    #[arg(long, env = "PAYSTREAM_EXECUTOR_LEASE_SECS", default_value_t = limits::LEASE_SECS_DEFAULT)]
    pub lease_secs: u64,
    /// After the last PSP call whose outcome is unknown (timeout, 409 key
    /// in use, ...), how long the PSP's "no charge" answer is not trusted
    /// yet (it may still be finishing that request). Default: 2 × the PSP
    /// timeout.
    #[arg(long, env = "PAYSTREAM_EXECUTOR_UNKNOWN_OUTCOME_GRACE_MS")]
    pub unknown_outcome_grace_ms: Option<u64>,
}

impl ExecutorArgs {
    /// Defaults with a random port and a given PSP, its API key and its
    /// webhook secret.
    pub fn for_tests(
        psp_url: &str,
        psp_api_key: Secret,
        psp_webhook_secret: Secret,
    ) -> ExecutorArgs {
        ExecutorArgs {
            listen: "127.0.0.1:0".parse().expect("valid address"),
            psp_url: psp_url.to_owned(),
            psp_api_key: Some(psp_api_key),
            psp_webhook_secret: Some(psp_webhook_secret),
            psp_timeout_ms: limits::PSP_TIMEOUT_MS_DEFAULT,
            max_in_flight: limits::PAYMENTS_IN_FLIGHT_MAX_DEFAULT,
            max_attempts: limits::ATTEMPTS_MAX_DEFAULT,
            max_retry_secs: limits::RETRY_SECS_MAX_DEFAULT,
            backoff_base_ms: limits::BACKOFF_BASE_MS_DEFAULT,
            backoff_cap_ms: limits::BACKOFF_CAP_MS_DEFAULT,
            pending_poll_after_secs: 300,
            webhook_tolerance_secs: 300,
            lease_secs: limits::LEASE_SECS_DEFAULT,
            unknown_outcome_grace_ms: None,
        }
    }
}

fn ms(v: u64, unit: u64) -> i64 {
    i64::try_from(v.saturating_mul(unit)).unwrap_or(i64::MAX)
}

/// The retry and timing policy, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub max_attempts: i32,
    pub max_total_ms: i64,
    pub backoff_base_ms: i64,
    pub backoff_cap_ms: i64,
    pub pending_poll_ms: i64,
    pub lease_ms: i64,
    pub webhook_tolerance_s: i64,
    /// See `ExecutorArgs::unknown_outcome_grace_ms`.
    pub unknown_grace_ms: i64,
}

impl Policy {
    pub fn from_args(a: &ExecutorArgs) -> Policy {
        assert!(a.max_attempts > 0, "max_attempts must be at least 1");
        assert!(a.lease_secs > 0, "lease must be positive");
        Policy {
            max_attempts: i32::try_from(a.max_attempts).unwrap_or(i32::MAX),
            max_total_ms: ms(a.max_retry_secs, 1000),
            backoff_base_ms: ms(a.backoff_base_ms, 1),
            backoff_cap_ms: ms(a.backoff_cap_ms, 1),
            pending_poll_ms: ms(a.pending_poll_after_secs, 1000),
            lease_ms: ms(a.lease_secs, 1000),
            webhook_tolerance_s: ms(a.webhook_tolerance_secs, 1),
            unknown_grace_ms: ms(
                a.unknown_outcome_grace_ms
                    .unwrap_or_else(|| a.psp_timeout_ms.saturating_mul(2)),
                1,
            ),
        }
    }

    /// Full-jitter exponential back-off before attempt `attempt + 1`, at
    /// least what Retry-After asked for.
    pub fn backoff_ms(&self, attempt: i32, retry_after: Option<Duration>) -> i64 {
        let exp = u32::try_from(attempt.saturating_sub(1).clamp(0, 30)).unwrap_or(30);
        let ceiling = self
            .backoff_base_ms
            .saturating_mul(1i64 << exp)
            .min(self.backoff_cap_ms)
            .max(1);
        let jittered = rand::random_range(0..=ceiling);
        let asked = retry_after
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        jittered.max(asked)
    }
}

/// State shared by the intake, the dispatcher and the webhook endpoint.
#[derive(Debug, Clone)]
pub struct App {
    pub db: Db,
    pub producer: EventProducer,
    pub psp: PspClient,
    pub policy: Policy,
    pub webhook_secret: Secret,
    pub max_in_flight: usize,
    /// Wakes the dispatcher when the intake recorded new work.
    pub work: Arc<Notify>,
    /// False once a part of the executor ended early (`/healthz` says so).
    pub health: runtime::supervise::Health,
}

/// A started executor.
#[derive(Debug)]
pub struct Running {
    /// Where the HTTP server listens (useful with port 0).
    pub addr: SocketAddr,
    pub app: App,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Waits until the executor stopped (after `shutdown` was cancelled).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("executor task")?
    }
}

/// Runs the executor until `shutdown`: intake consumer, dispatcher, HTTP
/// server (webhooks).
pub async fn serve(
    kafka: KafkaConfig,
    db_url: &str,
    args: ExecutorArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    start(kafka, db_url, args, shutdown).await?.wait().await
}

/// Starts everything and returns once the HTTP server is listening.
pub async fn start(
    kafka: KafkaConfig,
    db_url: &str,
    args: ExecutorArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    assert!(args.max_in_flight > 0, "max_in_flight must be positive");
    // No built-in secrets: refuse to start without good ones, before
    // touching the database or the broker.
    let psp_api_key = secret::require(
        args.psp_api_key.as_ref(),
        "--psp-api-key / PAYSTREAM_PSP_API_KEY",
    )?;
    let webhook_secret = secret::require(
        args.psp_webhook_secret.as_ref(),
        "--psp-webhook-secret / PAYSTREAM_PSP_WEBHOOK_SECRET",
    )?;
    let db = Db::connect(db_url).await?;
    store::migrate(&db)
        .await
        .context("migrating the executor's tables")?;
    let topology = kafka.topology();
    streaming::admin::ensure_topics(&kafka, &topology.specs())
        .await
        .context("creating topics")?;
    let producer = EventProducer::new(&kafka, "paystream-executor")?;
    // A lease shorter than a few PSP calls plus slack can run out while the
    // holder is still working (it is renewed during calls, but a stalled
    // database or scheduler can delay that).
    let lease_floor_ms = limits::lease_floor_ms(args.psp_timeout_ms);
    if args.lease_secs.saturating_mul(1000) < lease_floor_ms {
        tracing::warn!(
            lease_secs = args.lease_secs,
            psp_timeout_ms = args.psp_timeout_ms,
            "the payment lease is shorter than 3 x the PSP timeout + 30 s; a slow PSP call may outlive it"
        );
    }
    let psp = PspClient::new(
        &args.psp_url,
        psp_api_key,
        Duration::from_millis(args.psp_timeout_ms.max(1)),
    )?;
    let app = App {
        db: db.clone(),
        producer: producer.clone(),
        psp,
        policy: Policy::from_args(&args),
        webhook_secret,
        max_in_flight: args.max_in_flight,
        work: Arc::new(Notify::new()),
        health: runtime::supervise::Health::new(),
    };

    // Events recorded by a previous run but never acknowledged go out first.
    crate::dispatch::flush_outbox(&app, None, i64::MAX)
        .await
        .context("re-appending recorded events")?;

    let (addr, http) = runtime::http::spawn_server(
        args.listen,
        crate::webhook::router(app.clone()),
        "executor",
        shutdown.clone(),
    )
    .await?;
    let intake = tokio::spawn(streaming::run_consumer(
        kafka.clone(),
        ConsumerSettings::new(
            topology.group("executor"),
            vec![topology.name(events::TopicKind::Payments)],
        ),
        producer.clone(),
        crate::intake::Intake::new(app.clone()),
        shutdown.clone(),
    ));
    let dispatcher = tokio::spawn(crate::dispatch::run(app.clone(), shutdown.clone()));
    // An executor is alive only while all of its parts are: the first to
    // end early marks it unhealthy (`/healthz`), stops the rest and fails
    // the process, so an orchestrator restarts it.
    let mut parts = runtime::supervise::Supervisor::new(shutdown.clone(), app.health.clone());
    parts.spawn("HTTP server", async move {
        http.await??;
        anyhow::Ok(())
    });
    parts.spawn("intake consumer", async move {
        intake.await??;
        anyhow::Ok(())
    });
    parts.spawn("dispatcher", async move {
        dispatcher.await?;
        anyhow::Ok(())
    });
    let task = tokio::spawn(async move {
        let result = parts.wait().await;
        producer.flush(Duration::from_secs(10))?;
        db.close().await;
        result
    });
    Ok(Running { addr, app, task })
}
