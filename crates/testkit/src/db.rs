//! Fresh databases: each test gets its own, so tests run in parallel and
//! never see each other's rows. Moved here from `storage::testing`.

use storage::{Backend, Db, StorageError};

/// Server-level URL tests create their databases through:
/// `PAYSTREAM_TEST_DATABASE_URL`, default the local server.
pub fn admin_url() -> String {
    std::env::var("PAYSTREAM_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Name prefix of test databases; `scripts/test.sh` drops leftovers.
pub const TEST_DB_PREFIX: &str = "paystream_t_";

/// A new, empty PostgreSQL database; returns its URL.
pub async fn fresh_postgres_url() -> Result<String, StorageError> {
    let admin = admin_url();
    let name = format!("{TEST_DB_PREFIX}{}", uuid::Uuid::now_v7().simple());
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&admin)
        .await
        .map_err(|source| StorageError::Connect {
            url: storage::redact(&admin),
            source,
        })?;
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&pool)
        .await?;
    pool.close().await;
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
    Ok(format!("{base}/{name}"))
}

/// A new, empty PostgreSQL database, connected.
pub async fn fresh_postgres() -> Result<Db, StorageError> {
    Db::connect(&fresh_postgres_url().await?).await
}

/// A new SQLite database in a temporary directory (deleted on drop of the
/// returned guard).
pub async fn fresh_sqlite() -> Result<(Db, tempfile::TempDir), StorageError> {
    let dir = tempfile::tempdir().map_err(|e| StorageError::Sql(sqlx::Error::Io(e)))?;
    let url = format!("sqlite://{}", dir.path().join("test.db").display());
    Ok((Db::connect(&url).await?, dir))
}

/// A fresh, empty database of either backend, by URL (for code under test
/// that connects by itself). An SQLite file lives as long as this value.
#[derive(Debug)]
pub struct FreshDb {
    pub url: String,
    pub backend: Backend,
    dir: Option<tempfile::TempDir>,
}

impl FreshDb {
    /// A new database of `backend`; panics if it cannot be created.
    pub async fn new(backend: Backend) -> FreshDb {
        match backend {
            Backend::Postgres => FreshDb {
                url: fresh_postgres_url().await.expect("fresh postgres"),
                backend,
                dir: None,
            },
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("tempdir");
                FreshDb {
                    url: format!("sqlite://{}", dir.path().join("test.db").display()),
                    backend,
                    dir: Some(dir),
                }
            }
        }
    }

    /// A pool on the database.
    pub async fn connect(&self) -> Db {
        Db::connect(&self.url).await.expect("connect")
    }

    /// The URL and the SQLite file's directory guard (`None` for
    /// PostgreSQL): the database lives as long as the guard.
    pub fn into_parts(self) -> (String, Option<tempfile::TempDir>) {
        (self.url, self.dir)
    }
}

/// Runs one statement.
pub async fn exec(db: &Db, sql: &str) -> Result<(), sqlx::Error> {
    storage::with_pool!(db, p => sqlx::query(sql).execute(p).await.map(drop))
}

/// A query's one integer; panics on error.
pub async fn count(db: &Db, sql: &str) -> i64 {
    storage::with_pool!(db, p => sqlx::query_scalar::<_, i64>(sql).fetch_one(p).await)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// A query's text column, sorted; panics on error.
pub async fn strings(db: &Db, sql: &str) -> Vec<String> {
    let mut v =
        storage::with_pool!(db, p => sqlx::query_scalar::<_, String>(sql).fetch_all(p).await)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    v.sort();
    v
}
