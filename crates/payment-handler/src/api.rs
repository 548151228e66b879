//! The HTTP API. Every error is JSON `{"error": {"code", "message",
//! "field"}}` with a stable code.

use crate::error_code::ErrorCode;
use crate::group;
use crate::limits::IDEMPOTENCY_KEY_LEN_MAX;
use crate::request;
use crate::service::{self, App};
use crate::store::{self, Begin};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use events::{ClientId, PaymentId};
use runtime::metrics::events::IdempotencyResult;
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
    ("get", "/metrics"),
];

/// The OpenAPI document, checked into the repository.
pub const OPENAPI_JSON: &str = include_str!("../openapi.json");

/// Header marking a replayed response.
pub const REPLAY_HEADER: &str = "idempotent-replayed";

pub fn router(app: App) -> Router {
    let router = Router::new()
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
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such route")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::MethodNotAllowed,
                "method not allowed on this route",
            )
        })
        .with_state(app);
    runtime::metrics::instrument(router, "handler")
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
    pub code: ErrorCode,
    pub message: String,
    pub field: Option<String>,
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after_s: None,
        }
    }

    fn body(&self) -> String {
        json!({"error": {"code": self.code.as_str(), "message": self.message, "field": self.field}})
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
        ErrorCode::Unavailable,
        "a dependency is unavailable; retry with the same Idempotency-Key",
    );
    err.retry_after_s = Some(1);
    err
}

async fn authenticate(app: &App, headers: &HeaderMap) -> Result<ClientId, ApiError> {
    let unauthorized = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthenticated,
            "a valid API key is required: Authorization: Bearer psk_...",
        )
    };
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.split_once(' ')
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, t)| t)
        })
        .ok_or_else(unauthorized)?;
    app.keys
        .authenticate(&app.db, token.trim())
        .await
        .map_err(unavailable)?
        .ok_or_else(unauthorized)
}

fn idempotency_key(headers: &HeaderMap) -> Result<String, ApiError> {
    let bad = |msg: &str| {
        let mut e = ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidIdempotencyKey,
            msg,
        );
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
                ErrorCode::PayloadTooLarge,
                format!("request bodies are limited to {limit} bytes"),
            )
        })
}

/// The JSON body of an error.
pub fn error_json(code: ErrorCode, message: &str, field: Option<&str>) -> String {
    json!({"error": {"code": code.as_str(), "message": message, "field": field}}).to_string()
}

/// Which owned work an idempotent request runs.
#[derive(Debug, Clone)]
enum Work {
    Payment,
    Refund { payment: String },
}

