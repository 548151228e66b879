//! The PSP's HTTP API as the executor uses it (see crates/psp-sim/README.md
//! for the contract), and the classification of its answers into final and
//! transient ones.

use crate::limits::PSP_ANSWER_BYTES_MAX;
use runtime::secret::Secret;
use serde::Deserialize;
use std::time::Duration;

/// The old name of [`crate::limits::PSP_ANSWER_BYTES_MAX`], which tests use.
pub use crate::limits::PSP_ANSWER_BYTES_MAX as MAX_ANSWER_BYTES;

/// A charge as the PSP reports it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Charge {
    pub id: String,
    pub status: String,
    pub amount_minor: i64,
    pub currency: String,
    pub fee_minor: i64,
    pub reference: String,
    #[serde(default)]
    pub decline_code: Option<String>,
    /// What was refunded of it so far.
    #[serde(default)]
    pub refunded_minor: i64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Refund {
    pub id: String,
    pub status: String,
}

#[derive(Debug, Deserialize)]
struct ChargeList {
    data: Vec<Charge>,
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Debug, Deserialize)]
struct ErrorDetail {
    code: String,
    #[serde(default)]
    message: String,
}

/// Why a call did not produce an answer we can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PspError {
    /// May go away: retry with the same idempotency key (5xx, 409 key in
    /// use, 429, connection errors, timeouts, unreadable answers).
    #[error("{code}: {reason}")]
    Transient {
        code: String,
        reason: String,
        retry_after: Option<Duration>,
        /// The PSP may have made the charge all the same (timeout,
        /// connection error, 409 key in use, unreadable 2xx or 5xx): such an
        /// order must never be failed before the PSP says there is no
        /// charge.
        outcome_unknown: bool,
    },
    /// The PSP refused the request for good (e.g. 422).
    #[error("{code}: {reason}")]
    Final {
        code: String,
        reason: String,
        /// A 400: the request itself is invalid, so no charge can exist.
        validation: bool,
    },
}

impl PspError {
    pub fn code(&self) -> &str {
        match self {
            PspError::Transient { code, .. } | PspError::Final { code, .. } => code,
        }
    }
    /// Whether the call may have created a charge despite the error.
    pub fn outcome_unknown(&self) -> bool {
        matches!(
            self,
            PspError::Transient {
                outcome_unknown: true,
                ..
            }
        )
    }
    /// Whether the PSP rejected the request as invalid (400): no charge can
    /// exist for it.
    pub fn is_validation(&self) -> bool {
        matches!(
            self,
            PspError::Final {
                validation: true,
                ..
            }
        )
    }
    pub fn reason(&self) -> &str {
        match self {
            PspError::Transient { reason, .. } | PspError::Final { reason, .. } => reason,
        }
    }
}

/// A charge answer and whether it was a replay of an earlier one.
#[derive(Debug, Clone)]
pub struct ChargeAnswer {
    pub charge: Charge,
    pub replayed: bool,
}

#[derive(Debug, Clone)]
pub struct PspClient {
    http: reqwest::Client,
    base: String,
    api_key: Secret,
}

impl PspClient {
    /// Fails only where reqwest cannot build its client (its TLS backend).
    pub fn new(
        base: &str,
        api_key: Secret,
        timeout: Duration,
    ) -> Result<PspClient, reqwest::Error> {
        assert!(!timeout.is_zero(), "a PSP call needs a positive timeout");
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .pool_max_idle_per_host(256)
            .build()?;
        Ok(PspClient {
            http,
            base: base.trim_end_matches('/').to_owned(),
            api_key,
        })
    }

    /// `POST /v1/charges` with the order id as idempotency key and reference.
    pub async fn charge(
        &self,
        order_id: &str,
        amount_minor: i64,
        currency: &str,
        card_token: &str,
    ) -> Result<ChargeAnswer, PspError> {
        observed("charge", async {
            let body = serde_json::json!({
                "amount_minor": amount_minor,
                "currency": currency,
                "card_token": card_token,
                "reference": order_id,
            });
            let resp = self
                .http
                .post(format!("{}/v1/charges", self.base))
                .bearer_auth(self.api_key.expose())
                .header("Idempotency-Key", order_id)
                .json(&body)
                .send()
                .await
                .map_err(transport)?;
            let replayed = resp
                .headers()
                .get("Idempotent-Replayed")
                .is_some_and(|v| v.as_bytes() == b"true");
            let charge = read::<Charge>(resp).await?;
            Ok(ChargeAnswer { charge, replayed })
        })
        .await
    }

    /// `GET /v1/charges/{id}`: the charge's current state.
    pub async fn get_charge(&self, id: &str) -> Result<Charge, PspError> {
        observed("get_charge", async {
            let resp = self
                .http
                .get(format!("{}/v1/charges/{id}", self.base))
                .bearer_auth(self.api_key.expose())
                .send()
                .await
                .map_err(transport)?;
            read(resp).await
        })
        .await
    }

