//! Step 2 of a batch: the handler calls. A transient failure is retried
//! with back-off; a deterministic one is narrowed down (bisection) to the
//! message(s) that fail on their own, which become rejections, i.e. dead
//! letters ([`FailureClass`](super::FailureClass)). No attempt starts on a
//! partition after its revocation was seen.

use super::config::ConsumerSettings;
use super::rebalance::LoopContext;
use super::{BatchHandler, Delivered, HandlerError, Outcome};
use runtime::metrics::events::{BatchFailed, InternalEvent as _};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// How a handler call (with its retries) ended.
pub(super) enum Handled<T> {
    Done(T),
    /// Shut down while retrying.
    Shutdown,
    /// A partition of the batch was revoked while it kept failing.
    Revoked,
}

/// Whether every message of `batch` belongs to a partition still owned
/// under the generation it was polled in.
fn still_owned(ctx: &LoopContext, batch: &[Delivered]) -> bool {
    let o = ctx.lock();
    batch
        .iter()
        .all(|d| o.owns(&d.meta.topic, d.meta.partition, d.generation))
}

/// Hands `decoded` to the handler and returns one outcome per event.
///
/// Transient failures retry the same (sub-)batch with back-off.
/// Deterministic failures split it in two halves, handled in order (left
/// first, so a partition's order is kept and what the left half applied is
/// durable before the right half runs), down to single messages: a message
/// that fails deterministically on its own becomes `Outcome::Rejected` with
/// the error's kind and message, i.e. a dead letter. Re-running the
/// messages of a failed attempt is safe because handlers are idempotent per
/// event id (an effect that did become durable comes back as `Duplicate`).
/// No attempt starts on a part whose partitions were revoked.
pub(super) async fn handle_with_retry<H: BatchHandler>(
    handler: &mut H,
    decoded: &[Delivered],
    settings: &ConsumerSettings,
    shutdown: &CancellationToken,
    ctx: &LoopContext,
) -> Handled<Vec<Outcome>> {
    let mut outcomes = Vec::with_capacity(decoded.len());
    // (start, end) ranges still to handle; the last one is next (left
    // halves on top).
    let mut todo: Vec<(usize, usize)> = vec![(0, decoded.len())];
    while let Some((start, end)) = todo.pop() {
        if start == end {
            continue;
        }
        let part = &decoded[start..end];
        let result = match handle_until_not_transient(handler, part, settings, shutdown, ctx).await
        {
            Handled::Done(r) => r,
            Handled::Shutdown => return Handled::Shutdown,
            Handled::Revoked => return Handled::Revoked,
        };
        match result {
            Ok(o) => outcomes.extend(o),
            // Rejected: logged as such with the batch's other outcomes.
            Err(e) if part.len() == 1 => {
                outcomes.push(Outcome::Rejected {
                    kind: e.kind,
                    reason: e.message,
                });
            }
            // Logged by the failure itself (BatchFailed).
            Err(_) => {
                let mid = start + part.len() / 2;
                todo.push((mid, end));
                todo.push((start, mid));
            }
        }
    }
    Handled::Done(outcomes)
}

/// Retries `batch` while it fails transiently. `Done(Err)`: a
/// deterministic failure.
async fn handle_until_not_transient<H: BatchHandler>(
    handler: &mut H,
    batch: &[Delivered],
    settings: &ConsumerSettings,
    shutdown: &CancellationToken,
    ctx: &LoopContext,
) -> Handled<Result<Vec<Outcome>, HandlerError>> {
    let mut backoff = settings.retry_backoff;
    let mut attempt = 1u32;
    loop {
        // Re-checked before every attempt: the handler never starts on a
        // partition after its revocation was seen.
        if !still_owned(ctx, batch) {
            return Handled::Revoked;
        }
        let span =
            tracing::info_span!("batch", group = %settings.group_id, size = batch.len(), attempt);
        match handler.handle(batch).instrument(span).await {
            Ok(outcomes) => {
                // A handler that loses or invents outcomes is a bug; crash
                // rather than commit offsets of unapplied events.
                assert_eq!(
                    outcomes.len(),
                    batch.len(),
                    "handler must return one outcome per event"
                );
                return Handled::Done(Ok(outcomes));
            }
            Err(e) => {
                let deterministic = e.is_deterministic();
                BatchFailed {
                    group: &settings.group_id,
                    size: batch.len(),
                    attempt,
                    error: &e,
                    retry_in: (!deterministic).then_some(backoff),
                }
                .emit();
                if deterministic {
                    return Handled::Done(Err(e));
                }
                // Registered before the ownership check so a revocation
                // in between still wakes the back-off.
                let revoked = ctx.revoked.notified();
                tokio::pin!(revoked);
                revoked.as_mut().enable();
                if !still_owned(ctx, batch) {
                    return Handled::Revoked;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Handled::Shutdown,
                    _ = tokio::time::sleep(backoff) => {}
                    _ = revoked => {}
                }
                backoff = (backoff * 2).min(settings.retry_backoff_max);
                attempt = attempt.saturating_add(1);
            }
        }
    }
}
