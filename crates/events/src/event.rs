//! The event model: an [`Envelope`] around one past-tense [`Event`].
//!
//! Mirrors `schemas/envelope.avsc`; the Avro module maps between the two and
//! is the only place that knows the wire format.

use crate::ids::{
    BuyerId, ClientId, CorrelationId, DiscrepancyId, EventId, OrderId, PaymentId, RefundId,
    SellerId,
};
use crate::money::Money;
use std::collections::BTreeMap;
use time::OffsetDateTime;

/// Version of `schemas/envelope.avsc` this code writes.
pub const SCHEMA_VERSION: i32 = 2;

/// Metadata carried by every event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub event_id: EventId,
    pub occurred_at: Timestamp,
    /// `None` only for events not tied to a known payment.
    pub payment_id: Option<PaymentId>,
    pub correlation_id: CorrelationId,
    pub causation_id: Option<EventId>,
    /// Component and version that appended the event.
    pub producer: String,
    pub schema_version: i32,
    pub event: Event,
}

impl Envelope {
    pub fn event_type(&self) -> EventType {
        self.event.event_type()
    }

    /// The Kafka message key: all events of one payment share it, so they
    /// land on one partition, in order. Events without a payment are keyed
    /// by the id of what they are about.
    pub fn partition_key(&self) -> String {
        match (&self.payment_id, &self.event) {
            (Some(p), _) => p.to_string(),
            (None, Event::ReconciliationDiscrepancyFound(d)) => d.discrepancy_id.to_string(),
            (None, Event::ReconciliationDiscrepancyResolved(d)) => d.discrepancy_id.to_string(),
            (None, Event::ReconciliationRunCompleted(r)) => r.run_id.clone(),
            (None, _) => self.event_id.to_string(),
        }
    }
}

/// UTC instant with microsecond precision (the wire's `timestamp-micros`).
///
/// Events only carry instants within the years 0000 to 9999
/// ([`Timestamp::MIN`]..=[`Timestamp::MAX`], what RFC 3339 can write);
/// decoding refuses others. Any `i64` is still representable, and
/// formatting one outside the range never panics (see `Display`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    /// 0000-01-01T00:00:00Z.
    pub const MIN: Timestamp = Timestamp(-62_167_219_200_000_000);
    /// 9999-12-31T23:59:59.999999Z.
    pub const MAX: Timestamp = Timestamp(253_402_300_799_999_999);

    /// Within [`Timestamp::MIN`]..=[`Timestamp::MAX`].
    pub const fn is_in_range(&self) -> bool {
        self.0 >= Timestamp::MIN.0 && self.0 <= Timestamp::MAX.0
    }

    pub const fn from_micros(micros: i64) -> Timestamp {
        Timestamp(micros)
    }
    pub const fn as_micros(&self) -> i64 {
        self.0
    }
    /// Truncates to whole microseconds.
    pub fn from_datetime(dt: OffsetDateTime) -> Timestamp {
        let micros = dt.unix_timestamp_nanos() / 1_000;
        Timestamp(i64::try_from(micros).expect("timestamps within ±292,000 years"))
    }
    pub fn now() -> Timestamp {
        Timestamp::from_datetime(OffsetDateTime::now_utc())
    }
    /// The instant as a date and time; `None` outside the years 0000 to
    /// 9999.
    pub fn to_datetime(&self) -> Option<OffsetDateTime> {
        if !self.is_in_range() {
            return None;
        }
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1_000).ok()
    }
    /// Milliseconds, as Kafka record timestamps use.
    pub const fn as_millis(&self) -> i64 {
        self.0.div_euclid(1_000)
    }
}

/// RFC 3339 (`2026-12-05T23:30:00.123456Z`). Outside the years 0000 to
/// 9999, where RFC 3339 has no spelling, the raw value with a note
/// (`@-9223372036854775808us (out of range)`), so printing a hostile event
/// (`dlq show`, `replay`) never fails or panics.
impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let formatted = self.to_datetime().and_then(|dt| {
            dt.format(&time::format_description::well_known::Rfc3339)
                .ok()
        });
        match formatted {
            Some(s) => f.write_str(&s),
            None => write!(f, "@{}us (out of range)", self.0),
        }
    }
}

