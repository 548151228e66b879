//! Event model and Avro wire-format tests (no I/O beyond reading schemas/).

use events::avro::{self, DecodeError};
use events::samples;
use events::*;
use proptest::prelude::*;

mod direct;
use std::collections::BTreeMap;

fn start() -> Timestamp {
    Timestamp::from_micros(1_764_000_000_123_456)
}

#[test]
fn every_event_type_round_trips_through_avro() {
    let all = samples::one_of_each("shop-1", "key-1", start());
    let types: Vec<_> = all.iter().map(Envelope::event_type).collect();
    assert_eq!(
        types,
        EventType::ALL,
        "samples cover every event type in union order"
    );
    for env in &all {
        let bytes = avro::encode(env).unwrap();
        assert_eq!(bytes[..2], [0xC3, 0x01]);
        assert_eq!(bytes[2..10], avro::current_fingerprint().to_le_bytes());
        assert_eq!(&avro::decode(&bytes).unwrap(), env, "{}", env.event_type());
    }
}

#[test]
fn schema_union_order_matches_event_types() {
    let schema: serde_json::Value = serde_json::from_str(avro::ENVELOPE_SCHEMA_JSON).unwrap();
    let payload = schema["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "payload")
        .unwrap();
    let names: Vec<&str> = payload["type"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    let ours: Vec<&str> = EventType::ALL.iter().map(EventType::as_str).collect();
    assert_eq!(names, ours);
}

#[test]
fn every_history_schema_is_registered_and_readable() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../schemas/history");
    let mut on_disk: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    on_disk.retain(|n| n.ends_with(".avsc"));
    on_disk.sort();
    let mut listed: Vec<String> = avro::HISTORY.iter().map(|(n, _)| (*n).to_owned()).collect();
    listed.sort();
    assert_eq!(
        on_disk, listed,
        "schemas/history and events::avro::HISTORY must list the same files"
    );
    for (name, json) in avro::HISTORY {
        avro::compat::check_backward(json, avro::ENVELOPE_SCHEMA_JSON)
            .unwrap_or_else(|e| panic!("current schema cannot read {name}: {e}"));
    }
}

/// Messages written by a producer on an earlier schema version decode: the
/// union only grew at its end, so a v1 body of an existing event type is
/// the current body under v1's fingerprint.
#[test]
fn events_written_with_every_history_version_still_decode() {
    assert!(!avro::HISTORY.is_empty());
    for (name, json) in avro::HISTORY {
        let old_fp = avro::fingerprint(json).unwrap();
        assert_ne!(old_fp, avro::current_fingerprint(), "{name}");
        let old: serde_json::Value = serde_json::from_str(json).unwrap();
        let old_types = old.to_string();
        for env in samples::one_of_each("shop-1", "history", start()) {
            if !old_types.contains(&format!("\"{}\"", env.event_type().as_str())) {
                continue; // a type the old version did not have
            }
            let mut bytes = avro::encode(&env).unwrap();
            bytes[2..10].copy_from_slice(&old_fp.to_le_bytes());
            let back = avro::decode(&bytes)
                .unwrap_or_else(|e| panic!("{name}: {} does not decode: {e}", env.event_type()));
            assert_eq!(back, env, "{name}");
        }
    }
    // A fingerprint nobody knows is refused, not guessed.
    let env = samples::one_of_each("shop-1", "history", start()).remove(0);
    let mut bytes = avro::encode(&env).unwrap();
    bytes[2..10].copy_from_slice(&0x0123_4567_89ab_cdefu64.to_le_bytes());
    assert!(matches!(
        avro::decode(&bytes),
        Err(DecodeError::UnknownSchema { .. })
    ));
}

#[test]
fn a_payload_that_contradicts_event_type_is_rejected() {
    // Same-length names keep the Avro framing valid: the body now says
    // "RiskRejected" while its payload branch is an OrderPending.
    let env = samples::one_of_each("shop-1", "k", start()).remove(6);
    assert_eq!(env.event_type(), EventType::OrderPending);
    let mut bytes = avro::encode(&env).unwrap();
    let pos = bytes
        .windows(12)
        .position(|w| w == b"OrderPending")
        .unwrap();
    bytes[pos..pos + 12].copy_from_slice(b"RiskRejected");
    match avro::decode(&bytes) {
        Err(DecodeError::Invalid { field, reason }) => {
            assert_eq!(field, "Envelope.event_type");
            assert!(reason.contains("OrderPending"), "{reason}");
        }
        other => panic!("expected invalid event_type, got {other:?}"),
    }
}

#[test]
fn unknown_currency_on_the_wire_is_an_invalid_field() {
    // Build bytes whose Money carries an unknown currency by encoding a
    // valid event and patching the 3-letter code (same length keeps the
    // Avro framing valid).
    let env = samples::one_of_each("shop-1", "k", start()).remove(4); // OrderSucceeded
    let mut bytes = avro::encode(&env).unwrap();
    let pos = bytes.windows(3).position(|w| w == b"EUR").unwrap();
    bytes[pos..pos + 3].copy_from_slice(b"XXX");
    match avro::decode(&bytes) {
        Err(DecodeError::Invalid { field, reason }) => {
            assert!(field.contains("amount"), "{field}");
            assert!(reason.contains("XXX"), "{reason}");
        }
        other => panic!("expected invalid field, got {other:?}"),
    }
}

#[test]
fn null_schema_single_object_header_matches_the_spec() {
    let fp = avro::fingerprint("\"null\"").unwrap();
    assert_eq!(
        avro::header(fp),
        [0xc3, 0x01, 0x8a, 0x8f, 0x25, 0xcc, 0xe7, 0x24, 0xdd, 0x63]
    );
}

fn arb_money() -> impl Strategy<Value = Money> {
    (
        any::<i64>(),
        prop::sample::select(Currency::all().collect::<Vec<_>>()),
    )
        .prop_map(|(a, c)| Money::new(a, c))
}

fn arb_text() -> impl Strategy<Value = String> {
    "\\PC{0,40}"
}

fn arb_ext_id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._:-]{1,40}"
}

