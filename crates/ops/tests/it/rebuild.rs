//! Projection reset and rebuild: plans, execution, refusal while the
//! group is active, and rebuilt == live.

use crate::harness::*;
use ops::projection::{RunOptions, execute_rebuild, execute_reset, plan_rebuild, plan_reset};
use projections::Projection;
use testkit::TestKafka;

async fn rebuilt_equals_live(backend: Backend) {
    let k = TestKafka::new(4).await;
    let (db, url, _dir) = fresh_db(backend).await;
    let h = history(&k.unique, 120, 1_700_000_000_000_000);
    produce_all(&k.producer, &h.envs).await;
    run_live_to_end(&k.cfg, &db).await;
    let live_ledger = snapshot(&db, Projection::Ledger).await;
    let live_wallet = snapshot(&db, Projection::Wallet).await;
    assert_eq!(
        live_ledger["ledger_transactions"].len(),
        h.captures + h.refunds + h.adjustments
    );
    assert_eq!(wallets(&db).await, h.wallets);
    assert_eq!(
        live_ledger["ledger_psp_references"].len(),
        h.captures + h.refunds,
        "one PSP reference per capture and refund"
    );
    assert!(projections::verify(&db).await.is_ok());

    for p in [Projection::Ledger, Projection::Wallet] {
        // Rows the live tables should not have: the rebuild must drop them.
        tamper(&db, p).await;
        assert_ne!(snapshot(&db, p).await["applied_events"], {
            let l = if p == Projection::Ledger {
                &live_ledger
            } else {
                &live_wallet
            };
            l["applied_events"].clone()
        });
        let group = k.cfg.topology().group(p.as_str());
        let plan = plan_rebuild(&k.cfg, &db, p, &group).await.unwrap();
        assert!(
            plan.offsets
                .iter()
                .all(|r| r.current.unwrap_or(r.low) == r.high && r.target == r.high),
            "{:?}",
            plan.offsets
        );
        let s = execute_rebuild(&k.cfg, &url, &db, p, &group, 37, RunOptions::default())
            .await
            .unwrap();
        assert_eq!(s.events.read, u64::try_from(h.envs.len()).unwrap());
        assert_eq!(s.events.rejected, u64::try_from(h.rejected).unwrap());
        assert_eq!(
            s.events.applied + s.events.ignored + s.events.rejected,
            u64::try_from(h.distinct + h.unbooked).unwrap()
        );
        assert_eq!(
            s.events.duplicate,
            u64::try_from(h.envs.len() - h.distinct - h.unbooked).unwrap()
        );
        // The group's offsets are at the ends the rebuild read up to.
        let offs =
            ops::groups::offsets(&k.cfg, &group, &ops::projection::projection_topics(&k.cfg))
                .await
                .unwrap();
        assert!(offs.iter().all(|o| o.committed == Some(o.high)), "{offs:?}");
    }
    assert_eq!(snapshot(&db, Projection::Ledger).await, live_ledger);
    assert_eq!(snapshot(&db, Projection::Wallet).await, live_wallet);
    assert_eq!(wallets(&db).await, h.wallets, "the bogus balance is gone");
    assert_ledger_immutable(&db).await;
    let report = projections::verify(&db).await;
    assert!(report.is_ok(), "{report}");
    // The chain was rebuilt from genesis: one link per transaction.
    assert_eq!(
        count(&db, "SELECT seq FROM ledger_chain_head").await,
        i64::try_from(h.captures + h.refunds + h.adjustments).unwrap()
    );
    // No shadow left behind.
    match &db {
        storage::Db::Postgres(_) => assert_eq!(
            count(&db, "SELECT COUNT(*) FROM information_schema.schemata WHERE schema_name LIKE 'ops_shadow_%'").await,
            0
        ),
        storage::Db::Sqlite(_) => {
            let dir = _dir.as_ref().unwrap().path();
            let names: Vec<_> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            assert!(names.iter().all(|n| !n.contains("ops-shadow")), "{names:?}");
        }
    }
    // Live consumers started afterwards find nothing new to do, and more
    // events are applied on top as usual.
    let more = history(&format!("{}-more", k.unique), 8, 1_700_000_500_000_000);
    produce_all(&k.producer, &more.envs).await;
    run_live_to_end(&k.cfg, &db).await;
    let mut expected = h.wallets.clone();
    for (s, v) in more.wallets {
        *expected.entry(s).or_default() += v;
    }
    assert_eq!(wallets(&db).await, expected);
    let report = projections::verify(&db).await;
    assert!(report.is_ok(), "{report}");
}

testkit::both!(rebuild_equals_live, rebuilt_equals_live);

