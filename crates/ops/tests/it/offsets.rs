//! `offsets show/reset`: every target computed right, clamping, execution,
//! default topics, refusal while the group is active.

use crate::harness::*;
use ops::groups::{self, Target};
use projections::Projection;
use std::collections::BTreeMap;
use testkit::TestKafka;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_targets() {
    let k = TestKafka::new(3).await;
    let base_ms: i64 = 1_700_000_000_000;
    let mut envs = history(&k.unique, 12, 0).envs;
    // Distinct, increasing record timestamps, produced in order so every
    // partition's timestamps increase with its offsets.
    for (i, e) in envs.iter_mut().enumerate() {
        e.occurred_at =
            events::Timestamp::from_micros((base_ms + i64::try_from(i).unwrap() * 10) * 1000);
    }
    for e in &envs {
        k.producer.append(e).await.expect("append");
    }
    let topics = ops::projection::projection_topics(&k.cfg);
    let group = k.group("offsets");
    assert!(
        groups::committed_topics(&k.cfg, &group)
            .await
            .unwrap()
            .is_empty()
    );

    let earliest = groups::plan(&k.cfg, &group, &topics, &Target::Earliest)
        .await
        .unwrap();
    assert_eq!(earliest.len(), 6);
    assert!(
        earliest
            .iter()
            .all(|r| r.current.is_none() && r.target == r.low)
    );
    let total: i64 = earliest.iter().map(|r| r.high - r.low).sum();
    assert_eq!(total, i64::try_from(envs.len()).unwrap());

    // --to-offset 2, clamped to each partition's range; executed.
    let two = groups::plan(&k.cfg, &group, &topics, &Target::Offset(2))
        .await
        .unwrap();
    for r in &two {
        assert_eq!(r.target, 2.clamp(r.low, r.high), "{r:?}");
    }
    groups::execute(&k.cfg, &group, &two).await.unwrap();
    let now = groups::offsets(&k.cfg, &group, &topics).await.unwrap();
    for r in &two {
        let o = now
            .iter()
            .find(|o| o.topic == r.topic && o.partition == r.partition)
            .unwrap();
        assert_eq!(o.committed, Some(r.target));
    }
    let committed = groups::committed_topics(&k.cfg, &group).await.unwrap();
    for t in &topics {
        assert!(committed.contains(t), "{committed:?}");
    }

    let shift_back = groups::plan(&k.cfg, &group, &topics, &Target::ShiftBy(-1))
        .await
        .unwrap();
    for r in &shift_back {
        let cur = r.current.unwrap();
        assert_eq!(r.target, (cur - 1).max(r.low), "{r:?}");
    }
    let shift_far = groups::plan(&k.cfg, &group, &topics, &Target::ShiftBy(1000))
        .await
        .unwrap();
    assert!(shift_far.iter().all(|r| r.target == r.high));
    let negative = groups::plan(&k.cfg, &group, &topics, &Target::Offset(-5))
        .await
        .unwrap();
    assert!(negative.iter().all(|r| r.target == r.low));
    let latest = groups::plan(&k.cfg, &group, &topics, &Target::Latest)
        .await
        .unwrap();
    assert!(
        latest
            .iter()
            .all(|r| r.target == r.high && r.current.is_some())
    );

    // --to-datetime: per partition the first offset stamped at or after T,
    // T exactly a record's timestamp (so ≥ versus > matters).
    let t = base_ms + 50;
    let mut expected: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for topic in &topics {
        let n = earliest
            .iter()
            .filter(|r| &r.topic == topic)
            .map(|r| usize::try_from(r.high - r.low).unwrap())
            .sum();
        for rec in testkit::read_topic(&k.cfg, topic, n).await {
            if rec.timestamp_ms.unwrap() >= t {
                let e = expected
                    .entry((rec.topic.clone(), rec.partition))
                    .or_insert(rec.offset);
                *e = (*e).min(rec.offset);
            }
        }
    }
    let by_time = groups::plan(&k.cfg, &group, &topics, &Target::Datetime(t))
        .await
        .unwrap();
    for r in &by_time {
        let want = expected
            .get(&(r.topic.clone(), r.partition))
            .copied()
            .unwrap_or(r.high);
        assert_eq!(r.target, want, "{r:?}");
    }
    assert!(
        by_time
            .iter()
            .any(|r| r.target > r.low && r.target < r.high),
        "{by_time:?}"
    );
    groups::execute(&k.cfg, &group, &by_time).await.unwrap();
    let now = groups::offsets(&k.cfg, &group, &topics).await.unwrap();
    for r in &by_time {
        let o = now
            .iter()
            .find(|o| o.topic == r.topic && o.partition == r.partition)
            .unwrap();
        assert_eq!(o.committed, Some(r.target));
        assert_eq!(o.lag(), r.high - r.target);
    }
    let text = groups::render_plan(&by_time);
    assert!(text.contains("NEW-OFFSET"), "{text}");

    // A member in the group: refused, nothing moved.
    let (db, _url, _dir) = fresh_db(Backend::Sqlite).await;
    let live = start_live(&k.cfg, &db, Projection::Ledger, &group);
    wait_caught_up(&k.cfg, &group).await;
    wait_active(&k.cfg, &group).await;
    let e = groups::execute(&k.cfg, &group, &earliest)
        .await
        .unwrap_err();
    // As the binary prints it (`error: {e:#}`): with its causes.
    let e = anyhow::Error::from(e);
    assert!(
        format!("{e:#}").contains("stop its consumers first"),
        "{e:#}"
    );
    let now = groups::offsets(&k.cfg, &group, &topics).await.unwrap();
    assert!(now.iter().all(|o| o.lag() == 0), "{now:?}");
    live.stop().await;
    wait_inactive(&k.cfg, &group).await;
    groups::execute(&k.cfg, &group, &earliest).await.unwrap();
    let now = groups::offsets(&k.cfg, &group, &topics).await.unwrap();
    assert!(now.iter().all(|o| o.committed == Some(o.low)), "{now:?}");
}