fn arb_event() -> impl Strategy<Value = Event> {
    let oid = any::<u128>().prop_map(|u| OrderId::from_uuid(uuid::Uuid::from_u128(u)));
    prop_oneof![
        (
            arb_ext_id(),
            proptest::option::of(arb_text()),
            arb_ext_id(),
            prop::collection::vec((any::<u128>(), arb_ext_id(), arb_money()), 0..5),
            prop::collection::btree_map(arb_text(), arb_text(), 0..4)
        )
            .prop_map(
                |(c, k, b, orders, metadata): (
                    String,
                    Option<String>,
                    String,
                    Vec<_>,
                    BTreeMap<_, _>
                )| {
                    PaymentRequested {
                        client_id: ClientId::parse(&c).unwrap(),
                        idempotency_key: k,
                        buyer_id: BuyerId::parse(&b).unwrap(),
                        orders: orders
                            .into_iter()
                            .map(|(o, s, amount)| PaymentOrder {
                                order_id: OrderId::from_uuid(uuid::Uuid::from_u128(o)),
                                seller_id: SellerId::parse(&s).unwrap(),
                                amount,
                            })
                            .collect(),
                        metadata,
                    }
                    .into()
                }
            ),
        (
            oid.clone(),
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
        (
            oid.clone(),
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
        (
            any::<u128>(),
            proptest::option::of(oid),
            proptest::option::of(arb_money()),
            proptest::option::of(arb_money()),
            prop::sample::select(DiscrepancyClass::ALL.to_vec()),
            arb_text()
        )
            .prop_map(|(d, order_id, ours, theirs, class, detail)| {
                ReconciliationDiscrepancyFound {
                    discrepancy_id: DiscrepancyId::from_uuid(uuid::Uuid::from_u128(d)),
                    run_id: "run".into(),
                    class,
                    psp_reference: None,
                    order_id,
                    ours,
                    theirs,
                    detail,
                }
                .into()
            }),
    ]
}

proptest! {
    #[test]
    fn random_envelopes_round_trip(
        event in arb_event(),
        ids in any::<(u128, u128, Option<u128>, Option<u128>)>(),
        // Events carry instants within the years 0000..=9999 only.
        at in Timestamp::MIN.as_micros()..=Timestamp::MAX.as_micros(),
        producer in arb_text(),
    ) {
        let env = Envelope {
            event_id: EventId::from_uuid(uuid::Uuid::from_u128(ids.0)),
            occurred_at: Timestamp::from_micros(at),
            payment_id: ids.2.map(|u| PaymentId::from_uuid(uuid::Uuid::from_u128(u))),
            correlation_id: CorrelationId::from_uuid(uuid::Uuid::from_u128(ids.1)),
            causation_id: ids.3.map(|u| EventId::from_uuid(uuid::Uuid::from_u128(u))),
            producer,
            schema_version: SCHEMA_VERSION,
            event,
        };
        let bytes = avro::encode(&env).unwrap();
        prop_assert_eq!(avro::decode(&bytes).unwrap(), env);
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(tail in prop::collection::vec(any::<u8>(), 0..200)) {
        let mut bytes = avro::header(avro::current_fingerprint()).to_vec();
        bytes.extend(tail);
        let _ = avro::decode(&bytes);
    }
}
