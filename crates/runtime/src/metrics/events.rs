//! Typed internal events (issue 17 item 2, in the way Vector's
//! `InternalEvent`s work): each notable thing a consumer or a PSP client
//! does is one type, and its [`InternalEvent::emit`] writes the log line
//! and updates the metric together, with the labels taken from the same
//! fields. Call sites build the event and emit it; they never call
//! `tracing::warn!` and `metrics::counter!` separately for these things,
//! so a log line and its metric cannot drift apart (a counter bumped where
//! nothing is logged, or a label the log does not carry).
//!
//! Labels stay bounded (see the module above): groups, topics,
//! partitions, stable codes. Messages, reasons and ids go into the log
//! line only.

use std::time::Duration;

/// Something worth a log line and a metric.
pub trait InternalEvent {
    /// Writes the log line and updates the metric.
    fn emit(self);
}

/// What a consumer group did with one batch, by outcome: the counters of
/// `paystream_events_total`, and one debug line.
#[derive(Debug, Clone, Copy)]
pub struct BatchHandled<'a> {
    pub group: &'a str,
    pub applied: u64,
    pub duplicate: u64,
    pub ignored: u64,
    pub dead_lettered: u64,
}

impl InternalEvent for BatchHandled<'_> {
    fn emit(self) {
        tracing::debug!(
            group = self.group,
            applied = self.applied,
            duplicate = self.duplicate,
            ignored = self.ignored,
            dead_lettered = self.dead_lettered,
            "batch handled"
        );
        for (outcome, n) in [
            ("applied", self.applied),
            ("duplicate", self.duplicate),
            ("ignored", self.ignored),
            ("dead_lettered", self.dead_lettered),
        ] {
            if n > 0 {
                metrics::counter!(super::EVENTS, "group" => self.group.to_owned(), "outcome" => outcome)
                    .increment(n);
            }
        }
    }
}

/// An event the handler rejected: it will be dead-lettered. Logged in the
/// message's span (the caller enters it); counted once its dead letter is
/// stored ([`DeadLetterStored`]), since only then is it dead-lettered.
#[derive(Debug, Clone, Copy)]
pub struct EventRejected<'a> {
    pub group: &'a str,
    pub kind: &'a str,
    pub reason: &'a str,
}

impl InternalEvent for EventRejected<'_> {
    fn emit(self) {
        tracing::warn!(
            group = self.group,
            error_kind = self.kind,
            reason = self.reason,
            "event rejected; dead-lettering"
        );
    }
}

/// A dead letter acknowledged by the dead-letter topic: one info line and
/// `paystream_dead_letters_total{group, kind}`.
#[derive(Debug, Clone, Copy)]
pub struct DeadLetterStored<'a> {
    pub group: &'a str,
    pub kind: &'a str,
    /// Where the dead-lettered message came from.
    pub original_topic: &'a str,
    pub original_partition: i32,
    pub original_offset: i64,
    pub dlq_partition: i32,
    pub dlq_offset: i64,
    /// `whole`, `stub` or `minimal` (what of the message the letter kept).
    pub form: &'static str,
}

impl InternalEvent for DeadLetterStored<'_> {
    fn emit(self) {
        tracing::info!(
            group = self.group,
            error_kind = self.kind,
            original_topic = %self.original_topic,
            original_partition = self.original_partition,
            original_offset = self.original_offset,
            dlq_partition = self.dlq_partition,
            dlq_offset = self.dlq_offset,
            form = self.form,
            "dead letter stored"
        );
        metrics::counter!(super::DEAD_LETTERS, "group" => self.group.to_owned(), "kind" => self.kind.to_owned())
            .increment(1);
    }
}

/// A batch whose handler failed: `paystream_batch_failures_total{group,
/// retry}` and one line. A transient failure is retried after `retry_in`
/// (an error line); a deterministic one is narrowed down to the message
/// that causes it (a warning), which is then rejected.
#[derive(Clone, Copy)]
pub struct BatchFailed<'a> {
    pub group: &'a str,
    pub size: usize,
    pub attempt: u32,
    pub error: &'a dyn std::fmt::Display,
    /// `Some(back-off)`: transient, retried; `None`: deterministic.
    pub retry_in: Option<Duration>,
}

impl std::fmt::Debug for BatchFailed<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchFailed")
            .field("group", &self.group)
            .field("size", &self.size)
            .field("attempt", &self.attempt)
            .field("error", &self.error.to_string())
            .field("retry_in", &self.retry_in)
            .finish()
    }
}

