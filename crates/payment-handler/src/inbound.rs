//! Payment requests produced straight to the inbound topic get what HTTP
//! requests get: the same validation (through `request::parse`), the same
//! risk check, the same dedup. Invalid ones are dead-lettered with the
//! reason.
//!
//! A message acts for a client only if it proves it: the header
//! `paystream-signature: keyid=<key id>,v1=<hex>` carries an HMAC-SHA256
//! over the message's key and bytes (see [`signed_bytes`]) keyed with the
//! SHA-256 of the secret of one of the client's API keys (`psk_<key
//! id>_<secret>`). The server keeps only that SHA-256, which is enough to
//! verify, and an upstream producer can be given just the signing key
//! ([`signing_key`]) without the API key itself. Unsigned messages, bad
//! signatures, unknown or revoked keys and keys of another client than the
//! payload's `client_id` are dead-lettered with kind `unauthenticated`.

use crate::group::Admitted;
use crate::request;
use crate::service::{App, run_owned_payment};
use crate::store::Begin;
use events::{Envelope, Event, json};
use hmac::{Hmac, Mac};
use rdkafka::message::Header;
use sha2::{Digest, Sha256};
use streaming::{
    Appended, BatchHandler, Delivered, EventProducer, HandlerError, Outcome, ProduceError,
};
use tracing::Instrument;

/// The header carrying an inbound message's signature.
pub const SIGNATURE_HEADER: &str = "paystream-signature";
const DOMAIN: &[u8] = b"paystream-inbound-v1\n";

/// The bytes an inbound signature covers: `paystream-inbound-v1\n`, the
/// key's length as 4 bytes big-endian, the key, then the payload. The key is
/// covered so a signed message cannot be replayed under another key.
pub fn signed_bytes(key: Option<&[u8]>, payload: &[u8]) -> Vec<u8> {
    let key = key.unwrap_or_default();
    let mut v = Vec::with_capacity(DOMAIN.len() + 4 + key.len() + payload.len());
    v.extend_from_slice(DOMAIN);
    v.extend_from_slice(&u32::try_from(key.len()).unwrap_or(u32::MAX).to_be_bytes());
    v.extend_from_slice(key);
    v.extend_from_slice(payload);
    v
}

/// (key id, HMAC key) of an API key `psk_<key id>_<secret>`: the HMAC key is
/// SHA-256 of the secret, which is what the server stores.
pub fn signing_key(api_key: &str) -> Option<(String, [u8; 32])> {
    let (key_id, secret) = crate::store::split_api_key(api_key)?;
    Some((key_id.to_owned(), Sha256::digest(secret.as_bytes()).into()))
}

fn mac(signing_key: &[u8; 32], key: Option<&[u8]>, payload: &[u8]) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(signing_key).expect("HMAC takes any key size");
    m.update(&signed_bytes(key, payload));
    m
}

/// The `paystream-signature` header value for a message, signed with an
/// API key; `None` if `api_key` is not of the form `psk_<key id>_<secret>`.
pub fn sign(api_key: &str, key: Option<&[u8]>, payload: &[u8]) -> Option<String> {
    let (key_id, signing) = signing_key(api_key)?;
    let sig = hex::encode(mac(&signing, key, payload).finalize().into_bytes());
    Some(format!("keyid={key_id},v1={sig}"))
}

