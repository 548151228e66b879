//! Mapping between the Rust event model and Avro [`Value`]s shaped by the
//! current `schemas/envelope.avsc`. Written by hand, field by field, so a
//! schema change that the code does not follow fails loudly in the
//! round-trip tests instead of decoding into the wrong field.

use super::DecodeError;
use crate::event::*;
use crate::ids::*;
use crate::money::{Currency, Money};
use apache_avro::types::Value;
use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use uuid::Uuid;

// ---------- encode ----------

fn uuid(u: Uuid) -> Value {
    Value::Uuid(u)
}

fn string(s: &str) -> Value {
    Value::String(s.to_owned())
}

fn money(m: &Money) -> Value {
    Value::Record(vec![
        ("amount_minor".into(), Value::Long(m.amount_minor())),
        ("currency".into(), string(m.currency().code())),
    ])
}

fn optional(v: Option<Value>) -> Value {
    match v {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(v) => Value::Union(1, Box::new(v)),
    }
}

fn record(fields: Vec<(&str, Value)>) -> Value {
    Value::Record(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

fn payload(event: &Event) -> Value {
    match event {
        Event::PaymentRequested(e) => record(vec![
            ("client_id", string(e.client_id.as_str())),
            (
                "idempotency_key",
                optional(e.idempotency_key.as_deref().map(string)),
            ),
            ("buyer_id", string(e.buyer_id.as_str())),
            (
                "orders",
                Value::Array(
                    e.orders
                        .iter()
                        .map(|o| {
                            record(vec![
                                ("order_id", uuid(o.order_id.as_uuid())),
                                ("seller_id", string(o.seller_id.as_str())),
                                ("amount", money(&o.amount)),
                            ])
                        })
                        .collect(),
                ),
            ),
            (
                "metadata",
                Value::Map(
                    e.metadata
                        .iter()
                        .map(|(k, v)| (k.clone(), string(v)))
                        .collect::<HashMap<_, _>>(),
                ),
            ),
        ]),
        Event::RiskApproved(e) => record(vec![("rule_set", string(&e.rule_set))]),
        Event::RiskRejected(e) => record(vec![
            ("rule_set", string(&e.rule_set)),
            ("rule", string(&e.rule)),
            ("reason", string(&e.reason)),
        ]),
        Event::OrderExecutionStarted(e) => record(vec![
            ("order_id", uuid(e.order_id.as_uuid())),
            ("attempt", Value::Int(e.attempt)),
        ]),
        Event::OrderSucceeded(e) => record(vec![
            ("order_id", uuid(e.order_id.as_uuid())),
            ("psp_reference", string(&e.psp_reference)),
            ("amount", money(&e.amount)),
            ("fee", money(&e.fee)),
        ]),
        Event::OrderFailed(e) => record(vec![
            ("order_id", uuid(e.order_id.as_uuid())),
            ("retryable", Value::Boolean(e.retryable)),
            ("code", string(&e.code)),
            ("reason", string(&e.reason)),
            ("attempt", Value::Int(e.attempt)),
        ]),
        Event::OrderPending(e) => record(vec![
            ("order_id", uuid(e.order_id.as_uuid())),
            ("psp_reference", string(&e.psp_reference)),
            ("amount", money(&e.amount)),
        ]),
        Event::OrderSettledByWebhook(e) => record(vec![
            ("order_id", uuid(e.order_id.as_uuid())),
            ("psp_reference", string(&e.psp_reference)),
            ("succeeded", Value::Boolean(e.succeeded)),
            ("amount", money(&e.amount)),
            ("fee", optional(e.fee.as_ref().map(money))),
            (
                "failure_reason",
                optional(e.failure_reason.as_deref().map(string)),
            ),
        ]),
        Event::RefundRequested(e) => record(vec![
            ("refund_id", uuid(e.refund_id.as_uuid())),
            ("order_id", uuid(e.order_id.as_uuid())),
            ("amount", money(&e.amount)),
            ("reason", string(&e.reason)),
        ]),
        Event::RefundSucceeded(e) => record(vec![
            ("refund_id", uuid(e.refund_id.as_uuid())),
            ("order_id", uuid(e.order_id.as_uuid())),
            ("psp_reference", string(&e.psp_reference)),
            ("amount", money(&e.amount)),
        ]),
        Event::RefundFailed(e) => record(vec![
            ("refund_id", uuid(e.refund_id.as_uuid())),
            ("order_id", uuid(e.order_id.as_uuid())),
            ("code", string(&e.code)),
            ("reason", string(&e.reason)),
        ]),
        Event::ReconciliationDiscrepancyFound(e) => record(vec![
            ("discrepancy_id", uuid(e.discrepancy_id.as_uuid())),
            ("run_id", string(&e.run_id)),
            ("class", string(e.class.as_str())),
            (
                "psp_reference",
                optional(e.psp_reference.as_deref().map(string)),
            ),
            ("order_id", optional(e.order_id.map(|o| uuid(o.as_uuid())))),
            ("ours", optional(e.ours.as_ref().map(money))),
            ("theirs", optional(e.theirs.as_ref().map(money))),
            ("detail", string(&e.detail)),
        ]),
        Event::ReconciliationDiscrepancyResolved(e) => record(vec![
            ("discrepancy_id", uuid(e.discrepancy_id.as_uuid())),
            ("action", string(e.action.as_str())),
            ("reason", string(&e.reason)),
            ("adjustment", optional(e.adjustment.as_ref().map(money))),
            ("resolved_by", string(&e.resolved_by)),
        ]),
        Event::ReconciliationRunCompleted(e) => record(vec![
            ("run_id", string(&e.run_id)),
            ("settlement_date", string(&e.settlement_date)),
            ("source", string(&e.source)),
            ("file_sha256", string(&e.file_sha256)),
            ("rows", Value::Long(e.rows)),
            ("matched", Value::Long(e.matched)),
            ("discrepancies", Value::Long(e.discrepancies)),
            (
                "class_counts",
                Value::Map(
                    e.class_counts
                        .iter()
                        .map(|(k, v)| (k.clone(), Value::Long(*v)))
                        .collect::<HashMap<_, _>>(),
                ),
            ),
        ]),
    }
}

fn union_index(t: EventType) -> u32 {
    let idx = EventType::ALL
        .iter()
        .position(|x| *x == t)
        .expect("every type is in ALL");
    u32::try_from(idx).expect("fewer than 2^32 event types")
}

pub(super) fn to_value(env: &Envelope) -> Value {
    let t = env.event_type();
    record(vec![
        ("event_id", uuid(env.event_id.as_uuid())),
        ("event_type", string(t.as_str())),
        ("schema_version", Value::Int(env.schema_version)),
        (
            "occurred_at",
            Value::TimestampMicros(env.occurred_at.as_micros()),
        ),
        (
            "payment_id",
            optional(env.payment_id.map(|p| uuid(p.as_uuid()))),
        ),
        ("correlation_id", uuid(env.correlation_id.as_uuid())),
        (
            "causation_id",
            optional(env.causation_id.map(|c| uuid(c.as_uuid()))),
        ),
        ("producer", string(&env.producer)),
        (
            "payload",
            Value::Union(union_index(t), Box::new(payload(&env.event))),
        ),
    ])
}

// ---------- decode ----------

fn invalid(field: &str, reason: impl Into<String>) -> DecodeError {
    DecodeError::Invalid {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// The fields of one decoded record, taken out by name.
struct Fields {
    record: &'static str,
    map: HashMap<String, Value>,
}

impl Fields {
    fn new(record: &'static str, v: Value) -> Result<Fields, DecodeError> {
        match v {
            Value::Record(fields) => Ok(Fields {
                record,
                map: fields.into_iter().collect(),
            }),
            other => Err(invalid(record, format!("expected a record, got {other:?}"))),
        }
    }

    fn path(&self, name: &str) -> String {
        format!("{}.{name}", self.record)
    }

    fn take(&mut self, name: &str) -> Result<Value, DecodeError> {
        self.map
            .remove(name)
            .ok_or_else(|| invalid(&self.path(name), "missing"))
    }

    fn string(&mut self, name: &str) -> Result<String, DecodeError> {
        let path = self.path(name);
        as_string(&path, self.take(name)?)
    }

    fn uuid(&mut self, name: &str) -> Result<Uuid, DecodeError> {
        let path = self.path(name);
        as_uuid(&path, self.take(name)?)
    }

    fn int(&mut self, name: &str) -> Result<i32, DecodeError> {
        match self.take(name)? {
            Value::Int(i) => Ok(i),
            other => Err(invalid(
                &self.path(name),
                format!("expected int, got {other:?}"),
            )),
        }
    }

    fn long(&mut self, name: &str) -> Result<i64, DecodeError> {
        match self.take(name)? {
            Value::Long(i) => Ok(i),
            Value::Int(i) => Ok(i64::from(i)),
            other => Err(invalid(
                &self.path(name),
                format!("expected long, got {other:?}"),
            )),
        }
    }

    fn boolean(&mut self, name: &str) -> Result<bool, DecodeError> {
        match self.take(name)? {
            Value::Boolean(b) => Ok(b),
            other => Err(invalid(
                &self.path(name),
                format!("expected boolean, got {other:?}"),
            )),
        }
    }

    fn money(&mut self, name: &str) -> Result<Money, DecodeError> {
        let path = self.path(name);
        as_money(&path, self.take(name)?)
    }

    fn optional(&mut self, name: &str) -> Result<Option<Value>, DecodeError> {
        match self.take(name)? {
            Value::Union(_, inner) => match *inner {
                Value::Null => Ok(None),
                v => Ok(Some(v)),
            },
            Value::Null => Ok(None),
            other => Err(invalid(
                &self.path(name),
                format!("expected an optional, got {other:?}"),
            )),
        }
    }

    fn opt_string(&mut self, name: &str) -> Result<Option<String>, DecodeError> {
        let path = self.path(name);
        self.optional(name)?
            .map(|v| as_string(&path, v))
            .transpose()
    }

    fn opt_money(&mut self, name: &str) -> Result<Option<Money>, DecodeError> {
        let path = self.path(name);
        self.optional(name)?.map(|v| as_money(&path, v)).transpose()
    }

    fn opt_uuid(&mut self, name: &str) -> Result<Option<Uuid>, DecodeError> {
        let path = self.path(name);
        self.optional(name)?.map(|v| as_uuid(&path, v)).transpose()
    }

    fn parsed<T, E: std::fmt::Display>(
        &mut self,
        name: &str,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> Result<T, DecodeError> {
        let s = self.string(name)?;
        parse(&s).map_err(|e| invalid(&self.path(name), e.to_string()))
    }
}

fn as_string(path: &str, v: Value) -> Result<String, DecodeError> {
    match v {
        Value::String(s) => Ok(s),
        other => Err(invalid(path, format!("expected string, got {other:?}"))),
    }
}

fn as_uuid(path: &str, v: Value) -> Result<Uuid, DecodeError> {
    match v {
        Value::Uuid(u) => Ok(u),
        Value::String(s) => Uuid::from_str(&s).map_err(|e| invalid(path, e.to_string())),
        other => Err(invalid(path, format!("expected uuid, got {other:?}"))),
    }
}

fn as_money(path: &str, v: Value) -> Result<Money, DecodeError> {
    let Value::Record(fields) = v else {
        return Err(invalid(path, "expected a Money record"));
    };
    let mut amount = None;
    let mut currency = None;
    for (k, v) in fields {
        match (k.as_str(), v) {
            ("amount_minor", Value::Long(a)) => amount = Some(a),
            ("currency", Value::String(c)) => currency = Some(c),
            (other, _) => return Err(invalid(path, format!("unexpected Money field {other}"))),
        }
    }
    let amount = amount.ok_or_else(|| invalid(path, "Money without amount_minor"))?;
    let currency = currency.ok_or_else(|| invalid(path, "Money without currency"))?;
    let currency = Currency::from_code(&currency).map_err(|e| invalid(path, e.to_string()))?;
    Ok(Money::new(amount, currency))
}

fn decode_payload(t: EventType, v: Value) -> Result<Event, DecodeError> {
    let mut f = Fields::new(t.as_str(), v)?;
    let event = match t {
        EventType::PaymentRequested => {
            let Value::Array(items) = f.take("orders")? else {
                return Err(invalid("PaymentRequested.orders", "expected an array"));
            };
            let orders = items
                .into_iter()
                .map(|item| {
                    let mut o = Fields::new("PaymentOrder", item)?;
                    Ok(PaymentOrder {
                        order_id: OrderId::from_uuid(o.uuid("order_id")?),
                        seller_id: o.parsed("seller_id", SellerId::parse)?,
                        amount: o.money("amount")?,
                    })
                })
                .collect::<Result<Vec<_>, DecodeError>>()?;
            let Value::Map(meta) = f.take("metadata")? else {
                return Err(invalid("PaymentRequested.metadata", "expected a map"));
            };
            let metadata = meta
                .into_iter()
                .map(|(k, v)| Ok((k, as_string("PaymentRequested.metadata", v)?)))
                .collect::<Result<BTreeMap<_, _>, DecodeError>>()?;
            Event::PaymentRequested(PaymentRequested {
                client_id: f.parsed("client_id", ClientId::parse)?,
                idempotency_key: f.opt_string("idempotency_key")?,
                buyer_id: f.parsed("buyer_id", BuyerId::parse)?,
                orders,
                metadata,
            })
        }
        EventType::RiskApproved => RiskApproved {
            rule_set: f.string("rule_set")?,
        }
        .into(),
        EventType::RiskRejected => RiskRejected {
            rule_set: f.string("rule_set")?,
            rule: f.string("rule")?,
            reason: f.string("reason")?,
        }
        .into(),
        EventType::OrderExecutionStarted => OrderExecutionStarted {
            order_id: OrderId::from_uuid(f.uuid("order_id")?),
            attempt: f.int("attempt")?,
        }
        .into(),
        EventType::OrderSucceeded => OrderSucceeded {
            order_id: OrderId::from_uuid(f.uuid("order_id")?),
            psp_reference: f.string("psp_reference")?,
            amount: f.money("amount")?,
            fee: f.money("fee")?,
        }
        .into(),
        EventType::OrderFailed => OrderFailed {
            order_id: OrderId::from_uuid(f.uuid("order_id")?),
            retryable: f.boolean("retryable")?,
            code: f.string("code")?,
            reason: f.string("reason")?,
            attempt: f.int("attempt")?,
        }
        .into(),
        EventType::OrderPending => OrderPending {
            order_id: OrderId::from_uuid(f.uuid("order_id")?),
            psp_reference: f.string("psp_reference")?,
            amount: f.money("amount")?,
        }
        .into(),
        EventType::OrderSettledByWebhook => OrderSettledByWebhook {
            order_id: OrderId::from_uuid(f.uuid("order_id")?),
            psp_reference: f.string("psp_reference")?,
            succeeded: f.boolean("succeeded")?,
            amount: f.money("amount")?,
            fee: f.opt_money("fee")?,
            failure_reason: f.opt_string("failure_reason")?,
        }
        .into(),
        EventType::RefundRequested => RefundRequested {
            refund_id: RefundId::from_uuid(f.uuid("refund_id")?),
            order_id: OrderId::from_uuid(f.uuid("order_id")?),
            amount: f.money("amount")?,
            reason: f.string("reason")?,
        }
        .into(),
        EventType::RefundSucceeded => RefundSucceeded {
            refund_id: RefundId::from_uuid(f.uuid("refund_id")?),
            order_id: OrderId::from_uuid(f.uuid("order_id")?),
            psp_reference: f.string("psp_reference")?,
            amount: f.money("amount")?,
        }
        .into(),
        EventType::RefundFailed => RefundFailed {
            refund_id: RefundId::from_uuid(f.uuid("refund_id")?),
            order_id: OrderId::from_uuid(f.uuid("order_id")?),
            code: f.string("code")?,
            reason: f.string("reason")?,
        }
        .into(),
        EventType::ReconciliationDiscrepancyFound => ReconciliationDiscrepancyFound {
            discrepancy_id: DiscrepancyId::from_uuid(f.uuid("discrepancy_id")?),
            run_id: f.string("run_id")?,
            class: f.parsed("class", |s| {
                DiscrepancyClass::parse(s).ok_or("unknown discrepancy class")
            })?,
            psp_reference: f.opt_string("psp_reference")?,
            order_id: f.opt_uuid("order_id")?.map(OrderId::from_uuid),
            ours: f.opt_money("ours")?,
            theirs: f.opt_money("theirs")?,
            detail: f.string("detail")?,
        }
        .into(),
        EventType::ReconciliationDiscrepancyResolved => ReconciliationDiscrepancyResolved {
            discrepancy_id: DiscrepancyId::from_uuid(f.uuid("discrepancy_id")?),
            action: f.parsed("action", |s| {
                ResolutionAction::parse(s).ok_or("unknown resolution action")
            })?,
            reason: f.string("reason")?,
            adjustment: f.opt_money("adjustment")?,
            resolved_by: f.string("resolved_by")?,
        }
        .into(),
        EventType::ReconciliationRunCompleted => {
            let Value::Map(counts) = f.take("class_counts")? else {
                return Err(invalid(
                    "ReconciliationRunCompleted.class_counts",
                    "expected a map",
                ));
            };
            let class_counts = counts
                .into_iter()
                .map(|(k, v)| match v {
                    Value::Long(n) => Ok((k, n)),
                    other => Err(invalid(
                        "ReconciliationRunCompleted.class_counts",
                        format!("expected long, got {other:?}"),
                    )),
                })
                .collect::<Result<BTreeMap<_, _>, DecodeError>>()?;
            ReconciliationRunCompleted {
                run_id: f.string("run_id")?,
                settlement_date: f.string("settlement_date")?,
                source: f.string("source")?,
                file_sha256: f.string("file_sha256")?,
                rows: f.long("rows")?,
                matched: f.long("matched")?,
                discrepancies: f.long("discrepancies")?,
                class_counts,
            }
            .into()
        }
    };
    Ok(event)
}

pub(super) fn from_value(v: Value) -> Result<Envelope, DecodeError> {
    let mut f = Fields::new("Envelope", v)?;
    let event_type_name = f.string("event_type")?;
    let (branch, payload) = match f.take("payload")? {
        Value::Union(i, inner) => (i, *inner),
        other => {
            return Err(invalid(
                "Envelope.payload",
                format!("expected a union, got {other:?}"),
            ));
        }
    };
    let t = usize::try_from(branch)
        .ok()
        .and_then(|i| EventType::ALL.get(i).copied())
        .ok_or_else(|| {
            invalid(
                "Envelope.payload",
                format!("union branch {branch} is not a known event type"),
            )
        })?;
    if t.as_str() != event_type_name {
        return Err(invalid(
            "Envelope.event_type",
            format!(
                "says {event_type_name:?} but the payload is a {}",
                t.as_str()
            ),
        ));
    }
    let occurred_at = match f.take("occurred_at")? {
        Value::TimestampMicros(t) | Value::Long(t) => Timestamp::from_micros(t),
        other => {
            return Err(invalid(
                "Envelope.occurred_at",
                format!("expected timestamp-micros, got {other:?}"),
            ));
        }
    };
    // Outside 0000..=9999 a timestamp cannot be written as RFC 3339 (nor
    // stored by most databases): refuse it here, so it is dead-lettered
    // instead of failing later stages.
    if !occurred_at.is_in_range() {
        return Err(invalid(
            "Envelope.occurred_at",
            format!(
                "{} µs since the epoch is outside the years 0000 to 9999",
                occurred_at.as_micros()
            ),
        ));
    }
    Ok(Envelope {
        event_id: EventId::from_uuid(f.uuid("event_id")?),
        occurred_at,
        payment_id: f.opt_uuid("payment_id")?.map(PaymentId::from_uuid),
        correlation_id: CorrelationId::from_uuid(f.uuid("correlation_id")?),
        causation_id: f.opt_uuid("causation_id")?.map(EventId::from_uuid),
        producer: f.string("producer")?,
        schema_version: f.int("schema_version")?,
        event: decode_payload(t, payload)?,
    })
}
