//! The executor's HTTP server: `POST /v1/psp/webhooks` and `GET /healthz`.
//!
//! A webhook is trusted only with a valid `Psp-Signature` (HMAC-SHA256 of
//! `"<t>.<raw body>"`, compared in constant time) whose time is within the
//! tolerance; anything else gets 401 and causes no database work at all.
//! A signed charge webhook settles a pending order only if its charge id,
//! amount and currency are the order's; otherwise it changes nothing, is
//! logged and counted (`paystream_webhook_mismatches_total{field}`), and
//! the order is polled from the PSP at once instead. Refund webhooks are
//! acknowledged and change nothing (the refund call's own answer decides).
//! Deliveries are deduplicated by the PSP's event id, and the order's state
//! guard makes the settlement event happen once however often (or late) a
//! webhook comes.

use crate::dispatch;
use crate::psp::Charge;
use crate::service::App;
use crate::store;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::json;
use sha2::Sha256;

pub fn router(app: App) -> Router {
    runtime::metrics::instrument(
        Router::new()
            .route("/healthz", get(healthz))
            .route("/v1/psp/webhooks", post(webhook))
            .layer(axum::extract::DefaultBodyLimit::max(
                crate::limits::WEBHOOK_BODY_BYTES_MAX,
            ))
            .with_state(app),
        "executor",
    )
}

async fn healthz(State(app): State<App>) -> Response {
    if !app.health.is_alive() {
        // A part (intake, dispatcher) ended: the process is stopping.
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "a part of the executor stopped",
            None,
        );
    }
    match app.db.ping().await {
        Ok(()) => (StatusCode::OK, "ok").into_response(),
        Err(e) => {
            // The cause is for the operator's log, not for whoever asks.
            tracing::warn!(error = %e, "health check: database unavailable");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "database unavailable",
                None,
            )
        }
    }
}

fn error(status: StatusCode, code: &str, message: &str, field: Option<&str>) -> Response {
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": message, "field": field}})),
    )
        .into_response()
}

/// Why a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing Psp-Signature header")]
    Missing,
    #[error("malformed Psp-Signature header")]
    Malformed,
    #[error("signature timestamp outside the accepted window")]
    Stale,
    #[error("signature does not match")]
    Mismatch,
}

/// Checks a `Psp-Signature` header (`t=<unix s>,v1=<hex>`, possibly several
/// `v1`) against the body, at time `now_s`.
pub fn verify(
    secret: &[u8],
    header: Option<&str>,
    body: &[u8],
    now_s: i64,
    tolerance_s: i64,
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let mut t = None;
    let mut sigs = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = Some(v.parse::<i64>().map_err(|_| SignatureError::Malformed)?),
            Some(("v1", v)) => sigs.push(hex::decode(v).map_err(|_| SignatureError::Malformed)?),
            _ => {}
        }
    }
    let t = t.ok_or(SignatureError::Malformed)?;
    if sigs.is_empty() {
        return Err(SignatureError::Malformed);
    }
    if now_s.abs_diff(t) > tolerance_s.unsigned_abs() {
        return Err(SignatureError::Stale);
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    // verify_slice compares in constant time.
    if sigs.iter().any(|s| mac.clone().verify_slice(s).is_ok()) {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

#[derive(Debug, Deserialize)]
struct WebhookEvent {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    data: serde_json::Value,
}

async fn webhook(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    let sig = headers.get("Psp-Signature").and_then(|v| v.to_str().ok());
    let now_s = store::now_ms().div_euclid(1000);
    if let Err(e) = verify(
        app.webhook_secret.expose().as_bytes(),
        sig,
        &body,
        now_s,
        app.policy.webhook_tolerance_s,
    ) {
        // Nothing an unauthenticated caller sends is read further or causes
        // any database work: a genuine PSP delivers again, and the poll
        // fallback resolves pending orders without it.
        tracing::warn!(error = %e, "webhook refused");
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_signature",
            &e.to_string(),
            Some("Psp-Signature"),
        );
    }
    let event: WebhookEvent = match serde_json::from_slice(&body) {
        Ok(e) => e,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &e.to_string(),
                None,
            );
        }
    };
    match handle(&app, &event).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::warn!(error = %e, psp_event = %event.id, "webhook processing failed");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                &e.to_string(),
                None,
            )
        }
    }
}

fn ok(status: &str) -> Response {
    (StatusCode::OK, axum::Json(json!({"status": status}))).into_response()
}

