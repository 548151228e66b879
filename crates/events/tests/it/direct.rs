//! The direct Avro codec (`events::avro::paths::*_direct`) against the
//! generic one built on apache-avro's `Value` tree: equal on random
//! envelopes of every event type and on every schema version, and on
//! damaged bytes the direct reader never accepts what the generic one
//! refuses nor gives another value, and never panics.

use events::avro::{self, paths};
use events::*;
use proptest::prelude::*;
use std::collections::BTreeMap;
use uuid::Uuid;

fn arb_money() -> impl Strategy<Value = Money> {
    (
        any::<i64>(),
        prop::sample::select(Currency::all().collect::<Vec<_>>()),
    )
        .prop_map(|(a, c)| Money::new(a, c))
}

fn arb_text() -> impl Strategy<Value = String> {
    "\\PC{0,24}"
}

fn arb_ext_id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._:-]{1,40}"
}

fn arb_uuid() -> impl Strategy<Value = Uuid> {
    any::<u128>().prop_map(Uuid::from_u128)
}

fn arb_order() -> impl Strategy<Value = OrderId> {
    arb_uuid().prop_map(OrderId::from_uuid)
}

/// One strategy per event type, so every type is drawn.
fn arb_event() -> impl Strategy<Value = Event> {
    prop_oneof![
        (
            arb_ext_id(),
            proptest::option::of(arb_text()),
            arb_ext_id(),
            prop::collection::vec((arb_order(), arb_ext_id(), arb_money()), 0..4),
            prop::collection::btree_map(arb_text(), arb_text(), 0..3)
        )
            .prop_map(|(c, k, b, orders, metadata)| PaymentRequested {
                client_id: ClientId::parse(&c).unwrap(),
                idempotency_key: k,
                buyer_id: BuyerId::parse(&b).unwrap(),
                orders: orders
                    .into_iter()
                    .map(|(order_id, s, amount)| PaymentOrder {
                        order_id,
                        seller_id: SellerId::parse(&s).unwrap(),
                        amount,
                    })
                    .collect(),
                metadata,
            }
            .into()),
        arb_text().prop_map(|rule_set| RiskApproved { rule_set }.into()),
        (arb_text(), arb_text(), arb_text()).prop_map(|(rule_set, rule, reason)| RiskRejected {
            rule_set,
            rule,
            reason
        }
        .into()),
        (arb_order(), any::<i32>()).prop_map(|(order_id, attempt)| OrderExecutionStarted {
            order_id,
            attempt
        }
        .into()),
        (arb_order(), arb_text(), arb_money(), arb_money()).prop_map(
            |(order_id, psp_reference, amount, fee)| OrderSucceeded {
                order_id,
                psp_reference,
                amount,
                fee
            }
            .into()
        ),
        (
            arb_order(),
            any::<bool>(),
            arb_text(),
            arb_text(),
            any::<i32>()
        )
            .prop_map(|(order_id, retryable, code, reason, attempt)| OrderFailed {
                order_id,
                retryable,
                code,
                reason,
                attempt
            }
            .into()),
        (arb_order(), arb_text(), arb_money()).prop_map(|(order_id, psp_reference, amount)| {
            OrderPending {
                order_id,
                psp_reference,
                amount,
            }
            .into()
        }),
        (
            arb_order(),
            arb_text(),
            any::<bool>(),
            arb_money(),
            proptest::option::of(arb_money()),
            proptest::option::of(arb_text())
        )
            .prop_map(
                |(order_id, psp_reference, succeeded, amount, fee, failure_reason)| {
                    OrderSettledByWebhook {
                        order_id,
                        psp_reference,
                        succeeded,
                        amount,
                        fee,
                        failure_reason,
                    }
                    .into()
                }
            ),
        (arb_uuid(), arb_order(), arb_money(), arb_text()).prop_map(
            |(r, order_id, amount, reason)| RefundRequested {
                refund_id: RefundId::from_uuid(r),
                order_id,
                amount,
                reason
            }
            .into()
        ),
        (arb_uuid(), arb_order(), arb_text(), arb_money()).prop_map(
            |(r, order_id, psp_reference, amount)| RefundSucceeded {
                refund_id: RefundId::from_uuid(r),
                order_id,
                psp_reference,
                amount
            }
            .into()
        ),
        (arb_uuid(), arb_order(), arb_text(), arb_text()).prop_map(
            |(r, order_id, code, reason)| RefundFailed {
                refund_id: RefundId::from_uuid(r),
                order_id,
                code,
                reason
            }
            .into()
        ),
        (
            arb_uuid(),
            arb_text(),
            prop::sample::select(DiscrepancyClass::ALL.to_vec()),
            proptest::option::of(arb_text()),
            proptest::option::of(arb_order()),
            proptest::option::of(arb_money()),
            proptest::option::of(arb_money()),
            arb_text()
        )
            .prop_map(
                |(d, run_id, class, psp_reference, order_id, ours, theirs, detail)| {
                    ReconciliationDiscrepancyFound {
                        discrepancy_id: DiscrepancyId::from_uuid(d),
                        run_id,
                        class,
                        psp_reference,
                        order_id,
                        ours,
                        theirs,
                        detail,
                    }
                    .into()
                }
            ),
        (
            arb_uuid(),
            prop::sample::select(ResolutionAction::ALL.to_vec()),
            arb_text(),
            proptest::option::of(arb_money()),
            arb_text()
        )
            .prop_map(|(d, action, reason, adjustment, resolved_by)| {
                ReconciliationDiscrepancyResolved {
                    discrepancy_id: DiscrepancyId::from_uuid(d),
                    action,
                    reason,
                    adjustment,
                    resolved_by,
                }
                .into()
            }),
        (
            (arb_text(), arb_text(), arb_text(), arb_text()),
            (any::<i64>(), any::<i64>(), any::<i64>()),
            prop::collection::btree_map(arb_text(), any::<i64>(), 0..3)
        )
            .prop_map(
                |((run_id, settlement_date, source, file_sha256), (rows, matched, d), counts)| {
                    ReconciliationRunCompleted {
                        run_id,
                        settlement_date,
                        source,
                        file_sha256,
                        rows,
                        matched,
                        discrepancies: d,
                        class_counts: counts,
                    }
                    .into()
                }
            ),
    ]
}

