//! Configuration, shared state, the submit path shared by HTTP and the
//! inbound topic, and `serve`.

use crate::error_code::ErrorCode;
use crate::limits;
use crate::request::PaymentRequest;
use crate::risk::{RecentActivity, RiskCheck, RiskDecision, RiskRules};
use crate::store::{self, IdempotencyPolicy};
use anyhow::Context;
use domain::payment::{PaymentCommand, PaymentState, RiskVerdict, Submission};
use domain::refund::{OrderRefunds, RefundCommand, RefundRejection, RefundRequest};
use events::{ClientId, Envelope, Money, PaymentId, Timestamp, TopicKind};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use storage::Db;
use streaming::{ConsumerSettings, EventProducer, KafkaConfig};
use tokio_util::sync::CancellationToken;

/// How often abandoned requests are swept and expired keys reaped.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

pub(crate) const PRODUCER: &str = concat!("payment-handler/", env!("CARGO_PKG_VERSION"));

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
    /// The retention in seconds, overriding the hours when set (tests and
    /// short-lived setups). A decided request's fingerprint is kept beyond
    /// the retention, for as long as its payment exists.
    #[arg(long, env = "PAYSTREAM_IDEMPOTENCY_RETENTION_SECS")]
    pub idempotency_retention_secs: Option<u64>,
    /// How long a request may hold its key before a retry may take it over
    /// (the holder is presumed crashed). Longer than any request takes.
    #[arg(long, env = "PAYSTREAM_IDEMPOTENCY_LEASE_SECS", default_value_t = limits::IDEMPOTENCY_LEASE_SECS_DEFAULT)]
    pub idempotency_lease_secs: u64,
    /// Largest accepted request body.
    #[arg(long, env = "PAYSTREAM_BODY_LIMIT_BYTES", default_value_t = limits::BODY_LIMIT_BYTES_DEFAULT)]
    pub body_limit_bytes: usize,
    /// Testing only: `crash_after_append` aborts the process right after a
    /// payment's events were appended; `fail_after_append_once` answers 503
    /// once at that point.
    #[arg(long, hide = true, env = "PAYSTREAM_FAULT_INJECT")]
    pub fault_inject: Option<String>,
    /// Group commit: most `POST /v1/payments` requests decided, stored and
    /// appended together (see `group`); 0 or 1 handles each request alone.
    #[arg(long, env = "PAYSTREAM_GROUP_COMMIT_MAX", default_value_t = limits::GROUP_COMMIT_MAX_DEFAULT)]
    pub group_commit_max: usize,
    /// Group commit: how long a batch waits for more requests once its
    /// first one arrived, in milliseconds.
    #[arg(long, env = "PAYSTREAM_GROUP_COMMIT_WAIT_MS", default_value_t = limits::GROUP_COMMIT_WAIT_MS_DEFAULT)]
    pub group_commit_wait_ms: u64,
    /// Group commit: how many batches may be in progress at once (one
    /// batch's produce round overlaps the next one's claims).
    #[arg(long, env = "PAYSTREAM_GROUP_COMMIT_BATCHES", default_value_t = limits::GROUP_COMMIT_BATCHES_DEFAULT)]
    pub group_commit_batches: usize,
}

impl HandlerArgs {
    pub fn for_tests() -> HandlerArgs {
        HandlerArgs {
            listen: "127.0.0.1:0".parse().expect("valid address"),
            risk_rules: None,
            idempotency_retention_hours: 24,
            idempotency_retention_secs: None,
            idempotency_lease_secs: limits::IDEMPOTENCY_LEASE_SECS_DEFAULT,
            body_limit_bytes: limits::BODY_LIMIT_BYTES_DEFAULT,
            fault_inject: None,
            group_commit_max: limits::GROUP_COMMIT_MAX_DEFAULT,
            group_commit_wait_ms: limits::GROUP_COMMIT_WAIT_MS_DEFAULT,
            group_commit_batches: limits::GROUP_COMMIT_BATCHES_DEFAULT,
        }
    }

    /// The group commit's limits, if it is on.
    pub fn group_commit(&self) -> Option<crate::group::Limits> {
        (self.group_commit_max > 1).then(|| crate::group::Limits {
            max: self.group_commit_max,
            wait: Duration::from_millis(self.group_commit_wait_ms),
            batches: self.group_commit_batches,
        })
    }
}