/// How processing a signed webhook fails (answered 503: the PSP delivers
/// it again).
#[derive(Debug, thiserror::Error)]
enum WebhookError {
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
    #[error(transparent)]
    Dispatch(#[from] dispatch::DispatchError),
    #[error("order {order_id} without its payment")]
    OrderWithoutPayment { order_id: String },
}

async fn handle(app: &App, event: &WebhookEvent) -> Result<Response, WebhookError> {
    if store::webhook_seen(&app.db, &event.id).await? {
        return Ok(ok("duplicate"));
    }
    if event.kind != "charge.succeeded" && event.kind != "charge.failed" {
        // Refund webhooks and others: the refund call already told us.
        store::record_webhook(&app.db, &event.id, &event.kind).await?;
        return Ok(ok("acknowledged"));
    }
    let charge: Charge = match serde_json::from_value(event.data.clone()) {
        Ok(c) => c,
        Err(e) => {
            return Ok(error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &e.to_string(),
                Some("data"),
            ));
        }
    };
    let Some(order) = store::order(&app.db, &charge.reference).await? else {
        tracing::warn!(reference = %charge.reference, "webhook for an unknown order; acknowledged");
        store::record_webhook(&app.db, &event.id, &event.kind).await?;
        return Ok(ok("unknown_order"));
    };
    match order.state.as_str() {
        "pending" => {
            if let Some(field) = mismatch(&order, &charge) {
                // Signed, but not about the charge we made: settle nothing
                // from it; ask the PSP itself (the poll fallback) instead.
                {
                    use runtime::metrics::events::{InternalEvent as _, WebhookMismatch};
                    WebhookMismatch {
                        order: &order.order_id,
                        field,
                        psp_event: &event.id,
                    }
                    .emit();
                }
                store::poll_now(&app.db, &order.order_id).await?;
                app.work.notify_one();
                return Ok(ok("mismatch"));
            }
            let Some(pay) = store::payment(&app.db, &order.payment_id).await? else {
                return Err(WebhookError::OrderWithoutPayment {
                    order_id: order.order_id,
                });
            };
            let resolved = dispatch::settle(app, &pay, &order, &charge).await?;
            store::record_webhook(&app.db, &event.id, &event.kind).await?;
            Ok(ok(if resolved { "resolved" } else { "duplicate" }))
        }
        "failed" | "cancelled" if charge.status == "succeeded" => {
            // The PSP charged an order we reported as not charged: money
            // moved that our events deny. Never booked from here; an
            // operator must reconcile (refund or re-open) it.
            tracing::error!(
                order_id = %order.order_id,
                state = %order.state,
                psp_charge_id = %charge.id,
                amount_minor = charge.amount_minor,
                "DISCREPANCY: the PSP reports a succeeded charge for an order we marked {}",
                order.state
            );
            store::record_webhook(&app.db, &event.id, &event.kind).await?;
            Ok(ok("discrepancy"))
        }
        "succeeded" | "failed" | "cancelled" => {
            store::record_webhook(&app.db, &event.id, &event.kind).await?;
            Ok(ok("duplicate"))
        }
        // Our own call has not recorded its outcome yet: ask the PSP to
        // deliver again later rather than dropping what it says.
        _ => Ok(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the order's execution is still being recorded; retry later",
            None,
        )),
    }
}

/// The first field in which a charge webhook differs from what we know
/// of the order: the charge id our own call got (a pending order always
/// has one), the amount and the currency.
fn mismatch(order: &store::OrderRow, charge: &Charge) -> Option<&'static str> {
    if order.psp_charge_id.as_deref() != Some(charge.id.as_str()) {
        Some("charge_id")
    } else if charge.amount_minor != order.amount_minor {
        Some("amount")
    } else if charge.currency != order.currency {
        Some("currency")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &[u8], t: i64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(format!("{t}.").as_bytes());
        mac.update(body);
        format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn accepts_a_valid_signature_and_refuses_others() {
        let body = br#"{"id":"evt_1"}"#;
        let h = sign(b"s", 1000, body);
        assert_eq!(verify(b"s", Some(&h), body, 1100, 300), Ok(()));
        assert_eq!(
            verify(b"s", Some(&h), body, 1400, 300),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            verify(b"other", Some(&h), body, 1000, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(b"s", Some(&h), b"{}", 1000, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(b"s", None, body, 1000, 300),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            verify(b"s", Some("t=x,v1=zz"), body, 1000, 300),
            Err(SignatureError::Malformed)
        );
    }
}
