//! Reset/rebuild safety: truncated history refused, lagging events still
//! dead-lettered after a rebuild, one run per projection at a time.

use crate::harness::*;
use events::TopicKind;
use ops::lock::RunLock;
use ops::projection::{RunOptions, execute_rebuild, execute_reset, plan_rebuild};
use projections::Projection;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use testkit::TestKafka;

use testkit::read_all;

async fn truncated_history_refused(backend: Backend) {
    let k = TestKafka::new(2).await;
    let (db, url, _dir) = fresh_db(backend).await;
    let h = history(&k.unique, 12, 1_700_000_000_000_000);
    produce_all(&k.producer, &h.envs).await;
    run_live_to_end(&k.cfg, &db).await;
    let payments = k.topic(TopicKind::Payments);
    let lg = k.cfg.topology().group("ledger");
    let topics = ops::projection::projection_topics(&k.cfg);

    // DeleteRecords: partition 0 of payments now starts at offset 3.
    let admin: AdminClient<DefaultClientContext> =
        k.cfg.client_config("ops-test-admin").create().unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&payments, 0, Offset::Offset(3))
        .unwrap();
    let res = admin
        .delete_records(&tpl, &AdminOptions::new())
        .await
        .unwrap();
    for e in res.elements() {
        e.error().unwrap();
    }
    let offs = ops::groups::offsets(&k.cfg, &lg, &topics).await.unwrap();
    let p0 = offs
        .iter()
        .find(|o| o.topic == payments && o.partition == 0)
        .unwrap();
    assert_eq!(p0.low, 3, "{offs:?}");
    let before = snapshot(&db, Projection::Ledger).await;

    let plan = plan_rebuild(&k.cfg, &db, Projection::Ledger, &lg)
        .await
        .unwrap();
    assert_eq!(plan.history_gaps.len(), 1, "{:?}", plan.history_gaps);
    assert!(ops::projection::render_plan(&plan).contains("history incomplete"));
    for e in [
        execute_rebuild(
            &k.cfg,
            &url,
            &db,
            Projection::Ledger,
            &lg,
            50,
            RunOptions::default(),
        )
        .await
        .map(drop)
        .unwrap_err(),
        execute_reset(
            &k.cfg,
            &url,
            &db,
            Projection::Ledger,
            &lg,
            RunOptions::default(),
        )
        .await
        .map(drop)
        .unwrap_err(),
    ] {
        let m = format!("{:#}", anyhow::Error::from(e));
        assert!(
            m.contains(&format!("{payments}/0"))
                && m.contains("3 records")
                && m.contains("--allow-truncated-history"),
            "{m}"
        );
    }
    assert_eq!(
        snapshot(&db, Projection::Ledger).await,
        before,
        "nothing changed"
    );
    assert_eq!(
        ops::groups::offsets(&k.cfg, &lg, &topics).await.unwrap(),
        offs,
        "offsets unchanged"
    );

    // Allowed explicitly: the rebuild reads what is left.
    let allow = RunOptions {
        allow_truncated_history: true,
    };
    let s = execute_rebuild(&k.cfg, &url, &db, Projection::Ledger, &lg, 50, allow)
        .await
        .unwrap();
    assert_eq!(s.events.read, u64::try_from(h.envs.len() - 3).unwrap());
}

testkit::both!(truncated_history_refused, truncated_history_refused);

