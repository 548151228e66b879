//! The query API over HTTP. Errors are JSON
//! `{"error": {"code", "message", "field"}}` with stable codes, the
//! closed enum [`ErrorCode`] (each code has one status).
//!
//! Every `/v1` route needs `Authorization: Bearer <API key>` (the payment
//! handler's keys, see [`crate::auth`]); a request without a well-formed
//! key gets 401 before any database work. A client key reads only its own
//! client's data: its payments' entries (another client's payment is 404,
//! as if it did not exist), its sellers' wallets and merchant accounts and
//! its buyers' totals. Ledger-wide reads (the other accounts, another
//! client's data via `client_id=`) and `/v1/ledger/verify` need an
//! operator key (403 otherwise). At most [`QueryLimits::max_in_flight`]
//! requests are served at once and one verification at a time; beyond
//! that the answer is 503 with `Retry-After`.

use crate::auth::{self, AuthError, Caller, Role};
use crate::error_code::ErrorCode;
use crate::limits::{HISTORY_LIMIT_DEFAULT, HISTORY_LIMIT_MAX};
use crate::query;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use storage::Db;
use tokio::sync::Semaphore;

/// A failed request: HTTP status plus the stable error body.
#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    message: String,
    field: Option<&'static str>,
    /// Seconds for `Retry-After` (503 when saturated).
    retry_after: Option<u32>,
}

impl ApiError {
    fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            field: None,
            retry_after: None,
        }
    }

    fn unauthenticated(message: &str) -> ApiError {
        ApiError::new(ErrorCode::Unauthenticated, message)
    }

    fn forbidden(message: String) -> ApiError {
        ApiError::new(ErrorCode::Forbidden, message)
    }

    fn busy(code: ErrorCode, message: &str, seconds: u32) -> ApiError {
        ApiError {
            retry_after: Some(seconds),
            ..ApiError::new(code, message)
        }
    }

    fn invalid(field: &'static str, message: String) -> ApiError {
        ApiError {
            field: Some(field),
            ..ApiError::new(ErrorCode::InvalidParameter, message)
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> ApiError {
        tracing::error!(error = %e, "query failed");
        ApiError::new(
            ErrorCode::DatabaseUnavailable,
            "the projection database could not be read",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": {"code": self.code.as_str(), "message": self.message, "field": self.field}
        });
        let mut r = (self.code.status(), Json(body)).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.code == ErrorCode::Unauthenticated {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// Parses an RFC 3339 instant into microseconds since the epoch.
pub fn parse_as_of(s: &str) -> Result<i64, String> {
    let dt = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| {
            format!("as_of must be an RFC 3339 timestamp such as 2026-11-25T12:00:00Z: {e}")
        })?;
    Ok(events::Timestamp::from_datetime(dt).as_micros())
}

/// Query parameters, taken as strings so a malformed one gets the JSON
/// error body (axum's own rejection is plain text).
type Params = HashMap<String, String>;

fn int_param(p: &Params, name: &'static str) -> Result<Option<i64>, ApiError> {
    p.get(name)
        .map(|v| {
            v.parse::<i64>().map_err(|_| {
                ApiError::invalid(name, format!("{name} must be an integer, got {v:?}"))
            })
        })
        .transpose()
}

fn check_account(account: &str) -> Result<(), ApiError> {
    if crate::booking::is_known_account(account) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "account",
            format!(
                "unknown account {account:?}: expected psp_receivable, psp_fees, reconciliation_adjustments or merchant_payable:<client>/<seller>"
            ),
        ))
    }
}

/// Limits of the query API.
#[derive(Debug, Clone, Copy)]
pub struct QueryLimits {
    /// Requests served at once; more get 503 with `Retry-After`.
    pub max_in_flight: usize,
}

impl Default for QueryLimits {
    fn default() -> QueryLimits {
        QueryLimits {
            max_in_flight: crate::limits::QUERIES_IN_FLIGHT_MAX_DEFAULT,
        }
    }
}

/// The router's state: the query pool (its own, see `cli::serve`) and
/// the limits.
#[derive(Debug, Clone)]
struct Api {
    db: Db,
    in_flight: Arc<Semaphore>,
    /// `/v1/ledger/verify` runs at most once at a time.
    verify: Arc<Semaphore>,
    /// Whether the missing key table was logged already.
    key_table_logged: Arc<AtomicBool>,
}

