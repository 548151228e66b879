//! The HTTP API. Every error is JSON `{"error": {"code", "message",
//! "field"}}` with a stable code.

use crate::request;
use crate::service::{App, submit};
use crate::store::{self, Begin};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use events::{ClientId, PaymentId};
use serde_json::json;

/// Every route, as (method, OpenAPI path). `openapi.json` must list exactly
/// these (a test checks both ways).
pub const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/payments"),
    ("get", "/v1/payments/{payment_id}"),
    ("post", "/v1/payments/{payment_id}/refunds"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/openapi.json"),
];

/// The OpenAPI document, checked into the repository.
pub const OPENAPI_JSON: &str = include_str!("../openapi.json");

/// Header marking a replayed response.
pub const REPLAY_HEADER: &str = "idempotent-replayed";
/// Longest accepted Idempotency-Key (the IETF draft and Stripe use 255).
pub const IDEMPOTENCY_KEY_LEN_MAX: usize = 255;

pub fn router(app: App) -> Router {
    Router::new()
        .route("/v1/payments", post(create_payment))
        .route("/v1/payments/{payment_id}", get(get_payment))
        .route("/v1/payments/{payment_id}/refunds", post(create_refund))
        .route(
            "/healthz",
            get(|| async { Json200(json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz))
        .route(
            "/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON) }),
        )
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        .with_state(app)
}

struct Json200(serde_json::Value);

impl IntoResponse for Json200 {
    fn into_response(self) -> Response {
        json_response(StatusCode::OK, self.0.to_string())
    }
}

fn json_response(status: StatusCode, body: String) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after_s: None,
        }
    }

    fn body(&self) -> String {
        json!({"error": {"code": self.code, "message": self.message, "field": self.field}})
            .to_string()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = json_response(self.status, self.body());
        if let Some(s) = self.retry_after_s {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "dependency unavailable");
    let mut err = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "a dependency is unavailable; retry with the same Idempotency-Key",
    );
    err.retry_after_s = Some(1);
    err
}

async fn authenticate(app: &App, headers: &HeaderMap) -> Result<ClientId, ApiError> {
    let unauthorized = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "a valid API key is required: Authorization: Bearer psk_...",
        )
    };
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(unauthorized)?;
    store::authenticate(&app.db, token.trim())
        .await
        .map_err(unavailable)?
        .ok_or_else(unauthorized)
}

fn idempotency_key(headers: &HeaderMap) -> Result<String, ApiError> {
    let bad = |msg: &str| {
        let mut e = ApiError::new(StatusCode::BAD_REQUEST, "invalid_idempotency_key", msg);
        e.field = Some("Idempotency-Key".into());
        e
    };
    let v = headers
        .get("idempotency-key")
        .ok_or_else(|| bad("the Idempotency-Key header is required"))?;
    let s = v
        .to_str()
        .map_err(|_| bad("Idempotency-Key must be printable ASCII"))?;
    if s.is_empty() || s.len() > IDEMPOTENCY_KEY_LEN_MAX || !s.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(bad(
            "Idempotency-Key must be 1 to 255 printable ASCII characters without spaces",
        ));
    }
    Ok(s.to_owned())
}

async fn read_body(req: Request, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("request bodies are limited to {limit} bytes"),
            )
        })
}

/// Runs `work` at most once per (client, Idempotency-Key): replays a
/// finished answer, refuses a different body or a key still in flight.
/// `work` returns the answer to store (success or a business refusal, both
/// sticky) or an error that is not (503: the key is released).
async fn idempotent<Fut>(
    app: &App,
    client: &ClientId,
    key: &str,
    fingerprint: &str,
    work: Fut,
) -> Result<Response, ApiError>
where
    Fut: std::future::Future<Output = Result<(StatusCode, String), ApiError>>,
{
    match store::idem_begin(&app.db, client, key, fingerprint, app.policy)
        .await
        .map_err(unavailable)?
    {
        Begin::Owned => {}
        Begin::Replay { status, body } => {
            let mut r = json_response(StatusCode::from_u16(status).unwrap_or(StatusCode::OK), body);
            r.headers_mut()
                .insert(REPLAY_HEADER, HeaderValue::from_static("true"));
            return Ok(r);
        }
        Begin::Mismatch => {
            let mut e = ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was already used with a different request",
            );
            e.field = Some("Idempotency-Key".into());
            return Err(e);
        }
        Begin::InFlight { retry_after_s } => {
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "idempotency_key_in_use",
                "a request with this Idempotency-Key is still being processed; retry later",
            );
            e.retry_after_s = Some(retry_after_s);
            return Err(e);
        }
    }
    match work.await {
        Ok((status, body)) => {
            store::idem_finish(&app.db, client, key, status.as_u16(), &body)
                .await
                .map_err(unavailable)?;
            Ok(json_response(status, body))
        }
        Err(e) => {
            if let Err(release) = store::idem_release(&app.db, client, key).await {
                tracing::warn!(error = %release, "cannot release idempotency key; it frees itself when its lease expires");
            }
            Err(e)
        }
    }
}

/// A business refusal, stored and replayed like a success.
fn refusal(
    status: StatusCode,
    code: &'static str,
    message: impl Into<String>,
    field: Option<&str>,
) -> (StatusCode, String) {
    let mut e = ApiError::new(status, code, message);
    e.field = field.map(str::to_owned);
    (e.status, e.body())
}