macro_rules! event_types {
    ($($name:ident),+ $(,)?) => {
        /// Every kind of event, in the order of the Avro union.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum Event {
            $($name($name),)+
        }

        /// The name of an event kind, as on the wire (`event_type`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum EventType {
            $($name,)+
        }

        impl Event {
            pub fn event_type(&self) -> EventType {
                match self {
                    $(Event::$name(_) => EventType::$name,)+
                }
            }
        }

        impl EventType {
            /// All event types, in union order.
            pub const ALL: &'static [EventType] = &[$(EventType::$name,)+];

            pub fn as_str(&self) -> &'static str {
                match self {
                    $(EventType::$name => stringify!($name),)+
                }
            }

            pub fn parse(s: &str) -> Option<EventType> {
                match s {
                    $(stringify!($name) => Some(EventType::$name),)+
                    _ => None,
                }
            }
        }

        $(impl From<$name> for Event {
            fn from(e: $name) -> Event {
                Event::$name(e)
            }
        })+
    };
}

event_types!(
    PaymentRequested,
    RiskApproved,
    RiskRejected,
    OrderExecutionStarted,
    OrderSucceeded,
    OrderFailed,
    OrderPending,
    OrderSettledByWebhook,
    RefundRequested,
    RefundSucceeded,
    RefundFailed,
    ReconciliationDiscrepancyFound,
    ReconciliationDiscrepancyResolved,
    ReconciliationRunCompleted,
);

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One seller's part of a payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentOrder {
    pub order_id: OrderId,
    pub seller_id: SellerId,
    pub amount: Money,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentRequested {
    pub client_id: ClientId,
    pub idempotency_key: Option<String>,
    pub buyer_id: BuyerId,
    pub orders: Vec<PaymentOrder>,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RiskApproved {
    pub rule_set: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RiskRejected {
    pub rule_set: String,
    pub rule: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderExecutionStarted {
    pub order_id: OrderId,
    pub attempt: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderSucceeded {
    pub order_id: OrderId,
    pub psp_reference: String,
    pub amount: Money,
    pub fee: Money,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderFailed {
    pub order_id: OrderId,
    pub retryable: bool,
    pub code: String,
    pub reason: String,
    pub attempt: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderPending {
    pub order_id: OrderId,
    pub psp_reference: String,
    pub amount: Money,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderSettledByWebhook {
    pub order_id: OrderId,
    pub psp_reference: String,
    pub succeeded: bool,
    pub amount: Money,
    pub fee: Option<Money>,
    pub failure_reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundRequested {
    pub refund_id: RefundId,
    pub order_id: OrderId,
    pub amount: Money,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundSucceeded {
    pub refund_id: RefundId,
    pub order_id: OrderId,
    pub psp_reference: String,
    pub amount: Money,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundFailed {
    pub refund_id: RefundId,
    pub order_id: OrderId,
    pub code: String,
    pub reason: String,
}

/// What kind of difference reconciliation found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DiscrepancyClass {
    MissingInLedger,
    MissingAtPsp,
    AmountMismatch,
    CurrencyMismatch,
    StatusMismatch,
    FeeMismatch,
}

impl DiscrepancyClass {
    pub const ALL: &'static [DiscrepancyClass] = &[
        DiscrepancyClass::MissingInLedger,
        DiscrepancyClass::MissingAtPsp,
        DiscrepancyClass::AmountMismatch,
        DiscrepancyClass::CurrencyMismatch,
        DiscrepancyClass::StatusMismatch,
        DiscrepancyClass::FeeMismatch,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            DiscrepancyClass::MissingInLedger => "missing_in_ledger",
            DiscrepancyClass::MissingAtPsp => "missing_at_psp",
            DiscrepancyClass::AmountMismatch => "amount_mismatch",
            DiscrepancyClass::CurrencyMismatch => "currency_mismatch",
            DiscrepancyClass::StatusMismatch => "status_mismatch",
            DiscrepancyClass::FeeMismatch => "fee_mismatch",
        }
    }

    pub fn parse(s: &str) -> Option<DiscrepancyClass> {
        DiscrepancyClass::ALL
            .iter()
            .copied()
            .find(|c| c.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconciliationDiscrepancyFound {
    pub discrepancy_id: DiscrepancyId,
    pub run_id: String,
    pub class: DiscrepancyClass,
    pub psp_reference: Option<String>,
    pub order_id: Option<OrderId>,
    pub ours: Option<Money>,
    pub theirs: Option<Money>,
    pub detail: String,
}

/// How a discrepancy was worked off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResolutionAction {
    AcceptPspAmount,
    ExpectLateSettlement,
    Escalate,
}

impl ResolutionAction {
    pub const ALL: &'static [ResolutionAction] = &[
        ResolutionAction::AcceptPspAmount,
        ResolutionAction::ExpectLateSettlement,
        ResolutionAction::Escalate,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            ResolutionAction::AcceptPspAmount => "accept_psp_amount",
            ResolutionAction::ExpectLateSettlement => "expect_late_settlement",
            ResolutionAction::Escalate => "escalate",
        }
    }

    pub fn parse(s: &str) -> Option<ResolutionAction> {
        ResolutionAction::ALL
            .iter()
            .copied()
            .find(|a| a.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconciliationDiscrepancyResolved {
    pub discrepancy_id: DiscrepancyId,
    pub action: ResolutionAction,
    pub reason: String,
    pub adjustment: Option<Money>,
    pub resolved_by: String,
}

/// One reconciliation run of a settlement file against the ledger finished.
/// Appended once per run (its event id derives from the run id), after the
/// run's discrepancy events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconciliationRunCompleted {
    /// Derived from the settlement date and the file's SHA-256: the same
    /// file for the same day is the same run.
    pub run_id: String,
    /// The settlement day (UTC), `YYYY-MM-DD`.
    pub settlement_date: String,
    /// Where the file came from (a path or a URL without credentials).
    pub source: String,
    /// SHA-256 of the file's bytes, hex.
    pub file_sha256: String,
    /// Data rows in the file (header excluded).
    pub rows: i64,
    /// PSP rows matched without any difference.
    pub matched: i64,
    /// Differences found by this run, all classes (including ones already
    /// open from an earlier run of the same day, which are not reported twice).
    pub discrepancies: i64,
    /// Differences per class name (`DiscrepancyClass::as_str`).
    pub class_counts: BTreeMap<String, i64>,
}

#[cfg(test)]
mod timestamp_tests {
    use super::*;

    #[test]
    fn display_never_panics_and_marks_out_of_range_values() {
        for micros in [
            i64::MIN,
            i64::MAX,
            Timestamp::MIN.0 - 1,
            Timestamp::MAX.0 + 1,
        ] {
            let t = Timestamp::from_micros(micros);
            assert!(!t.is_in_range());
            assert_eq!(t.to_string(), format!("@{micros}us (out of range)"));
            assert_eq!(t.to_datetime(), None);
        }
        assert_eq!(Timestamp::MIN.to_string(), "0000-01-01T00:00:00Z");
        assert_eq!(Timestamp::MAX.to_string(), "9999-12-31T23:59:59.999999Z");
        assert!(Timestamp::MIN.is_in_range() && Timestamp::MAX.is_in_range());
    }

    #[test]
    fn decoding_refuses_timestamps_outside_years_0_to_9999() {
        let mut env = crate::samples::one_of_each("c1", "ts", Timestamp::now()).remove(0);
        for micros in [
            i64::MAX,
            i64::MIN,
            Timestamp::MAX.0 + 1,
            Timestamp::MIN.0 - 1,
        ] {
            env.occurred_at = Timestamp::from_micros(micros);
            let bytes = crate::avro::encode(&env).expect("encodes");
            let err = crate::avro::decode(&bytes).expect_err("out of range");
            assert_eq!(err.kind(), "invalid_field", "{err}");
            assert!(err.to_string().contains("occurred_at"), "{err}");
        }
        for t in [Timestamp::MIN, Timestamp::MAX] {
            env.occurred_at = t;
            let bytes = crate::avro::encode(&env).expect("encodes");
            assert_eq!(
                crate::avro::decode(&bytes).expect("in range").occurred_at,
                t
            );
        }
    }
}
