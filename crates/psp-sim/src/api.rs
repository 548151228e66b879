//! The HTTP API (contract in the README). Handlers authenticate, validate,
//! claim the idempotency key, then hand the work to a spawned task: a
//! client that hangs up mid-request cannot leave a key locked or a charge
//! half-made, just as a real PSP finishes a charge whose caller timed out.

use crate::config::{Account, Outcome, Resolution};
use crate::error_code::ErrorCode;
use crate::limits::IDEMPOTENCY_KEY_LEN_MAX;
use crate::settlement::{self, InjectionSpec};
use crate::store::{self, ChargeRow, Claim, ClaimArgs, NewCharge, NewRefund, RefundRefused};
use crate::{AppState, ConnKill, workers};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;

pub(crate) fn router(state: Arc<AppState>) -> Router {
    let router = Router::new()
        .route("/v1/charges", post(create_charge).get(list_charges))
        .route("/v1/charges/{id}", get(get_charge))
        .route("/v1/charges/{id}/refunds", post(create_refund))
        .route("/v1/settlements/{file}", get(settlement_csv))
        .route(
            "/v1/settlements/{date}/injected.json",
            get(settlement_injected),
        )
        .route("/_sim/stats", get(sim_stats))
        .route("/_sim/clock/advance", post(sim_clock_advance))
        .route("/health", get(|| async { "ok" }))
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such endpoint") });
    runtime::metrics::instrument(router, "psp-sim").with_state(state)
}

/// `{"error": {"code", "message", "field"}}` with a stable code, one of
/// the closed enum [`ErrorCode`].
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
    field: Option<&'static str>,
    retry_after_s: Option<u64>,
}

impl ApiError {
    /// An error with `code`'s one status.
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError::with_status(code.status(), code, message)
    }

    /// A simulated failure, whose status the behaviour file chose among
    /// `code`'s statuses.
    fn with_status(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        debug_assert!(
            code.statuses().contains(&status.as_u16()),
            "{code} {status}"
        );
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after_s: None,
        }
    }

    fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            field: Some(field),
            ..ApiError::new(ErrorCode::InvalidRequest, message)
        }
    }

    fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "psp simulator internal error");
        ApiError::new(ErrorCode::InternalError, "internal error in the simulator")
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::internal(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code.as_str(), "message": self.message, "field": self.field}});
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after_s {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

fn json_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

fn replay(body: String) -> Response {
    let mut resp = json_response(StatusCode::OK, body);
    resp.headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    resp
}

fn authenticate<'a>(st: &'a AppState, headers: &HeaderMap) -> Result<&'a Account, ApiError> {
    let unauthorized = || {
        ApiError::new(
            ErrorCode::Unauthorized,
            "missing or unknown API key (Authorization: Bearer <key>)",
        )
    };
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(unauthorized)?;
    let key = value.strip_prefix("Bearer ").ok_or_else(unauthorized)?;
    // Compared in constant time, over digests (so the key's length does not
    // show either) and over every account (so which one matched does not).
    let presented = Sha256::digest(key.as_bytes());
    let mut found = None;
    for a in &st.accounts {
        let stored = Sha256::digest(a.api_key.expose().as_bytes());
        if runtime::secret::constant_time_eq(&stored, &presented) && found.is_none() {
            found = Some(a);
        }
    }
    found.ok_or_else(unauthorized)
}

fn idempotency_key(headers: &HeaderMap) -> Result<String, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Err(ApiError {
            field: Some("Idempotency-Key"),
            ..ApiError::new(
                ErrorCode::IdempotencyKeyMissing,
                "the Idempotency-Key header is required",
            )
        });
    };
    let key = v
        .to_str()
        .map_err(|_| ApiError::invalid("Idempotency-Key", "must be visible ASCII"))?;
    if key.is_empty() || key.len() > IDEMPOTENCY_KEY_LEN_MAX {
        return Err(ApiError::invalid(
            "Idempotency-Key",
            format!("must be 1..={IDEMPOTENCY_KEY_LEN_MAX} characters"),
        ));
    }
    Ok(key.to_owned())
}

fn request_hash(route: &str, canonical: &impl Serialize) -> String {
    let mut h = Sha256::new();
    h.update(route.as_bytes());
    h.update(b"\n");
    h.update(serde_json::to_vec(canonical).expect("requests serialise"));
    hex::encode(h.finalize())
}