/// How [`append_signed`] fails.
#[derive(Debug, thiserror::Error)]
pub enum AppendSignedError {
    #[error(transparent)]
    Encode(#[from] events::avro::EncodeError),
    #[error("not an API key (psk_<key id>_<secret>)")]
    NotAnApiKey,
    // (A ProduceError is large: boxed.)
    #[error(transparent)]
    Produce(Box<ProduceError>),
}

impl From<ProduceError> for AppendSignedError {
    fn from(e: ProduceError) -> AppendSignedError {
        AppendSignedError::Produce(Box::new(e))
    }
}

/// Appends `env` to `topic` (the inbound topic) signed with `api_key`, with
/// the headers `EventProducer::append_to` sets.
pub async fn append_signed(
    producer: &EventProducer,
    topic: &str,
    env: &Envelope,
    api_key: &str,
) -> Result<Appended, AppendSignedError> {
    let payload = events::avro::encode(env)?;
    let key = env.partition_key();
    let sig =
        sign(api_key, Some(key.as_bytes()), &payload).ok_or(AppendSignedError::NotAnApiKey)?;
    let headers = streaming::producer::envelope_headers(env).insert(Header {
        key: SIGNATURE_HEADER,
        value: Some(sig.as_str()),
    });
    Ok(producer
        .send_raw(
            topic,
            Some(key.as_bytes()),
            Some(&payload),
            headers,
            Some(env.occurred_at.as_millis()),
        )
        .await?)
}

/// Parses `keyid=<id>,v1=<hex>`.
fn parse_signature(v: &str) -> Option<(&str, Vec<u8>)> {
    let mut key_id = None;
    let mut sig = None;
    for part in v.split(',') {
        match part.trim().split_once('=')? {
            ("keyid", k) => key_id = Some(k),
            ("v1", s) => sig = Some(hex::decode(s).ok()?),
            _ => {}
        }
    }
    Some((key_id?, sig?))
}

#[derive(Debug)]
pub struct Inbound {
    app: App,
}

impl Inbound {
    pub fn new(app: App) -> Inbound {
        Inbound { app }
    }

    /// Everything about a message that needs no decision: its type, its
    /// signature, its idempotency key, the HTTP body it stands for. `Err`
    /// only when the database cannot be asked (the batch is retried).
    async fn check(&self, d: &Delivered) -> Result<Checked, HandlerError> {
        let Event::PaymentRequested(p) = &d.envelope.event else {
            return Ok(Checked::Done(Outcome::rejected(
                "unexpected_event_type",
                format!(
                    "the inbound topic takes PaymentRequested only, got {}",
                    d.envelope.event_type()
                ),
            )));
        };
        if let Some(reason) = self.unauthenticated(d, p.client_id.as_str()).await? {
            return Ok(Checked::Done(Outcome::rejected("unauthenticated", reason)));
        }
        // Inbound requests go through the same idempotency keys as HTTP
        // ones: the same (client, key) is one payment whichever path it
        // took, and a different request under a used key is refused.
        let Some(key) = p.idempotency_key.as_deref() else {
            return Ok(Checked::Done(Outcome::rejected(
                "missing_idempotency_key",
                "inbound payment requests need an idempotency_key",
            )));
        };
        if key.is_empty()
            || key.len() > crate::limits::IDEMPOTENCY_KEY_LEN_MAX
            || !key.bytes().all(|b| b.is_ascii_graphic())
        {
            return Ok(Checked::Done(Outcome::rejected(
                "invalid_idempotency_key",
                "idempotency_key must be 1 to 255 printable ASCII characters without spaces",
            )));
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
        Ok(Checked::Submit(Submit {
            client: p.client_id.clone(),
            buyer: payload["buyer_id"].to_string(),
            key: key.to_owned(),
            fingerprint: request::fingerprint(body.as_bytes()),
            body,
        }))
    }

    /// Submits a checked message the way `POST /v1/payments` does: through
    /// the group commit when it runs (so the messages of a batch submitted
    /// together are decided, appended and stored together), else, or when
    /// its key exists already, through the per-request path.
    async fn submit(&self, s: &Submit) -> Result<Outcome, HandlerError> {
        if let Some(group) = &self.app.group {
            match group
                .submit(
                    s.client.clone(),
                    s.key.clone(),
                    s.fingerprint.clone(),
                    request::parse(s.body.as_bytes()),
                )
                .await
            {
                Admitted::PerRequest => {}
                // The answer is stored under the key (a refusal too), so a
                // re-delivered message gets it again below.
                Admitted::Answered(Ok(reply)) if reply.status >= 400 => {
                    return Ok(stored_rejection(&reply.body));
                }
                Admitted::Answered(Ok(_)) => return Ok(Outcome::Applied),
                Admitted::Answered(Err(e)) => {
                    return Err(HandlerError(format!("inbound: {e}")));
                }
            }
        }
        self.per_request(s).await
    }

    /// The per-request path: the key's stored answer, or this message
    /// decided and appended on its own.
    async fn per_request(&self, s: &Submit) -> Result<Outcome, HandlerError> {
        let unavailable = |e: &dyn std::fmt::Display| HandlerError(format!("inbound: {e}"));
        let (client, key) = (&s.client, s.key.as_str());
        let (token, pending) = match crate::store::idem_begin(
            &self.app.db,
            client,
            key,
            &s.fingerprint,
            self.app.policy,
        )
        .await
        .map_err(|e| unavailable(&e))?
        {
            Begin::Owned { token, pending } => (token, pending),
            // Refused by an earlier delivery of this message (e.g. in a
            // batch that then failed and is run again): dead-letter it
            // again, or its dead letter would be lost.
            Begin::Replay { status, body } if status >= 400 => return Ok(stored_rejection(&body)),
            Begin::Replay { .. } | Begin::Decided { .. } => return Ok(Outcome::Duplicate),
            Begin::Mismatch => {
                return Ok(Outcome::rejected(
                    "idempotency_key_reused",
                    format!(
                        "client {client} already used idempotency key {key:?} for a different request"
                    ),
                ));
            }
            Begin::InFlight { .. } => {
                return Err(HandlerError(format!(
                    "idempotency key {key:?} is in flight elsewhere; retrying"
                )));
            }
        };
        let reply =
            match run_owned_payment(&self.app, client, key, &token, pending, s.body.as_bytes())
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    let _ = crate::store::idem_release(&self.app.db, client, key, &token).await;
                    return Err(unavailable(&e));
                }
            };
        let _ =
            crate::store::idem_finish(&self.app.db, client, key, &token, reply.status, &reply.body)
                .await;
        if reply.status >= 400 {
            return Ok(stored_rejection(&reply.body));
        }
        Ok(Outcome::Applied)
    }
}