#[test]
fn cli_targets_parse() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: ops::OffsetsCommand,
    }
    let parse = |args: &[&str]| Cli::try_parse_from(args).map(|c| c.cmd);
    match parse(&["x", "reset", "--group", "g", "--shift-by", "-3"]).unwrap() {
        ops::OffsetsCommand::Reset { target, mode, .. } => {
            assert_eq!(target.target().unwrap(), Target::ShiftBy(-3));
            assert!(!mode.execute);
        }
        other => panic!("{other:?}"),
    }
    match parse(&[
        "x",
        "reset",
        "--group",
        "g",
        "--to-datetime",
        "2023-11-14T22:13:20Z",
        "--execute",
    ])
    .unwrap()
    {
        ops::OffsetsCommand::Reset { target, mode, .. } => {
            assert_eq!(
                target.target().unwrap(),
                Target::Datetime(1_700_000_000_000)
            );
            assert!(mode.execute);
        }
        other => panic!("{other:?}"),
    }
    assert!(
        parse(&["x", "reset", "--group", "g"]).is_err(),
        "a target is required"
    );
    assert!(parse(&["x", "reset", "--group", "g", "--to-earliest", "--to-latest"]).is_err());
    assert!(
        parse(&[
            "x",
            "reset",
            "--group",
            "g",
            "--to-earliest",
            "--execute",
            "--dry-run"
        ])
        .is_err()
    );
    let bad = match parse(&["x", "reset", "--group", "g", "--to-datetime", "yesterday"]).unwrap() {
        ops::OffsetsCommand::Reset { target, .. } => target.target().unwrap_err(),
        other => panic!("{other:?}"),
    };
    assert!(format!("{bad:#}").contains("RFC 3339"), "{bad:#}");
}