fn parse_object(body: &[u8], allowed: &[&'static str]) -> Result<Map<String, Value>, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!("body is not valid JSON: {e}"),
        )
    })?;
    let Value::Object(map) = v else {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            "body must be a JSON object",
        ));
    };
    if let Some(k) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!("unknown field {k:?}"),
        ));
    }
    Ok(map)
}

fn positive_amount(map: &Map<String, Value>) -> Result<Option<i64>, ApiError> {
    match map.get("amount_minor") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_i64() {
            Some(a) if a > 0 => Ok(Some(a)),
            _ => Err(ApiError::invalid(
                "amount_minor",
                "must be a positive integer number of minor units",
            )),
        },
    }
}

fn text(
    map: &Map<String, Value>,
    field: &'static str,
    max: usize,
) -> Result<Option<String>, ApiError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() && s.len() <= max => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::invalid(
            field,
            format!("must be a string of 1..={max} bytes"),
        )),
    }
}

/// A validated charge request; its JSON form is what the idempotency hash
/// covers, so formatting differences in the body do not count as "different".
#[derive(Debug, Clone, Serialize)]
struct ChargeRequest {
    amount_minor: i64,
    currency: String,
    card_token: String,
    reference: String,
    description: Option<String>,
}

fn parse_charge(body: &[u8], account: &Account) -> Result<ChargeRequest, ApiError> {
    let map = parse_object(
        body,
        &[
            "amount_minor",
            "currency",
            "card_token",
            "reference",
            "description",
        ],
    )?;
    let amount_minor =
        positive_amount(&map)?.ok_or_else(|| ApiError::invalid("amount_minor", "is required"))?;
    if account.fee_for(amount_minor).is_none() {
        return Err(ApiError::invalid("amount_minor", "is too large"));
    }
    let currency =
        text(&map, "currency", 3)?.ok_or_else(|| ApiError::invalid("currency", "is required"))?;
    let currency = events::Currency::from_code(&currency)
        .map_err(|e| ApiError::invalid("currency", e.to_string()))?;
    let card_token = text(&map, "card_token", 255)?
        .ok_or_else(|| ApiError::invalid("card_token", "is required"))?;
    let reference = text(&map, "reference", 255)?
        .ok_or_else(|| ApiError::invalid("reference", "is required"))?;
    let description = text(&map, "description", 1000)?;
    Ok(ChargeRequest {
        amount_minor,
        currency: currency.code().to_owned(),
        card_token,
        reference,
        description,
    })
}

/// What a charge attempt ended in.
#[derive(Debug)]
enum Action {
    Created(String),
    /// The stored first answer.
    Replay(String),
    Fail(ApiError),
    /// Hold the connection this long, then drop it unanswered.
    Hold(u64),
}

async fn create_charge(
    State(st): State<Arc<AppState>>,
    kill: Option<Extension<ConnKill>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let account = authenticate(&st, &headers)?.clone();
    let key = idempotency_key(&headers)?;
    let req = parse_charge(&body, &account)?;
    let hash = request_hash("POST /v1/charges", &req);
    // Claim and work in a task of their own, so a caller hanging up between
    // the claim and the answer cannot leave the key locked.
    let task = {
        let st = st.clone();
        tokio::spawn(async move {
            let owner = uuid::Uuid::new_v4().simple().to_string();
            let claim = ClaimArgs {
                account: account.id.clone(),
                key: key.clone(),
                request_hash: hash,
                owner: owner.clone(),
                now_ms: st.clock.now_ms(),
                count_reference: Some(req.reference.clone()),
            };
            let attempt = match st.writer.run(claim, store::claim).await? {
                Claim::Owned { attempt } => attempt,
                Claim::Replay { body } => return Ok(Action::Replay(body)),
                Claim::Reused => return Err(key_reused()),
                Claim::InUse => return Err(key_in_use()),
            };
            let action = process_charge(&st, &account, &key, &owner, req, attempt).await;
            if !matches!(action, Action::Created(_)) {
                // No final answer stored (or it was stored before a simulated
                // timeout, in which case this is a no-op): free the key.
                let hold = (account.id.clone(), key, owner);
                if let Err(e) = st.writer.run(hold, store::release).await {
                    tracing::error!(error = %e, "releasing an idempotency key failed");
                }
            }
            Ok(action)
        })
    };
    match task.await.map_err(ApiError::internal)?? {
        Action::Created(body) => Ok(json_response(StatusCode::CREATED, body)),
        Action::Replay(body) => Ok(replay(body)),
        Action::Fail(e) => Err(e),
        Action::Hold(ms) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            let Some(Extension(ConnKill(kill))) = kill else {
                return Err(ApiError::internal("no connection handle to drop"));
            };
            kill.cancel();
            // The accept loop drops this connection (and this future) now.
            std::future::pending().await
        }
    }
}

