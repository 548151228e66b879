//! The query API over HTTP. Errors are JSON
//! `{"error": {"code", "message", "field"}}` with stable codes.

use crate::query::{self, HISTORY_LIMIT_MAX};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::collections::HashMap;
use storage::Db;

/// A failed request: HTTP status plus the stable error body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<&'static str>,
}

impl ApiError {
    fn invalid(field: &'static str, message: String) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_parameter",
            message,
            field: Some(field),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> ApiError {
        tracing::error!(error = %e, "query failed");
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "database_unavailable",
            message: "the projection database could not be read".into(),
            field: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": {"code": self.code, "message": self.message, "field": self.field}
        });
        (self.status, Json(body)).into_response()
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
                "unknown account {account:?}: expected psp_receivable, psp_fees, reconciliation_adjustments or merchant_payable:<seller>"
            ),
        ))
    }
}

async fn wallet(State(db): State<Db>, Path(seller): Path<String>) -> Result<Response, ApiError> {
    Ok(Json(query::wallet(&db, &seller).await?).into_response())
}

async fn buyer(State(db): State<Db>, Path(buyer): Path<String>) -> Result<Response, ApiError> {
    let totals = query::buyer_totals(&db, &buyer).await?;
    Ok(Json(serde_json::json!({"buyer_id": buyer, "totals": totals})).into_response())
}

async fn balance(
    State(db): State<Db>,
    Path(account): Path<String>,
    Query(p): Query<Params>,
) -> Result<Response, ApiError> {
    check_account(&account)?;
    let as_of = p
        .get("as_of")
        .map(String::as_str)
        .map(parse_as_of)
        .transpose()
        .map_err(|m| ApiError::invalid("as_of", m))?;
    Ok(Json(query::account_balance(&db, &account, as_of).await?).into_response())
}

async fn history(
    State(db): State<Db>,
    Path(account): Path<String>,
    Query(p): Query<Params>,
) -> Result<Response, ApiError> {
    check_account(&account)?;
    let limit = int_param(&p, "limit")?.unwrap_or(100);
    let after = int_param(&p, "after")?;
    if !(1..=HISTORY_LIMIT_MAX).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("limit must be between 1 and {HISTORY_LIMIT_MAX}"),
        ));
    }
    Ok(Json(query::account_history(&db, &account, after, limit).await?).into_response())
}

async fn payment_entries(
    State(db): State<Db>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id: events::PaymentId = id
        .parse()
        .map_err(|e: events::IdError| ApiError::invalid("payment_id", e.to_string()))?;
    let entries = query::payment_entries(&db, &id.to_string()).await?;
    Ok(Json(serde_json::json!({"payment_id": id.to_string(), "entries": entries})).into_response())
}

async fn verify(State(db): State<Db>) -> Response {
    let report = crate::verify::verify(&db).await;
    let status = if report.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::CONFLICT
    };
    (status, Json(report)).into_response()
}

async fn health(State(db): State<Db>) -> Response {
    match db.ping().await {
        Ok(()) => (StatusCode::OK, Json(serde_json::json!({"status": "ok"}))).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "health check failed");
            ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: "database_unavailable",
                message: "the projection database is not reachable".into(),
                field: None,
            }
            .into_response()
        }
    }
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: "not_found",
        message: "no such route".into(),
        field: None,
    }
}

/// Routes: `GET /v1/wallets/{seller}`, `GET /v1/buyers/{buyer}`,
/// `GET /v1/ledger/accounts/{account}/balance?as_of=`,
/// `GET /v1/ledger/accounts/{account}/entries?limit=&after=`,
/// `GET /v1/ledger/payments/{id}/entries`, `GET /v1/ledger/verify`,
/// `GET /healthz`.
pub fn router(db: Db) -> Router {
    streaming::metrics::instrument(
        Router::new()
            .route("/v1/wallets/{seller}", get(wallet))
            .route("/v1/buyers/{buyer}", get(buyer))
            .route("/v1/ledger/accounts/{account}/balance", get(balance))
            .route("/v1/ledger/accounts/{account}/entries", get(history))
            .route("/v1/ledger/payments/{id}/entries", get(payment_entries))
            .route("/v1/ledger/verify", get(verify))
            .route("/healthz", get(health))
            .fallback(not_found)
            .with_state(db),
        "projections",
    )
}