/// Runs the request at most once per (client, Idempotency-Key): replays a
/// finished answer, refuses a different request or a key still in flight.
/// The owned part runs in its own task, so a client that hangs up cannot
/// cancel it half-way (after the append, before the answer is stored).
async fn idempotent(app: App, work: Work, req: Request) -> Result<Response, ApiError> {
    let headers = req.headers().clone();
    let client = authenticate(&app, &headers).await?;
    let key = idempotency_key(&headers)?;
    let body = read_body(req, app.body_limit).await?;
    let fingerprint = match &work {
        Work::Payment => request::fingerprint(&body),
        // Keys are per client across endpoints; the path is part of the request.
        Work::Refund { payment } => {
            request::fingerprint_with(&format!("POST /v1/payments/{payment}/refunds"), &body)
        }
    };
    // The common case goes through the group commit (`group`); a key that
    // exists already comes back here, to the per-request path.
    if let (Work::Payment, Some(group)) = (&work, &app.group) {
        let parsed = request::parse(&body);
        match group
            .submit(client.clone(), key.clone(), fingerprint.clone(), parsed)
            .await
        {
            group::Admitted::PerRequest => {}
            group::Admitted::Answered(Ok(reply)) => {
                idempotency(IdempotencyResult::Owned);
                return Ok(reply_response(reply));
            }
            group::Admitted::Answered(Err(e)) => return Err(unavailable(e)),
        }
    }
    let (token, pending) = match store::idem_begin(&app.db, &client, &key, &fingerprint, app.policy)
        .await
        .map_err(unavailable)?
    {
        Begin::Owned { token, pending } => {
            idempotency(if pending.is_some() {
                IdempotencyResult::TakenOver
            } else {
                IdempotencyResult::Owned
            });
            (token, pending)
        }
        Begin::Replay { status, body } => {
            idempotency(IdempotencyResult::Replay);
            let mut r = json_response(StatusCode::from_u16(status).unwrap_or(StatusCode::OK), body);
            r.headers_mut()
                .insert(REPLAY_HEADER, HeaderValue::from_static("true"));
            return Ok(r);
        }
        Begin::Decided { kind, resource } => {
            idempotency(IdempotencyResult::Replay);
            let reply = service::decided_reply(&app, &client, &kind, &resource)
                .await
                .map_err(unavailable)?;
            let mut r = json_response(
                StatusCode::from_u16(reply.status).unwrap_or(StatusCode::OK),
                reply.body,
            );
            r.headers_mut()
                .insert(REPLAY_HEADER, HeaderValue::from_static("true"));
            return Ok(r);
        }
        Begin::Mismatch => {
            idempotency(IdempotencyResult::Mismatch);
            let mut e = ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCode::IdempotencyKeyReused,
                "this Idempotency-Key was already used with a different request",
            );
            e.field = Some("Idempotency-Key".into());
            return Err(e);
        }
        Begin::InFlight { retry_after_s } => {
            idempotency(IdempotencyResult::InFlight);
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::IdempotencyKeyInUse,
                "a request with this Idempotency-Key is still being processed; retry later",
            );
            e.retry_after_s = Some(retry_after_s);
            return Err(e);
        }
    };
    let task = tokio::spawn(async move {
        let reply = match &work {
            Work::Payment => {
                service::run_owned_payment(&app, &client, &key, &token, pending, &body).await
            }
            Work::Refund { payment } => {
                service::run_owned_refund(&app, &client, &key, &token, pending, payment, &body)
                    .await
            }
        };
        match reply {
            Ok(reply) if reply.sticky => {
                match store::idem_finish(&app.db, &client, &key, &token, reply.status, &reply.body)
                    .await
                {
                    Ok(()) => {}
                    // Another request took the key over; it re-appends the same
                    // events and stores the same kind of answer.
                    Err(store::IdemError::NotOwner) => {
                        tracing::warn!("finished after losing the idempotency key")
                    }
                    Err(store::IdemError::Sql(e)) => return Err(unavailable(e)),
                }
                Ok(reply)
            }
            other => {
                if let Err(e) = store::idem_release(&app.db, &client, &key, &token).await {
                    tracing::warn!(error = %e, "cannot release idempotency key; it frees itself when its lease expires");
                }
                other.map_err(unavailable)
            }
        }
    });
    let reply = task
        .await
        .map_err(|e| unavailable(format!("request task: {e}")))??;
    Ok(reply_response(reply))
}

fn reply_response(reply: service::Reply) -> Response {
    let mut r = json_response(
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        reply.body,
    );
    if let Some(s) = reply.retry_after_s {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    r
}

async fn create_payment(State(app): State<App>, req: Request) -> Result<Response, ApiError> {
    idempotent(app, Work::Payment, req).await
}

async fn create_refund(
    State(app): State<App>,
    Path(payment): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    idempotent(app, Work::Refund { payment }, req).await
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
            ErrorCode::PaymentNotFound,
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
    // A part of the handler (consumer, sweeper, server) ended: not ready,
    // whatever the database and broker say; the process is stopping.
    let parts = app.health.is_alive();
    let db = app.db.ping().await.map_err(|e| {
        tracing::warn!(error = %e, "readiness: database unavailable");
        "unavailable"
    });
    let broker = app
        .producer
        .check_broker(std::time::Duration::from_secs(3))
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "readiness: broker unavailable");
            "unavailable"
        });
    let ok = parts && db.is_ok() && broker.is_ok();
    // Fixed words only: the causes are in the log, not in the answer.
    let body = json!({
        "status": if ok { "ready" } else { "not_ready" },
        "parts": if parts { "running" } else { "stopped" },
        "database": db.err().unwrap_or("ok"),
        "broker": broker.err().unwrap_or("ok"),
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

/// Counts and logs what became of an `Idempotency-Key`.
fn idempotency(result: IdempotencyResult) {
    use runtime::metrics::events::{IdempotencyDecided, InternalEvent as _};
    IdempotencyDecided { result }.emit();
}
