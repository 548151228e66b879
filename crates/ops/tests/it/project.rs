//! `project --as-of`: exactly the phase-1 state, production untouched.

use crate::harness::*;
use ops::project::project_as_of;
use projections::Projection;
use testkit::TestKafka;

async fn as_of(backend: Backend) {
    let k = TestKafka::new(3).await;
    // Production on the other backend than the target.
    let (prod, prod_url, _dir) = fresh_db(match backend {
        Backend::Postgres => Backend::Sqlite,
        Backend::Sqlite => Backend::Postgres,
    })
    .await;
    let base1: i64 = 1_700_000_000_000_000;
    let phase1 = history(&format!("{}-a", k.unique), 40, base1);
    // T exactly on phase 1's last event (included: ≤), and phase 2 starting
    // 100 µs later, with events at T+100, T+200, ... µs inside T's
    // millisecond (excluded: µs-exact, not by the record's ms timestamp).
    let as_of_us = phase1
        .envs
        .iter()
        .map(|e| e.occurred_at.as_micros())
        .max()
        .unwrap();
    let base2 = as_of_us + 100;
    let phase2 = history(&format!("{}-b", k.unique), 25, base2);
    assert!(
        phase2
            .envs
            .iter()
            .filter(|e| e.occurred_at.as_micros() / 1000 == as_of_us / 1000)
            .count()
            >= 2,
        "phase 2 has events inside T's millisecond"
    );
    // The RFC 3339 form of T parses back to the same microsecond.
    assert_eq!(
        ops::project::parse_instant_us(&ops::projection::micros_rfc3339(as_of_us)).unwrap(),
        as_of_us
    );
    produce_all(&k.producer, &phase1.envs).await;
    produce_all(&k.producer, &phase2.envs).await;
    run_live_to_end(&k.cfg, &prod).await;
    let prod_ledger = snapshot(&prod, Projection::Ledger).await;
    let prod_wallet = snapshot(&prod, Projection::Wallet).await;
    let topics = ops::projection::projection_topics(&k.cfg);
    let lg = k.cfg.topology().group("ledger");
    let offsets_before = ops::groups::offsets(&k.cfg, &lg, &topics).await.unwrap();

    // The target: a fresh database of the other backend than production.
    let (into, _into_dir) = testkit::FreshDb::new(backend).await.into_parts();
    let both = [Projection::Ledger, Projection::Wallet];
    let e = project_as_of(&k.cfg, &prod_url, &prod_url, as_of_us, &both, 100)
        .await
        .unwrap_err();
    // As the binary prints it (`error: {e:#}`): with its causes.
    let e = anyhow::Error::from(e);
    assert!(format!("{e:#}").contains("production database"), "{e:#}");
    // Another spelling of the production database: caught after connecting.
    let _alias_dir = tempfile::tempdir().unwrap();
    let alias = if prod_url.starts_with("postgres") {
        if prod_url.contains("127.0.0.1") {
            prod_url.replace("127.0.0.1", "localhost")
        } else {
            prod_url.replace("localhost", "127.0.0.1")
        }
    } else {
        let file = ops::shadow::sqlite_file(&prod).await.unwrap();
        let link = _alias_dir.path().join("alias.db");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        format!("sqlite://{}", link.display())
    };
    assert!(!ops::project::same_database(&prod_url, &alias), "{alias}");
    let e = project_as_of(&k.cfg, &prod_url, &alias, as_of_us, &both, 100)
        .await
        .unwrap_err();
    // As the binary prints it (`error: {e:#}`): with its causes.
    let e = anyhow::Error::from(e);
    assert!(
        format!("{e:#}").contains("same database after connecting"),
        "{e:#}"
    );
    // A target holding projection-like data is refused before anything is
    // migrated into it.
    let odd_dir = tempfile::tempdir().unwrap();
    let odd = format!("sqlite://{}", odd_dir.path().join("odd.db").display());
    {
        let d = storage::Db::connect(&odd).await.unwrap();
        exec(
            &d,
            "CREATE TABLE wallet_balances (seller_id TEXT, currency TEXT, balance_minor BIGINT)",
        )
        .await
        .unwrap();
        exec(&d, "INSERT INTO wallet_balances VALUES ('s', 'EUR', 1)")
            .await
            .unwrap();
        d.close().await;
    }
    let e = project_as_of(&k.cfg, &prod_url, &odd, as_of_us, &both, 100)
        .await
        .unwrap_err();
    // As the binary prints it (`error: {e:#}`): with its causes.
    let e = anyhow::Error::from(e);
    assert!(
        format!("{e:#}").contains("already holds projection data"),
        "{e:#}"
    );
    let d = storage::Db::connect(&odd).await.unwrap();
    assert_eq!(
        count(
            &d,
            "SELECT COUNT(*) FROM sqlite_master WHERE name = '_sqlx_migrations'"
        )
        .await,
        0,
        "not migrated"
    );
    d.close().await;

    let s = project_as_of(&k.cfg, &prod_url, &into, as_of_us, &both, 100)
        .await
        .unwrap();
    assert_eq!(
        s.records_read,
        u64::try_from(phase1.envs.len() + phase2.envs.len()).unwrap()
    );
    assert_eq!(
        s.records_included,
        u64::try_from(phase1.envs.len()).unwrap()
    );
    assert_eq!(s.ledger.as_ref().unwrap().rejected, 1);

    let target = storage::Db::connect(&into).await.unwrap();
    assert_eq!(wallets(&target).await, phase1.wallets);
    // The ledger holds exactly the production transactions of phase 1.
    let cutoff = as_of_us;
    let want = strings(
        &prod,
        &format!("SELECT id FROM ledger_transactions WHERE occurred_at <= {cutoff}"),
    )
    .await;
    assert_eq!(
        want.len(),
        phase1.captures + phase1.refunds + phase1.adjustments
    );
    assert_eq!(
        strings(&target, "SELECT id FROM ledger_transactions").await,
        want
    );
    let report = projections::verify(&target).await;
    assert!(report.is_ok(), "{report}");

    // Not twice into the same database.
    let e = project_as_of(&k.cfg, &prod_url, &into, as_of_us, &both, 100)
        .await
        .unwrap_err();
    // As the binary prints it (`error: {e:#}`): with its causes.
    let e = anyhow::Error::from(e);
    assert!(
        format!("{e:#}").contains("already holds projection data"),
        "{e:#}"
    );

    // Production untouched: tables and the group's offsets.
    assert_eq!(snapshot(&prod, Projection::Ledger).await, prod_ledger);
    assert_eq!(snapshot(&prod, Projection::Wallet).await, prod_wallet);
    assert_eq!(
        ops::groups::offsets(&k.cfg, &lg, &topics).await.unwrap(),
        offsets_before
    );
    target.close().await;
}

testkit::both!(as_of_into, as_of);

#[test]
fn instants_and_same_database() {
    assert_eq!(
        ops::project::parse_instant_ms("1700000000000").unwrap(),
        1_700_000_000_000
    );
    assert_eq!(
        ops::project::parse_instant_ms("2023-11-14T22:13:20.5Z").unwrap(),
        1_700_000_000_500
    );
    assert!(ops::project::parse_instant_ms("soon").is_err());
    assert_eq!(
        ops::project::parse_instant_us("2023-11-14T22:13:20.000150Z").unwrap(),
        1_700_000_000_000_150
    );
    assert_eq!(
        ops::project::parse_instant_us("1700000000000").unwrap(),
        1_700_000_000_000_000
    );
    assert!(ops::project::same_database(
        "postgres://u:p@localhost:5432/prod",
        "postgres://other@localhost/prod"
    ));
    assert!(!ops::project::same_database(
        "postgres://localhost/prod",
        "postgres://localhost/analysis"
    ));
    assert!(ops::project::same_database(
        "sqlite://./x.db",
        "sqlite:x.db"
    ));
    assert!(!ops::project::same_database(
        "sqlite://x.db",
        "sqlite://y.db"
    ));
}