/// Authenticates every `/v1` request, within the in-flight limit.
async fn guard(State(api): State<Api>, mut req: Request, next: Next) -> Response {
    // 1. No database work for a request without a well-formed key.
    let Some(header) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return ApiError::unauthenticated(
            "send Authorization: Bearer <API key> (create one with `paystream clients create NAME`)",
        )
        .into_response();
    };
    let Some((key_id, secret)) = auth::bearer(header).and_then(auth::parse_key) else {
        return ApiError::unauthenticated("the Authorization header holds no valid API key")
            .into_response();
    };
    // 2. Bounded concurrency: the query pool is small on purpose.
    let Ok(_permit) = api.in_flight.clone().try_acquire_owned() else {
        return ApiError::busy(
            ErrorCode::Overloaded,
            "too many queries at once; retry shortly",
            1,
        )
        .into_response();
    };
    // 3. The key.
    let caller = match auth::authenticate(&api.db, key_id, secret).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            return ApiError::unauthenticated("unknown or revoked API key").into_response();
        }
        Err(AuthError::KeyTableMissing(e)) => {
            if !api.key_table_logged.swap(true, Ordering::Relaxed) {
                tracing::error!(error = %e, "the API key table handler_api_keys is missing: every query is refused until the payment handler's migrations run on this database");
            }
            return ApiError::new(
                ErrorCode::AuthUnavailable,
                "API keys cannot be checked: the key table handler_api_keys is missing or outdated in this database; run the payment handler (or `paystream clients create`) against it",
            )
            .into_response();
        }
        Err(AuthError::Db(e)) => return ApiError::from(e).into_response(),
    };
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// The client whose data a request reads: the caller's own; an operator
/// may name another with `client_id=` (empty: what was booked before
/// sellers were scoped by client).
fn client_scope(caller: &Caller, p: &Params) -> Result<String, ApiError> {
    match (p.get("client_id"), caller.role) {
        (None, _) => Ok(caller.client_id.clone()),
        (Some(c), _) if *c == caller.client_id => Ok(c.clone()),
        (Some(c), Role::Operator) => Ok(c.clone()),
        (Some(c), Role::Client) => Err(ApiError::forbidden(format!(
            "client {} may not read client {c:?}'s data: that needs an operator key",
            caller.client_id
        ))),
    }
}

/// Clients read only their own sellers' accounts; the rest of the ledger
/// needs an operator key.
fn may_read_account(caller: &Caller, account: &str) -> Result<(), ApiError> {
    if caller.role == Role::Operator {
        return Ok(());
    }
    match crate::booking::merchant_of(account) {
        Some((client, _)) if client == caller.client_id => Ok(()),
        _ => Err(ApiError::forbidden(format!(
            "account {account:?} is ledger-wide or another client's: reading it needs an operator key (clients read merchant_payable:{}/<seller>)",
            caller.client_id
        ))),
    }
}

fn operator_only(caller: &Caller, what: &str) -> Result<(), ApiError> {
    if caller.role == Role::Operator {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "{what} needs an operator key (`paystream clients create NAME --role operator`)"
        )))
    }
}

async fn wallet(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    Path(seller): Path<String>,
    Query(p): Query<Params>,
) -> Result<Response, ApiError> {
    let client = client_scope(&caller, &p)?;
    Ok(Json(query::wallet(&api.db, &client, &seller).await?).into_response())
}

async fn buyer(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    Path(buyer): Path<String>,
    Query(p): Query<Params>,
) -> Result<Response, ApiError> {
    let client = client_scope(&caller, &p)?;
    let totals = query::buyer_totals(&api.db, &client, &buyer).await?;
    Ok(
        Json(serde_json::json!({"client_id": client, "buyer_id": buyer, "totals": totals}))
            .into_response(),
    )
}

