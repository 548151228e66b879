//! Both backends connect, answer, and give each test its own database.

mod classify;
mod lock_wait;

use storage::{Backend, Db};

#[tokio::test]
async fn fresh_postgres_databases_are_separate() {
    let a = testkit::fresh_postgres().await.unwrap();
    let b = testkit::fresh_postgres().await.unwrap();
    assert_eq!(a.backend(), Backend::Postgres);
    a.ping().await.unwrap();
    let Db::Postgres(pa) = &a else { unreachable!() };
    let Db::Postgres(pb) = &b else { unreachable!() };
    sqlx::query("CREATE TABLE only_in_a (x INT)")
        .execute(pa)
        .await
        .unwrap();
    let seen: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'only_in_a'",
    )
    .fetch_one(pb)
    .await
    .unwrap();
    assert_eq!(seen, 0);
}

#[tokio::test]
async fn sqlite_file_is_created_in_wal_mode() {
    let (db, _dir) = testkit::fresh_sqlite().await.unwrap();
    assert_eq!(db.backend(), Backend::Sqlite);
    db.ping().await.unwrap();
    let Db::Sqlite(p) = &db else { unreachable!() };
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(p)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    // Every connection of the pool has the larger page cache.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = p.acquire().await.unwrap();
        let kib: i64 = sqlx::query_scalar("PRAGMA cache_size")
            .fetch_one(&mut *c)
            .await
            .unwrap();
        assert_eq!(kib, -i64::from(storage::SQLITE_CACHE_KIB));
        held.push(c);
    }
}

#[tokio::test]
async fn unsupported_urls_are_a_clear_error() {
    let e = Db::connect("mysql://x").await.unwrap_err();
    assert!(e.to_string().contains("expected postgres://"), "{e}");
}

#[tokio::test]
async fn one_sql_string_serves_both_backends() {
    let (sqlite, _dir) = testkit::fresh_sqlite().await.unwrap();
    for db in [testkit::fresh_postgres().await.unwrap(), sqlite] {
        storage::with_pool!(&db, p => {
            sqlx::query("CREATE TABLE kv (k TEXT PRIMARY KEY, v BIGINT NOT NULL)").execute(p).await.unwrap();
            let inserted = sqlx::query("INSERT INTO kv (k, v) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind("a").bind(1i64).execute(p).await.unwrap().rows_affected();
            assert_eq!(inserted, 1);
            let again = sqlx::query("INSERT INTO kv (k, v) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind("a").bind(2i64).execute(p).await.unwrap().rows_affected();
            assert_eq!(again, 0);
            let (v,): (i64,) = sqlx::query_as("UPDATE kv SET v = v + $1 WHERE k = $2 RETURNING v")
                .bind(10i64).bind("a").fetch_one(p).await.unwrap();
            assert_eq!(v, 11);
        });
    }
}