/// A `--fault-inject` value that names no fault.
#[derive(Debug, thiserror::Error)]
#[error("unknown fault {0:?}")]
pub struct UnknownFault(pub String);

/// Why [`App::new`] cannot build the handler's state from its flags.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    RiskRules(#[from] crate::risk::RulesError),
    #[error(transparent)]
    Fault(#[from] UnknownFault),
}

/// Test-only fault injection (`--fault-inject`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Abort the process right after the events were appended and before the
    /// response is stored: the worst moment for a crash.
    CrashAfterAppend,
    /// Fail (503) once right after the append, as a lost connection would.
    FailAfterAppendOnce,
}

impl Fault {
    pub fn parse(s: Option<&str>) -> Result<Fault, UnknownFault> {
        match s {
            None | Some("") => Ok(Fault::None),
            Some("crash_after_append") => Ok(Fault::CrashAfterAppend),
            Some("fail_after_append_once") => Ok(Fault::FailAfterAppendOnce),
            Some(other) => Err(UnknownFault(other.to_owned())),
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
    fault_fired: Arc<std::sync::atomic::AtomicBool>,
    /// False once a part of the handler ended early (`/readyz` says so).
    pub health: runtime::supervise::Health,
    /// The API keys in memory (`keys`): no database work per request.
    pub keys: Arc<crate::keys::KeyDirectory>,
    /// Where `POST /v1/payments` requests are batched (`group`); `None`:
    /// each request is handled alone.
    pub group: Option<crate::group::GroupCommit>,
}

impl App {
    pub fn new(db: Db, producer: EventProducer, args: &HandlerArgs) -> Result<App, AppError> {
        let risk: Arc<dyn RiskCheck> = match &args.risk_rules {
            Some(path) => Arc::new(RiskRules::load(path)?),
            None => Arc::new(RiskRules::default_rules()),
        };
        let hours_ms = i64::try_from(match args.idempotency_retention_secs {
            Some(secs) => secs.saturating_mul(1000),
            None => args.idempotency_retention_hours.saturating_mul(3_600_000),
        })
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
            fault: Fault::parse(args.fault_inject.as_deref())?,
            fault_fired: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            health: runtime::supervise::Health::new(),
            keys: Arc::default(),
            group: None,
        })
    }