async fn balance(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    Path(account): Path<String>,
    Query(p): Query<Params>,
) -> Result<Response, ApiError> {
    check_account(&account)?;
    may_read_account(&caller, &account)?;
    let as_of = p
        .get("as_of")
        .map(String::as_str)
        .map(parse_as_of)
        .transpose()
        .map_err(|m| ApiError::invalid("as_of", m))?;
    Ok(Json(query::account_balance(&api.db, &account, as_of).await?).into_response())
}

async fn history(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    Path(account): Path<String>,
    Query(p): Query<Params>,
) -> Result<Response, ApiError> {
    check_account(&account)?;
    may_read_account(&caller, &account)?;
    let limit = int_param(&p, "limit")?.unwrap_or(HISTORY_LIMIT_DEFAULT);
    let after = int_param(&p, "after")?;
    if !(1..=HISTORY_LIMIT_MAX).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("limit must be between 1 and {HISTORY_LIMIT_MAX}"),
        ));
    }
    Ok(Json(query::account_history(&api.db, &account, after, limit).await?).into_response())
}

async fn payment_entries(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id: events::PaymentId = id
        .parse()
        .map_err(|e: events::IdError| ApiError::invalid("payment_id", e.to_string()))?;
    if caller.role == Role::Client
        && query::payment_client(&api.db, &id.to_string()).await? != Some(caller.client_id.clone())
    {
        // Not the caller's (or unknown): the same answer either way, so a
        // client cannot probe for other clients' payments.
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no payment {id} of client {}", caller.client_id),
        ));
    }
    let entries = query::payment_entries(&api.db, &id.to_string()).await?;
    Ok(Json(serde_json::json!({"payment_id": id.to_string(), "entries": entries})).into_response())
}

async fn verify(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    operator_only(&caller, "verifying the ledger")?;
    // A verification walks the whole chain: one at a time.
    let Ok(_one) = api.verify.clone().try_acquire_owned() else {
        return Err(ApiError::busy(
            ErrorCode::VerifyInProgress,
            "a ledger verification is running; retry when it is done",
            5,
        ));
    };
    let report = crate::verify::verify(&api.db).await;
    let status = if report.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::CONFLICT
    };
    Ok((status, Json(report)).into_response())
}

async fn health(State(api): State<Api>) -> Response {
    let Ok(_permit) = api.in_flight.clone().try_acquire_owned() else {
        return ApiError::busy(
            ErrorCode::Overloaded,
            "too many queries at once; retry shortly",
            1,
        )
        .into_response();
    };
    match api.db.ping().await {
        Ok(()) => (StatusCode::OK, Json(serde_json::json!({"status": "ok"}))).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "health check failed");
            ApiError::new(
                ErrorCode::DatabaseUnavailable,
                "the projection database is not reachable",
            )
            .into_response()
        }
    }
}

async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such route")
}

/// Routes: `GET /v1/wallets/{seller}`, `GET /v1/buyers/{buyer}`,
/// `GET /v1/ledger/accounts/{account}/balance?as_of=`,
/// `GET /v1/ledger/accounts/{account}/entries?limit=&after=`,
/// `GET /v1/ledger/payments/{id}/entries`, `GET /v1/ledger/verify`
/// (all authenticated, see the module docs), `GET /healthz` (not).
/// `db` should be the query pool, not the consumers'.
pub fn router(db: Db) -> Router {
    router_with(db, QueryLimits::default())
}

/// [`router`] with explicit limits.
pub fn router_with(db: Db, limits: QueryLimits) -> Router {
    let api = Api {
        db,
        in_flight: Arc::new(Semaphore::new(limits.max_in_flight.max(1))),
        verify: Arc::new(Semaphore::new(1)),
        key_table_logged: Arc::new(AtomicBool::new(false)),
    };
    runtime::metrics::instrument(
        Router::new()
            .route("/v1/wallets/{seller}", get(wallet))
            .route("/v1/buyers/{buyer}", get(buyer))
            .route("/v1/ledger/accounts/{account}/balance", get(balance))
            .route("/v1/ledger/accounts/{account}/entries", get(history))
            .route("/v1/ledger/payments/{id}/entries", get(payment_entries))
            .route("/v1/ledger/verify", get(verify))
            .route_layer(middleware::from_fn_with_state(api.clone(), guard))
            .route("/healthz", get(health))
            .fallback(not_found)
            .with_state(api),
        "projections",
    )
}
