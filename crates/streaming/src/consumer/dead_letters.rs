//! Step 3 of a batch: its dead letters (undecodable messages, rejected
//! events) sent to the dead-letter topic all at once, each retried while
//! the failure is transient and sent as a bounded stub when refused for
//! good ([`dlq::Form`]); the batch's offsets are stored only after every
//! one is acknowledged.

use super::config::ConsumerSettings;
use crate::dlq::{self, DeadLetter};
use crate::producer::EventProducer;
use runtime::metrics::events::{DeadLetterStored, InternalEvent as _};
use tokio_util::sync::CancellationToken;

/// A dead letter and the assignment generation of its partition.
pub(super) struct Dead {
    pub(super) generation: u64,
    pub(super) letter: DeadLetter,
}

/// Sends every dead letter, all at once, and waits for every
/// acknowledgement. `false`: shut down before all were stored.
pub(super) async fn send_dead_letters(
    producer: &EventProducer,
    dead: &[Dead],
    settings: &ConsumerSettings,
    shutdown: &CancellationToken,
) -> bool {
    futures::future::join_all(
        dead.iter()
            .map(|d| send_dead_letter(producer, &d.letter, settings, shutdown)),
    )
    .await
    .into_iter()
    .all(|stored| stored)
}

/// Sends one dead letter and waits for its acknowledgement. Retryable
/// produce errors (broker unavailable, queue full, timeouts) are retried
/// with back-off; a dead letter the producer or broker refuses for good
/// (too large, invalid record) is sent as a stub instead, and a stub that
/// is refused as a minimal stub (only `dlq.*` headers; bounded, so a
/// failure to produce it is the cluster's, not the message's, and is
/// retried). So one message can never block its partition here. `false`:
/// shut down before it was stored.
async fn send_dead_letter(
    producer: &EventProducer,
    d: &DeadLetter,
    settings: &ConsumerSettings,
    shutdown: &CancellationToken,
) -> bool {
    let mut backoff = settings.retry_backoff;
    let mut form = dlq::Form::Whole;
    let mut cause = String::new();
    loop {
        match d.send_as(producer, form, &cause).await {
            Ok(at) => {
                DeadLetterStored {
                    group: &d.consumer_group,
                    kind: &d.error_kind,
                    original_topic: &d.origin.topic,
                    original_partition: d.origin.partition,
                    original_offset: d.origin.offset,
                    dlq_partition: at.partition,
                    dlq_offset: at.offset,
                    form: form.as_str(),
                }
                .emit();
                return true;
            }
            Err(e) if !e.is_retryable() && form != dlq::Form::Minimal => {
                let next = if form == dlq::Form::Whole {
                    dlq::Form::Stub
                } else {
                    dlq::Form::Minimal
                };
                tracing::warn!(error = %e, ?form, ?next, original_topic = %d.origin.topic, original_partition = d.origin.partition, original_offset = d.origin.offset, "dead letter refused for good; sending a stub");
                cause = e.to_string();
                form = next;
            }
            Err(e) => {
                tracing::error!(error = %e, ?form, "cannot store dead letter; will retry");
                tokio::select! {
                    _ = shutdown.cancelled() => return false,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(settings.retry_backoff_max);
            }
        }
    }
}
