//! JSON rendering of events for people and tools (CLI output, JSON lines).
//! Field names follow `schemas/envelope.avsc`; money stays integer minor
//! units plus currency.

use crate::event::*;
use crate::money::Money;
use serde_json::{Map, Value, json};

fn money(m: &Money) -> Value {
    json!({"amount_minor": m.amount_minor(), "currency": m.currency().code()})
}

fn opt<T>(v: Option<T>, f: impl FnOnce(T) -> Value) -> Value {
    v.map(f).unwrap_or(Value::Null)
}

/// The payload's fields.
pub fn payload(event: &Event) -> Value {
    match event {
        Event::PaymentRequested(e) => json!({
            "client_id": e.client_id.as_str(),
            "idempotency_key": e.idempotency_key,
            "buyer_id": e.buyer_id.as_str(),
            "orders": e.orders.iter().map(|o| json!({
                "order_id": o.order_id.to_string(),
                "seller_id": o.seller_id.as_str(),
                "amount": money(&o.amount),
            })).collect::<Vec<_>>(),
            "metadata": e.metadata,
        }),
        Event::RiskApproved(e) => json!({"rule_set": e.rule_set}),
        Event::RiskRejected(e) => {
            json!({"rule_set": e.rule_set, "rule": e.rule, "reason": e.reason})
        }
        Event::OrderExecutionStarted(e) => {
            json!({"order_id": e.order_id.to_string(), "attempt": e.attempt})
        }
        Event::OrderSucceeded(e) => json!({
            "order_id": e.order_id.to_string(), "psp_reference": e.psp_reference,
            "amount": money(&e.amount), "fee": money(&e.fee),
        }),
        Event::OrderFailed(e) => json!({
            "order_id": e.order_id.to_string(), "retryable": e.retryable, "code": e.code,
            "reason": e.reason, "attempt": e.attempt,
        }),
        Event::OrderPending(e) => json!({
            "order_id": e.order_id.to_string(), "psp_reference": e.psp_reference, "amount": money(&e.amount),
        }),
        Event::OrderSettledByWebhook(e) => json!({
            "order_id": e.order_id.to_string(), "psp_reference": e.psp_reference, "succeeded": e.succeeded,
            "amount": money(&e.amount), "fee": opt(e.fee.as_ref(), money), "failure_reason": e.failure_reason,
        }),
        Event::RefundRequested(e) => json!({
            "refund_id": e.refund_id.to_string(), "order_id": e.order_id.to_string(),
            "amount": money(&e.amount), "reason": e.reason,
        }),
        Event::RefundSucceeded(e) => json!({
            "refund_id": e.refund_id.to_string(), "order_id": e.order_id.to_string(),
            "psp_reference": e.psp_reference, "amount": money(&e.amount),
        }),
        Event::RefundFailed(e) => json!({
            "refund_id": e.refund_id.to_string(), "order_id": e.order_id.to_string(),
            "code": e.code, "reason": e.reason,
        }),
        Event::ReconciliationDiscrepancyFound(e) => json!({
            "discrepancy_id": e.discrepancy_id.to_string(), "run_id": e.run_id, "class": e.class.as_str(),
            "psp_reference": e.psp_reference, "order_id": opt(e.order_id, |o| Value::String(o.to_string())),
            "ours": opt(e.ours.as_ref(), money), "theirs": opt(e.theirs.as_ref(), money), "detail": e.detail,
        }),
        Event::ReconciliationDiscrepancyResolved(e) => json!({
            "discrepancy_id": e.discrepancy_id.to_string(), "action": e.action.as_str(), "reason": e.reason,
            "adjustment": opt(e.adjustment.as_ref(), money), "resolved_by": e.resolved_by,
        }),
        Event::ReconciliationRunCompleted(e) => json!({
            "run_id": e.run_id, "settlement_date": e.settlement_date, "source": e.source,
            "file_sha256": e.file_sha256, "rows": e.rows, "matched": e.matched,
            "discrepancies": e.discrepancies, "class_counts": e.class_counts,
        }),
    }
}

/// The whole envelope; `occurred_at` as RFC 3339 with microseconds.
pub fn envelope(env: &Envelope) -> Value {
    let mut m = Map::new();
    m.insert("event_id".into(), env.event_id.to_string().into());
    m.insert("event_type".into(), env.event_type().as_str().into());
    m.insert("schema_version".into(), env.schema_version.into());
    m.insert("occurred_at".into(), env.occurred_at.to_string().into());
    m.insert(
        "payment_id".into(),
        opt(env.payment_id, |p| Value::String(p.to_string())),
    );
    m.insert(
        "correlation_id".into(),
        env.correlation_id.to_string().into(),
    );
    m.insert(
        "causation_id".into(),
        opt(env.causation_id, |c| Value::String(c.to_string())),
    );
    m.insert("producer".into(), env.producer.clone().into());
    m.insert("payload".into(), payload(&env.event));
    Value::Object(m)
}
