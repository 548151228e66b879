//! Fresh databases for tests: each test gets its own, so tests run in
//! parallel and never see each other's rows.

use crate::{Db, StorageError};

/// Server-level URL tests create their databases through.
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
            url: crate::redact(&admin),
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
