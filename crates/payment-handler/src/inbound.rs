//! Payment requests produced straight to the inbound topic get what HTTP
//! requests get: the same validation (through `request::parse`), the same
//! risk check, the same dedup. Invalid ones are dead-lettered with the
//! reason.

use crate::request;
use crate::service::{App, run_owned_payment};
use crate::store::Begin;
use events::{Event, json};
use streaming::{BatchHandler, Delivered, HandlerError, Outcome};
use tracing::Instrument;

#[derive(Debug)]
pub struct Inbound {
    app: App,
}

impl Inbound {
    pub fn new(app: App) -> Inbound {
        Inbound { app }
    }

    async fn one(&self, d: &Delivered) -> Result<Outcome, HandlerError> {
        let unavailable = |e: &dyn std::fmt::Display| HandlerError(format!("inbound: {e}"));
        let Event::PaymentRequested(p) = &d.envelope.event else {
            return Ok(Outcome::rejected(
                "unexpected_event_type",
                format!(
                    "the inbound topic takes PaymentRequested only, got {}",
                    d.envelope.event_type()
                ),
            ));
        };
        if !crate::store::client_exists(&self.app.db, &p.client_id)
            .await
            .map_err(|e| unavailable(&e))?
        {
            return Ok(Outcome::rejected(
                "unknown_client",
                format!("client {} is not registered", p.client_id),
            ));
        }
        // Inbound requests go through the same idempotency keys as HTTP
        // ones: the same (client, key) is one payment whichever path it
        // took, and a different request under a used key is refused.
        let Some(key) = p.idempotency_key.as_deref() else {
            return Ok(Outcome::rejected(
                "missing_idempotency_key",
                "inbound payment requests need an idempotency_key",
            ));
        };
        if key.is_empty()
            || key.len() > crate::api::IDEMPOTENCY_KEY_LEN_MAX
            || !key.bytes().all(|b| b.is_ascii_graphic())
        {
            return Ok(Outcome::rejected(
                "invalid_idempotency_key",
                "idempotency_key must be 1 to 255 printable ASCII characters without spaces",
            ));
        }
        // The body an HTTP client would have sent, so validation and the
        // request fingerprint are exactly the HTTP API's.
        let payload = json::payload(&d.envelope.event);
        let mut body = serde_json::json!({
            "buyer_id": payload["buyer_id"],
            "orders": payload["orders"].as_array().map(|os| os.iter().map(|o| serde_json::json!({
                "seller_id": o["seller_id"],
                "amount_minor": o["amount"]["amount_minor"],
                "currency": o["amount"]["currency"],
            })).collect::<Vec<_>>()),
        });
        if !p.metadata.is_empty() {
            body["metadata"] = payload["metadata"].clone();
        }
        let body = body.to_string();
        let fingerprint = request::fingerprint(body.as_bytes());
        let (token, pending) = match crate::store::idem_begin(
            &self.app.db,
            &p.client_id,
            key,
            &fingerprint,
            self.app.policy,
        )
        .await
        .map_err(|e| unavailable(&e))?
        {
            Begin::Owned { token, pending } => (token, pending),
            Begin::Replay { .. } => return Ok(Outcome::Duplicate),
            Begin::Mismatch => {
                return Ok(Outcome::rejected(
                    "idempotency_key_reused",
                    format!(
                        "client {} already used idempotency key {key:?} for a different request",
                        p.client_id
                    ),
                ));
            }
            Begin::InFlight { .. } => {
                return Err(HandlerError(format!(
                    "idempotency key {key:?} is in flight elsewhere; retrying"
                )));
            }
        };
        let reply = match run_owned_payment(
            &self.app,
            &p.client_id,
            key,
            &token,
            pending,
            body.as_bytes(),
        )
        .await
        {
            Ok(r) => r,
            Err(e) => {
                let _ = crate::store::idem_release(&self.app.db, &p.client_id, key, &token).await;
                return Err(unavailable(&e));
            }
        };
        let _ = crate::store::idem_finish(
            &self.app.db,
            &p.client_id,
            key,
            &token,
            reply.status,
            &reply.body,
        )
        .await;
        if reply.status >= 400 {
            let v: serde_json::Value = serde_json::from_str(&reply.body).unwrap_or_default();
            let code = v["error"]["code"]
                .as_str()
                .unwrap_or("invalid_request")
                .to_owned();
            let field = v["error"]["field"]
                .as_str()
                .map(|f| format!(" ({f})"))
                .unwrap_or_default();
            return Ok(Outcome::Rejected {
                kind: code,
                reason: format!("{}{field}", v["error"]["message"].as_str().unwrap_or("")),
            });
        }
        Ok(Outcome::Applied)
    }
}

impl BatchHandler for Inbound {
    async fn handle(&mut self, batch: &[Delivered]) -> Result<Vec<Outcome>, HandlerError> {
        let mut out = Vec::with_capacity(batch.len());
        for d in batch {
            out.push(self.one(d).instrument(d.span()).await?);
        }
        Ok(out)
    }
}