impl InternalEvent for BatchFailed<'_> {
    fn emit(self) {
        let retry = match self.retry_in {
            Some(backoff) => {
                tracing::error!(
                    group = self.group,
                    size = self.size,
                    attempt = self.attempt,
                    error = %self.error,
                    retry_in_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
                    "batch failed; will retry"
                );
                "yes"
            }
            None => {
                tracing::warn!(
                    group = self.group,
                    size = self.size,
                    attempt = self.attempt,
                    error = %self.error,
                    "batch failed deterministically; narrowing it down to the message"
                );
                "no"
            }
        };
        metrics::counter!(super::BATCH_FAILURES, "group" => self.group.to_owned(), "retry" => retry)
            .increment(1);
    }
}

/// What a rebalance did to this member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebalanceKind {
    Assigned,
    Revoked,
    Error,
}

impl RebalanceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RebalanceKind::Assigned => "assigned",
            RebalanceKind::Revoked => "revoked",
            RebalanceKind::Error => "error",
        }
    }
}

/// A rebalance callback: `paystream_rebalances_total{group, kind}` and one
/// line (a warning for an error).
#[derive(Debug, Clone, Copy)]
pub struct Rebalanced<'a> {
    pub group: &'a str,
    pub kind: RebalanceKind,
    /// The partitions, or the error, as text.
    pub detail: &'a str,
}

impl InternalEvent for Rebalanced<'_> {
    fn emit(self) {
        match self.kind {
            RebalanceKind::Error => {
                tracing::warn!(group = self.group, error = self.detail, "rebalance error");
            }
            kind => {
                tracing::info!(
                    group = self.group,
                    partitions = self.detail,
                    "partitions {}",
                    kind.as_str()
                );
            }
        }
        metrics::counter!(super::REBALANCES, "group" => self.group.to_owned(), "kind" => self.kind.as_str())
            .increment(1);
    }
}

/// One call to the PSP: `paystream_psp_requests_total{operation,
/// outcome}`, `paystream_psp_request_duration_seconds{operation}`, and a
/// debug line (a warning when it failed).
#[derive(Debug, Clone, Copy)]
pub struct PspCalled<'a> {
    /// `charge`, `lookup`, `refund`, ...
    pub operation: &'static str,
    /// `ok`, `transient` or `final`.
    pub outcome: &'static str,
    pub took: Duration,
    /// The error's text when it failed.
    pub error: Option<&'a str>,
}

impl InternalEvent for PspCalled<'_> {
    fn emit(self) {
        let took_ms = u64::try_from(self.took.as_millis()).unwrap_or(u64::MAX);
        match self.error {
            None => tracing::debug!(
                operation = self.operation,
                outcome = self.outcome,
                took_ms,
                "PSP call"
            ),
            Some(error) => tracing::warn!(
                operation = self.operation,
                outcome = self.outcome,
                took_ms,
                error,
                "PSP call failed"
            ),
        }
        metrics::histogram!(super::PSP_DURATION, "operation" => self.operation)
            .record(self.took.as_secs_f64());
        metrics::counter!(super::PSP_REQUESTS, "operation" => self.operation, "outcome" => self.outcome)
            .increment(1);
    }
}

/// An order parked for a retry after a transient PSP answer:
/// `paystream_psp_retries_total` and one line.
#[derive(Debug, Clone, Copy)]
pub struct PspRetryParked<'a> {
    pub order: &'a str,
    pub attempt: i32,
}

impl InternalEvent for PspRetryParked<'_> {
    fn emit(self) {
        tracing::info!(
            order = self.order,
            attempt = self.attempt,
            "PSP answer not final; order parked for a retry"
        );
        metrics::counter!(super::PSP_RETRIES).increment(1);
    }
}

/// What `POST` made of an `Idempotency-Key`:
/// `paystream_idempotency_total{result}` and a debug line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdempotencyResult {
    /// A new key, now owned by this request.
    Owned,
    /// An abandoned key's decided events taken over by this request.
    TakenOver,
    /// The stored answer replayed.
    Replay,
    /// The key was used with another request.
    Mismatch,
    /// Another request holds the key.
    InFlight,
}