async fn reset_then_replay(backend: Backend) {
    let k = TestKafka::new(3).await;
    let (db, url, _dir) = fresh_db(backend).await;
    let h = history(&k.unique, 30, 1_700_000_000_000_000);
    produce_all(&k.producer, &h.envs).await;
    run_live_to_end(&k.cfg, &db).await;
    let live_ledger = snapshot(&db, Projection::Ledger).await;
    let live_wallet = snapshot(&db, Projection::Wallet).await;
    let lg = k.cfg.topology().group("ledger");

    let plan = plan_reset(&k.cfg, &db, Projection::Ledger, &lg)
        .await
        .unwrap();
    let rows = |t: &str| plan.tables.iter().find(|r| r.table == t).unwrap().rows;
    assert_eq!(rows("applied_events"), i64::try_from(h.distinct).unwrap());
    assert_eq!(
        rows("ledger_transactions"),
        i64::try_from(h.captures + h.refunds + h.adjustments).unwrap()
    );
    assert!(plan.tables.iter().all(|t| t.table != "wallet_balances"));
    assert_eq!(plan.offsets.len(), 6);
    assert!(
        plan.offsets
            .iter()
            .all(|r| r.current.unwrap_or(r.low) == r.high && r.target == r.low),
        "{:?}",
        plan.offsets
    );
    let text = ops::projection::render_plan(&plan);
    assert!(
        text.contains("ledger_entries") && text.contains("NEW-OFFSET"),
        "{text}"
    );

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
    let after = snapshot(&db, Projection::Ledger).await;
    assert!(after.values().all(Vec::is_empty), "{after:?}");
    assert_eq!(count(&db, "SELECT seq FROM ledger_chain_head").await, 0);
    assert_eq!(
        snapshot(&db, Projection::Wallet).await,
        live_wallet,
        "wallet untouched"
    );
    let offs = ops::groups::offsets(&k.cfg, &lg, &ops::projection::projection_topics(&k.cfg))
        .await
        .unwrap();
    assert!(offs.iter().all(|o| o.committed == Some(o.low)), "{offs:?}");
    // The live consumer rebuilds it.
    run_live_to_end(&k.cfg, &db).await;
    assert_eq!(snapshot(&db, Projection::Ledger).await, live_ledger);
    // The triggers the swap set aside are back: the refilled ledger refuses
    // UPDATE and DELETE.
    assert_ledger_immutable(&db).await;
    let report = projections::verify(&db).await;
    assert!(report.is_ok(), "{report}");
}

testkit::both!(reset, reset_then_replay);

async fn refused_while_active(backend: Backend) {
    let k = TestKafka::new(2).await;
    let (db, url, _dir) = fresh_db(backend).await;
    let h = history(&k.unique, 10, 1_700_000_000_000_000);
    produce_all(&k.producer, &h.envs).await;
    let lg = k.cfg.topology().group("ledger");
    let live = start_live(&k.cfg, &db, Projection::Ledger, &lg);
    wait_caught_up(&k.cfg, &lg).await;
    let g = wait_active(&k.cfg, &lg).await;
    eprintln!("active group as the broker describes it: {g:?}");
    assert!(g.is_active());
    let before = snapshot(&db, Projection::Ledger).await;

    let e = execute_reset(
        &k.cfg,
        &url,
        &db,
        Projection::Ledger,
        &lg,
        RunOptions::default(),
    )
    .await
    .unwrap_err();
    // As the binary prints it (`error: {e:#}`): with its causes.
    let e = anyhow::Error::from(e);
    assert!(
        format!("{e:#}").contains("stop its consumers first"),
        "{e:#}"
    );
    let e = execute_rebuild(
        &k.cfg,
        &url,
        &db,
        Projection::Ledger,
        &lg,
        100,
        RunOptions::default(),
    )
    .await
    .unwrap_err();
    // As the binary prints it (`error: {e:#}`): with its causes.
    let e = anyhow::Error::from(e);
    assert!(
        format!("{e:#}").contains("stop its consumers first"),
        "{e:#}"
    );
    // The dry-run plan still works and says so.
    let plan = plan_reset(&k.cfg, &db, Projection::Ledger, &lg)
        .await
        .unwrap();
    assert!(plan.group.is_active());
    assert_eq!(
        snapshot(&db, Projection::Ledger).await,
        before,
        "nothing changed"
    );
    let offs = ops::groups::offsets(&k.cfg, &lg, &ops::projection::projection_topics(&k.cfg))
        .await
        .unwrap();
    assert!(offs.iter().all(|o| o.lag() == 0), "{offs:?}");
    live.stop().await;
    wait_inactive(&k.cfg, &lg).await;
    // Once stopped, the reset goes through.
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
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM ledger_transactions").await,
        0
    );
}

testkit::both!(refused_while_active, refused_while_active);
