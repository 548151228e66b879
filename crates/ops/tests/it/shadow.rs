//! The shadow and the swap on their own (no broker): only the chosen
//! projection's rows change, the triggers survive, the shadow is removed.

use crate::harness::*;
use ops::shadow::Shadow;
use projections::{Incoming, Projection, apply_batch};
use storage::Db;
use streaming::MessageMeta;

async fn apply(db: &Db, p: Projection, envs: &[events::Envelope]) {
    let metas: Vec<MessageMeta> = (0..envs.len())
        .map(|i| MessageMeta {
            topic: "t".into(),
            partition: 0,
            offset: i64::try_from(i).unwrap(),
            timestamp_ms: None,
        })
        .collect();
    let batch: Vec<Incoming<'_>> = envs
        .iter()
        .zip(&metas)
        .map(|(envelope, meta)| Incoming { envelope, meta })
        .collect();
    apply_batch(db, p, &batch).await.expect("apply");
}

async fn swap_replaces_one_projection(backend: Backend) {
    let (db, url, _dir) = fresh_db(backend).await;
    let big = history("shadow-big", 30, 1_700_000_000_000_000);
    let small = history("shadow-small", 6, 1_700_000_000_000_000);
    apply(&db, Projection::Ledger, &big.envs).await;
    apply(&db, Projection::Wallet, &big.envs).await;
    let wallet_before = snapshot(&db, Projection::Wallet).await;

    // A reference of what the ledger should become.
    let (reference, _u, _d) = fresh_db(backend).await;
    apply(&reference, Projection::Ledger, &small.envs).await;

    let shadow = Shadow::create(&db, &url, Projection::Ledger).await.unwrap();
    apply(&shadow.db, Projection::Ledger, &small.envs).await;
    // Readers of the live database still see the old ledger.
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM ledger_transactions").await,
        i64::try_from(big.captures + big.refunds + big.adjustments).unwrap()
    );
    // PostgreSQL: a REPEATABLE READ reader (like `ledger verify`) whose
    // snapshot predates the rebuilt tables keeps seeing the old ledger to
    // its end: the O(1) swap (tables exchanged, not rows) waits for it,
    // because its snapshot could not see the rebuilt rows.
    match &db {
        Db::Postgres(_) => {
            use sqlx::Connection as _;
            let mut reader = sqlx::PgConnection::connect(&url).await.unwrap();
            sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ")
                .execute(&mut reader)
                .await
                .unwrap();
            // Takes the snapshot without touching the ledger's tables.
            let _: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM wallet_balances")
                .fetch_one(&mut reader)
                .await
                .unwrap();
            let live = db.clone();
            let swap = tokio::spawn(async move { shadow.swap(&live, Projection::Ledger).await });
            // The swap built the shadow's keys and took its statistics:
            // what comes next is the wait for this reader.
            testkit::wait_until(
                "the shadow's statistics",
                std::time::Duration::from_secs(60),
                async || {
                    count(
                        &db,
                        "SELECT COUNT(*) FROM pg_stats WHERE schemaname = 'ops_shadow_ledger' \
                         AND tablename = 'ledger_transactions'",
                    )
                    .await
                        > 0
                },
            )
            .await;
            let old: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ledger_transactions")
                .fetch_one(&mut reader)
                .await
                .unwrap();
            assert_eq!(
                old,
                i64::try_from(big.captures + big.refunds + big.adjustments).unwrap(),
                "an older snapshot must still see the old ledger"
            );
            assert!(
                !swap.is_finished(),
                "the swap went ahead while a snapshot older than the rebuilt tables was open"
            );
            sqlx::query("COMMIT").execute(&mut reader).await.unwrap();
            swap.await.unwrap().unwrap();
        }
        Db::Sqlite(_) => shadow.swap(&db, Projection::Ledger).await.unwrap(),
    }

    assert_eq!(
        snapshot(&db, Projection::Ledger).await,
        snapshot(&reference, Projection::Ledger).await
    );
    assert_eq!(snapshot(&db, Projection::Wallet).await, wallet_before);
    assert_eq!(
        count(&db, "SELECT seq FROM ledger_chain_head").await,
        i64::try_from(small.captures + small.refunds + small.adjustments).unwrap()
    );
    // The ledger is still immutable and still appends (chain continues).
    assert_ledger_immutable(&db).await;
    let more = history("shadow-more", 4, 1_700_000_000_000_000);
    apply(&db, Projection::Ledger, &more.envs).await;
    apply(&db, Projection::Wallet, &small.envs).await;
    let report = projections::verify(&db).await;
    assert!(report.error.is_none(), "{report}");
    // Wallet and ledger differ on purpose here; the ledger's own checks hold.
    for c in &report.checks {
        if ["transactions_balance", "ledger_sums_to_zero", "hash_chain"].contains(&c.name) {
            assert_eq!(c.violations, 0, "{report}");
        }
    }
    // A shadow left behind with rows (a crashed rebuild) is replaced by
    // an empty one; discard leaves the live tables.
    let left = Shadow::create(&db, &url, Projection::Wallet).await.unwrap();
    apply(&left.db, Projection::Wallet, &big.envs).await;
    assert!(count(&left.db, "SELECT COUNT(*) FROM wallet_balances").await > 0);
    left.db.close().await;
    drop(left);
    let s = Shadow::create(&db, &url, Projection::Wallet).await.unwrap();
    assert_eq!(
        count(&s.db, "SELECT COUNT(*) FROM wallet_balances").await,
        0
    );
    assert_eq!(count(&s.db, "SELECT COUNT(*) FROM applied_events").await, 0);
    s.discard(&db).await.unwrap();
    assert_ne!(count(&db, "SELECT COUNT(*) FROM wallet_balances").await, 0);
}

testkit::both!(swap, swap_replaces_one_projection);

/// A shadow holding one key twice (what a faulty bulk load would write)
/// fails the swap where the keys are built or checked, and the live
/// projection stays exactly as it was.
async fn duplicate_keys_fail_the_swap(backend: Backend) {
    let (db, url, _dir) = fresh_db(backend).await;
    let h = history("shadow-dup", 5, 1_700_000_000_000_000);
    apply(&db, Projection::Ledger, &h.envs).await;
    let before = snapshot(&db, Projection::Ledger).await;
    let shadow = Shadow::create(&db, &url, Projection::Ledger).await.unwrap();
    shadow.strip_indexes().await.unwrap();
    for _ in 0..2 {
        testkit::exec(
            &shadow.db,
            "INSERT INTO applied_events (projection, event_id, applied_at, topic, \
             kafka_partition, kafka_offset) VALUES ('ledger', 'twice', 0, 't', 0, 0)",
        )
        .await
        .unwrap();
    }
    let err = shadow.swap(&db, Projection::Ledger).await.unwrap_err();
    let err = anyhow::Error::from(err);
    assert!(format!("{err:#}").contains("applied_events"), "{err:#}");
    assert_eq!(snapshot(&db, Projection::Ledger).await, before);
    assert_ledger_immutable(&db).await;
    // The next shadow replaces the one the failed swap left behind.
    let again = Shadow::create(&db, &url, Projection::Ledger).await.unwrap();
    assert_eq!(
        count(&again.db, "SELECT COUNT(*) FROM applied_events").await,
        0
    );
    again.discard(&db).await.unwrap();
}

testkit::both!(duplicate_keys, duplicate_keys_fail_the_swap);
