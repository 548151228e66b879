//! Every table `projections::migrate` creates is in ops' ownership list.

use crate::harness::{Backend, fresh_db};
use ops::tables::{NOT_PROJECTION_DATA, TABLES, existing_tables, tables_of};
use projections::Projection;

async fn every_migrated_table_is_owned(backend: Backend) {
    let (db, _url, _dir) = fresh_db(backend).await;
    let have = existing_tables(&db).await.unwrap();
    assert!(have.contains("applied_events"), "{have:?}");
    for t in &have {
        if NOT_PROJECTION_DATA.contains(&t.as_str()) {
            continue;
        }
        assert!(
            TABLES.iter().any(|(n, _)| n == t),
            "table {t} created by projections::migrate is not in ops::tables::TABLES: \
             say which projection owns it, or reset/rebuild will forget it"
        );
    }
    // The two projections share only the bookkeeping tables.
    let ledger: Vec<_> = tables_of(Projection::Ledger)
        .into_iter()
        .map(|t| t.name)
        .collect();
    let wallet: Vec<_> = tables_of(Projection::Wallet)
        .into_iter()
        .map(|t| t.name)
        .collect();
    for t in &ledger {
        let shared = TABLES
            .iter()
            .any(|(n, o)| n == t && *o == ops::tables::Owner::Shared);
        assert_eq!(wallet.contains(t), shared, "{t}");
    }
}

testkit::both!(every_migrated_table_is_owned, every_migrated_table_is_owned);
