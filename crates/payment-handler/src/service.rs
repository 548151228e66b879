//! Configuration, shared state, the submit path shared by HTTP and the
//! inbound topic, and `serve`.

use crate::request::PaymentRequest;
use crate::risk::{RecentActivity, RiskCheck, RiskDecision, RiskRules};
use crate::store::{self, IdempotencyPolicy, PaymentView};
use anyhow::Context;
use events::{
    ClientId, CorrelationId, Envelope, EventId, Money, OrderId, PaymentId, PaymentOrder,
    PaymentRequested, RiskApproved, RiskRejected, SCHEMA_VERSION, Timestamp, TopicKind,
};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use storage::Db;
use streaming::{ConsumerSettings, EventProducer, KafkaConfig};
use tokio_util::sync::CancellationToken;

const PRODUCER: &str = concat!("payment-handler/", env!("CARGO_PKG_VERSION"));

/// `paystream serve handler` options.
#[derive(Debug, Clone, clap::Args)]
pub struct HandlerArgs {
    /// Address of the HTTP API.
    #[arg(
        long = "listen",
        env = "PAYSTREAM_HTTP_ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub listen: SocketAddr,
    /// Risk rule set (TOML); the built-in default is config/risk-rules.toml.
    #[arg(long, env = "PAYSTREAM_RISK_RULES")]
    pub risk_rules: Option<PathBuf>,
    /// How long a finished Idempotency-Key is kept and replayed.
    #[arg(
        long,
        env = "PAYSTREAM_IDEMPOTENCY_RETENTION_HOURS",
        default_value_t = 24
    )]
    pub idempotency_retention_hours: u64,
    /// How long a request may hold its key before a retry may take it over
    /// (the holder is presumed crashed). Longer than any request takes.
    #[arg(long, env = "PAYSTREAM_IDEMPOTENCY_LEASE_SECS", default_value_t = 30)]
    pub idempotency_lease_secs: u64,
    /// Largest accepted request body.
    #[arg(long, env = "PAYSTREAM_BODY_LIMIT_BYTES", default_value_t = 65_536)]
    pub body_limit_bytes: usize,
}

impl HandlerArgs {
    pub fn for_tests() -> HandlerArgs {
        HandlerArgs {
            listen: "127.0.0.1:0".parse().expect("valid address"),
            risk_rules: None,
            idempotency_retention_hours: 24,
            idempotency_lease_secs: 30,
            body_limit_bytes: 65_536,
        }
    }
}

/// Test-only fault injection, from `PAYSTREAM_FAULT_INJECT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Abort the process right after the events were appended and before the
    /// response is stored: the worst moment for a crash.
    CrashAfterAppend,
}

impl Fault {
    pub fn from_env() -> Fault {
        match std::env::var("PAYSTREAM_FAULT_INJECT").as_deref() {
            Ok("crash_after_append") => Fault::CrashAfterAppend,
            _ => Fault::None,
        }
    }
}

/// State shared by the HTTP handlers and consumers.
#[derive(Debug, Clone)]
pub struct App {
    pub db: Db,
    pub producer: EventProducer,
    pub risk: Arc<dyn RiskCheck>,
    pub policy: IdempotencyPolicy,
    pub body_limit: usize,
    pub fault: Fault,
}

