//! The SQL error classifier against the real databases: data and integrity
//! errors are deterministic, lock waits and closed pools transient.

use std::time::Duration;
use storage::{Db, KIND_DATA, KIND_INTEGRITY, SqlErrorClass, sql_error_class};

fn class(r: Result<impl Sized, sqlx::Error>) -> SqlErrorClass {
    sql_error_class(&r.err().expect("the statement fails"))
}

#[tokio::test]
async fn postgres_data_and_integrity_errors_are_deterministic_lock_timeouts_transient() {
    let db = testkit::fresh_postgres().await.unwrap();
    let Db::Postgres(p) = &db else { unreachable!() };
    sqlx::query(
        "CREATE TABLE t (id BIGINT PRIMARY KEY, note TEXT NOT NULL CHECK (length(note) < 10), n INT)",
    )
    .execute(p)
    .await
    .unwrap();
    sqlx::query("INSERT INTO t VALUES (1, 'a', 0)")
        .execute(p)
        .await
        .unwrap();
    let insert = |id: i64, note: &'static str| {
        sqlx::query("INSERT INTO t (id, note) VALUES ($1, $2)")
            .bind(id)
            .bind(note)
            .execute(p)
    };
    // 22021: a NUL byte in text.
    assert_eq!(
        class(insert(2, "x\0y").await),
        SqlErrorClass::Deterministic(KIND_DATA)
    );
    // 22003: out of range (INT column, and a SUM beyond BIGINT).
    assert_eq!(
        class(
            sqlx::query("UPDATE t SET n = $1 WHERE id = 1")
                .bind(i64::MAX)
                .execute(p)
                .await
        ),
        SqlErrorClass::Deterministic(KIND_DATA)
    );
    assert_eq!(
        class(
            sqlx::query_scalar::<_, i64>("SELECT ($1::BIGINT + $1::BIGINT)")
                .bind(i64::MAX)
                .fetch_one(p)
                .await
        ),
        SqlErrorClass::Deterministic(KIND_DATA)
    );
    // 23505 unique, 23514 check.
    assert_eq!(
        class(insert(1, "b").await),
        SqlErrorClass::Deterministic(KIND_INTEGRITY)
    );
    assert_eq!(
        class(insert(3, "far too long").await),
        SqlErrorClass::Deterministic(KIND_INTEGRITY)
    );
    // The kind is found through wrappers too.
    let wrapped = storage::StorageError::Sql(insert(1, "b").await.unwrap_err());
    assert_eq!(storage::deterministic_kind(&wrapped), Some(KIND_INTEGRITY));

    // 55P03: lock not available (another transaction holds the row).
    let mut holder = p.begin().await.unwrap();
    sqlx::query("SELECT id FROM t WHERE id = 1 FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let mut waiter = p.begin().await.unwrap();
    sqlx::query("SET LOCAL lock_timeout = '100ms'")
        .execute(&mut *waiter)
        .await
        .unwrap();
    let e = sqlx::query("UPDATE t SET n = 1 WHERE id = 1")
        .execute(&mut *waiter)
        .await
        .unwrap_err();
    assert_eq!(
        e.as_database_error().and_then(|d| d.code()).as_deref(),
        Some("55P03")
    );
    assert_eq!(sql_error_class(&e), SqlErrorClass::Transient);
    assert_eq!(storage::deterministic_kind(&e), None);
    drop(waiter);
    holder.rollback().await.unwrap();

    // A closed pool (the database went away) is transient.
    db.close().await;
    assert_eq!(class(insert(9, "z").await), SqlErrorClass::Transient);
}

#[tokio::test]
async fn sqlite_constraint_and_overflow_errors_are_deterministic_busy_transient() {
    let (db, dir) = testkit::fresh_sqlite().await.unwrap();
    let Db::Sqlite(p) = &db else { unreachable!() };
    sqlx::query(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, note TEXT NOT NULL CHECK (length(note) < 10), n INTEGER)",
    )
    .execute(p)
    .await
    .unwrap();
    sqlx::query("INSERT INTO t VALUES (1, 'a', 9223372036854775807), (2, 'b', 1)")
        .execute(p)
        .await
        .unwrap();
    let insert = |id: i64, note: &'static str| {
        sqlx::query("INSERT INTO t (id, note) VALUES ($1, $2)")
            .bind(id)
            .bind(note)
            .execute(p)
    };
    assert_eq!(
        class(insert(1, "dup").await),
        SqlErrorClass::Deterministic(KIND_INTEGRITY)
    );
    assert_eq!(
        class(insert(3, "far too long").await),
        SqlErrorClass::Deterministic(KIND_INTEGRITY)
    );
    assert_eq!(
        class(
            sqlx::query("INSERT INTO t (id, note) VALUES (4, NULL)")
                .execute(p)
                .await
        ),
        SqlErrorClass::Deterministic(KIND_INTEGRITY)
    );
    // SUM beyond i64: "integer overflow".
    assert_eq!(
        class(
            sqlx::query_scalar::<_, i64>("SELECT SUM(n) FROM t")
                .fetch_one(p)
                .await
        ),
        SqlErrorClass::Deterministic(KIND_DATA)
    );

    // SQLITE_BUSY: another connection holds the write lock.
    let url = format!("sqlite://{}", dir.path().join("test.db").display());
    let other = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(
            url.parse::<sqlx::sqlite::SqliteConnectOptions>()
                .unwrap()
                .busy_timeout(Duration::from_millis(50)),
        )
        .await
        .unwrap();
    let mut holder = p.begin().await.unwrap();
    sqlx::query("UPDATE t SET note = 'h' WHERE id = 2")
        .execute(&mut *holder)
        .await
        .unwrap();
    let busy = class(
        sqlx::query("UPDATE t SET note = 'w' WHERE id = 2")
            .execute(&other)
            .await,
    );
    assert_eq!(busy, SqlErrorClass::Transient);
    holder.rollback().await.unwrap();
}