async fn lag_is_dead_lettered_after_rebuild(backend: Backend) {
    let k = TestKafka::new(3).await;
    let (db, url, _dir) = fresh_db(backend).await;
    let h = history(&k.unique, 15, 1_700_000_000_000_000);
    produce_all(&k.producer, &h.envs).await;
    run_live_to_end(&k.cfg, &db).await;
    // Events the ledger consumers have not reached, a rejected one among them.
    let more = history(&format!("{}-more", k.unique), 6, 1_700_000_100_000_000);
    produce_all(&k.producer, &more.envs).await;
    let stray = more
        .envs
        .iter()
        .rev()
        .find(|e| matches!(e.event, events::Event::RefundSucceeded(_)))
        .map(|e| e.event_id)
        .unwrap();
    let lg = k.cfg.topology().group("ledger");
    let topics = ops::projection::projection_topics(&k.cfg);
    let old = ops::groups::offsets(&k.cfg, &lg, &topics).await.unwrap();
    assert!(old.iter().any(|o| o.lag() > 0), "{old:?}");
    let dlq = k.topic(TopicKind::DeadLetter);
    let dlq_before = read_all(&k.cfg, &dlq).await.len();

    let plan = plan_rebuild(&k.cfg, &db, Projection::Ledger, &lg)
        .await
        .unwrap();
    for r in &plan.offsets {
        assert_eq!(
            r.target,
            r.current.unwrap_or(r.low),
            "old offsets kept: {r:?}"
        );
    }
    let s = execute_rebuild(
        &k.cfg,
        &url,
        &db,
        Projection::Ledger,
        &lg,
        40,
        RunOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(s.events.rejected, 2, "{s:?}");
    // The group keeps its old offsets (below the ends).
    let now = ops::groups::offsets(&k.cfg, &lg, &topics).await.unwrap();
    for (a, b) in old.iter().zip(&now) {
        assert_eq!(
            (a.topic.as_str(), a.partition, a.committed.unwrap_or(a.low)),
            (b.topic.as_str(), b.partition, b.committed.unwrap_or(b.low)),
        );
    }
    let rebuilt = snapshot(&db, Projection::Ledger).await;
    assert_eq!(
        rebuilt["ledger_transactions"].len(),
        h.captures + h.refunds + h.adjustments + more.captures + more.refunds + more.adjustments
    );

    // The live consumer meets the lag: duplicates, and the stored rejection,
    // which it dead-letters.
    let live = start_live(&k.cfg, &db, Projection::Ledger, &lg);
    wait_caught_up(&k.cfg, &lg).await;
    live.stop().await;
    wait_inactive(&k.cfg, &lg).await;
    let dead = testkit::read_topic(&k.cfg, &dlq, dlq_before + 1).await;
    let ids: Vec<events::EventId> = dead
        .iter()
        .filter_map(|r| events::avro::decode(&r.payload).ok())
        .map(|e| e.event_id)
        .collect();
    assert!(ids.contains(&stray), "{ids:?}");
    assert_eq!(
        snapshot(&db, Projection::Ledger).await,
        rebuilt,
        "tables unchanged"
    );
    // The wallets catch up too, then ledger and wallets agree.
    run_live_to_end(&k.cfg, &db).await;
    let report = projections::verify(&db).await;
    assert!(report.is_ok(), "{report}");
}

testkit::both!(
    lag_dead_lettered_after_rebuild,
    lag_is_dead_lettered_after_rebuild
);

async fn one_run_at_a_time(backend: Backend) {
    let k = TestKafka::new(1).await;
    let (db, url, _dir) = fresh_db(backend).await;
    let lg = k.cfg.topology().group("ledger");
    let held = RunLock::acquire(&db, &url, Projection::Ledger)
        .await
        .unwrap();
    for e in [
        execute_reset(
            &k.cfg,
            &url,
            &db,
            Projection::Ledger,
            &lg,
            RunOptions::default(),
        )
        .await
        .map(drop)
        .unwrap_err(),
        execute_rebuild(
            &k.cfg,
            &url,
            &db,
            Projection::Ledger,
            &lg,
            10,
            RunOptions::default(),
        )
        .await
        .map(drop)
        .unwrap_err(),
    ] {
        let m = format!("{:#}", anyhow::Error::from(e));
        assert!(
            m.contains("another rebuild/reset of ledger is running"),
            "{m}"
        );
    }
    // The other projection has its own lock.
    let wallet = RunLock::acquire(&db, &url, Projection::Wallet)
        .await
        .unwrap();
    wallet.release().await.unwrap();
    held.release().await.unwrap();
    // Released: the next run goes through.
    execute_reset(
        &k.cfg,
        &url,
        &db,
        Projection::Ledger,
        &lg,
        RunOptions::default(),
    )
    .await
    .unwrap();
    RunLock::acquire(&db, &url, Projection::Ledger)
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
}

testkit::both!(one_run_at_a_time, one_run_at_a_time);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moved_offsets_are_reported() {
    let k = TestKafka::new(2).await;
    let h = history(&k.unique, 6, 1_700_000_000_000_000);
    produce_all(&k.producer, &h.envs).await;
    let group = k.group("moved");
    let topics = ops::projection::projection_topics(&k.cfg);
    let rows = ops::groups::plan(&k.cfg, &group, &topics, &ops::groups::Target::Latest)
        .await
        .unwrap();
    let expect: std::collections::BTreeMap<(String, i32), Option<i64>> = rows
        .iter()
        .map(|r| ((r.topic.clone(), r.partition), r.current))
        .collect();
    ops::projection::verify_committed(&k.cfg, &group, &topics, &expect)
        .await
        .unwrap();
    // Someone commits meanwhile (as a consumer starting up would).
    ops::groups::execute(&k.cfg, &group, &rows).await.unwrap();
    let e = ops::projection::verify_committed(&k.cfg, &group, &topics, &expect)
        .await
        .unwrap_err();
    // As the binary prints it (`error: {e:#}`): with its causes.
    let e = anyhow::Error::from(e);
    let m = format!("{e:#}");
    let payments = k.topic(TopicKind::Payments);
    assert!(
        m.contains("moved") && m.contains(&format!("{payments}/")) && m.contains("expected -"),
        "{m}"
    );
}
