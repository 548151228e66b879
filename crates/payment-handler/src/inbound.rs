//! Payment requests produced straight to the inbound topic get what HTTP
//! requests get: the same validation (through `request::parse`), the same
//! risk check, the same dedup. Invalid ones are dead-lettered with the
//! reason.

use crate::request;
use crate::service::{App, submit};
use events::{Event, PaymentId, json};
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
        // The same payment id an HTTP request with this key would get, so an
        // upstream that uses both paths still makes one payment.
        let payment = match (&p.idempotency_key, d.envelope.payment_id) {
            (Some(key), _) => PaymentId::derive(&p.client_id, key),
            (None, Some(id)) => id,
            (None, None) => {
                return Ok(Outcome::rejected(
                    "missing_payment_id",
                    "an inbound request needs an idempotency_key or a payment_id",
                ));
            }
        };
        if crate::store::payment_exists(&self.app.db, payment)
            .await
            .map_err(|e| unavailable(&e))?
        {
            return Ok(Outcome::Duplicate);
        }
        // Validate exactly as the HTTP API does, by building its body.
        let payload = json::payload(&d.envelope.event);
        let body = serde_json::json!({
            "buyer_id": payload["buyer_id"],
            "orders": payload["orders"].as_array().map(|os| os.iter().map(|o| serde_json::json!({
                "seller_id": o["seller_id"],
                "amount_minor": o["amount"]["amount_minor"],
                "currency": o["amount"]["currency"],
            })).collect::<Vec<_>>()),
            "metadata": payload["metadata"],
        });
        let req = match request::parse(body.to_string().as_bytes()) {
            Ok(r) => r,
            Err(e) => {
                let field = if e.field.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", e.field)
                };
                return Ok(Outcome::rejected(e.code, format!("{}{field}", e.message)));
            }
        };
        submit(
            &self.app,
            &p.client_id,
            payment,
            p.idempotency_key.as_deref(),
            &req,
        )
        .await
        .map_err(|e| unavailable(&e))?;
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