impl IdempotencyResult {
    pub fn as_str(self) -> &'static str {
        match self {
            IdempotencyResult::Owned => "owned",
            IdempotencyResult::TakenOver => "taken_over",
            IdempotencyResult::Replay => "replay",
            IdempotencyResult::Mismatch => "mismatch",
            IdempotencyResult::InFlight => "in_flight",
        }
    }
}

/// One idempotency decision of the payment handler.
#[derive(Debug, Clone, Copy)]
pub struct IdempotencyDecided {
    pub result: IdempotencyResult,
}

impl InternalEvent for IdempotencyDecided {
    fn emit(self) {
        tracing::debug!(result = self.result.as_str(), "idempotency key");
        metrics::counter!(super::IDEMPOTENCY, "result" => self.result.as_str()).increment(1);
    }
}

/// A correctly signed PSP webhook that names another charge, amount or
/// currency than the order's: ignored (the PSP is polled instead).
/// `paystream_webhook_mismatches_total{field}` and a warning.
#[derive(Debug, Clone, Copy)]
pub struct WebhookMismatch<'a> {
    pub order: &'a str,
    /// `charge_id`, `amount` or `currency`.
    pub field: &'static str,
    pub psp_event: &'a str,
}

impl InternalEvent for WebhookMismatch<'_> {
    fn emit(self) {
        tracing::warn!(
            order_id = self.order,
            field = self.field,
            psp_event = self.psp_event,
            "webhook does not match the order; ignored, polling the PSP instead"
        );
        metrics::counter!(super::WEBHOOK_MISMATCHES, "field" => self.field).increment(1);
    }
}

/// A batch of the handler's group commit admitted to run:
/// `paystream_handler_group_commit_batches_total` and a debug line with
/// its size and how long it waited for a free slot.
#[derive(Debug, Clone, Copy)]
pub struct GroupCommitBatch {
    pub requests: usize,
    pub waited: Duration,
}

impl InternalEvent for GroupCommitBatch {
    fn emit(self) {
        tracing::debug!(
            requests = self.requests,
            waited_ms = u64::try_from(self.waited.as_millis()).unwrap_or(u64::MAX),
            "group commit batch admitted"
        );
        metrics::counter!(super::GROUP_COMMIT_BATCHES).increment(1);
    }
}

/// A charge the PSP simulator created: `paystream_psp_sim_charges_total`
/// by outcome and a debug line.
#[derive(Debug, Clone, Copy)]
pub struct SimChargeCreated<'a> {
    pub charge: &'a str,
    /// `succeeded`, `pending`, `declined` or `other`.
    pub outcome: &'static str,
}

impl InternalEvent for SimChargeCreated<'_> {
    fn emit(self) {
        tracing::debug!(
            charge = self.charge,
            outcome = self.outcome,
            "charge created"
        );
        metrics::counter!(super::PSP_SIM_CHARGES, "outcome" => self.outcome).increment(1);
    }
}

/// One webhook delivery attempt of the PSP simulator:
/// `paystream_psp_sim_webhook_deliveries_total` by result and a debug
/// line (the error when the receiver did not acknowledge it).
#[derive(Debug, Clone, Copy)]
pub struct SimWebhookAttempted<'a> {
    pub seq: i64,
    pub error: Option<&'a str>,
}