impl App {
    pub fn new(db: Db, producer: EventProducer, args: &HandlerArgs) -> anyhow::Result<App> {
        let risk: Arc<dyn RiskCheck> = match &args.risk_rules {
            Some(path) => Arc::new(RiskRules::load(path)?),
            None => Arc::new(RiskRules::default_rules()),
        };
        let hours_ms = i64::try_from(args.idempotency_retention_hours.saturating_mul(3_600_000))
            .unwrap_or(i64::MAX);
        let lease_ms =
            i64::try_from(args.idempotency_lease_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        Ok(App {
            db,
            producer,
            risk,
            policy: IdempotencyPolicy {
                lease_ms,
                retention_ms: hours_ms,
            },
            body_limit: args.body_limit_bytes,
            fault: Fault::from_env(),
        })
    }
}

/// A failure that is not the client's: try again later.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

impl From<sqlx::Error> for Unavailable {
    fn from(e: sqlx::Error) -> Self {
        Unavailable(format!("database: {e}"))
    }
}

/// Decides and appends one payment: `PaymentRequested` and the risk
/// decision, both with ids derived from the payment id, so doing this twice
/// appends duplicates that every consumer drops. Returns the payment as the
/// status projection now shows it.
pub async fn submit(
    app: &App,
    client: &ClientId,
    payment: PaymentId,
    idempotency_key: Option<&str>,
    req: &PaymentRequest,
) -> Result<PaymentView, Unavailable> {
    let currency = req.currency();
    let recent = match app.risk.velocity_window_ms() {
        Some(window) => {
            let since = store::now_ms().saturating_sub(window);
            let (count, sum) = store::recent_activity(
                &app.db,
                req.buyer_id.as_str(),
                currency.code(),
                since,
                payment,
            )
            .await?;
            RecentActivity {
                count: u32::try_from(count).unwrap_or(u32::MAX),
                amount: Money::new(sum, currency),
            }
        }
        None => RecentActivity {
            count: 0,
            amount: Money::zero(currency),
        },
    };
    let decision = app.risk.assess(req, &recent);
    let now = Timestamp::now();
    let requested_id = EventId::derive(payment.as_uuid(), "requested");
    let base = |event_id, causation, event| Envelope {
        event_id,
        occurred_at: now,
        payment_id: Some(payment),
        correlation_id: CorrelationId::from_uuid(payment.as_uuid()),
        causation_id: causation,
        producer: PRODUCER.to_owned(),
        schema_version: SCHEMA_VERSION,
        event,
    };
    let requested = base(
        requested_id,
        None,
        PaymentRequested {
            client_id: client.clone(),
            idempotency_key: idempotency_key.map(str::to_owned),
            buyer_id: req.buyer_id.clone(),
            orders: req
                .orders
                .iter()
                .enumerate()
                .map(|(i, o)| PaymentOrder {
                    order_id: OrderId::derive(payment, i),
                    seller_id: o.seller_id.clone(),
                    amount: o.amount,
                })
                .collect(),
            metadata: req.metadata.clone(),
        }
        .into(),
    );
    let rule_set = app.risk.rule_set().to_owned();
    let risk_event = match decision {
        RiskDecision::Approved => RiskApproved { rule_set }.into(),
        RiskDecision::Rejected { rule, reason } => RiskRejected {
            rule_set,
            rule: rule.to_owned(),
            reason,
        }
        .into(),
    };
    // Approved or rejected, the risk decision of a payment has one id: only
    // one decision per payment can ever survive deduplication.
    let risk = base(
        EventId::derive(payment.as_uuid(), "risk"),
        Some(requested_id),
        risk_event,
    );
    for env in [&requested, &risk] {
        app.producer
            .append(env)
            .await
            .map_err(|e| Unavailable(format!("broker: {e}")))?;
    }
    if app.fault == Fault::CrashAfterAppend {
        tracing::error!(
            "fault injection: aborting after the append, before the response is stored"
        );
        std::process::abort();
    }
    store::apply_status(&app.db, &[&requested, &risk]).await?;
    store::get_payment(&app.db, &payment.to_string(), client)
        .await?
        .ok_or_else(|| Unavailable("payment vanished from the status projection".into()))
}

/// A started handler.
#[derive(Debug)]
pub struct Running {
    /// Where the HTTP API listens (useful with port 0).
    pub addr: SocketAddr,
    pub app: App,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Waits until the handler stopped (after `shutdown` was cancelled).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("handler task")?
    }
}

/// Runs the handler until `shutdown`: HTTP API, inbound-topic consumer,
/// payment-status projection, idempotency-key reaper.
pub async fn serve(
    kafka: KafkaConfig,
    db_url: &str,
    args: HandlerArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    start(kafka, db_url, args, shutdown).await?.wait().await
}

/// Starts everything and returns once the API is listening.
pub async fn start(
    kafka: KafkaConfig,
    db_url: &str,
    args: HandlerArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    let db = Db::connect(db_url).await?;
    store::migrate(&db)
        .await
        .context("migrating the handler's tables")?;
    let topology = kafka.topology();
    streaming::admin::ensure_topics(&kafka, &topology.specs())
        .await
        .context("creating topics")?;
    let producer = EventProducer::new(&kafka, "paystream-payment-handler")?;
    let app = App::new(db.clone(), producer.clone(), &args)?;

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "payment handler listening");
    let http = {
        let (router, shutdown) = (crate::api::router(app.clone()), shutdown.clone());
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
        })
    };
    let status = tokio::spawn(streaming::run_consumer(
        kafka.clone(),
        ConsumerSettings::new(
            topology.group("payment-status"),
            vec![topology.name(TopicKind::Payments)],
        ),
        producer.clone(),
        crate::status::StatusProjection::new(db.clone()),
        shutdown.clone(),
    ));
    let inbound = tokio::spawn(streaming::run_consumer(
        kafka.clone(),
        ConsumerSettings::new(
            topology.group("handler-inbound"),
            vec![topology.name(TopicKind::Inbound)],
        ),
        producer.clone(),
        crate::inbound::Inbound::new(app.clone()),
        shutdown.clone(),
    ));
    let reaper = {
        let (db, shutdown) = (db.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                match store::idem_reap(&db).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(reaped = n, "expired idempotency keys deleted"),
                    Err(e) => tracing::warn!(error = %e, "reaping idempotency keys failed"),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                }
            }
        })
    };
    let task = tokio::spawn(async move {
        http.await??;
        status.await??;
        inbound.await??;
        reaper.await?;
        producer.flush(Duration::from_secs(10))?;
        db.close().await;
        Ok(())
    });
    Ok(Running { addr, app, task })
}
