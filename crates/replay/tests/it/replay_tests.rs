//! `paystream replay` against the real broker.

use crate::harness::*;
use events::{Envelope, Event, EventType, SellerId, Timestamp, TopicKind, json};
use rdkafka::message::OwnedHeaders;
use replay::{CSV_COLUMNS, Format};
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::Duration;
use testkit::TestKafka;

/// Two sample payments (one event of each type each, on payments and
/// reconciliation), the orders of `x` all sold by seller-x and those of `y`
/// by seller-y; plus one poison message on payments.
async fn two_payments(k: &TestKafka) -> (Vec<Envelope>, Vec<Envelope>) {
    let with_seller = |mut evs: Vec<Envelope>, seller: &str| {
        for e in &mut evs {
            if let Event::PaymentRequested(r) = &mut e.event {
                for o in &mut r.orders {
                    o.seller_id = SellerId::parse(seller).unwrap();
                }
            }
        }
        evs
    };
    let x = with_seller(k.samples("x"), "seller-x");
    let y = with_seller(k.samples("y"), "seller-y");
    for e in x.iter().chain(&y) {
        k.producer.append(e).await.unwrap();
    }
    k.producer
        .send_raw(
            &k.topic(TopicKind::Payments),
            Some(b"poison"),
            Some(b"hello, not avro"),
            OwnedHeaders::new(),
            None,
        )
        .await
        .unwrap();
    (x, y)
}

fn ids(lines: &[Value]) -> BTreeSet<String> {
    lines
        .iter()
        .map(|l| l["event_id"].as_str().unwrap().to_owned())
        .collect()
}

