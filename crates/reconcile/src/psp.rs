//! The PSP's settlement files over HTTP: where a day's file is and fetching
//! it with retries.

use crate::settlement;
use runtime::secret::Secret;
use std::time::Duration;
use time::Date;

/// Where to fetch settlement files: a PSP (or the simulator) over HTTP.
#[derive(Debug, Clone)]
pub struct PspSource {
    /// e.g. `http://127.0.0.1:8090`
    pub base_url: String,
    pub api_key: Secret,
    /// Extra query string appended to the file's URL (the simulator's
    /// `inject=...&seed=...`), without `?`.
    pub query: Option<String>,
    pub timeout: Duration,
    /// Attempts before giving up (at least 1).
    pub attempts: u32,
    /// Longest wait a PSP's `Retry-After` may ask for between attempts
    /// (longer requests are cut to this).
    pub max_retry_after: Duration,
}

impl PspSource {
    /// A simulator's (or PSP's) account at `base_url` with its API key.
    pub fn simulator(base_url: &str, api_key: Secret) -> PspSource {
        PspSource {
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key,
            query: None,
            timeout: Duration::from_secs(30),
            attempts: 5,
            max_retry_after: crate::limits::RETRY_AFTER_MAX_DEFAULT,
        }
    }

    /// URL of a day's file.
    pub fn url(&self, date: Date) -> String {
        let mut u = format!(
            "{}/v1/settlements/{}.csv",
            self.base_url.trim_end_matches('/'),
            settlement::format_date(date)
        );
        if let Some(q) = &self.query {
            u.push('?');
            u.push_str(q);
        }
        u
    }
}

/// A settlement file the PSP did not hand over.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The HTTP client could not be built.
    #[error(transparent)]
    Client(#[from] reqwest::Error),
    /// An answer that will not change by asking again (4xx other than 404
    /// and 429).
    #[error("fetching {url}: {detail}")]
    Refused { url: String, detail: String },
    /// Every attempt failed transiently; `last` says how the last one did.
    #[error("fetching {url} failed after {attempts} attempts: {last}")]
    GaveUp {
        url: String,
        attempts: u32,
        last: String,
    },
}

/// Fetches a day's settlement file, retrying transient failures
/// (connection errors, timeouts, 5xx, 429) with exponential back-off and
/// honouring `Retry-After` up to `psp.max_retry_after`.
pub async fn fetch_settlement(psp: &PspSource, date: Date) -> Result<Vec<u8>, FetchError> {
    let client = reqwest::Client::builder().timeout(psp.timeout).build()?;
    let url = psp.url(date);
    let attempts = psp.attempts.max(1);
    let mut delay = Duration::from_millis(250);
    let mut last = String::new();
    for attempt in 1..=attempts {
        let res = client
            .get(&url)
            .bearer_auth(psp.api_key.expose())
            .send()
            .await;
        let wait = match res {
            Ok(r) if r.status().is_success() => match r.bytes().await {
                Ok(b) => return Ok(b.to_vec()),
                Err(e) => {
                    last = format!("reading {url}: {e}");
                    None
                }
            },
            Ok(r) => {
                let status = r.status();
                let retry_after = r
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let body = r.text().await.unwrap_or_default();
                last = if status.as_u16() == 404 {
                    format!("HTTP {status} (the file is not ready yet): {body}")
                } else {
                    format!("HTTP {status}: {body}")
                };
                if !(status.is_server_error() || matches!(status.as_u16(), 404 | 429)) {
                    return Err(FetchError::Refused { url, detail: last });
                }
                retry_after
            }
            Err(e) => {
                last = e.to_string();
                None
            }
        };
        if attempt < attempts {
            // A PSP (or whoever answers in its name) cannot park the
            // reconciler for hours.
            let d = wait
                .map(|w| w.min(psp.max_retry_after))
                .unwrap_or(delay)
                .max(delay);
            tracing::warn!(%url, attempt, error = %last, wait_ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX), "settlement fetch failed; retrying");
            tokio::time::sleep(d).await;
            delay = (delay * 2).min(Duration::from_secs(60));
        }
    }
    Err(FetchError::GaveUp {
        url,
        attempts,
        last,
    })
}