    /// `GET /v1/charges?reference=`: the charges made for an order (none:
    /// `Ok(vec![])`).
    pub async fn charges_for(&self, order_id: &str) -> Result<Vec<Charge>, PspError> {
        observed("charges_for", async {
            let resp = self
                .http
                .get(format!("{}/v1/charges", self.base))
                .query(&[("reference", order_id)])
                .bearer_auth(self.api_key.expose())
                .send()
                .await
                .map_err(transport)?;
            if resp.status() == reqwest::StatusCode::NOT_FOUND {
                return Ok(Vec::new());
            }
            Ok(read::<ChargeList>(resp).await?.data)
        })
        .await
    }

    /// `POST /v1/charges/{id}/refunds` with the refund id as idempotency key.
    pub async fn refund(
        &self,
        charge_id: &str,
        refund_id: &str,
        amount_minor: i64,
    ) -> Result<Refund, PspError> {
        observed("refund", async {
            let resp = self
                .http
                .post(format!("{}/v1/charges/{charge_id}/refunds", self.base))
                .bearer_auth(self.api_key.expose())
                .header("Idempotency-Key", refund_id)
                .json(&serde_json::json!({ "amount_minor": amount_minor }))
                .send()
                .await
                .map_err(transport)?;
            read(resp).await
        })
        .await
    }
}

/// Records a PSP call's latency and outcome class (ok, transient, final).
async fn observed<T, F: std::future::Future<Output = Result<T, PspError>>>(
    operation: &'static str,
    call: F,
) -> Result<T, PspError> {
    use runtime::metrics::events::{InternalEvent as _, PspCalled};
    let started = std::time::Instant::now();
    let result = call.await;
    let outcome = match &result {
        Ok(_) => "ok",
        Err(PspError::Transient { .. }) => "transient",
        Err(PspError::Final { .. }) => "final",
    };
    let error = result.as_ref().err().map(ToString::to_string);
    PspCalled {
        operation,
        outcome,
        took: started.elapsed(),
        error: error.as_deref(),
    }
    .emit();
    result
}

fn transport(e: reqwest::Error) -> PspError {
    let code = if e.is_timeout() {
        "psp_timeout"
    } else {
        "psp_unreachable"
    };
    PspError::Transient {
        code: code.into(),
        reason: e.to_string(),
        retry_after: None,
        outcome_unknown: true,
    }
}

/// Reads a 2xx body as `T`, or classifies the error answer.
async fn read<T: serde::de::DeserializeOwned>(resp: reqwest::Response) -> Result<T, PspError> {
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let bytes = match read_limited(resp, PSP_ANSWER_BYTES_MAX).await? {
        Some(b) => b,
        None => {
            return Err(PspError::Transient {
                code: "psp_bad_answer".into(),
                reason: format!(
                    "{status} answer longer than {PSP_ANSWER_BYTES_MAX} bytes; not read"
                ),
                retry_after: None,
                // A 2xx may stand for a charge made; an error answer we
                // cannot read may come from a proxy in front of one.
                outcome_unknown: true,
            });
        }
    };
    if status.is_success() {
        return serde_json::from_slice(&bytes).map_err(|e| PspError::Transient {
            code: "psp_bad_answer".into(),
            reason: format!("unreadable {status} answer: {e}"),
            retry_after: None,
            outcome_unknown: true,
        });
    }
    let (code, message, readable) = match serde_json::from_slice::<ErrorBody>(&bytes) {
        Ok(b) => (b.error.code, b.error.message, true),
        Err(_) => (
            format!("http_{}", status.as_u16()),
            String::from_utf8_lossy(&bytes).chars().take(200).collect(),
            false,
        ),
    };
    let reason = format!("PSP answered {status}: {message}");
    // Final only where the PSP's contract says the request itself is wrong
    // for good: 400 (validation), 404 (unknown charge), 422 (key reused,
    // refund refused). Everything else — 5xx, 409, 429, 401 (an operator's
    // mistake that gets fixed), 408, 425 and 4xx we do not know — may go
    // away and is retried.
    let transient = !matches!(status.as_u16(), 400 | 404 | 422);
    // 409: another request with our key is still being processed and may
    // create the charge; a 5xx without the PSP's error body may come from a
    // proxy in front of a PSP that did the work. A 5xx/429 with the PSP's
    // error body says no charge was made.
    let outcome_unknown =
        status == reqwest::StatusCode::CONFLICT || (status.is_server_error() && !readable);
    if transient {
        Err(PspError::Transient {
            code,
            reason,
            retry_after,
            outcome_unknown,
        })
    } else {
        Err(PspError::Final {
            code,
            reason,
            validation: status == reqwest::StatusCode::BAD_REQUEST,
        })
    }
}

/// The body, or `None` when it is longer than `limit` (announced or
/// actual): never more than `limit` bytes are held.
async fn read_limited(
    mut resp: reqwest::Response,
    limit: usize,
) -> Result<Option<Vec<u8>>, PspError> {
    if resp
        .content_length()
        .is_some_and(|n| n > u64::try_from(limit).unwrap_or(u64::MAX))
    {
        return Ok(None);
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(transport)? {
        if body.len().saturating_add(chunk.len()) > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}
