//! A direct reader and writer of the envelope's Avro binary body: bytes
//! straight into [`Envelope`] and back, field by field in schema order,
//! without the generic `apache_avro::Value` tree of `convert.rs` (one heap
//! node per field, a `String` per field name, a `HashMap` per record).
//!
//! It mirrors `schemas/envelope.avsc` at the fingerprint
//! [`WRITTEN_FOR`]; `mod.rs` only uses it for that schema and for history
//! versions laid out as a prefix of it (branches appended to the payload
//! union), and the events tests prove it equal to the generic path on
//! random envelopes of every event type. Primitive reads copy
//! apache-avro 0.22's rules (varint of at most 10 bytes, `int` range
//! checked, booleans 0 or 1, negative block counts followed by a byte
//! size, the same allocation limits), so whatever this reader accepts the
//! generic one accepts with the same value. It is never more lenient; where
//! it refuses, `mod.rs` asks the generic path, whose result (including a
//! few lenient quirks of apache-avro on truncated bodies) stays the answer.

use super::DecodeError;
use crate::event::*;
use crate::ids::*;
use crate::money::{Currency, Money};
use std::collections::BTreeMap;
use uuid::Uuid;

/// CRC-64-AVRO fingerprint of the Parsing Canonical Form this module is
/// written for (`schemas/envelope.avsc`, version 2). A schema change makes
/// `mod.rs` fall back to the generic path until this module follows it
/// (and a test fails until then).
pub(super) const WRITTEN_FOR: u64 = 0x3c0c_3673_5e89_105f;

fn body(reason: impl Into<String>) -> DecodeError {
    DecodeError::Body(reason.into())
}

