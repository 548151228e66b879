//! A realistic story of one payment with one event of every type, for
//! tests, the demo and documentation. Deterministic for a given client and
//! idempotency key.

use crate::event::*;
use crate::ids::*;
use crate::money::{Currency, Money};
use std::collections::BTreeMap;

const PRODUCER: &str = concat!("samples/", env!("CARGO_PKG_VERSION"));

/// One event of every [`EventType`], in union order, all belonging to one
/// payment of two orders (EUR to two sellers), each caused by the previous.
pub fn one_of_each(client: &str, idempotency_key: &str, start: Timestamp) -> Vec<Envelope> {
    let client = ClientId::parse(client).expect("sample client id is valid");
    let payment = PaymentId::derive(&client, idempotency_key);
    let order_a = OrderId::derive(payment, 0);
    let order_b = OrderId::derive(payment, 1);
    let refund = RefundId::derive(&client, &format!("{idempotency_key}-refund"));
    let discrepancy =
        DiscrepancyId::from_uuid(EventId::derive(payment.as_uuid(), "discrepancy").as_uuid());
    let eur = |minor| Money::new(minor, Currency::EUR);
    let events: Vec<Event> = vec![
        PaymentRequested {
            client_id: client.clone(),
            idempotency_key: Some(idempotency_key.to_owned()),
            buyer_id: BuyerId::parse("buyer-7").expect("valid"),
            orders: vec![
                PaymentOrder {
                    order_id: order_a,
                    seller_id: SellerId::parse("seller-a").expect("valid"),
                    amount: eur(1_050),
                },
                PaymentOrder {
                    order_id: order_b,
                    seller_id: SellerId::parse("seller-b").expect("valid"),
                    amount: eur(2_500),
                },
            ],
            metadata: BTreeMap::from([
                ("cart".to_owned(), "c-123".to_owned()),
                ("ünïcode".to_owned(), "✓".to_owned()),
            ]),
        }
        .into(),
        RiskApproved {
            rule_set: "default@1".into(),
        }
        .into(),
        RiskRejected {
            rule_set: "default@1".into(),
            rule: "blocked_seller".into(),
            reason: "seller seller-x is blocked".into(),
        }
        .into(),
        OrderExecutionStarted {
            order_id: order_a,
            attempt: 1,
        }
        .into(),
        OrderSucceeded {
            order_id: order_a,
            psp_reference: "psp_ch_1".into(),
            amount: eur(1_050),
            fee: eur(32),
        }
        .into(),
        OrderFailed {
            order_id: order_b,
            retryable: true,
            code: "psp_unavailable".into(),
            reason: "503 from PSP".into(),
            attempt: 1,
        }
        .into(),
        OrderPending {
            order_id: order_b,
            psp_reference: "psp_ch_2".into(),
            amount: eur(2_500),
        }
        .into(),
        OrderSettledByWebhook {
            order_id: order_b,
            psp_reference: "psp_ch_2".into(),
            succeeded: true,
            amount: eur(2_500),
            fee: Some(eur(75)),
            failure_reason: None,
        }
        .into(),
        RefundRequested {
            refund_id: refund,
            order_id: order_a,
            amount: eur(500),
            reason: "partial return".into(),
        }
        .into(),
        RefundSucceeded {
            refund_id: refund,
            order_id: order_a,
            psp_reference: "psp_rf_1".into(),
            amount: eur(500),
        }
        .into(),
        RefundFailed {
            refund_id: refund,
            order_id: order_a,
            code: "already_refunded".into(),
            reason: "nothing left to refund".into(),
        }
        .into(),
        ReconciliationDiscrepancyFound {
            discrepancy_id: discrepancy,
            run_id: "2026-11-24".into(),
            class: DiscrepancyClass::FeeMismatch,
            psp_reference: Some("psp_ch_1".into()),
            order_id: Some(order_a),
            ours: Some(eur(32)),
            theirs: Some(eur(35)),
            detail: "fee differs by 0.03 EUR".into(),
        }
        .into(),
        ReconciliationDiscrepancyResolved {
            discrepancy_id: discrepancy,
            action: ResolutionAction::AcceptPspAmount,
            reason: "PSP fee schedule changed".into(),
            adjustment: Some(eur(-3)),
            resolved_by: "ops@example.com".into(),
        }
        .into(),
        ReconciliationRunCompleted {
            run_id: "2026-11-24".into(),
            settlement_date: "2026-11-24".into(),
            source: "settlement-2026-11-24.csv".into(),
            file_sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
            rows: 2,
            matched: 1,
            discrepancies: 1,
            class_counts: BTreeMap::from([("fee_mismatch".to_owned(), 1)]),
        }
        .into(),
    ];
    let mut previous: Option<EventId> = None;
    events
        .into_iter()
        .enumerate()
        .map(|(i, event)| {
            let event_id = EventId::derive(payment.as_uuid(), &format!("sample-{i}"));
            let env = Envelope {
                event_id,
                occurred_at: Timestamp::from_micros(
                    start.as_micros() + i64::try_from(i).expect("small") * 1_000_001,
                ),
                payment_id: Some(payment),
                correlation_id: CorrelationId::from_uuid(payment.as_uuid()),
                causation_id: previous,
                producer: PRODUCER.to_owned(),
                schema_version: SCHEMA_VERSION,
                event,
            };
            previous = Some(event_id);
            env
        })
        .collect()
}
