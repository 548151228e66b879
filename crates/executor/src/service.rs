//! Configuration, shared state and `serve`/`start`.

use crate::psp::PspClient;
use crate::store;
use anyhow::Context;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use storage::Db;
use streaming::{ConsumerSettings, EventProducer, KafkaConfig};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub(crate) const PRODUCER: &str = concat!("executor/", env!("CARGO_PKG_VERSION"));

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
    /// API key for the PSP (sent as a bearer token).
    #[arg(long, env = "PAYSTREAM_PSP_API_KEY", default_value = "sk_test_default")]
    pub psp_api_key: String,
    /// Secret the PSP signs its webhooks with.
    #[arg(
        long,
        env = "PAYSTREAM_PSP_WEBHOOK_SECRET",
        default_value = "whsec_default"
    )]
    pub psp_webhook_secret: String,
    /// Timeout of one PSP request.
    #[arg(long, env = "PAYSTREAM_PSP_TIMEOUT_MS", default_value_t = 10_000)]
    pub psp_timeout_ms: u64,
    /// Most payments executed at once (orders of one payment run one after
    /// the other).
    #[arg(long, env = "PAYSTREAM_EXECUTOR_MAX_IN_FLIGHT", default_value_t = 64)]
    pub max_in_flight: usize,
    /// Most PSP attempts per order or refund before it fails for good.
    #[arg(long, env = "PAYSTREAM_EXECUTOR_MAX_ATTEMPTS", default_value_t = 8)]
    pub max_attempts: u32,
    /// Most time from the first attempt after which transient errors are
    /// no longer retried.
    #[arg(long, env = "PAYSTREAM_EXECUTOR_MAX_RETRY_SECS", default_value_t = 600)]
    pub max_retry_secs: u64,
    /// First retry delay (full jitter below it); doubles per attempt.
    #[arg(
        long,
        env = "PAYSTREAM_EXECUTOR_BACKOFF_BASE_MS",
        default_value_t = 200
    )]
    pub backoff_base_ms: u64,
    /// Largest retry delay (Retry-After may ask for more and gets it).
    #[arg(
        long,
        env = "PAYSTREAM_EXECUTOR_BACKOFF_CAP_MS",
        default_value_t = 30_000
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
    #[arg(long, env = "PAYSTREAM_EXECUTOR_LEASE_SECS", default_value_t = 60)]
    pub lease_secs: u64,
    /// After the last PSP call whose outcome is unknown (timeout, 409 key
    /// in use, ...), how long the PSP's "no charge" answer is not trusted
    /// yet (it may still be finishing that request). Default: 2 × the PSP
    /// timeout.
    #[arg(long, env = "PAYSTREAM_EXECUTOR_UNKNOWN_OUTCOME_GRACE_MS")]
    pub unknown_outcome_grace_ms: Option<u64>,
}

impl ExecutorArgs {
    /// Defaults with a random port and a given PSP.
    pub fn for_tests(psp_url: &str) -> ExecutorArgs {
        ExecutorArgs {
            listen: "127.0.0.1:0".parse().expect("valid address"),
            psp_url: psp_url.to_owned(),
            psp_api_key: "sk_test_default".into(),
            psp_webhook_secret: "whsec_default".into(),
            psp_timeout_ms: 10_000,
            max_in_flight: 64,
            max_attempts: 8,
            max_retry_secs: 600,
            backoff_base_ms: 200,
            backoff_cap_ms: 30_000,
            pending_poll_after_secs: 300,
            webhook_tolerance_secs: 300,
            lease_secs: 60,
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
    pub webhook_secret: Arc<[u8]>,
    pub max_in_flight: usize,
    /// Wakes the dispatcher when the intake recorded new work.
    pub work: Arc<Notify>,
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
    let lease_floor_ms = args.psp_timeout_ms.saturating_mul(3).saturating_add(30_000);
    if args.lease_secs.saturating_mul(1000) < lease_floor_ms {
        tracing::warn!(
            lease_secs = args.lease_secs,
            psp_timeout_ms = args.psp_timeout_ms,
            "the payment lease is shorter than 3 x the PSP timeout + 30 s; a slow PSP call may outlive it"
        );
    }
    let psp = PspClient::new(
        &args.psp_url,
        &args.psp_api_key,
        Duration::from_millis(args.psp_timeout_ms.max(1)),
    )?;
    let app = App {
        db: db.clone(),
        producer: producer.clone(),
        psp,
        policy: Policy::from_args(&args),
        webhook_secret: Arc::from(args.psp_webhook_secret.as_bytes()),
        max_in_flight: args.max_in_flight,
        work: Arc::new(Notify::new()),
    };

    // Events recorded by a previous run but never acknowledged go out first.
    crate::dispatch::flush_outbox(&app, None, i64::MAX)
        .await
        .context("re-appending recorded events")?;

    let (addr, http) = streaming::http::spawn_server(
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
    let task = tokio::spawn(async move {
        http.await??;
        intake.await??;
        dispatcher.await?;
        producer.flush(Duration::from_secs(10))?;
        db.close().await;
        Ok(())
    });
    Ok(Running { addr, app, task })
}
