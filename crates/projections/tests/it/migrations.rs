//! Migrations 3005 (selective key columns first), 3006 (no entry foreign
//! key), 3007 (the ledger's booking keys only in its transactions) and
//! 3008 (PostgreSQL: the shared tables partitioned by projection) on a
//! database with data: every row survives (in its projection's partition) (the ledger's copies of its
//! booking keys exactly as its transactions hold them), `ledger verify` is
//! green before and after, and the projections go on applying.

use crate::harness::*;
use projections::{Projection, verify};
use std::borrow::Cow;
use storage::Db;
use streaming::Outcome;

async fn data_survives_3005_to_3008(db: Db) {
    let upto = |mut m: sqlx::migrate::Migrator| {
        m.migrations = Cow::Owned(
            m.migrations
                .iter()
                .filter(|x| x.version < 3005)
                .cloned()
                .collect(),
        );
        storage::component_migrator(m)
    };
    db.migrate(
        &upto(sqlx::migrate!("migrations/postgres")),
        &upto(sqlx::migrate!("migrations/sqlite")),
    )
    .await
    .unwrap();
    let mut evs = Vec::new();
    for i in 0..30 {
        let (req, p, o) = request(
            &format!("k{i}"),
            "b1",
            &format!("s{}", i % 4),
            eur(1000 + i),
            10,
        );
        evs.push(req);
        evs.push(succeeded(p, o, &format!("c{i}"), eur(1000 + i), eur(3), 20));
    }
    // One rejected (a capture of an unknown order) among them.
    let (_, p, o) = request("never-requested", "b1", "s1", eur(10), 10);
    evs.push(succeeded(p, o, "orphan", eur(10), eur(0), 30));
    apply_both(&db, &evs, 7).await;
    let before = snapshot(&db).await;
    assert!(verify(&db).await.is_ok(), "{}", verify(&db).await);

    // What the code before 3007 wrote besides: the ledger's booking keys
    // in projection_bookings too.
    exec(
        &db,
        "INSERT INTO projection_bookings (projection, booking_key, event_id) \
         SELECT 'ledger', booking_key, event_id FROM ledger_transactions",
    )
    .await
    .unwrap();
    projections::migrate(&db).await.unwrap();
    let after = snapshot(&db).await;
    for (table, rows) in &before {
        assert_eq!(&after[table], rows, "{table}");
    }
    let report = verify(&db).await;
    assert!(report.is_ok(), "{report}");
    if let Db::Postgres(_) = &db {
        for table in [
            "applied_events",
            "projection_orders",
            "projection_bookings",
            "projection_totals",
        ] {
            for p in ["ledger", "wallet"] {
                let whole = testkit::count(
                    &db,
                    &format!("SELECT COUNT(*) FROM {table} WHERE projection = '{p}'"),
                )
                .await;
                let part =
                    testkit::count(&db, &format!("SELECT COUNT(*) FROM ONLY {table}_{p}")).await;
                assert_eq!(part, whole, "{table}: {p}'s rows are in its partition");
            }
        }
        assert!(
            testkit::count(&db, "SELECT COUNT(*) FROM applied_events_wallet").await > 0,
            "the wallet's partition holds its rows"
        );
    }
    // Redelivered: duplicates and the stored rejection, nothing changes.
    let again = apply(&db, Projection::Ledger, &evs, 11).await;
    assert!(again[..60].iter().all(|o| *o == Outcome::Duplicate));
    assert!(
        matches!(again[60], Outcome::Rejected { .. }),
        "{:?}",
        again[60]
    );
    assert_eq!(snapshot(&db).await, before);
    // New events apply on the migrated tables.
    let (req, p, o) = request("after", "b2", "s9", eur(77), 40);
    let out = apply_both(
        &db,
        &[req, succeeded(p, o, "after-c", eur(77), eur(1), 41)],
        10,
    )
    .await;
    assert_eq!(out, vec![Outcome::Applied, Outcome::Applied]);
    let report = verify(&db).await;
    assert!(report.is_ok(), "{report}");
}
// Not `both!`: that migrates to the latest version first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_3005_to_3008_postgres() {
    let db = testkit::fresh_postgres().await.unwrap();
    data_survives_3005_to_3008(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_3005_to_3008_sqlite() {
    let (db, _dir) = testkit::fresh_sqlite().await.unwrap();
    data_survives_3005_to_3008(db).await;
}