fn invalid(field: &str, reason: impl Into<String>) -> DecodeError {
    DecodeError::Invalid {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// apache-avro's `Value` sizes, for its collection limit (see
/// [`Reader::block_len`]).
type GenericItem = apache_avro::types::Value;
type GenericEntry = (String, apache_avro::types::Value);

/// A cursor over a datum body.
pub(super) struct Reader<'a> {
    buf: &'a [u8],
    /// apache-avro's allocation limit in bytes
    /// (`apache_avro::util::max_allocation_bytes`).
    max_alloc: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn new(buf: &'a [u8], max_alloc: usize) -> Reader<'a> {
        Reader { buf, max_alloc }
    }

    pub(super) fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        let (&b, rest) = self
            .buf
            .split_first()
            .ok_or_else(|| body("unexpected end of the datum"))?;
        self.buf = rest;
        Ok(b)
    }

    /// A varint of at most 10 bytes; bits beyond 64 are dropped, as
    /// apache-avro does.
    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut i = 0u64;
        for j in 0..10 {
            let b = self.byte()?;
            i |= u64::from(b & 0x7F) << (j * 7);
            if b >> 7 == 0 {
                return Ok(i);
            }
        }
        Err(body("varint longer than 10 bytes"))
    }

    fn long(&mut self) -> Result<i64, DecodeError> {
        let z = self.varint()?;
        // Zig-zag: the casts reinterpret the 64 bits, as apache-avro does.
        #[allow(clippy::cast_possible_wrap)]
        Ok(if z & 1 == 0 {
            (z >> 1) as i64
        } else {
            !(z >> 1) as i64
        })
    }

    fn int(&mut self) -> Result<i32, DecodeError> {
        let l = self.long()?;
        i32::try_from(l).map_err(|_| body(format!("int out of range: {l}")))
    }

    fn boolean(&mut self) -> Result<bool, DecodeError> {
        match self.byte()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(body(format!("invalid boolean byte {b}"))),
        }
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.long()?;
        let len = usize::try_from(len).map_err(|_| body(format!("negative length {len}")))?;
        if len > self.max_alloc {
            return Err(body(format!("length {len} over the allocation limit")));
        }
        if len > self.buf.len() {
            return Err(body(format!(
                "length {len} beyond the {} bytes left",
                self.buf.len()
            )));
        }
        let (s, rest) = self.buf.split_at(len);
        self.buf = rest;
        Ok(s)
    }

    fn str(&mut self) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.bytes()?).map_err(|e| body(e.to_string()))
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        self.str().map(str::to_owned)
    }

    fn uuid(&mut self) -> Result<Uuid, DecodeError> {
        Uuid::parse_str(self.str()?).map_err(|e| body(e.to_string()))
    }

    /// A union branch index below `branches`.
    fn branch(&mut self, branches: usize) -> Result<usize, DecodeError> {
        let i = self.long()?;
        usize::try_from(i)
            .ok()
            .filter(|&b| b < branches)
            .ok_or_else(|| body(format!("union branch {i} of {branches}")))
    }

    /// `["null", T]`: `None` or `Some(read T)`.
    fn optional<T>(
        &mut self,
        read: impl FnOnce(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<Option<T>, DecodeError> {
        match self.branch(2)? {
            0 => Ok(None),
            _ => read(self).map(Some),
        }
    }

    /// The item count of the next array or map block (0 ends the
    /// collection), checked against apache-avro's limits given the items
    /// `so_far`, where one item weighs `item_size` bytes there.
    fn block_len(&mut self, so_far: usize, item_size: usize) -> Result<usize, DecodeError> {
        let raw = self.long()?;
        let len = match raw.cmp(&0) {
            std::cmp::Ordering::Equal => return Ok(0),
            std::cmp::Ordering::Less => {
                let _byte_size = self.long()?;
                raw.checked_neg()
                    .ok_or_else(|| body("block count overflows"))?
            }
            std::cmp::Ordering::Greater => raw,
        };
        let len = usize::try_from(len).map_err(|_| body("block count out of range"))?;
        let total = so_far
            .checked_add(len)
            .ok_or_else(|| body("block count overflows"))?;
        if len > self.max_alloc
            || total
                .checked_mul(item_size)
                .is_none_or(|bytes| bytes > self.max_alloc)
        {
            return Err(body(format!("{total} items over the allocation limit")));
        }
        Ok(len)
    }

    /// An array, each item read by `read`. Every item takes at least one
    /// byte, so the reservation never exceeds the bytes left.
    fn array<T>(
        &mut self,
        mut read: impl FnMut(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>, DecodeError> {
        let mut items = Vec::new();
        loop {
            let len = self.block_len(items.len(), size_of::<GenericItem>())?;
            if len == 0 {
                return Ok(items);
            }
            items.reserve(len.min(self.buf.len()));
            for _ in 0..len {
                items.push(read(self)?);
            }
        }
    }

    /// A map with string keys; a repeated key keeps its last value, as the
    /// generic reader's `HashMap` does.
    fn map<T>(
        &mut self,
        mut read: impl FnMut(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<BTreeMap<String, T>, DecodeError> {
        let mut items = BTreeMap::new();
        // The generic limit counts entries read, repeated keys included.
        let mut count = 0usize;
        loop {
            let len = self.block_len(count, size_of::<GenericEntry>())?;
            if len == 0 {
                return Ok(items);
            }
            count += len;
            for _ in 0..len {
                let k = self.string()?;
                let v = read(self)?;
                items.insert(k, v);
            }
        }
    }

    fn money(&mut self, path: &str) -> Result<Money, DecodeError> {
        let amount = self.long()?;
        let code = self.str()?;
        let currency = Currency::from_code(code).map_err(|e| invalid(path, e.to_string()))?;
        Ok(Money::new(amount, currency))
    }

    fn opt_money(&mut self, path: &str) -> Result<Option<Money>, DecodeError> {
        self.optional(|r| r.money(path))
    }

    fn parsed<T, E: std::fmt::Display>(
        &mut self,
        path: &str,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> Result<T, DecodeError> {
        let s = self.str()?;
        parse(s).map_err(|e| invalid(path, e.to_string()))
    }
}

fn payload(r: &mut Reader<'_>, t: EventType) -> Result<Event, DecodeError> {
    let event = match t {
        EventType::PaymentRequested => PaymentRequested {
            client_id: r.parsed("PaymentRequested.client_id", ClientId::parse)?,
            idempotency_key: r.optional(Reader::string)?,
            buyer_id: r.parsed("PaymentRequested.buyer_id", BuyerId::parse)?,
            orders: r.array(|r| {
                Ok(PaymentOrder {
                    order_id: OrderId::from_uuid(r.uuid()?),
                    seller_id: r.parsed("PaymentOrder.seller_id", SellerId::parse)?,
                    amount: r.money("PaymentOrder.amount")?,
                })
            })?,
            metadata: r.map(Reader::string)?,
        }
        .into(),
        EventType::RiskApproved => RiskApproved {
            rule_set: r.string()?,
        }
        .into(),
        EventType::RiskRejected => RiskRejected {
            rule_set: r.string()?,
            rule: r.string()?,
            reason: r.string()?,
        }
        .into(),
        EventType::OrderExecutionStarted => OrderExecutionStarted {
            order_id: OrderId::from_uuid(r.uuid()?),
            attempt: r.int()?,
        }
        .into(),
        EventType::OrderSucceeded => OrderSucceeded {
            order_id: OrderId::from_uuid(r.uuid()?),
            psp_reference: r.string()?,
            amount: r.money("OrderSucceeded.amount")?,
            fee: r.money("OrderSucceeded.fee")?,
        }
        .into(),
        EventType::OrderFailed => OrderFailed {
            order_id: OrderId::from_uuid(r.uuid()?),
            retryable: r.boolean()?,
            code: r.string()?,
            reason: r.string()?,
            attempt: r.int()?,
        }
        .into(),
        EventType::OrderPending => OrderPending {
            order_id: OrderId::from_uuid(r.uuid()?),
            psp_reference: r.string()?,
            amount: r.money("OrderPending.amount")?,
        }
        .into(),
        EventType::OrderSettledByWebhook => OrderSettledByWebhook {
            order_id: OrderId::from_uuid(r.uuid()?),
            psp_reference: r.string()?,
            succeeded: r.boolean()?,
            amount: r.money("OrderSettledByWebhook.amount")?,
            fee: r.opt_money("OrderSettledByWebhook.fee")?,
            failure_reason: r.optional(Reader::string)?,
        }
        .into(),
        EventType::RefundRequested => RefundRequested {
            refund_id: RefundId::from_uuid(r.uuid()?),
            order_id: OrderId::from_uuid(r.uuid()?),
            amount: r.money("RefundRequested.amount")?,
            reason: r.string()?,
        }
        .into(),
        EventType::RefundSucceeded => RefundSucceeded {
            refund_id: RefundId::from_uuid(r.uuid()?),
            order_id: OrderId::from_uuid(r.uuid()?),
            psp_reference: r.string()?,
            amount: r.money("RefundSucceeded.amount")?,
        }
        .into(),
        EventType::RefundFailed => RefundFailed {
            refund_id: RefundId::from_uuid(r.uuid()?),
            order_id: OrderId::from_uuid(r.uuid()?),
            code: r.string()?,
            reason: r.string()?,
        }
        .into(),
        EventType::ReconciliationDiscrepancyFound => ReconciliationDiscrepancyFound {
            discrepancy_id: DiscrepancyId::from_uuid(r.uuid()?),
            run_id: r.string()?,
            class: r.parsed("ReconciliationDiscrepancyFound.class", |s| {
                DiscrepancyClass::parse(s).ok_or("unknown discrepancy class")
            })?,
            psp_reference: r.optional(Reader::string)?,
            order_id: r.optional(Reader::uuid)?.map(OrderId::from_uuid),
            ours: r.opt_money("ReconciliationDiscrepancyFound.ours")?,
            theirs: r.opt_money("ReconciliationDiscrepancyFound.theirs")?,
            detail: r.string()?,
        }
        .into(),
        EventType::ReconciliationDiscrepancyResolved => ReconciliationDiscrepancyResolved {
            discrepancy_id: DiscrepancyId::from_uuid(r.uuid()?),
            action: r.parsed("ReconciliationDiscrepancyResolved.action", |s| {
                ResolutionAction::parse(s).ok_or("unknown resolution action")
            })?,
            reason: r.string()?,
            adjustment: r.opt_money("ReconciliationDiscrepancyResolved.adjustment")?,
            resolved_by: r.string()?,
        }
        .into(),
        EventType::ReconciliationRunCompleted => ReconciliationRunCompleted {
            run_id: r.string()?,
            settlement_date: r.string()?,
            source: r.string()?,
            file_sha256: r.string()?,
            rows: r.long()?,
            matched: r.long()?,
            discrepancies: r.long()?,
            class_counts: r.map(Reader::long)?,
        }
        .into(),
    };
    Ok(event)
}

/// Reads one envelope body whose payload union has `branches` branches
/// (the first `branches` of [`EventType::ALL`]); the whole body must be
/// consumed.
pub(super) fn decode_body(
    bytes: &[u8],
    branches: usize,
    max_alloc: usize,
) -> Result<Envelope, DecodeError> {
    let mut r = Reader::new(bytes, max_alloc);
    let event_id = EventId::from_uuid(r.uuid()?);
    let event_type = r.str()?;
    let schema_version = r.int()?;
    let occurred_at = Timestamp::from_micros(r.long()?);
    let payment_id = r.optional(Reader::uuid)?.map(PaymentId::from_uuid);
    let correlation_id = CorrelationId::from_uuid(r.uuid()?);
    let causation_id = r.optional(Reader::uuid)?.map(EventId::from_uuid);
    let producer = r.string()?;
    let t = EventType::ALL[r.branch(branches.min(EventType::ALL.len()))?];
    if t.as_str() != event_type {
        return Err(invalid(
            "Envelope.event_type",
            format!("says {event_type:?} but the payload is a {}", t.as_str()),
        ));
    }
    if !occurred_at.is_in_range() {
        return Err(invalid(
            "Envelope.occurred_at",
            format!(
                "{} µs since the epoch is outside the years 0000 to 9999",
                occurred_at.as_micros()
            ),
        ));
    }
    let event = payload(&mut r, t)?;
    if r.remaining() != 0 {
        return Err(body(format!(
            "{} trailing bytes after the datum",
            r.remaining()
        )));
    }
    Ok(Envelope {
        event_id,
        occurred_at,
        payment_id,
        correlation_id,
        causation_id,
        producer,
        schema_version,
        event,
    })
}

// ---------- encode ----------

/// Appends the current schema's binary body of values, as apache-avro's
/// writer lays them out (maps and arrays as one block then 0). The
/// container writer (`container.rs`) uses its `long` and `str` too.
pub(super) struct Writer<'a>(pub(super) &'a mut Vec<u8>);

impl Writer<'_> {
    pub(super) fn long(&mut self, n: i64) {
        // Zig-zag then varint; the casts reinterpret the 64 bits.
        #[allow(clippy::cast_sign_loss)]
        let mut z = ((n << 1) ^ (n >> 63)) as u64;
        while z > 0x7F {
            // Low 7 bits with the continuation bit: the truncation is the point.
            #[allow(clippy::cast_possible_truncation)]
            self.0.push((z & 0x7F) as u8 | 0x80);
            z >>= 7;
        }
        #[allow(clippy::cast_possible_truncation)]
        self.0.push(z as u8);
    }

    fn int(&mut self, n: i32) {
        self.long(i64::from(n));
    }

    fn boolean(&mut self, b: bool) {
        self.0.push(u8::from(b));
    }

    pub(super) fn str(&mut self, s: &str) {
        self.len(s.len());
        self.0.extend_from_slice(s.as_bytes());
    }

    fn len(&mut self, n: usize) {
        self.long(i64::try_from(n).expect("lengths fit in i64"));
    }

    fn uuid(&mut self, u: Uuid) {
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        self.str(u.hyphenated().encode_lower(&mut buf));
    }

    fn branch(&mut self, i: usize) {
        self.len(i);
    }

    fn optional<T>(&mut self, v: Option<T>, write: impl FnOnce(&mut Self, T)) {
        match v {
            None => self.branch(0),
            Some(v) => {
                self.branch(1);
                write(self, v);
            }
        }
    }

    fn money(&mut self, m: &Money) {
        self.long(m.amount_minor());
        self.str(m.currency().code());
    }

    fn map<T>(&mut self, m: &BTreeMap<String, T>, mut write: impl FnMut(&mut Self, &T)) {
        if !m.is_empty() {
            self.len(m.len());
            for (k, v) in m {
                self.str(k);
                write(self, v);
            }
        }
        self.long(0);
    }
}

fn union_index(t: EventType) -> usize {
    EventType::ALL
        .iter()
        .position(|x| *x == t)
        .expect("every type is in ALL")
}

/// Appends the current schema's body of `env` to `out`.
pub(super) fn encode_body(env: &Envelope, out: &mut Vec<u8>) {
    let mut w = Writer(out);
    let t = env.event_type();
    w.uuid(env.event_id.as_uuid());
    w.str(t.as_str());
    w.int(env.schema_version);
    w.long(env.occurred_at.as_micros());
    w.optional(env.payment_id, |w, p| w.uuid(p.as_uuid()));
    w.uuid(env.correlation_id.as_uuid());
    w.optional(env.causation_id, |w, c| w.uuid(c.as_uuid()));
    w.str(&env.producer);
    w.branch(union_index(t));
    match &env.event {
        Event::PaymentRequested(e) => {
            w.str(e.client_id.as_str());
            w.optional(e.idempotency_key.as_deref(), Writer::str);
            w.str(e.buyer_id.as_str());
            if !e.orders.is_empty() {
                w.len(e.orders.len());
                for o in &e.orders {
                    w.uuid(o.order_id.as_uuid());
                    w.str(o.seller_id.as_str());
                    w.money(&o.amount);
                }
            }
            w.long(0);
            w.map(&e.metadata, |w, v| w.str(v));
        }
        Event::RiskApproved(e) => w.str(&e.rule_set),
        Event::RiskRejected(e) => {
            w.str(&e.rule_set);
            w.str(&e.rule);
            w.str(&e.reason);
        }
        Event::OrderExecutionStarted(e) => {
            w.uuid(e.order_id.as_uuid());
            w.int(e.attempt);
        }
        Event::OrderSucceeded(e) => {
            w.uuid(e.order_id.as_uuid());
            w.str(&e.psp_reference);
            w.money(&e.amount);
            w.money(&e.fee);
        }
        Event::OrderFailed(e) => {
            w.uuid(e.order_id.as_uuid());
            w.boolean(e.retryable);
            w.str(&e.code);
            w.str(&e.reason);
            w.int(e.attempt);
        }
        Event::OrderPending(e) => {
            w.uuid(e.order_id.as_uuid());
            w.str(&e.psp_reference);
            w.money(&e.amount);
        }
        Event::OrderSettledByWebhook(e) => {
            w.uuid(e.order_id.as_uuid());
            w.str(&e.psp_reference);
            w.boolean(e.succeeded);
            w.money(&e.amount);
            w.optional(e.fee.as_ref(), Writer::money);
            w.optional(e.failure_reason.as_deref(), Writer::str);
        }
        Event::RefundRequested(e) => {
            w.uuid(e.refund_id.as_uuid());
            w.uuid(e.order_id.as_uuid());
            w.money(&e.amount);
            w.str(&e.reason);
        }
        Event::RefundSucceeded(e) => {
            w.uuid(e.refund_id.as_uuid());
            w.uuid(e.order_id.as_uuid());
            w.str(&e.psp_reference);
            w.money(&e.amount);
        }
        Event::RefundFailed(e) => {
            w.uuid(e.refund_id.as_uuid());
            w.uuid(e.order_id.as_uuid());
            w.str(&e.code);
            w.str(&e.reason);
        }
        Event::ReconciliationDiscrepancyFound(e) => {
            w.uuid(e.discrepancy_id.as_uuid());
            w.str(&e.run_id);
            w.str(e.class.as_str());
            w.optional(e.psp_reference.as_deref(), Writer::str);
            w.optional(e.order_id, |w, o| w.uuid(o.as_uuid()));
            w.optional(e.ours.as_ref(), Writer::money);
            w.optional(e.theirs.as_ref(), Writer::money);
            w.str(&e.detail);
        }
        Event::ReconciliationDiscrepancyResolved(e) => {
            w.uuid(e.discrepancy_id.as_uuid());
            w.str(e.action.as_str());
            w.str(&e.reason);
            w.optional(e.adjustment.as_ref(), Writer::money);
            w.str(&e.resolved_by);
        }
        Event::ReconciliationRunCompleted(e) => {
            w.str(&e.run_id);
            w.str(&e.settlement_date);
            w.str(&e.source);
            w.str(&e.file_sha256);
            w.long(e.rows);
            w.long(e.matched);
            w.long(e.discrepancies);
            w.map(&e.class_counts, |w, v| w.long(*v));
        }
    }
}
