//! fastavro (Python) reads what paystream wrote to the broker, and
//! paystream reads what fastavro wrote, with nothing but schemas/.

use crate::harness::*;
use events::{EventType, TopicKind, avro, json};
use serde_json::{Value, json};
use std::io::Write;
use std::process::{Command, Stdio};

fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn python(mode: &str, input: &str) -> String {
    let root = repo_root();
    let python = std::env::var("PAYSTREAM_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut child = Command::new(&python)
        .arg(root.join("scripts/interop/fastavro_interop.py"))
        .arg(mode)
        .arg(root.join("schemas"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {python} (needs fastavro: pip install fastavro): {e}")
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "fastavro script failed (is fastavro installed? .ci/run installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn fastavro_decodes_events_paystream_produced_to_the_broker() {
    let k = TestKafka::new(1).await;
    let sent = k.samples("interop");
    for e in &sent {
        k.producer.append(e).await.unwrap();
    }
    let n_payments = sent
        .iter()
        .filter(|e| k.topology.topic_for(e) == k.topic(TopicKind::Payments))
        .count();
    let mut raw = read_topic(&k.cfg, &k.topic(TopicKind::Payments), n_payments).await;
    raw.extend(
        read_topic(
            &k.cfg,
            &k.topic(TopicKind::Reconciliation),
            sent.len() - n_payments,
        )
        .await,
    );
    let input: String = raw.iter().map(|r| hex(&r.payload) + "\n").collect();
    let decoded: Vec<Value> = python("decode", &input)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(decoded.len(), sent.len());
    let mut seen = Vec::new();
    for d in decoded {
        let env = sent
            .iter()
            .find(|e| e.event_id.to_string() == d["event_id"])
            .unwrap_or_else(|| panic!("fastavro decoded an unknown event {d}"));
        assert_eq!(d["event_type"], env.event_type().as_str());
        assert_eq!(d["occurred_at"], env.occurred_at.as_micros());
        assert_eq!(d["payment_id"], env.payment_id.unwrap().to_string());
        assert_eq!(d["correlation_id"], env.correlation_id.to_string());
        assert_eq!(d["producer"], env.producer);
        assert_eq!(
            d["payload"],
            json::payload(&env.event),
            "{}",
            env.event_type()
        );
        seen.push(env.event_type());
    }
    seen.sort();
    let mut all = EventType::ALL.to_vec();
    all.sort();
    assert_eq!(seen, all);
}

#[test]
fn paystream_decodes_an_event_fastavro_encoded() {
    let record = json!({
        "event_id": "0196a1b2-0000-7000-8000-000000000001",
        "event_type": "PaymentRequested",
        "schema_version": 1,
        "occurred_at": 1_764_000_000_123_456i64,
        "payment_id": "0196a1b2-0000-7000-8000-000000000002",
        "correlation_id": "0196a1b2-0000-7000-8000-000000000003",
        "causation_id": null,
        "producer": "python-upstream/1.0",
        "payload": ["paystream.events.PaymentRequested", {
            "client_id": "shop-py",
            "idempotency_key": "k-1",
            "buyer_id": "buyer-1",
            "orders": [{"order_id": "0196a1b2-0000-7000-8000-000000000004", "seller_id": "seller-1",
                        "amount": {"amount_minor": 1999, "currency": "JPY"}}],
            "metadata": {"source": "python"}
        }]
    });
    let out = python("encode", &record.to_string());
    let bytes: Vec<u8> = (0..out.trim().len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&out.trim()[i..i + 2], 16).unwrap())
        .collect();
    assert_eq!(
        avro::read_header(&bytes).unwrap(),
        avro::current_fingerprint(),
        "fingerprints agree"
    );
    let env = avro::decode(&bytes).unwrap();
    assert_eq!(env.event_type(), EventType::PaymentRequested);
    assert_eq!(env.occurred_at.as_micros(), 1_764_000_000_123_456);
    assert_eq!(env.producer, "python-upstream/1.0");
    let events::Event::PaymentRequested(p) = env.event else {
        unreachable!()
    };
    assert_eq!(
        p.orders[0].amount,
        events::Money::new(1999, events::Currency::JPY)
    );
    assert_eq!(p.metadata.get("source").map(String::as_str), Some("python"));
}
