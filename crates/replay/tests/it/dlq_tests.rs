//! `paystream dlq list|show|redrive` end to end: the projections
//! dead-letter a capture whose PaymentRequested is missing (and a poison
//! message), the fix arrives, the redrive books the capture once.

use crate::harness::*;
use events::{Envelope, Event, EventType, TopicKind};
use projections::ProjectionsArgs;
use rdkafka::message::OwnedHeaders;
use replay::{DlqCommand, DlqFilter, ListArgs, RedriveArgs, ShowArgs};
use serde_json::Value;
use storage::Db;
use testkit::{TestKafka, read_topic};
use tokio_util::sync::CancellationToken;

fn list(json: bool, group: Option<String>, kind: Option<&str>) -> DlqCommand {
    DlqCommand::List(ListArgs {
        json,
        filter: DlqFilter {
            group,
            kind: kind.map(str::to_owned),
        },
    })
}

fn redrive(positions: Vec<String>, kind: Option<&str>, execute: bool, force: bool) -> DlqCommand {
    DlqCommand::Redrive(RedriveArgs {
        all: positions.is_empty(),
        positions,
        filter: DlqFilter {
            group: None,
            kind: kind.map(str::to_owned),
        },
        execute,
        force,
        json: true,
    })
}

fn pick(evs: &[Envelope], t: EventType) -> Envelope {
    evs.iter().find(|e| e.event_type() == t).unwrap().clone()
}