    /// Whether the one-time fault fires now (it fires once per process).
    /// The injected fault at the point right after an append, before the
    /// stored answer: aborts the process, or fails once, or nothing.
    pub(crate) fn fault_after_append(&self) -> Result<(), Unavailable> {
        match self.fault {
            Fault::CrashAfterAppend => {
                tracing::error!(
                    "fault injection: aborting after the append, before the response is stored"
                );
                std::process::abort();
            }
            Fault::FailAfterAppendOnce
                if !self
                    .fault_fired
                    .swap(true, std::sync::atomic::Ordering::SeqCst) =>
            {
                Err(Unavailable(
                    "fault injection: failing once after the append".into(),
                ))
            }
            _ => Ok(()),
        }
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

/// Decides one payment: the risk check, and the `PaymentRequested` and risk
/// events with ids derived from the payment id. Its only side effect is
/// counting the payment in the buyer's velocity window; the caller stores
/// the events under its idempotency key, then `commit_events`.
pub async fn decide_payment(
    app: &App,
    client: &ClientId,
    payment: PaymentId,
    idempotency_key: Option<&str>,
    req: &PaymentRequest,
) -> Result<Vec<Envelope>, Unavailable> {
    let currency = req.currency();
    let recent = match app.risk.velocity_window_ms() {
        Some(window) => {
            let total = req.total().map_err(|e| Unavailable(e.message))?;
            store::note_velocity(
                &app.db,
                client,
                payment,
                req.buyer_id.as_str(),
                currency.code(),
                total.amount_minor(),
            )
            .await?;
            let since = store::now_ms().saturating_sub(window);
            let (count, sum) = store::recent_activity(
                &app.db,
                client,
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
    decide_submission(
        app,
        client,
        payment,
        idempotency_key,
        req,
        &recent,
        Timestamp::now(),
    )
}

/// The pure part of a payment's decision, given the buyer's recent
/// activity and the time: the risk verdict, then `domain::payment::decide`
/// on a payment nothing was decided for yet.
pub fn decide_submission(
    app: &App,
    client: &ClientId,
    payment: PaymentId,
    idempotency_key: Option<&str>,
    req: &PaymentRequest,
    recent: &RecentActivity,
    at: Timestamp,
) -> Result<Vec<Envelope>, Unavailable> {
    let rule_set = app.risk.rule_set().to_owned();
    let risk = match app.risk.assess(req, recent) {
        RiskDecision::Approved => RiskVerdict::Approved { rule_set },
        RiskDecision::Rejected { rule, reason } => RiskVerdict::Rejected {
            rule_set,
            rule: rule.to_owned(),
            reason,
        },
    };
    let submission = Submission {
        payment_id: payment,
        client_id: client.clone(),
        idempotency_key: idempotency_key.map(str::to_owned),
        buyer_id: req.buyer_id.clone(),
        orders: req
            .orders
            .iter()
            .map(|o| (o.seller_id.clone(), o.amount))
            .collect(),
        metadata: req.metadata.clone(),
        risk,
        at,
        producer: PRODUCER.to_owned(),
    };
    domain::payment::decide(&PaymentState::New, PaymentCommand::Submit(submission))
        .map_err(|e| Unavailable(format!("payment decision: {e}")))
}

/// The view `GET /v1/payments/{id}` shows right after a payment's decided
/// events were applied: built in memory from the events (the group
/// commit's 201 body), through `domain::payment::apply`.
pub fn view_of_decided(envs: &[Envelope]) -> Option<store::PaymentView> {
    let state = envs.iter().fold(PaymentState::New, domain::payment::apply);
    let PaymentState::Live(p) = state else {
        return None;
    };
    let first = envs.first()?;
    let last = envs.last()?;
    let r = &p.requested;
    let currency = r.orders.first()?.amount.currency();
    let total = Money::checked_sum(currency, r.orders.iter().map(|o| o.amount)).ok()?;
    let ts = |t: Timestamp| Timestamp::from_micros(t.as_micros()).to_string();
    Some(store::PaymentView {
        payment_id: p.payment_id.to_string(),
        status: p.status.as_str().to_owned(),
        buyer_id: r.buyer_id.as_str().to_owned(),
        currency: currency.code().to_owned(),
        total_minor: total.amount_minor(),
        rejection: p
            .rejection
            .clone()
            .map(|(rule, reason)| store::Rejection { rule, reason }),
        orders: r
            .orders
            .iter()
            .zip(&p.orders)
            .map(|(o, (_, status))| store::OrderView {
                order_id: o.order_id.to_string(),
                seller_id: o.seller_id.as_str().to_owned(),
                amount_minor: o.amount.amount_minor(),
                currency: o.amount.currency().code().to_owned(),
                status: status.as_str().to_owned(),
                psp_reference: None,
                failure_reason: None,
                refunded_minor: 0,
            })
            .collect(),
        created_at: ts(first.occurred_at),
        updated_at: ts(last.occurred_at),
    })
}

/// Sends one event whose Avro bytes are already encoded (the bytes stored
/// under its key), with the headers `EventProducer::append_to` sets, and
/// waits for its acknowledgement. Sends start when the future is first
/// polled: the group commit polls all of a batch's sends together.
pub async fn append_encoded(app: &App, env: &Envelope, payload: &[u8]) -> Result<(), Unavailable> {
    let topic = app.producer.topology().topic_for(env);
    app.producer
        .append_encoded(&topic, env, payload)
        .await
        .map(drop)
        .map_err(|e| Unavailable(format!("broker: {e}")))
}

/// The refusal of a request whose key already made a payment that kept no
/// fingerprint (decided before fingerprints were kept for good).
pub(crate) fn key_already_used() -> Reply {
    Reply::refusal(
        422,
        ErrorCode::IdempotencyKeyReused,
        "a payment was already made under this Idempotency-Key",
        Some("Idempotency-Key"),
    )
}

/// Appends decided events (in order, each acknowledged) and applies them to
/// the status projection. Safe to repeat: the ids are derived.
pub async fn commit_events(app: &App, envs: &[Envelope]) -> Result<(), Unavailable> {
    for env in envs {
        app.producer
            .append(env)
            .await
            .map_err(|e| Unavailable(format!("broker: {e}")))?;
    }
    app.fault_after_append()?;
    let refs: Vec<&Envelope> = envs.iter().collect();
    store::apply_status(&app.db, &refs).await?;
    Ok(())
}

/// Decided events as stored under an idempotency key: the Avro
/// single-object bytes of each, hex, newline-separated.
pub fn encode_pending(envs: &[Envelope]) -> String {
    envs.iter()
        .map(|e| hex::encode(events::avro::encode(e).expect("our events encode")))
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn decode_pending(s: &str) -> Result<Vec<Envelope>, Unavailable> {
    s.lines()
        .map(|l| {
            let bytes = hex::decode(l)
                .map_err(|e| Unavailable(format!("stored events are corrupt: {e}")))?;
            events::avro::decode(&bytes)
                .map_err(|e| Unavailable(format!("stored events are undecodable: {e}")))
        })
        .collect()
}

/// An answer to an idempotent request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    /// Stored and replayed for this key (successes and business refusals);
    /// false for answers that may change (not found yet, not captured yet).
    pub sticky: bool,
    pub retry_after_s: Option<u64>,
}

impl Reply {
    pub(crate) fn sticky(status: u16, body: String) -> Reply {
        Reply {
            status,
            body,
            sticky: true,
            retry_after_s: None,
        }
    }
    pub(crate) fn refusal(
        status: u16,
        code: ErrorCode,
        message: impl Into<String>,
        field: Option<&str>,
    ) -> Reply {
        Reply::sticky(status, crate::api::error_json(code, &message.into(), field))
    }
    fn transient(
        status: u16,
        code: ErrorCode,
        message: impl Into<String>,
        field: Option<&str>,
    ) -> Reply {
        Reply {
            sticky: false,
            retry_after_s: Some(1),
            ..Reply::refusal(status, code, message, field)
        }
    }
}

fn lost(e: store::IdemError) -> Unavailable {
    Unavailable(e.to_string())
}

/// A payment request whose Idempotency-Key this request owns. `pending`:
/// events an earlier owner decided on; they are re-appended, never
/// re-decided, so one key can never yield two different decisions.
pub async fn run_owned_payment(
    app: &App,
    client: &ClientId,
    key: &str,
    token: &str,
    pending: Option<String>,
    body: &[u8],
) -> Result<Reply, Unavailable> {
    let payment = PaymentId::derive(client, key);
    let envs = match pending {
        Some(p) => decode_pending(&p)?,
        None => {
            let req = match crate::request::parse(body) {
                Ok(r) => r,
                Err(fe) => {
                    return Ok(Reply::refusal(
                        400,
                        fe.code,
                        fe.message,
                        Some(fe.field.as_str()).filter(|f| !f.is_empty()),
                    ));
                }
            };
            // A payment under this key exists but no fingerprint was kept
            // (decided before fingerprints were kept for good): whatever
            // this request holds, it must not be decided again.
            if store::get_payment(&app.db, &payment.to_string(), client)
                .await?
                .is_some()
            {
                return Ok(key_already_used());
            }
            let envs = decide_payment(app, client, payment, Some(key), &req).await?;
            store::idem_store_pending(&app.db, client, key, token, &encode_pending(&envs), payment)
                .await
                .map_err(lost)?;
            envs
        }
    };
    commit_events(app, &envs).await?;
    let view = store::get_payment(&app.db, &payment.to_string(), client)
        .await?
        .ok_or_else(|| Unavailable("payment vanished from the status projection".into()))?;
    Ok(Reply::sticky(
        201,
        serde_json::to_string(&view).expect("views serialise"),
    ))
}

/// The answer to a request decided under its key before the key's
/// retention ran out ([`store::Begin::Decided`]): the current view of the
/// payment or refund it created.
pub async fn decided_reply(
    app: &App,
    client: &ClientId,
    kind: &str,
    resource: &str,
) -> Result<Reply, Unavailable> {
    let body = match kind {
        "payment" => store::get_payment(&app.db, resource, client)
            .await?
            .map(|v| serde_json::to_string(&v).expect("views serialise")),
        _ => store::get_refund(&app.db, resource)
            .await?
            .map(|v| serde_json::to_string(&v).expect("views serialise")),
    };
    let body = body.ok_or_else(|| {
        Unavailable(format!(
            "{kind} {resource} is not in the status projection yet"
        ))
    })?;
    Ok(Reply::sticky(201, body))
}

/// A refund request whose Idempotency-Key this request owns.
pub async fn run_owned_refund(
    app: &App,
    client: &ClientId,
    key: &str,
    token: &str,
    pending: Option<String>,
    payment_path: &str,
    body: &[u8],
) -> Result<Reply, Unavailable> {
    let envs = match pending {
        Some(p) => decode_pending(&p)?,
        None => {
            let r = match crate::request::parse_refund(body) {
                Ok(r) => r,
                Err(fe) => {
                    return Ok(Reply::refusal(
                        400,
                        fe.code,
                        fe.message,
                        Some(fe.field.as_str()).filter(|f| !f.is_empty()),
                    ));
                }
            };
            // Not found *yet* is not stored: the payment may still be on its
            // way through the inbound topic.
            let not_found =
                || Reply::transient(404, ErrorCode::PaymentNotFound, "no such payment", None);
            let Ok(payment) = payment_path.parse::<PaymentId>() else {
                return Ok(Reply::refusal(
                    404,
                    ErrorCode::PaymentNotFound,
                    "no such payment",
                    None,
                ));
            };
            let pid = payment.to_string();
            let Some((owner, status, amount, currency, reserved)) =
                store::refundable(&app.db, &pid, &r.order_id.to_string()).await?
            else {
                return match store::get_payment(&app.db, &pid, client).await? {
                    None => Ok(not_found()),
                    Some(_) => Ok(Reply::refusal(
                        400,
                        ErrorCode::OrderNotInPayment,
                        "order_id is not an order of this payment",
                        Some("order_id"),
                    )),
                };
            };
            if owner != client.as_str() {
                return Ok(not_found());
            }
            // The rules are `domain::refund`'s; the SQL below only keeps them
            // (a compare-and-set on the reservation).
            let (Some(order_status), Ok(currency)) = (
                domain::payment::OrderStatus::parse(&status),
                events::Currency::from_code(&currency),
            ) else {
                return Err(Unavailable(format!(
                    "order {} has an unknown status {status:?} or currency {currency:?}",
                    r.order_id
                )));
            };
            let mut order = OrderRefunds::new(
                payment,
                r.order_id,
                Money::new(amount, currency),
                order_status,
            );
            order.reserved_minor = reserved;
            let refund_id = events::RefundId::derive(client, key);
            let command = RefundCommand::Request(RefundRequest {
                refund_id,
                amount_minor: r.amount_minor,
                reason: r.reason,
                at: Timestamp::now(),
                producer: PRODUCER.to_owned(),
            });
            let field = Some("order_id");
            let too_much = |e: &RefundRejection| {
                Reply::refusal(
                    422,
                    ErrorCode::AmountExceedsRefundable,
                    e.to_string(),
                    Some("amount_minor"),
                )
            };
            let envs = match domain::refund::decide(&order, command) {
                Ok(envs) => envs,
                Err(e @ RefundRejection::NotRefundable(_)) => {
                    return Ok(Reply::refusal(
                        422,
                        ErrorCode::OrderNotRefundable,
                        e.to_string(),
                        field,
                    ));
                }
                Err(e @ RefundRejection::NotCaptured(_)) => {
                    return Ok(Reply::transient(
                        409,
                        ErrorCode::OrderNotCaptured,
                        e.to_string(),
                        field,
                    ));
                }
                Err(e @ RefundRejection::ExceedsRefundable { .. }) => return Ok(too_much(&e)),
                // A fresh order state holds no refunds: never reused here (the
                // key's fingerprint guards reuse).
                Err(e @ RefundRejection::KeyReused) => {
                    return Ok(Reply::refusal(
                        422,
                        ErrorCode::IdempotencyKeyReused,
                        e.to_string(),
                        Some("Idempotency-Key"),
                    ));
                }
            };
            let refund = match &envs[0].event {
                events::Event::RefundRequested(r) => r.clone(),
                other => {
                    return Err(Unavailable(format!(
                        "a refund decision made a {}",
                        other.event_type()
                    )));
                }
            };
            // What is left, as the refusal of a refund that lost the race
            // for the rest says it.
            let lost_race = RefundRejection::ExceedsRefundable {
                available_minor: order.available_minor(),
                captured_minor: order.captured_minor(),
                reserved_minor: order.reserved_minor,
                currency: currency.code().to_owned(),
            };
            let pending = encode_pending(&envs);
            let at = envs[0].occurred_at.as_micros();
            if !store::reserve_refund(&app.db, client, key, token, &refund, &pid, at, &pending)
                .await
                .map_err(lost)?
            {
                return Ok(too_much(&lost_race)); // a concurrent refund took the rest
            }
            envs
        }
    };
    commit_events(app, &envs).await?;
    let refund_id = match &envs[0].event {
        events::Event::RefundRequested(r) => r.refund_id,
        other => {
            return Err(Unavailable(format!(
                "stored refund events hold a {}",
                other.event_type()
            )));
        }
    };
    let view = store::get_refund(&app.db, &refund_id.to_string())
        .await?
        .ok_or_else(|| Unavailable("refund vanished from the status projection".into()))?;
    Ok(Reply::sticky(
        201,
        serde_json::to_string(&view).expect("views serialise"),
    ))
}

/// Re-appends the events of keys whose owner gave up or died after
/// deciding, so a decided payment or refund is never lost even if the client
/// never retries. Returns how many keys it swept.
pub async fn sweep_abandoned(app: &App) -> Result<usize, Unavailable> {
    let mut swept = 0;
    for (client, key, lease_until, pending) in store::idem_abandoned(&app.db, 100).await? {
        // One key that cannot be swept (its stored events do not decode,
        // or their append fails) is logged and left for the next round;
        // it never stops the keys after it (review M4).
        let one = async {
            let envs = decode_pending(&pending)?;
            commit_events(app, &envs).await?;
            Ok::<bool, Unavailable>(
                store::idem_mark_swept(&app.db, &client, &key, lease_until).await?,
            )
        };
        match one.await {
            Ok(true) => swept += 1,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(client = %client, error = %e, "sweeping an abandoned request failed; going on with the others")
            }
        }
    }
    Ok(swept)
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
    let mut app = App::new(db.clone(), producer.clone(), &args)?;
    if let Some(limits) = args.group_commit() {
        // The batcher's own copy holds no handle to itself: it ends once
        // every handle (HTTP, consumers, sweeper) is dropped.
        app.group = Some(crate::group::GroupCommit::spawn(app.clone(), limits));
    }
    // Alive before the first key is claimed (see `instances`).
    crate::instances::heartbeat(&db)
        .await
        .context("writing the instance heartbeat")?;

    let (addr, http) = runtime::http::spawn_server(
        args.listen,
        crate::api::router(app.clone()),
        "payment handler",
        shutdown.clone(),
    )
    .await?;
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
        let (db, shutdown, sweeper) = (db.clone(), shutdown.clone(), app.clone());
        tokio::spawn(async move {
            loop {
                match sweep_abandoned(&sweeper).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::warn!(swept = n, "re-appended the events of abandoned requests")
                    }
                    Err(e) => tracing::warn!(error = %e, "sweeping abandoned requests failed"),
                }
                match store::idem_reap(&db).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(reaped = n, "expired idempotency keys deleted"),
                    Err(e) => tracing::warn!(error = %e, "reaping idempotency keys failed"),
                }
                if let Some(window) = sweeper.risk.velocity_window_ms() {
                    match store::velocity_prune(&db, store::now_ms().saturating_sub(window)).await {
                        Ok(0) => {}
                        Ok(n) => tracing::debug!(
                            pruned = n,
                            "velocity rows older than the window deleted"
                        ),
                        Err(e) => tracing::warn!(error = %e, "pruning velocity rows failed"),
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(SWEEP_INTERVAL) => {}
                }
            }
        })
    };
    // A handler is alive only while all of its parts are: the first to end
    // early marks it not ready (`/readyz`), stops the rest and fails the
    // process.
    let mut parts = runtime::supervise::Supervisor::new(shutdown.clone(), app.health.clone());
    parts.spawn("HTTP server", async move {
        http.await??;
        anyhow::Ok(())
    });
    parts.spawn("payment-status consumer", async move {
        status.await??;
        anyhow::Ok(())
    });
    parts.spawn("inbound consumer", async move {
        inbound.await??;
        anyhow::Ok(())
    });
    parts.spawn("idempotency sweeper", async move {
        reaper.await?;
        anyhow::Ok(())
    });
    {
        let (db, shutdown) = (db.clone(), shutdown.clone());
        parts.spawn("instance heartbeat", async move {
            crate::instances::run_heartbeat(db, shutdown).await;
            anyhow::Ok(())
        });
    }
    let task = tokio::spawn(async move {
        let result = parts.wait().await;
        producer.flush(Duration::from_secs(10))?;
        db.close().await;
        result
    });
    Ok(Running { addr, app, task })
}