fn key_reused() -> ApiError {
    ApiError {
        field: Some("Idempotency-Key"),
        ..ApiError::new(
            ErrorCode::IdempotencyKeyReused,
            "this Idempotency-Key was used with a different request",
        )
    }
}

fn key_in_use() -> ApiError {
    ApiError {
        field: Some("Idempotency-Key"),
        ..ApiError::new(
            ErrorCode::IdempotencyKeyInUse,
            "a request with this Idempotency-Key is in progress; retry later",
        )
    }
}

async fn process_charge(
    st: &AppState,
    account: &Account,
    key: &str,
    owner: &str,
    req: ChargeRequest,
    attempt: u32,
) -> Action {
    let (outcome, latency) = st
        .behaviour
        .decide(&req.card_token, req.amount_minor, &req.currency);
    let wait = if latency.max > latency.min {
        rand::rng().random_range(latency.min..=latency.max)
    } else {
        latency.min
    };
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
    let now = st.clock.now_ms();
    let fee = account
        .fee_for(req.amount_minor)
        .expect("validated: the fee of the amount fits");
    let mut row = ChargeRow {
        id: format!("ch_{}", uuid::Uuid::now_v7().simple()),
        account: account.id.clone(),
        reference: req.reference,
        amount_minor: req.amount_minor,
        currency: req.currency,
        card_token: req.card_token,
        status: "succeeded".into(),
        fee_minor: fee,
        decline_code: None,
        created_at_ms: now,
        settled_at_ms: Some(now),
        refunded_minor: 0,
    };
    let mut resolve = None;
    match outcome {
        Outcome::Error { status, times } if attempt <= times => {
            let status = StatusCode::from_u16(status).expect("validated status");
            return Action::Fail(ApiError::with_status(
                status,
                ErrorCode::PspUnavailable,
                "simulated processing error; retry with the same Idempotency-Key",
            ));
        }
        Outcome::RateLimit {
            status,
            retry_after_s,
            times,
        } if attempt <= times => {
            let status = StatusCode::from_u16(status).expect("validated status");
            return Action::Fail(ApiError {
                retry_after_s: Some(retry_after_s),
                ..ApiError::with_status(
                    status,
                    ErrorCode::RateLimited,
                    "too many requests; retry later",
                )
            });
        }
        Outcome::Timeout {
            hold_ms,
            charge_created,
            times,
        } if attempt <= times => {
            if !charge_created {
                return Action::Hold(hold_ms);
            }
            // Recorded (and answered under the key), then the answer is lost.
            return match create(st, &row, key, owner, &req.description, None).await {
                Action::Created(_) => Action::Hold(hold_ms),
                other => other,
            };
        }
        Outcome::Succeed
        | Outcome::Error { .. }
        | Outcome::RateLimit { .. }
        | Outcome::Timeout { .. } => {}
        Outcome::Decline { code } => {
            row.status = "declined".into();
            row.fee_minor = 0;
            row.decline_code = Some(code);
            row.settled_at_ms = None;
        }
        Outcome::Pending {
            resolve_after_ms,
            then,
        } => {
            row.status = "pending".into();
            row.settled_at_ms = None;
            let after = i64::try_from(resolve_after_ms).expect("validated: bounded delay");
            let to = match then {
                Resolution::Succeed => "succeed",
                Resolution::Fail => "fail",
            };
            resolve = Some((now.saturating_add(after), to));
        }
    }
    create(st, &row, key, owner, &req.description, resolve).await
}