async fn redrive_end_to_end(backend: Backend) {
    let k = TestKafka::new(2).await;
    let (url, _dir) = fresh_url(backend).await;
    let payments = k.topic(TopicKind::Payments);
    let dlq_topic = k.topic(TopicKind::DeadLetter);
    let story = k.samples("redrive");
    let request = pick(&story, EventType::PaymentRequested);
    let capture = pick(&story, EventType::OrderSucceeded);
    let Event::OrderSucceeded(captured) = &capture.event else {
        unreachable!()
    };

    let pa = ProjectionsArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        ledger_group: Some(k.group("ledger")),
        wallet_group: Some(k.group("wallet")),
        batch_size: 50,
    };
    let groups = vec![k.group("ledger"), k.group("wallet")];
    let stop = CancellationToken::new();
    let server = {
        let (cfg, url, pa, stop) = (k.cfg.clone(), url.clone(), pa.clone(), stop.clone());
        tokio::spawn(async move { projections::serve(cfg, &url, pa, stop).await })
    };

    // The capture before its request, and a poison message: both
    // projections dead-letter both.
    k.producer.append(&capture).await.unwrap();
    k.producer
        .send_raw(
            &payments,
            Some(b"poison"),
            Some(b"hello, not avro"),
            OwnedHeaders::new(),
            None,
        )
        .await
        .unwrap();
    read_topic(&k.cfg, &dlq_topic, 4).await;
    let db = Db::connect(&url).await.unwrap();

    // list --json: reasons, kinds, origins, groups, events; counts by kind.
    let (code, out) = dlq(&k.cfg, &url, list(true, None, None)).await;
    assert!(code.success());
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["total"], 4);
    assert_eq!(v["counts"]["unknown_order"], 2);
    assert_eq!(v["counts"]["not_single_object"], 2);
    let letters = v["dead_letters"].as_array().unwrap();
    let mut capture_positions = Vec::new();
    let mut poison_position = None;
    for d in letters {
        assert_eq!(d["original_topic"], payments.as_str());
        assert!(d["original_offset"].is_i64() && d["original_partition"].is_i64());
        assert!(
            groups.iter().any(|g| d["consumer_group"] == g.as_str()),
            "{d}"
        );
        assert!(d["failed_at"].is_string() && d["reason"].is_string());
        match d["error_kind"].as_str().unwrap() {
            "unknown_order" => {
                assert_eq!(d["event_id"], capture.event_id.to_string());
                assert_eq!(d["event_type"], "OrderSucceeded");
                capture_positions.push(d["position"].as_str().unwrap().to_owned());
            }
            "not_single_object" => {
                assert!(d["event_id"].is_null() && d["decode_error"].is_string());
                poison_position = Some(d["position"].as_str().unwrap().to_owned());
            }
            other => panic!("unexpected kind {other}"),
        }
    }
    // Filters.
    let (_, out) = dlq(
        &k.cfg,
        &url,
        list(true, Some(k.group("ledger")), Some("not_single_object")),
    )
    .await;
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["total"], 1);
    assert_eq!(v["dead_letters"][0]["consumer_group"], k.group("ledger"));
    // Human form: one line per dead letter, then the counts.
    let (_, out) = dlq(&k.cfg, &url, list(false, None, None)).await;
    assert_eq!(
        out.lines().filter(|l| l.contains(&payments)).count(),
        4,
        "{out}"
    );
    assert!(
        out.contains("dead letters by kind:") && out.contains("  unknown_order\t2"),
        "{out}"
    );
    assert!(out.contains("  total\t4"), "{out}");

    // replay --topic dlq: the decodable dead letters with what their dlq.*
    // headers say; the poison counted as undecodable.
    let (lines, s) = jsonl(&k.cfg, &args(&["dlq"])).await;
    assert_eq!((s.read, s.written, s.undecodable), (4, 2, 2));
    for l in &lines {
        assert_eq!(l["event_id"], capture.event_id.to_string());
        assert_eq!(l["topic"], dlq_topic.as_str());
        assert_eq!(l["dlq"]["error_kind"], "unknown_order");
        assert_eq!(l["dlq"]["original_topic"], payments.as_str());
    }

    // show: the poison as a hex dump, the capture decoded.
    let show = |position: &str, json: bool| {
        DlqCommand::Show(ShowArgs {
            position: position.to_owned(),
            json,
        })
    };
    let (_, out) = dlq(
        &k.cfg,
        &url,
        show(poison_position.as_deref().unwrap(), false),
    )
    .await;
    assert!(out.contains("00000000  68 65 6c 6c 6f 2c 20 6e"), "{out}");
    assert!(out.contains("|hello, not avro|"), "{out}");
    assert!(out.contains("dlq.error_kind: not_single_object"), "{out}");
    assert!(out.contains("key: poison"), "{out}");
    let (_, out) = dlq(&k.cfg, &url, show(&capture_positions[0], true)).await;
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["event"], events::json::envelope(&capture));
    assert!(v["payload_hex"].is_null());
    assert!(
        v["headers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["key"] == "paystream.event_id" && h["value"] == capture.event_id.to_string())
    );
    let mut out = Vec::new();
    let missing = replay::dlq_to(&k.cfg, &url, &show("0:999999", false), &mut out).await;
    assert!(format!("{:#}", missing.unwrap_err()).contains("no dead letter at 0:999999"));

    // The fix: the PaymentRequested arrives and is applied.
    k.producer.append(&request).await.unwrap();
    wait_count(
        &db,
        &format!(
            "SELECT COUNT(*) FROM projection_orders WHERE order_id = '{}'",
            captured.order_id
        ),
        2,
    )
    .await;
    let booked = format!(
        "SELECT COUNT(*) FROM ledger_transactions WHERE event_id = '{}'",
        capture.event_id
    );
    assert_eq!(count(&db, &booked).await, 0);
    let before = high_total(&k.cfg, &payments);

    // A named position that --kind filters out is reported, not dropped.
    let (code, out) = dlq(
        &k.cfg,
        &url,
        redrive(
            vec![poison_position.clone().unwrap()],
            Some("unknown_order"),
            true,
            false,
        ),
    )
    .await;
    assert!(code.success(), "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["dead_letters"][0]["plan"], "filtered_out", "{v}");
    assert_eq!(
        (v["produced"].as_i64(), v["skipped"].as_i64()),
        (Some(0), Some(1))
    );
    assert_eq!(high_total(&k.cfg, &payments), before);

    // Dry run: a plan, nothing produced. The two groups' dead letters are
    // one message: one is produced, the other goes with it.
    let (code, out) = dlq(
        &k.cfg,
        &url,
        redrive(vec![], Some("unknown_order"), false, false),
    )
    .await;
    assert!(code.success());
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["dry_run"], true);
    let plans: Vec<&str> = v["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["plan"].as_str().unwrap())
        .collect();
    assert_eq!(plans, ["produce", "same_message"], "{v}");
    assert_eq!(high_total(&k.cfg, &payments), before);

    // Redrive: produced to the original topic, the ledger books it once.
    let (code, out) = dlq(
        &k.cfg,
        &url,
        redrive(vec![], Some("unknown_order"), true, false),
    )
    .await;
    assert!(code.success(), "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["produced"], 1, "{v}");
    let results = v["results"].as_array().unwrap();
    assert_eq!(results[0]["produced"]["topic"], payments.as_str());
    assert_eq!(results[1]["result"], "skipped");
    assert_eq!(results[1]["recorded_with"], results[0]["position"]);
    assert_eq!(high_total(&k.cfg, &payments), before + 1);
    wait_count(&db, &booked, 1).await;
    for g in &groups {
        wait_caught_up(&k.cfg, g, std::slice::from_ref(&payments)).await;
    }
    assert_eq!(count(&db, &booked).await, 1);
    assert_eq!(
        count(
            &db,
            &format!(
                "SELECT COUNT(*) FROM applied_events WHERE event_id = '{}' AND outcome = 'applied'",
                capture.event_id
            )
        )
        .await,
        2
    );
    // Nothing new was dead-lettered: the second copy was a duplicate.
    assert_eq!(high_total(&k.cfg, &dlq_topic), 4);
    // The redriven message: original key and bytes, original headers
    // without dlq.*, plus where it came from.
    let all = read_topic(&k.cfg, &payments, usize::try_from(before + 1).unwrap()).await;
    let copies: Vec<_> = all
        .iter()
        .filter(|r| r.header(replay::H_REDRIVEN_FROM).is_some())
        .collect();
    assert_eq!(copies.len(), 1);
    let original = all
        .iter()
        .find(|r| {
            r.header(replay::H_REDRIVEN_FROM).is_none()
                && r.header("paystream.event_id") == Some(capture.event_id.to_string().as_str())
        })
        .unwrap();
    for c in &copies {
        assert_eq!(c.payload, original.payload);
        assert_eq!(c.key, original.key);
        assert_eq!(c.timestamp_ms, original.timestamp_ms);
        assert!(c.headers.iter().all(|(k, _)| !k.starts_with("dlq.")));
        let from = c.header(replay::H_REDRIVEN_FROM).unwrap();
        assert!(
            capture_positions
                .iter()
                .any(|p| from == format!("{dlq_topic}:{p}")),
            "{from}"
        );
        let mut without: Vec<_> = c
            .headers
            .iter()
            .filter(|(k, _)| k != replay::H_REDRIVEN_FROM)
            .cloned()
            .collect();
        without.sort();
        let mut want = original.headers.clone();
        want.sort();
        assert_eq!(without, want);
    }

    // Again: already redriven, nothing produced.
    let (code, out) = dlq(
        &k.cfg,
        &url,
        redrive(vec![], Some("unknown_order"), true, false),
    )
    .await;
    assert!(code.success());
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["produced"].as_i64(), v["skipped"].as_i64()),
        (Some(0), Some(2)),
        "{v}"
    );
    assert!(
        v["dead_letters"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["plan"] == "already_redriven")
    );
    assert_eq!(high_total(&k.cfg, &payments), before + 1);
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM replay_redrives WHERE state = 'produced' AND redrives = 1"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM replay_redrives WHERE state = 'produced' AND redrives = 0 AND same_as_offset IS NOT NULL"
        )
        .await,
        1
    );

    // --force produces again; the consumers deduplicate by event id.
    let (code, out) = dlq(
        &k.cfg,
        &url,
        redrive(vec![capture_positions[0].clone()], None, true, true),
    )
    .await;
    assert!(code.success());
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["produced"], 1, "{v}");
    assert_eq!(high_total(&k.cfg, &payments), before + 2);
    for g in &groups {
        wait_caught_up(&k.cfg, g, std::slice::from_ref(&payments)).await;
    }
    assert_eq!(count(&db, &booked).await, 1);
    assert_eq!(high_total(&k.cfg, &dlq_topic), 4);

    // Bad input: an unknown position is an error before anything happens.
    let mut out = Vec::new();
    let err = replay::dlq_to(
        &k.cfg,
        &url,
        &redrive(vec!["1:424242".into()], None, true, false),
        &mut out,
    )
    .await
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("no dead letter at 1:424242"),
        "{err:#}"
    );

    let report = projections::verify(&db).await;
    assert!(report.is_ok(), "{report}");
    stop.cancel();
    server.await.unwrap().expect("projections stop cleanly");
}