impl InternalEvent for SimWebhookAttempted<'_> {
    fn emit(self) {
        let result = match self.error {
            None => {
                tracing::debug!(seq = self.seq, "webhook delivered");
                "delivered"
            }
            Some(error) => {
                tracing::debug!(seq = self.seq, error, "webhook not acknowledged");
                "failed"
            }
        };
        metrics::counter!(super::PSP_SIM_WEBHOOKS, "result" => result).increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    /// The log lines written and the metrics rendered while `f` runs.
    fn capture(f: impl FnOnce()) -> (String, String) {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().expect("unpoisoned").extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        tracing::subscriber::with_default(subscriber, || {
            metrics::with_local_recorder(&recorder, f);
        });
        let logs = String::from_utf8(buf.0.lock().expect("unpoisoned").clone()).expect("utf-8");
        (logs, handle.render())
    }

    #[test]
    fn each_event_writes_one_line_and_its_metric_with_the_same_labels() {
        let err = "boom";
        let (logs, metrics) = capture(|| {
            BatchHandled {
                group: "g1",
                applied: 5,
                duplicate: 0,
                ignored: 2,
                dead_lettered: 1,
            }
            .emit();
            EventRejected {
                group: "g1",
                kind: "unknown_order",
                reason: "no such order",
            }
            .emit();
            DeadLetterStored {
                group: "g1",
                kind: "unknown_order",
                original_topic: "t.payments",
                original_partition: 3,
                original_offset: 41,
                dlq_partition: 0,
                dlq_offset: 7,
                form: "whole",
            }
            .emit();
            BatchFailed {
                group: "g1",
                size: 10,
                attempt: 2,
                error: &err,
                retry_in: Some(Duration::from_millis(200)),
            }
            .emit();
            BatchFailed {
                group: "g1",
                size: 10,
                attempt: 0,
                error: &err,
                retry_in: None,
            }
            .emit();
            Rebalanced {
                group: "g1",
                kind: RebalanceKind::Assigned,
                detail: "t.payments[0,1]",
            }
            .emit();
            PspCalled {
                operation: "charge",
                outcome: "transient",
                took: Duration::from_millis(12),
                error: Some("timeout"),
            }
            .emit();
            PspRetryParked {
                order: "o-1",
                attempt: 1,
            }
            .emit();
            IdempotencyDecided {
                result: IdempotencyResult::TakenOver,
            }
            .emit();
            WebhookMismatch {
                order: "o-2",
                field: "amount",
                psp_event: "evt_1",
            }
            .emit();
            GroupCommitBatch {
                requests: 17,
                waited: Duration::from_millis(3),
            }
            .emit();
            SimChargeCreated {
                charge: "ch_1",
                outcome: "declined",
            }
            .emit();
            SimWebhookAttempted {
                seq: 4,
                error: Some("receiver answered 500"),
            }
            .emit();
        });
        let lines: Vec<&str> = logs.lines().collect();
        assert_eq!(lines.len(), 13, "one line per event: {logs}");
        assert!(lines[11].contains("ch_1"), "{}", lines[11]);
        assert!(lines[12].contains("receiver answered 500"), "{}", lines[12]);
        assert!(lines[8].contains("taken_over"), "{}", lines[8]);
        assert!(lines[9].contains("amount") && lines[9].contains("does not match"));
        assert!(lines[10].contains("requests=17"), "{}", lines[10]);
        for (line, text) in [
            (0, "batch handled"),
            (1, "event rejected; dead-lettering"),
            (2, "dead letter stored"),
            (3, "batch failed; will retry"),
            (4, "batch failed deterministically"),
            (5, "partitions assigned"),
            (6, "PSP call failed"),
            (7, "parked for a retry"),
        ] {
            assert!(lines[line].contains(text), "{line}: {}", lines[line]);
            if line < 6 {
                assert!(
                    lines[line].contains("group=\"g1\"") || lines[line].contains("group=g1"),
                    "{}",
                    lines[line]
                );
            }
        }
        assert!(
            lines[2].contains("error_kind=\"unknown_order\"")
                || lines[2].contains("error_kind=unknown_order")
        );
        for series in [
            r#"paystream_events_total{group="g1",outcome="applied"} 5"#,
            r#"paystream_events_total{group="g1",outcome="ignored"} 2"#,
            r#"paystream_events_total{group="g1",outcome="dead_lettered"} 1"#,
            r#"paystream_dead_letters_total{group="g1",kind="unknown_order"} 1"#,
            r#"paystream_batch_failures_total{group="g1",retry="yes"} 1"#,
            r#"paystream_batch_failures_total{group="g1",retry="no"} 1"#,
            r#"paystream_rebalances_total{group="g1",kind="assigned"} 1"#,
            r#"paystream_psp_requests_total{operation="charge",outcome="transient"} 1"#,
            r#"paystream_psp_retries_total 1"#,
            r#"paystream_idempotency_total{result="taken_over"} 1"#,
            r#"paystream_webhook_mismatches_total{field="amount"} 1"#,
            r#"paystream_handler_group_commit_batches_total 1"#,
            r#"paystream_psp_sim_charges_total{outcome="declined"} 1"#,
            r#"paystream_psp_sim_webhook_deliveries_total{result="failed"} 1"#,
        ] {
            assert!(
                metrics.contains(series),
                "{series} missing from:\n{metrics}"
            );
        }
        assert!(
            !metrics.contains(r#"outcome="duplicate""#),
            "a zero count is not a series: {metrics}"
        );
        assert!(metrics.contains("paystream_psp_request_duration_seconds"));
    }
}