async fn create_payment(State(app): State<App>, req: Request) -> Result<Response, ApiError> {
    let headers = req.headers().clone();
    let client = authenticate(&app, &headers).await?;
    let key = idempotency_key(&headers)?;
    let body = read_body(req, app.body_limit).await?;
    let fingerprint = request::fingerprint(&body);
    let work = async {
        match request::parse(&body) {
            Err(fe) => {
                let field = Some(fe.field.as_str()).filter(|f| !f.is_empty());
                Ok(refusal(
                    StatusCode::BAD_REQUEST,
                    fe.code,
                    fe.message.clone(),
                    field,
                ))
            }
            Ok(parsed) => {
                let payment = PaymentId::derive(&client, &key);
                let view = submit(&app, &client, payment, Some(&key), &parsed)
                    .await
                    .map_err(unavailable)?;
                Ok((
                    StatusCode::CREATED,
                    serde_json::to_string(&view).expect("views serialise"),
                ))
            }
        }
    };
    idempotent(&app, &client, &key, &fingerprint, work).await
}

async fn create_refund(
    State(app): State<App>,
    Path(payment): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let headers = req.headers().clone();
    let client = authenticate(&app, &headers).await?;
    let key = idempotency_key(&headers)?;
    let body = read_body(req, app.body_limit).await?;
    // Keys are per client across endpoints; the path is part of the request.
    let fingerprint = request::fingerprint(
        &[
            format!("POST /v1/payments/{payment}/refunds\n").as_bytes(),
            &body[..],
        ]
        .concat(),
    );
    let work = async {
        let r = match request::parse_refund(&body) {
            Ok(r) => r,
            Err(fe) => {
                return Ok(refusal(
                    StatusCode::BAD_REQUEST,
                    fe.code,
                    fe.message.clone(),
                    Some(fe.field.as_str()).filter(|f| !f.is_empty()),
                ));
            }
        };
        let not_found = || {
            refusal(
                StatusCode::NOT_FOUND,
                "payment_not_found",
                "no such payment",
                None,
            )
        };
        let Ok(payment_id) = payment.parse::<PaymentId>() else {
            return Ok(not_found());
        };
        let row = store::refundable(&app.db, &payment_id.to_string(), &r.order_id.to_string())
            .await
            .map_err(unavailable)?;
        let Some((owner, status, amount, currency, requested)) = row else {
            // Either the payment is unknown (or not this client's), or the order is not part of it.
            return match store::get_payment(&app.db, &payment_id.to_string(), &client)
                .await
                .map_err(unavailable)?
            {
                None => Ok(not_found()),
                Some(_) => Ok(refusal(
                    StatusCode::BAD_REQUEST,
                    "order_not_in_payment",
                    "order_id is not an order of this payment",
                    Some("order_id"),
                )),
            };
        };
        if owner != client.as_str() {
            return Ok(not_found());
        }
        if status != "succeeded" {
            return Ok(refusal(
                StatusCode::UNPROCESSABLE_ENTITY,
                "order_not_captured",
                format!("only succeeded orders can be refunded; this order is {status}"),
                Some("order_id"),
            ));
        }
        let available = amount.saturating_sub(requested);
        let want = r.amount_minor.unwrap_or(available);
        if want <= 0 || want > available {
            return Ok(refusal(
                StatusCode::UNPROCESSABLE_ENTITY,
                "amount_exceeds_refundable",
                format!(
                    "{available} {currency} minor units are left to refund on this order (captured {amount}, already refunded or requested {requested})"
                ),
                Some("amount_minor"),
            ));
        }
        let currency = events::Currency::from_code(&currency).map_err(unavailable)?;
        let refund_id = events::RefundId::derive(&client, &key);
        let env = events::Envelope {
            event_id: events::EventId::derive(refund_id.as_uuid(), "requested"),
            occurred_at: events::Timestamp::now(),
            payment_id: Some(payment_id),
            correlation_id: events::CorrelationId::from_uuid(payment_id.as_uuid()),
            causation_id: None,
            producer: concat!("payment-handler/", env!("CARGO_PKG_VERSION")).to_owned(),
            schema_version: events::SCHEMA_VERSION,
            event: events::RefundRequested {
                refund_id,
                order_id: r.order_id,
                amount: events::Money::new(want, currency),
                reason: r.reason.clone(),
            }
            .into(),
        };
        app.producer.append(&env).await.map_err(unavailable)?;
        store::apply_status(&app.db, &[&env])
            .await
            .map_err(unavailable)?;
        let view = store::get_refund(&app.db, &refund_id.to_string())
            .await
            .map_err(unavailable)?
            .ok_or_else(|| unavailable("refund vanished from the status projection"))?;
        Ok((
            StatusCode::CREATED,
            serde_json::to_string(&view).expect("views serialise"),
        ))
    };
    idempotent(&app, &client, &key, &fingerprint, work).await
}

async fn get_payment(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let client = authenticate(&app, &headers).await?;
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "payment_not_found",
            "no such payment",
        )
    };
    // A malformed id cannot exist; answer as for any unknown payment.
    let id: PaymentId = id.parse().map_err(|_| not_found())?;
    let view = store::get_payment(&app.db, &id.to_string(), &client)
        .await
        .map_err(unavailable)?
        .ok_or_else(not_found)?;
    Ok(json_response(
        StatusCode::OK,
        serde_json::to_string(&view).expect("views serialise"),
    ))
}

async fn readyz(State(app): State<App>) -> Response {
    let db = app.db.ping().await.map_err(|e| e.to_string());
    let broker = app
        .producer
        .check_broker(std::time::Duration::from_secs(3))
        .await
        .map_err(|e| e.to_string());
    let ok = db.is_ok() && broker.is_ok();
    let body = json!({
        "status": if ok { "ready" } else { "not_ready" },
        "database": db.err().unwrap_or_else(|| "ok".into()),
        "broker": broker.err().unwrap_or_else(|| "ok".into()),
    });
    json_response(
        if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        body.to_string(),
    )
}