/// A message after its checks.
#[derive(Debug)]
enum Checked {
    /// Its outcome is known without deciding anything (a dead letter).
    Done(Outcome),
    /// A payment request to submit under (client, key).
    Submit(Submit),
}

#[derive(Debug)]
struct Submit {
    client: events::ClientId,
    /// The paying buyer as the message names it (for the order in which
    /// one buyer's payments are decided).
    buyer: String,
    key: String,
    fingerprint: String,
    /// The JSON body an HTTP client would have sent.
    body: String,
}

/// `first` (in the partition's order) in waves: the n-th wave holds each
/// (client, buyer)'s n-th submission, in the partition's order.
fn buyer_waves(first: &[(usize, Submit)]) -> Vec<Vec<&(usize, Submit)>> {
    let mut seen: std::collections::HashMap<(&events::ClientId, &str), usize> =
        std::collections::HashMap::new();
    let mut waves: Vec<Vec<&(usize, Submit)>> = Vec::new();
    for item in first {
        let n = seen
            .entry((&item.1.client, item.1.buyer.as_str()))
            .or_insert(0);
        if waves.len() <= *n {
            waves.push(Vec::new());
        }
        waves[*n].push(item);
        *n += 1;
    }
    waves
}

/// The dead letter's kind and reason from an error response body.
fn stored_rejection(body: &str) -> Outcome {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let code = v["error"]["code"]
        .as_str()
        .unwrap_or("invalid_request")
        .to_owned();
    let field = v["error"]["field"]
        .as_str()
        .map(|f| format!(" ({f})"))
        .unwrap_or_default();
    Outcome::Rejected {
        kind: code,
        reason: format!("{}{field}", v["error"]["message"].as_str().unwrap_or("")),
    }
}