fn ids_of<'a>(evs: impl IntoIterator<Item = &'a Envelope>) -> BTreeSet<String> {
    evs.into_iter().map(|e| e.event_id.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_select_exactly_the_matching_events() {
    let k = TestKafka::new(2).await;
    let (x, y) = two_payments(&k).await;
    let all: Vec<&Envelope> = x.iter().chain(&y).collect();
    let both = ["payments", "reconciliation"];

    // Everything, short names resolved with the prefix; the poison message
    // is counted, not silently dropped.
    let (lines, s) = jsonl(&k.cfg, &args(&both)).await;
    assert_eq!(ids(&lines), ids_of(all.iter().copied()));
    assert_eq!(lines.len(), all.len());
    let n = u64::try_from(all.len()).unwrap();
    assert_eq!((s.read, s.undecodable, s.written), (n + 1, 1, n));
    assert_eq!(s.undecodable_by_kind.get("not_single_object"), Some(&1));
    for l in &lines {
        let e = all
            .iter()
            .find(|e| e.event_id.to_string() == l["event_id"])
            .unwrap();
        // The envelope as events::json renders it, plus the position.
        let mut want = json::envelope(e);
        for key in ["topic", "partition", "offset", "timestamp", "timestamp_ms"] {
            want[key] = l[key].clone();
        }
        assert_eq!(l, &want);
        assert_eq!(l["topic"], k.topology.topic_for(e));
        assert_eq!(l["timestamp_ms"], e.occurred_at.as_millis());
    }
    // Full names work too.
    let full = k.topic(TopicKind::Reconciliation);
    let (rec_only, _) = jsonl(&k.cfg, &args(&[full.as_str()])).await;
    let on_reconciliation = all
        .iter()
        .filter(|e| k.topology.topic_for(e) == full)
        .count();
    assert!(on_reconciliation >= 4);
    assert_eq!(rec_only.len(), on_reconciliation);
    assert!(rec_only.iter().all(|l| l["topic"] == full.as_str()));

    // --payment
    let mut a = args(&both);
    a.payments = vec![x[0].payment_id.unwrap().to_string()];
    let (lines, _) = jsonl(&k.cfg, &a).await;
    assert_eq!(
        ids(&lines),
        ids_of(x.iter().filter(|e| e.payment_id == x[0].payment_id))
    );

    // --type (repeatable)
    let mut a = args(&both);
    a.types = vec![
        "OrderSucceeded".into(),
        "ReconciliationDiscrepancyFound".into(),
    ];
    let (lines, _) = jsonl(&k.cfg, &a).await;
    let want = ids_of(all.iter().copied().filter(|e| {
        matches!(
            e.event_type(),
            EventType::OrderSucceeded | EventType::ReconciliationDiscrepancyFound
        )
    }));
    assert_eq!(want.len(), 4);
    assert_eq!(ids(&lines), want);

    // --seller: every event of x concerns seller-x (its orders, its
    // payment's risk decisions, the discrepancy on its order) but the
    // settlement run's summary, none of y; reconciliation named first
    // still works (payments are read first).
    let mut a = args(&["reconciliation", "payments"]);
    a.seller = Some("seller-x".into());
    let (lines, _) = jsonl(&k.cfg, &a).await;
    let want = ids_of(
        x.iter()
            .filter(|e| e.event_type() != EventType::ReconciliationRunCompleted),
    );
    assert_eq!(want.len(), 13);
    assert_eq!(ids(&lines), want);
    // Combined with --type.
    a.types = vec!["RefundRequested".into()];
    let (lines, _) = jsonl(&k.cfg, &a).await;
    assert_eq!(
        ids(&lines),
        ids_of(
            x.iter()
                .filter(|e| e.event_type() == EventType::RefundRequested)
        )
    );

    // Offsets: [1, 3) in every partition, exactly.
    let (everything, _) = jsonl(&k.cfg, &args(&["payments"])).await;
    let mut a = args(&["payments"]);
    a.from = Some("offset:1".into());
    a.to = Some("offset:3".into());
    let (lines, s) = jsonl(&k.cfg, &a).await;
    let want: BTreeSet<String> = everything
        .iter()
        .filter(|l| (1..3).contains(&l["offset"].as_i64().unwrap()))
        .map(|l| l["event_id"].as_str().unwrap().to_owned())
        .collect();
    assert!(!want.is_empty());
    assert_eq!(ids(&lines), want);
    assert!(s.read <= 4, "read only [1, 3) of 2 partitions: {s:?}");

    // Bad input: clear errors.
    for (field, bad) in [("from", "yesterday"), ("type", "Nope"), ("payment", "123")] {
        let mut a = args(&["payments"]);
        match field {
            "from" => a.from = Some(bad.into()),
            "type" => a.types = vec![bad.into()],
            _ => a.payments = vec![bad.into()],
        }
        let mut out = Vec::new();
        // With its causes, as the binary prints it (`error: {e:#}`).
        let err = anyhow::Error::from(
            replay::replay_summary(&k.cfg, &a, &mut out)
                .await
                .unwrap_err(),
        );
        assert!(format!("{err:#}").contains(bad), "{err:#}");
    }

    // --strict fails on the poison message, naming where it is.
    let mut a = args(&["payments"]);
    a.strict = true;
    let mut out = Vec::new();
    let err = replay::replay_summary(&k.cfg, &a, &mut out)
        .await
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("undecodable message at") && msg.contains("not_single_object"),
        "{msg}"
    );
}

/// Two phases of events a pause apart; cuts by record timestamp are exact
/// at both ends (`--from` inclusive, `--to` exclusive).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamp_cuts_are_exact() {
    let k = TestKafka::new(3).await;
    let mut produced: Vec<Envelope> = Vec::new();
    for phase in ["early", "late"] {
        for i in 0..4 {
            // Real, distinct times: one sample payment after another.
            for mut e in k.samples(&format!("{phase}-{i}")) {
                e.occurred_at = Timestamp::now();
                k.producer.append(&e).await.unwrap();
                produced.push(e);
            }
        }
        if phase == "early" {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
    }
    let both = ["payments", "reconciliation"];
    let (everything, _) = jsonl(&k.cfg, &args(&both)).await;
    assert_eq!(everything.len(), produced.len());
    let ts = |l: &Value| l["timestamp_ms"].as_i64().unwrap();
    let mut times: Vec<i64> = everything.iter().map(ts).collect();
    times.sort_unstable();
    times.dedup();
    // The pause: the first late event.
    let half = produced.len() / 2;
    let cut = produced[half].occurred_at.as_millis();
    assert!(produced[half - 1].occurred_at.as_millis() + 1000 < cut);

    let select = |from: Option<i64>, to: Option<i64>| -> BTreeSet<String> {
        everything
            .iter()
            .filter(|l| from.is_none_or(|f| ts(l) >= f) && to.is_none_or(|t| ts(l) < t))
            .map(|l| l["event_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let run_cut = |from: Option<String>, to: Option<String>| {
        let mut a = args(&both);
        a.from = from;
        a.to = to;
        a
    };
    // At the pause, as ms and as RFC 3339.
    let (late, s) = jsonl(&k.cfg, &run_cut(Some(cut.to_string()), None)).await;
    assert_eq!(ids(&late), ids_of(&produced[half..]));
    assert_eq!(s.written, u64::try_from(produced.len() - half).unwrap());
    let rfc = events::Timestamp::from_micros(cut * 1000).to_string();
    let (early, _) = jsonl(&k.cfg, &run_cut(None, Some(rfc))).await;
    assert_eq!(ids(&early), ids_of(&produced[..half]));
    // Inside a phase, at record timestamps: the bounds are exact.
    for (f, t) in [(3, 9), (1, 2), (5, times.len() - 2)] {
        let (from, to) = (times[f], times[t]);
        let want = select(Some(from), Some(to));
        assert!(!want.is_empty());
        let (lines, _) = jsonl(
            &k.cfg,
            &run_cut(Some(from.to_string()), Some(to.to_string())),
        )
        .await;
        assert_eq!(ids(&lines), want, "[{from}, {to})");
        assert!(lines.iter().all(|l| ts(l) >= from && ts(l) < to));
    }
    // An empty range is an error, not an empty file.
    let mut out = Vec::new();
    let bad = run_cut(Some(cut.to_string()), Some(cut.to_string()));
    assert!(
        replay::replay_summary(&k.cfg, &bad, &mut out)
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_has_fixed_columns_and_rfc4180_quoting() {
    let k = TestKafka::new(2).await;
    let (x, y) = two_payments(&k).await;
    let mut a = args(&["payments", "reconciliation"]);
    a.format = Format::Csv;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.csv");
    a.out = Some(path.clone());
    let code = replay::replay(k.cfg.clone(), a).await.unwrap();
    assert_eq!(
        format!("{code:?}"),
        format!("{:?}", std::process::ExitCode::SUCCESS)
    );
    assert!(!dir.path().join("events.csv.partial").exists());
    let bytes = std::fs::read(&path).unwrap();
    assert!(bytes.windows(2).any(|w| w == b"\r\n"), "CRLF line ends");
    let mut r = csv::Reader::from_reader(bytes.as_slice());
    let header: Vec<String> = r.headers().unwrap().iter().map(str::to_owned).collect();
    assert_eq!(header, CSV_COLUMNS);
    let rows: Vec<csv::StringRecord> = r.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), x.len() + y.len());
    let col = |name: &str| CSV_COLUMNS.iter().position(|c| *c == name).unwrap();
    for row in &rows {
        let e = x
            .iter()
            .chain(&y)
            .find(|e| e.event_id.to_string() == row[col("event_id")])
            .unwrap();
        assert_eq!(&row[col("event_type")], e.event_type().as_str());
        assert_eq!(&row[col("topic")], k.topology.topic_for(e));
        assert_eq!(
            &row[col("payment_id")],
            e.payment_id.map(|p| p.to_string()).unwrap_or_default()
        );
        assert_eq!(&row[col("occurred_at")], e.occurred_at.to_string());
        // The data column is the payload JSON, quotes, commas and UTF-8
        // intact after quoting.
        let data: Value = serde_json::from_str(&row[col("data")]).unwrap();
        assert_eq!(data, json::payload(&e.event));
        if let Event::OrderSucceeded(s) = &e.event {
            assert_eq!(row[col("order_id")], s.order_id.to_string());
            assert_eq!(
                row[col("amount_minor")],
                s.amount.amount_minor().to_string()
            );
            assert_eq!(&row[col("currency")], s.amount.currency().code());
        }
    }
    let raw = String::from_utf8(bytes).unwrap();
    assert!(raw.contains(",\"{\"\""), "JSON quoted per RFC 4180");
    assert!(raw.contains("ünïcode"));
}

fn amounts(v: &Value) -> Vec<i64> {
    let mut out = Vec::new();
    match v {
        Value::Object(m) => {
            if let Some(n) = m.get("amount_minor").and_then(Value::as_i64) {
                out.push(n);
            }
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            for k in keys {
                out.extend(amounts(&m[k]));
            }
        }
        Value::Array(a) => a.iter().for_each(|x| out.extend(amounts(x))),
        _ => {}
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_container_is_read_back_by_fastavro() {
    let k = TestKafka::new(2).await;
    let (x, y) = two_payments(&k).await;
    // Enough events for several blocks.
    let mut many: Vec<Envelope> = Vec::new();
    for i in 0..90 {
        many.extend(k.samples(&format!("bulk-{i}")));
    }
    for chunk in many.chunks(200) {
        for r in futures::future::join_all(chunk.iter().map(|e| k.producer.append(e))).await {
            r.unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.avro");
    let mut a = args(&["payments", "reconciliation"]);
    a.format = Format::Avro;
    a.out = Some(path.clone());
    replay::replay(k.cfg.clone(), a).await.unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[..4], b"Obj\x01");

    let (header, records) = fastavro_read(&path);
    assert_eq!(header["codec"], "null");
    assert!(
        header["schema_name"]
            .as_str()
            .unwrap()
            .ends_with("Envelope"),
        "{header}"
    );
    let sent: Vec<&Envelope> = x.iter().chain(&y).chain(&many).collect();
    assert_eq!(records.len(), sent.len());
    let mut seen = BTreeSet::new();
    for r in &records {
        let id = r["event_id"].as_str().unwrap();
        let e = sent
            .iter()
            .find(|e| e.event_id.to_string() == id)
            .unwrap_or_else(|| panic!("unexpected record {r}"));
        assert!(seen.insert(id.to_owned()), "{id} twice");
        assert_eq!(r["event_type"], e.event_type().as_str());
        assert_eq!(
            r["payment_id"].as_str(),
            e.payment_id.map(|p| p.to_string()).as_deref()
        );
        assert_eq!(r["correlation_id"], e.correlation_id.to_string());
        assert_eq!(r["producer"], e.producer.as_str());
        let want = amounts(&json::payload(&e.event));
        assert_eq!(amounts(&r["payload"]), want, "{r}");
    }
    // The sample's amounts are really compared (not two empty lists).
    assert!(
        records
            .iter()
            .any(|r| amounts(&r["payload"]) == vec![1050, 2500])
    );
}