fn arb_envelope() -> impl Strategy<Value = Envelope> {
    (
        arb_event(),
        any::<(u128, u128, Option<u128>, Option<u128>)>(),
        Timestamp::MIN.as_micros()..=Timestamp::MAX.as_micros(),
        arb_text(),
        any::<i32>(),
    )
        .prop_map(|(event, ids, at, producer, schema_version)| Envelope {
            event_id: EventId::from_uuid(Uuid::from_u128(ids.0)),
            occurred_at: Timestamp::from_micros(at),
            payment_id: ids.2.map(|u| PaymentId::from_uuid(Uuid::from_u128(u))),
            correlation_id: CorrelationId::from_uuid(Uuid::from_u128(ids.1)),
            causation_id: ids.3.map(|u| EventId::from_uuid(Uuid::from_u128(u))),
            producer,
            schema_version,
            event,
        })
}

fn map_entries(env: &Envelope) -> usize {
    match &env.event {
        Event::PaymentRequested(e) => e.metadata.len(),
        Event::ReconciliationRunCompleted(e) => e.class_counts.len(),
        _ => 0,
    }
}

/// The direct reader agrees with the generic one: whatever it accepts, the
/// generic reader accepts with the same value; and `decode` is exactly the
/// generic result, error messages included.
fn assert_agree(bytes: &[u8]) -> Result<(), TestCaseError> {
    let generic = paths::decode_generic(bytes);
    if let Some(Ok(direct)) = paths::decode_direct(bytes) {
        prop_assert_eq!(
            Ok(direct),
            generic.clone(),
            "direct accepted {:02x?}",
            bytes
        );
    }
    prop_assert_eq!(avro::decode(bytes), generic);
    Ok(())
}

/// Version 1 of the schema: the current one without the last union branch.
fn v1_fingerprint() -> u64 {
    let (name, json) = avro::HISTORY[0];
    assert_eq!(name, "envelope.v1.avsc");
    avro::fingerprint(json).unwrap()
}

#[test]
fn the_direct_codec_is_in_use() {
    assert!(paths::direct_enabled());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn direct_and_generic_agree_on_every_event_type(env in arb_envelope()) {
        let generic_bytes = paths::encode_generic(&env).unwrap();
        let direct_bytes = paths::encode_direct(&env);
        // Byte for byte, except the order of map entries, which the generic
        // writer takes from a HashMap.
        if map_entries(&env) <= 1 {
            prop_assert_eq!(&direct_bytes, &generic_bytes);
        }
        prop_assert_eq!(direct_bytes.len(), generic_bytes.len());
        for bytes in [&generic_bytes, &direct_bytes] {
            prop_assert_eq!(paths::decode_direct(bytes), Some(Ok(env.clone())));
            prop_assert_eq!(paths::decode_generic(bytes), Ok(env.clone()));
            prop_assert_eq!(avro::decode(bytes), Ok(env.clone()));
        }
        prop_assert_eq!(avro::encode(&env).unwrap(), direct_bytes.clone());

        // The same body under version 1's fingerprint: the same envelope,
        // except the type v1 did not have, which both refuse.
        let mut v1 = direct_bytes;
        v1[2..10].copy_from_slice(&v1_fingerprint().to_le_bytes());
        let generic = paths::decode_generic(&v1);
        prop_assert_eq!(paths::decode_direct(&v1).unwrap().is_ok(), generic.is_ok());
        if env.event_type() == EventType::ReconciliationRunCompleted {
            prop_assert!(generic.is_err());
        } else {
            prop_assert_eq!(generic, Ok(env.clone()));
        }
        assert_agree(&v1)?;
    }

    #[test]
    fn damaged_bytes_never_panic_and_the_paths_agree(
        env in arb_envelope(),
        cut in any::<prop::sample::Index>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        inserted in prop::collection::vec(any::<u8>(), 1..12),
        v1 in any::<bool>(),
    ) {
        let mut bytes = avro::encode(&env).unwrap();
        if v1 {
            bytes[2..10].copy_from_slice(&v1_fingerprint().to_le_bytes());
        }
        // Every truncation point past the header.
        let body_len = bytes.len() - avro::HEADER_LEN;
        let at = avro::HEADER_LEN + cut.index(body_len);
        assert_agree(&bytes[..at])?;
        // Bytes changed in place (lengths, union indexes, varints, UTF-8).
        let mut flipped = bytes.clone();
        for (i, b) in &flips {
            let i = avro::HEADER_LEN + i.index(body_len);
            flipped[i] = *b;
        }
        assert_agree(&flipped)?;
        // Bytes inserted (hostile lengths and counts: 0xff.. varints).
        let mut grown = bytes.clone();
        grown.splice(at..at, inserted.iter().copied());
        assert_agree(&grown)?;
        // Trailing bytes.
        let mut trailing = bytes;
        trailing.extend_from_slice(&inserted);
        assert_agree(&trailing)?;
    }

    #[test]
    fn random_bodies_never_panic_and_the_paths_agree(
        tail in prop::collection::vec(any::<u8>(), 0..300),
        v1 in any::<bool>(),
    ) {
        let fp = if v1 { v1_fingerprint() } else { avro::current_fingerprint() };
        let mut bytes = avro::header(fp).to_vec();
        bytes.extend(tail);
        assert_agree(&bytes)?;
    }
}

