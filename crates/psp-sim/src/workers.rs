//! Background work: resolving pending charges when the simulator clock
//! reaches them, and delivering webhooks until they are acknowledged. Both
//! read their work from the database, so a restarted simulator resumes it.

use crate::config::Account;
use crate::limits::{WEBHOOK_DELIVERIES_PER_ROUND_MAX, WORKER_IDLE_MS_MAX};
use crate::store::{self, WebhookPlan};
use crate::{AppState, sign, wall_ms};
use rand::Rng as _;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Where and how an account's next webhook goes; none without a URL.
pub(crate) fn webhook_plan(st: &AppState, account: &Account) -> Option<WebhookPlan> {
    let url = account.webhook_url.clone()?;
    let w = &st.behaviour.webhooks;
    let mut rng = rand::rng();
    let copies = if rng.random_range(0..100u8) < w.duplicate_percent {
        2
    } else {
        1
    };
    let delay = if w.delay_max_ms > 0 && rng.random_range(0..100u8) < w.delay_percent {
        rng.random_range(0..=w.delay_max_ms)
    } else {
        0
    };
    let delay = i64::try_from(delay).expect("validated: bounded delay");
    Some(WebhookPlan {
        url,
        copies,
        first_attempt_at_ms: wall_ms().saturating_add(delay),
    })
}

pub(crate) async fn resolve_pending(st: Arc<AppState>, shutdown: CancellationToken) {
    loop {
        // Created before the query so an advance during it is not missed.
        let advanced = st.clock.advanced.notified();
        let mut full = false;
        match store::due_pending(&st.db, st.clock.now_ms()).await {
            Ok(due) => {
                full = due.len() >= 100;
                for (id, account_id, to) in due {
                    let resolve = store::Resolve {
                        id: id.clone(),
                        succeed: to == "succeed",
                        sim_now_ms: st.clock.now_ms(),
                        webhook: st.account(&account_id).and_then(|a| webhook_plan(&st, a)),
                    };
                    match st.writer.run(resolve, store::resolve_charge).await {
                        Ok(()) => st.webhooks_due.notify_one(),
                        Err(e) => tracing::warn!(error = %e, charge = %id, "resolving failed"),
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading pending charges failed"),
        }
        if full {
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = advanced => {}
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

pub(crate) async fn deliver_webhooks(st: Arc<AppState>, shutdown: CancellationToken) {
    let timeout = Duration::from_millis(st.behaviour.webhooks.timeout_ms);
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .expect("a plain HTTP client builds");
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        match store::due_deliveries(&st.db, wall_ms(), WEBHOOK_DELIVERIES_PER_ROUND_MAX).await {
            Ok(batch) if !batch.is_empty() => {
                let round = futures::future::join_all(
                    batch.into_iter().map(|d| deliver_one(&st, &client, d)),
                );
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = round => continue,
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reading due webhooks failed"),
        }
        let wait_ms = match store::next_delivery_at(&st.db).await {
            Ok(Some(at)) => at.saturating_sub(wall_ms()).clamp(1, WORKER_IDLE_MS_MAX),
            _ => WORKER_IDLE_MS_MAX,
        };
        let wait = Duration::from_millis(u64::try_from(wait_ms).expect("clamped positive"));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = st.webhooks_due.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn deliver_one(st: &AppState, client: &reqwest::Client, d: store::Delivery) {
    let result = match st.account(&d.account) {
        None => Err(format!("account {} is no longer configured", d.account)),
        Some(account) => {
            let t = wall_ms().div_euclid(1000);
            let signature = sign(
                account.webhook_secret.expose().as_bytes(),
                t,
                d.body.as_bytes(),
            );
            client
                .post(&d.url)
                .header("content-type", "application/json")
                .header("psp-signature", signature)
                .body(d.body.clone())
                .send()
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| {
                    if r.status().is_success() {
                        Ok(())
                    } else {
                        Err(format!("receiver answered {}", r.status()))
                    }
                })
        }
    };
    let now = wall_ms();
    {
        use runtime::metrics::events::{InternalEvent as _, SimWebhookAttempted};
        SimWebhookAttempted {
            seq: d.seq,
            error: result.as_ref().err().map(String::as_str),
        }
        .emit();
    }
    let stored = match result {
        Ok(()) => st.writer.run((d.seq, now), store::delivery_done).await,
        Err(error) => {
            let w = &st.behaviour.webhooks;
            let doublings = u32::try_from(d.attempts.clamp(0, 40)).expect("clamped");
            let backoff = w
                .initial_backoff_ms
                .saturating_mul(1u64 << doublings)
                .min(w.max_backoff_ms);
            let backoff = i64::try_from(backoff).unwrap_or(i64::MAX);
            let failed = (d.seq, now.saturating_add(backoff), error);
            st.writer.run(failed, store::delivery_failed).await
        }
    };
    if let Err(e) = stored {
        // The row stays due and is retried: at worst a duplicate delivery,
        // which receivers must handle anyway.
        tracing::warn!(error = %e, seq = d.seq, "recording a webhook attempt failed");
    }
}