testkit::both!(redrive_end_to_end, redrive_end_to_end);

/// The bytes of the one message at `topic` `partition`@`offset` as the
/// client library hands them over: None for a null value, Some(empty)
/// for an empty one (streaming's reader cannot tell them apart).
fn raw_payload(
    cfg: &streaming::KafkaConfig,
    group: &str,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Option<Vec<u8>> {
    use rdkafka::Message;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if let Some(m) = consumer.poll(std::time::Duration::from_millis(500)) {
            let m = m.unwrap();
            if m.offset() == offset {
                return m.payload().map(<[u8]>::to_vec);
            }
        }
    }
    panic!("no message at {topic} {partition}@{offset}");
}

fn plans(v: &Value) -> Vec<String> {
    v["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["plan"].as_str().unwrap().to_owned())
        .collect()
}

/// A message that keeps failing, dead-lettered by both projections:
/// `redrive --all --execute` produces it once per run at most, and a
/// second run produces nothing (its copy failed again) unless --force.
/// The message's empty payload is produced empty, not null.
async fn still_failing_message_is_not_multiplied(backend: Backend) {
    let k = TestKafka::new(2).await;
    let (url, _dir) = fresh_url(backend).await;
    let payments = k.topic(TopicKind::Payments);
    let dlq_topic = k.topic(TopicKind::DeadLetter);
    let pa = ProjectionsArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        ledger_group: Some(k.group("ledger")),
        wallet_group: Some(k.group("wallet")),
        batch_size: 50,
    };
    let stop = CancellationToken::new();
    let server = {
        let (cfg, url, pa, stop) = (k.cfg.clone(), url.clone(), pa.clone(), stop.clone());
        tokio::spawn(async move { projections::serve(cfg, &url, pa, stop).await })
    };
    // An empty payload: not an event, dead-lettered by both groups.
    k.producer
        .send_raw(
            &payments,
            Some(b"empty"),
            Some(b""),
            OwnedHeaders::new(),
            None,
        )
        .await
        .unwrap();
    read_topic(&k.cfg, &dlq_topic, 2).await;
    let before = high_total(&k.cfg, &payments);

    // Run 1: one copy for the two dead letters.
    let (code, out) = dlq(&k.cfg, &url, redrive(vec![], None, true, false)).await;
    assert!(code.success(), "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(plans(&v), ["produce", "same_message"], "{v}");
    assert_eq!(v["produced"], 1, "{v}");
    assert_eq!(high_total(&k.cfg, &payments), before + 1);
    let at = &v["results"][0]["produced"];
    let copy = raw_payload(
        &k.cfg,
        &k.group("raw"),
        &payments,
        i32::try_from(at["partition"].as_i64().unwrap()).unwrap(),
        at["offset"].as_i64().unwrap(),
    );
    assert_eq!(
        copy,
        Some(Vec::new()),
        "an empty payload stays empty, not null"
    );

    // Both groups reject the copy again.
    let letters = read_topic(&k.cfg, &dlq_topic, 4).await;
    let first = v["results"][0]["position"].as_str().unwrap().to_owned();
    assert_eq!(
        letters
            .iter()
            .filter(|r| r.header(replay::H_REDRIVEN_FROM)
                == Some(format!("{dlq_topic}:{first}").as_str()))
            .count(),
        2
    );

    // Run 2: nothing to produce; the copy's dead letters are reported.
    let (code, out) = dlq(&k.cfg, &url, redrive(vec![], None, true, false)).await;
    assert!(code.success(), "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        plans(&v),
        [
            "already_redriven",
            "already_redriven",
            "failed_again",
            "failed_again"
        ],
        "{v}"
    );
    assert_eq!(
        (v["produced"].as_i64(), v["skipped"].as_i64()),
        (Some(0), Some(4))
    );
    assert_eq!(high_total(&k.cfg, &payments), before + 1);

    // Run 3, --force: still one copy per message and run.
    let (code, out) = dlq(&k.cfg, &url, redrive(vec![], None, true, true)).await;
    assert!(code.success(), "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["produced"], 1, "{v}");
    assert_eq!(
        plans(&v),
        [
            "already_redriven",
            "same_message",
            "copy_of_this_run",
            "copy_of_this_run"
        ],
        "{v}"
    );
    assert_eq!(high_total(&k.cfg, &payments), before + 2);
    read_topic(&k.cfg, &dlq_topic, 6).await;

    // The human form names the reasons.
    let mut out = Vec::new();
    let cmd = DlqCommand::Redrive(RedriveArgs {
        all: true,
        ..RedriveArgs::default()
    });
    let code = replay::dlq_to(&k.cfg, &url, &cmd, &mut out).await.unwrap();
    assert!(ExitCodeEq(code).success());
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains("0 to produce"), "{out}");
    assert!(out.contains("already redriven together with"), "{out}");
    assert!(out.contains("that failed again; skipped"), "{out}");

    stop.cancel();
    server.await.unwrap().expect("projections stop cleanly");
}

testkit::both!(
    still_failing_message_is_not_multiplied,
    still_failing_message_is_not_multiplied
);