/// Hostile lengths and counts: the direct reader refuses them before
/// allocating (the lengths exceed the bytes left), and `decode` gives the
/// generic path's error.
#[test]
fn hostile_lengths_are_errors() {
    let env = samples::one_of_each("shop-1", "k", Timestamp::from_micros(0)).remove(0);
    let bytes = avro::encode(&env).unwrap();
    // The first field is the event id's length (36 -> zig-zag 72).
    assert_eq!(bytes[avro::HEADER_LEN], 72);
    for huge in [
        vec![0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01], // i64::MAX
        vec![0x80, 0x80, 0x80, 0x80, 0x04],                               // 512 MiB
        vec![
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ], // 11 bytes
        vec![0x01],                                                       // -1
    ] {
        let mut b = bytes[..avro::HEADER_LEN].to_vec();
        b.extend_from_slice(&huge);
        b.extend_from_slice(&bytes[avro::HEADER_LEN + 1..]);
        assert!(
            matches!(paths::decode_direct(&b), Some(Err(_))),
            "{huge:02x?}"
        );
        assert!(avro::decode(&b).is_err(), "{huge:02x?}");
    }
    // A PaymentRequested whose orders array claims 2^62 items.
    let mut e = env.clone();
    let Event::PaymentRequested(p) = &mut e.event else {
        unreachable!()
    };
    p.orders.clear();
    p.metadata.clear();
    let bytes = avro::encode(&e).unwrap();
    // The body ends with the empty orders array (0) and the empty map (0).
    assert_eq!(bytes[bytes.len() - 2..], [0, 0]);
    let mut b = bytes[..bytes.len() - 2].to_vec();
    b.extend_from_slice(&[
        0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 0x00, 0x00,
    ]);
    assert!(matches!(paths::decode_direct(&b), Some(Err(_))));
    assert!(avro::decode(&b).is_err());
}

/// The generic reader's leniency on a body cut just before a trailing
/// optional (it reads the missing union as null) is kept by the fallback,
/// so `decode` did not change its answer for such bytes.
#[test]
fn decode_keeps_the_generic_answer_where_the_direct_reader_refuses() {
    let env = samples::one_of_each("shop-1", "k", Timestamp::from_micros(0))
        .into_iter()
        .find(|e| e.event_type() == EventType::OrderSettledByWebhook)
        .unwrap();
    let Event::OrderSettledByWebhook(w) = &env.event else {
        unreachable!()
    };
    assert!(w.failure_reason.is_none());
    let bytes = avro::encode(&env).unwrap();
    let cut = &bytes[..bytes.len() - 1];
    assert!(matches!(paths::decode_direct(cut), Some(Err(_))));
    assert_eq!(avro::decode(cut), paths::decode_generic(cut));
}

#[test]
fn metadata_with_many_entries_round_trips_in_any_order() {
    let mut env = samples::one_of_each("shop-1", "k", Timestamp::from_micros(0)).remove(0);
    let Event::PaymentRequested(p) = &mut env.event else {
        unreachable!()
    };
    p.metadata = (0..50)
        .map(|i| (format!("k{i}"), format!("v{i}")))
        .collect::<BTreeMap<_, _>>();
    let generic = paths::encode_generic(&env).unwrap();
    assert_eq!(paths::decode_direct(&generic), Some(Ok(env.clone())));
    assert_eq!(paths::decode_generic(&paths::encode_direct(&env)), Ok(env));
}