async fn create(
    st: &AppState,
    row: &ChargeRow,
    key: &str,
    owner: &str,
    description: &Option<String>,
    resolve: Option<(i64, &'static str)>,
) -> Action {
    let new = NewCharge {
        row: row.clone(),
        idempotency_key: key.to_owned(),
        owner: owner.to_owned(),
        description: description.clone(),
        resolve_at_ms: resolve.map(|r| r.0),
        resolve_to: resolve.map(|r| r.1),
    };
    match st.writer.run(new, store::create_charge).await {
        Ok(body) => {
            if resolve.is_some() {
                st.clock.advanced.notify_waiters();
            }
            let outcome = match row.status.as_str() {
                "succeeded" => "succeeded",
                "pending" => "pending",
                "declined" => "declined",
                _ => "other",
            };
            {
                use runtime::metrics::events::{InternalEvent as _, SimChargeCreated};
                SimChargeCreated {
                    charge: &row.id,
                    outcome,
                }
                .emit();
            }
            Action::Created(body)
        }
        Err(e) => Action::Fail(ApiError::internal(e)),
    }
}

async fn get_charge(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let account = authenticate(&st, &headers)?;
    match store::get_charge(&st.db, &account.id, &id).await? {
        Some(c) => Ok(axum::Json(c.json()).into_response()),
        None => Err(not_found("charge")),
    }
}

fn not_found(what: &str) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("no such {what}"))
}

#[derive(Debug, Deserialize)]
struct ReferenceQuery {
    reference: Option<String>,
}

async fn list_charges(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<ReferenceQuery>,
) -> Result<Response, ApiError> {
    let account = authenticate(&st, &headers)?;
    let reference = q.reference.filter(|r| !r.is_empty()).ok_or_else(|| {
        ApiError::invalid("reference", "the reference query parameter is required")
    })?;
    let rows = store::charges_by_reference(&st.db, &account.id, &reference).await?;
    if rows.is_empty() {
        return Err(not_found("charge with this reference"));
    }
    let data: Vec<_> = rows.iter().map(ChargeRow::json).collect();
    Ok(axum::Json(json!({ "data": data })).into_response())
}

#[derive(Debug, Serialize)]
struct RefundRequest {
    amount_minor: Option<i64>,
}

async fn create_refund(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(charge_id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let account = authenticate(&st, &headers)?.clone();
    let key = idempotency_key(&headers)?;
    let req = if body.iter().all(u8::is_ascii_whitespace) {
        RefundRequest { amount_minor: None }
    } else {
        let map = parse_object(&body, &["amount_minor"])?;
        RefundRequest {
            amount_minor: positive_amount(&map)?,
        }
    };
    let hash = request_hash(&format!("POST /v1/charges/{charge_id}/refunds"), &req);
    let task = {
        let st = st.clone();
        tokio::spawn(async move {
            let owner = uuid::Uuid::new_v4().simple().to_string();
            let claim = ClaimArgs {
                account: account.id.clone(),
                key: key.clone(),
                request_hash: hash,
                owner: owner.clone(),
                now_ms: st.clock.now_ms(),
                count_reference: None,
            };
            match st.writer.run(claim, store::claim).await? {
                Claim::Owned { .. } => {}
                Claim::Replay { body } => return Ok(Action::Replay(body)),
                Claim::Reused => return Err(key_reused()),
                Claim::InUse => return Err(key_in_use()),
            }
            let plan = workers::webhook_plan(&st, &account);
            let webhook = plan.is_some();
            let refund = NewRefund {
                account: account.id.clone(),
                charge_id,
                amount: req.amount_minor,
                key: key.clone(),
                owner: owner.clone(),
                refund_id: format!("re_{}", uuid::Uuid::now_v7().simple()),
                now_ms: st.clock.now_ms(),
                webhook: plan,
            };
            let result = match st.writer.run(refund, store::create_refund).await {
                Ok(Ok(body)) => Ok(body),
                Ok(Err(refused)) => Err(match refused {
                    RefundRefused::NotFound => not_found("charge"),
                    RefundRefused::NotRefundable(status) => ApiError::new(
                        ErrorCode::ChargeNotRefundable,
                        format!("only succeeded charges can be refunded; this one is {status}"),
                    ),
                    RefundRefused::ExceedsRefundable { refundable } => ApiError {
                        field: Some("amount_minor"),
                        ..ApiError::new(
                            ErrorCode::AmountExceedsRefundable,
                            format!("at most {refundable} minor units can still be refunded"),
                        )
                    },
                }),
                Err(e) => Err(ApiError::internal(e)),
            };
            match result {
                Ok(body) => {
                    if webhook {
                        st.webhooks_due.notify_one();
                    }
                    Ok(Action::Created(body))
                }
                Err(e) => {
                    let hold = (account.id.clone(), key, owner);
                    if let Err(e) = st.writer.run(hold, store::release).await {
                        tracing::error!(error = %e, "releasing an idempotency key failed");
                    }
                    Err(e)
                }
            }
        })
    };
    match task.await.map_err(ApiError::internal)?? {
        Action::Created(body) => Ok(json_response(StatusCode::CREATED, body)),
        Action::Replay(body) => Ok(replay(body)),
        Action::Fail(e) => Err(e),
        Action::Hold(_) => unreachable!("refunds are never held"),
    }
}

#[derive(Debug, Deserialize)]
struct SettlementQuery {
    inject: Option<String>,
    seed: Option<u64>,
}

fn settlement_day(date: &str) -> Result<(i64, i64), ApiError> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let day = time::Date::parse(date, &format)
        .map_err(|_| ApiError::invalid("date", "expected YYYY-MM-DD"))?;
    let start = day.midnight().assume_utc().unix_timestamp() * 1000;
    Ok((start, start + 24 * 3600 * 1000))
}