impl Inbound {
    /// Why the message does not prove it acts for `client`, if it does not.
    async fn unauthenticated(
        &self,
        d: &Delivered,
        client: &str,
    ) -> Result<Option<String>, HandlerError> {
        let header = d
            .headers()
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(SIGNATURE_HEADER))
            .and_then(|(_, v)| v.as_deref());
        let Some(header) = header else {
            return Ok(Some(format!(
                "no {SIGNATURE_HEADER} header: inbound messages must be signed with one of client {client}'s API keys"
            )));
        };
        let Some((key_id, sig)) = std::str::from_utf8(header).ok().and_then(parse_signature) else {
            return Ok(Some(format!(
                "malformed {SIGNATURE_HEADER} header (expected keyid=<key id>,v1=<hex HMAC-SHA256>)"
            )));
        };
        let Some((owner, signing)) = crate::store::inbound_signing_key(&self.app.db, key_id)
            .await
            .map_err(|e| HandlerError(format!("inbound: {e}")))?
        else {
            return Ok(Some("unknown or revoked signing key".to_owned()));
        };
        if mac(&signing, d.key(), d.payload())
            .verify_slice(&sig)
            .is_err()
        {
            return Ok(Some("the signature does not match the message".to_owned()));
        }
        if owner != client {
            return Ok(Some(format!(
                "signed with a key of another client than the payload's client_id {client}"
            )));
        }
        Ok(None)
    }
}

impl BatchHandler for Inbound {
    /// The batch's messages are checked together, then the first message
    /// of each idempotency key is submitted, in the partition's order, in
    /// waves: each buyer's first payment of the batch together, then each
    /// buyer's second once the first wave is answered, and so on. The group
    /// commit batches a wave as it batches concurrent HTTP requests, and a
    /// buyer's payments are decided one after the other, as one-by-one
    /// processing decided them, so the velocity rules see exactly the
    /// buyer's earlier payments (never a later one of the same batch). A
    /// key met again in the batch is answered after its first message, from
    /// what that one stored, as one-by-one processing answered it. One
    /// outcome per message, in order.
    async fn handle(&mut self, batch: &[Delivered]) -> Result<Vec<Outcome>, HandlerError> {
        let this = &*self;
        let checked =
            futures::future::join_all(batch.iter().map(|d| this.check(d).instrument(d.span())))
                .await;
        let mut out: Vec<Option<Outcome>> = vec![None; batch.len()];
        let (mut first, mut again) = (Vec::new(), Vec::new());
        let mut keys = std::collections::HashSet::new();
        for (i, c) in checked.into_iter().enumerate() {
            match c? {
                Checked::Done(o) => out[i] = Some(o),
                Checked::Submit(s) => {
                    if keys.insert((s.client.clone(), s.key.clone())) {
                        first.push((i, s));
                    } else {
                        again.push((i, s));
                    }
                }
            }
        }
        for wave in buyer_waves(&first) {
            let submitted = futures::future::join_all(
                wave.iter()
                    .map(|(i, s)| this.submit(s).instrument(batch[*i].span())),
            )
            .await;
            for ((i, _), o) in wave.iter().zip(submitted) {
                out[*i] = Some(o?);
            }
        }
        for (i, s) in &again {
            out[*i] = Some(this.per_request(s).instrument(batch[*i].span()).await?);
        }
        Ok(out
            .into_iter()
            .map(|o| o.expect("every message has an outcome"))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submit(client: &str, buyer: &str, key: &str) -> Submit {
        Submit {
            client: events::ClientId::parse(client).expect("client id"),
            buyer: buyer.to_owned(),
            key: key.to_owned(),
            fingerprint: String::new(),
            body: String::new(),
        }
    }

    /// A buyer's payments are in successive waves, in the partition's
    /// order; other buyers' (and another client's buyer of the same id)
    /// share the first wave.
    #[test]
    fn one_buyers_payments_are_decided_one_after_the_other() {
        let first: Vec<(usize, Submit)> = [
            ("shop", "b1", "k1"),
            ("shop", "b2", "k2"),
            ("shop", "b1", "k3"),
            ("other", "b1", "k4"),
            ("shop", "b1", "k5"),
            ("shop", "b2", "k6"),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, (c, b, k))| (i, submit(c, b, k)))
        .collect();
        let waves: Vec<Vec<&str>> = buyer_waves(&first)
            .iter()
            .map(|w| w.iter().map(|(_, s)| s.key.as_str()).collect())
            .collect();
        assert_eq!(
            waves,
            vec![vec!["k1", "k2", "k4"], vec!["k3", "k6"], vec!["k5"]]
        );
    }
}
