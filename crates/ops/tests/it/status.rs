//! `projection status` against what was produced and applied.

use crate::harness::*;
use ops::projection::status;
use projections::Projection;
use testkit::TestKafka;

async fn status_counts(backend: Backend) {
    let k = TestKafka::new(3).await;
    let (db, _url, _dir) = fresh_db(backend).await;
    let first = history(&k.unique, 40, 1_700_000_000_000_000);
    produce_all(&k.producer, &first.envs).await;
    let produced = i64::try_from(first.envs.len()).unwrap();
    let lg = k.cfg.topology().group("ledger");
    let wg = k.cfg.topology().group("wallet");

    // Nothing consumed yet: the lag is everything produced.
    let s = status(&k.cfg, &db, Projection::Ledger, &lg).await.unwrap();
    assert_eq!(s.total_lag, produced);
    assert!(s.partitions.iter().all(|p| p.committed.is_none()));
    assert_eq!(s.partitions.len(), 6, "3 partitions of 2 topics");
    assert_eq!(s.last_applied_at, None);
    assert!(
        s.tables
            .iter()
            .all(|t| t.table == "ledger_chain_head" || t.rows == 0),
        "{:?}",
        s.tables
    );

    // The ledger catches up; then more events arrive.
    let live = start_live(&k.cfg, &db, Projection::Ledger, &lg);
    wait_caught_up(&k.cfg, &lg).await;
    let running = status(&k.cfg, &db, Projection::Ledger, &lg).await.unwrap();
    assert_eq!(running.group.state, "Stable");
    assert!(running.group.is_active());
    live.stop().await;
    wait_inactive(&k.cfg, &lg).await;
    let second = history(&format!("{}-b", k.unique), 10, 1_700_000_100_000_000);
    produce_all(&k.producer, &second.envs).await;
    let more = i64::try_from(second.envs.len()).unwrap();

    let s = status(&k.cfg, &db, Projection::Ledger, &lg).await.unwrap();
    assert_eq!(s.total_lag, more);
    assert_eq!(
        s.partitions.iter().map(|p| p.high).sum::<i64>(),
        produced + more
    );
    assert_eq!(
        s.partitions
            .iter()
            .map(|p| p.committed.unwrap_or(0))
            .sum::<i64>(),
        produced
    );
    assert!(!s.group.is_active(), "{:?}", s.group);
    assert!(s.last_applied_at.is_some());
    assert_eq!(s.dlq, i64::try_from(first.rejected).unwrap());
    let rows = |t: &str| s.tables.iter().find(|r| r.table == t).map(|r| r.rows);
    assert_eq!(
        rows("applied_events"),
        Some(i64::try_from(first.distinct).unwrap())
    );
    assert_eq!(
        rows("ledger_transactions"),
        Some(i64::try_from(first.captures + first.refunds + first.adjustments).unwrap())
    );
    assert_eq!(
        rows("projection_orders"),
        Some(i64::try_from(first.payments).unwrap())
    );
    assert_eq!(
        rows("wallet_balances"),
        None,
        "wallet tables are not the ledger's"
    );

    // The wallet group never ran.
    let w = status(&k.cfg, &db, Projection::Wallet, &wg).await.unwrap();
    assert_eq!(w.total_lag, produced + more);
    assert_eq!(w.dlq, 0);
    assert!(w.tables.iter().all(|t| t.rows == 0), "{:?}", w.tables);
    let text = ops::projection::render_status(&[s, w]);
    assert!(text.contains(&lg) && text.contains(&wg), "{text}");
}

testkit::both!(status, status_counts);
