//! Building envelopes by hand: deterministic event ids derived from the
//! payment and a tag, so the same call makes the same event.

use events::{CorrelationId, Currency, Envelope, Event, EventId, Money, PaymentId, Timestamp};

/// An envelope of `event` about `payment` (or none), its id derived from
/// the payment and `tag`, occurring at `at_us` microseconds since the epoch.
pub fn envelope(payment: Option<PaymentId>, tag: &str, at_us: i64, event: Event) -> Envelope {
    let parent = payment.map(|p| p.as_uuid()).unwrap_or(uuid::Uuid::nil());
    Envelope {
        event_id: EventId::derive(parent, tag),
        occurred_at: Timestamp::from_micros(at_us),
        payment_id: payment,
        correlation_id: CorrelationId::from_uuid(parent),
        causation_id: None,
        producer: "test".into(),
        schema_version: events::SCHEMA_VERSION,
        event,
    }
}

/// [`envelope`] of a payment, occurring now.
pub fn envelope_now(payment: PaymentId, tag: &str, event: Event) -> Envelope {
    Envelope {
        occurred_at: Timestamp::now(),
        ..envelope(Some(payment), tag, 0, event)
    }
}

/// `minor` euro cents.
pub fn eur(minor: i64) -> Money {
    Money::new(minor, Currency::EUR)
}
