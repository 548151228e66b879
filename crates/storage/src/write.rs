//! Write transactions. On SQLite a plain `BEGIN` is deferred: it starts as a
//! reader and upgrades to the write lock at its first write. In WAL mode that
//! upgrade fails at once with "database is locked" (SQLITE_BUSY_SNAPSHOT)
//! when another connection committed in between, and the busy timeout does
//! not help. `BEGIN IMMEDIATE` takes the write lock up front, so concurrent
//! writers (the components of `paystream up` share one file) wait their turn
//! under the busy timeout instead of failing. PostgreSQL needs no such thing.

use sqlx::{PgPool, Postgres, Sqlite, SqlitePool, Transaction};
use std::future::Future;

/// `pool.begin_write()`: a transaction that will write.
pub trait BeginWrite {
    type Database: sqlx::Database;
    fn begin_write(
        &self,
    ) -> impl Future<Output = Result<Transaction<'static, Self::Database>, sqlx::Error>> + Send;
}

impl BeginWrite for PgPool {
    type Database = Postgres;
    fn begin_write(
        &self,
    ) -> impl Future<Output = Result<Transaction<'static, Postgres>, sqlx::Error>> + Send {
        self.begin()
    }
}

impl BeginWrite for SqlitePool {
    type Database = Sqlite;
    fn begin_write(
        &self,
    ) -> impl Future<Output = Result<Transaction<'static, Sqlite>, sqlx::Error>> + Send {
        self.begin_with("BEGIN IMMEDIATE")
    }
}
