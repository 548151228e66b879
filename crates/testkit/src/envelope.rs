//! Building envelopes by hand: deterministic event ids derived from the
//! payment and a tag, so the same call makes the same event.

use events::{
    BuyerId, ClientId, CorrelationId, Currency, Envelope, Event, EventId, Money, OrderId,
    PaymentId, PaymentOrder, PaymentRequested, SellerId, Timestamp,
};
use std::collections::BTreeMap;

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

/// A one-order payment of `client` under idempotency key `key`, ids derived
/// as the handler derives them: (its `PaymentRequested`, tagged
/// "requested", the payment id, the order id).
pub fn one_order_payment(
    client: &str,
    key: &str,
    buyer: &str,
    seller: &str,
    amount: Money,
    at_us: i64,
) -> (Envelope, PaymentId, OrderId) {
    let client = ClientId::parse(client).expect("client id");
    let payment = PaymentId::derive(&client, key);
    let order = OrderId::derive(payment, 0);
    let env = envelope(
        Some(payment),
        "requested",
        at_us,
        PaymentRequested {
            client_id: client,
            idempotency_key: Some(key.into()),
            buyer_id: BuyerId::parse(buyer).expect("buyer id"),
            orders: vec![PaymentOrder {
                order_id: order,
                seller_id: SellerId::parse(seller).expect("seller id"),
                amount,
            }],
            metadata: BTreeMap::new(),
        }
        .into(),
    );
    (env, payment, order)
}