async fn settlement_report(
    st: &AppState,
    headers: &HeaderMap,
    date: &str,
    q: &SettlementQuery,
) -> Result<settlement::Report, ApiError> {
    let account = authenticate(st, headers)?;
    let (from, to) = settlement_day(date)?;
    let spec = match &q.inject {
        Some(s) => InjectionSpec::parse(s).map_err(|m| ApiError::invalid("inject", m))?,
        None => InjectionSpec::default(),
    };
    let rows = store::settlement_rows(&st.db, &account.id, from, to).await?;
    Ok(settlement::build(rows, &spec, q.seed.unwrap_or(0), from))
}

async fn settlement_csv(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(file): Path<String>,
    Query(q): Query<SettlementQuery>,
) -> Result<Response, ApiError> {
    let date = file
        .strip_suffix(".csv")
        .ok_or_else(|| not_found("settlement file (expected /v1/settlements/YYYY-MM-DD.csv)"))?;
    let report = settlement_report(&st, &headers, date, &q).await?;
    let csv = settlement::render_csv(&report.rows).map_err(ApiError::internal)?;
    let injected = serde_json::to_string(&report.injected).expect("injections serialise");
    let mut resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, HeaderValue::from_static("text/csv"))],
        csv,
    )
        .into_response();
    // Ids and order references are printable; fall back to the sidecar if not.
    if let Ok(v) = HeaderValue::from_str(&injected) {
        resp.headers_mut().insert("psp-injected", v);
    }
    Ok(resp)
}

async fn settlement_injected(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(date): Path<String>,
    Query(q): Query<SettlementQuery>,
) -> Result<Response, ApiError> {
    let report = settlement_report(&st, &headers, &date, &q).await?;
    Ok(axum::Json(report.injected).into_response())
}

async fn sim_stats(
    State(st): State<Arc<AppState>>,
    Query(q): Query<ReferenceQuery>,
) -> Result<Response, ApiError> {
    let reference = q
        .reference
        .ok_or_else(|| ApiError::invalid("reference", "is required"))?;
    let (charges, create_requests) = store::stats(&st.db, &reference).await?;
    Ok(axum::Json(json!({"charges": charges, "create_requests": create_requests})).into_response())
}

async fn sim_clock_advance(
    State(st): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let map = parse_object(&body, &["ms"])?;
    let ms = map
        .get("ms")
        .and_then(Value::as_u64)
        .and_then(|ms| i64::try_from(ms).ok())
        .filter(|ms| *ms <= i64::try_from(crate::limits::DELAY_MS_MAX).unwrap_or(i64::MAX))
        .ok_or_else(|| ApiError::invalid("ms", "a non-negative number of milliseconds"))?;
    st.clock.advance(ms);
    Ok(axum::Json(json!({"now": store::rfc3339(st.clock.now_ms())})).into_response())
}
