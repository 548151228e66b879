//! The SQL database behind paystream's state and projections: PostgreSQL in
//! production, SQLite as the embedded default, chosen by URL.
//!
//! Each component keeps its own migrations and applies them at start-up:
//! one directory per backend (executor, projections, reconcile, replay),
//! one directory for both (payment-handler), or SQLite only (the PSP
//! simulator, which has its own file). All components may share one
//! database, so migration versions are unique across components by
//! convention: payment-handler 1xxx, executor 2xxx, projections 3xxx,
//! reconcile 4xxx, replay 5xxx, the PSP simulator 9xxx.

use sqlx::ConnectOptions;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use std::str::FromStr;
use std::time::Duration;

mod classify;
mod existing;
pub mod lock_wait;
mod write;

pub use classify::{KIND_DATA, KIND_INTEGRITY, SqlErrorClass, deterministic_kind, sql_error_class};
pub use existing::Needs;
pub use write::BeginWrite;

/// Runs the same code against whichever pool a [`Db`] holds. The body is
/// type-checked once per backend, so one SQL string (written in the common
/// dialect: `$1` placeholders, `ON CONFLICT`, `RETURNING`, integer times,
/// TEXT ids) serves both.
///
/// ```ignore
/// let n = with_pool!(db, p => sqlx::query("DELETE FROM t WHERE x = $1").bind(1i64).execute(p).await?.rows_affected());
/// ```
#[macro_export]
macro_rules! with_pool {
    ($db:expr, $p:ident => $body:expr) => {
        match $db {
            $crate::Db::Postgres($p) => $body,
            $crate::Db::Sqlite($p) => $body,
        }
    };
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("unsupported database URL {0:?}: expected postgres://... or sqlite://...")]
    UnsupportedUrl(String),
    #[error("cannot connect to {url}: {source}")]
    Connect { url: String, source: sqlx::Error },
    #[error("migrating the database failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
    /// A read-only command's database lacks what it reads; the message
    /// says so in words and suggests where the data is.
    #[error("{0}")]
    Missing(String),
}

/// Which SQL dialect a [`Db`] speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// A connection pool to one of the supported databases.
#[derive(Debug, Clone)]
pub enum Db {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// Connections per pool. SQLite has one writer at a time anyway; WAL lets
/// readers proceed meanwhile.
pub const POSTGRES_CONNECTIONS_MAX: u32 = 16;
pub const SQLITE_CONNECTIONS_MAX: u32 = 4;

/// How long a SQLite statement waits for a lock before it fails with
/// "database is locked" (a transient error: the consumers retry).
pub const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Page cache per SQLite connection, KiB (SQLite's default: 2,000). The
/// projections' tables are keyed by random ids, so a batch touches pages all
/// over them, and with 2 MB most are read again from the file once the
/// tables are larger. `cargo bench -p storage --bench page_cache` (same run,
/// 100,000 rows): 17-57 % more rows/s with 64 MiB; the decline with size
/// remains (it comes from the pages each commit writes and syncs). A
/// connection takes pages as it uses them, up to this.
pub const SQLITE_CACHE_KIB: u32 = 65_536;

impl Db {
    /// Connects to `postgres://...` or `sqlite://path` (the file is created
    /// if missing).
    pub async fn connect(url: &str) -> Result<Db, StorageError> {
        Db::connect_with_create(url, true).await
    }

    /// [`Db::connect`], creating a missing SQLite file only when `create`.
    async fn connect_with_create(url: &str, create: bool) -> Result<Db, StorageError> {
        let err = |source| StorageError::Connect {
            url: redact(url),
            source,
        };
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let opts = PgConnectOptions::from_str(url).map_err(err)?;
            let pool = PgPoolOptions::new()
                .max_connections(POSTGRES_CONNECTIONS_MAX)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(opts)
                .await
                .map_err(err)?;
            Ok(Db::Postgres(pool))
        } else if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)
                .map_err(err)?
                .create_if_missing(create)
                // Readers do not block the writer and vice versa.
                .journal_mode(SqliteJournalMode::Wal)
                // Money: a committed transaction survives a power cut.
                .synchronous(SqliteSynchronous::Full)
                // While connecting (SQLite's own handler); then
                // `lock_wait::install` takes over with the same timeout.
                .busy_timeout(SQLITE_BUSY_TIMEOUT)
                .foreign_keys(true)
                .pragma("cache_size", format!("-{SQLITE_CACHE_KIB}"))
                // One writer at a time: a statement that waited for the
                // write lock is expected contention on the embedded
                // default, not a warning (it is one at debug level).
                .log_slow_statements(log::LevelFilter::Debug, Duration::from_secs(1));
            let pool = SqlitePoolOptions::new()
                .max_connections(SQLITE_CONNECTIONS_MAX)
                .acquire_timeout(Duration::from_secs(10))
                // Writers waiting for the lock are woken by the commit
                // that frees it instead of sleeping on (lock_wait.rs).
                .after_connect(|conn, _| Box::pin(lock_wait::install(conn, SQLITE_BUSY_TIMEOUT)))
                .connect_with(opts)
                .await
                .map_err(err)?;
            Ok(Db::Sqlite(pool))
        } else {
            Err(StorageError::UnsupportedUrl(redact(url)))
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Db::Postgres(_) => Backend::Postgres,
            Db::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// Applies the component's migrations for this backend. Migrators must
    /// have `ignore_missing` set (see [`component_migrator`]) because other
    /// components' versions live in the same table.
    pub async fn migrate(
        &self,
        postgres: &Migrator,
        sqlite: &Migrator,
    ) -> Result<(), StorageError> {
        match self {
            Db::Postgres(p) => postgres.run(p).await?,
            Db::Sqlite(p) => sqlite.run(p).await?,
        }
        Ok(())
    }

    /// A round trip to the database, for readiness checks.
    pub async fn ping(&self) -> Result<(), StorageError> {
        match self {
            Db::Postgres(p) => sqlx::query("SELECT 1").execute(p).await.map(drop)?,
            Db::Sqlite(p) => sqlx::query("SELECT 1").execute(p).await.map(drop)?,
        }
        Ok(())
    }

    pub async fn close(&self) {
        match self {
            Db::Postgres(p) => p.close().await,
            Db::Sqlite(p) => p.close().await,
        }
    }
}

/// Marks a migrator as one component's among several sharing a database.
pub fn component_migrator(mut m: Migrator) -> Migrator {
    m.set_ignore_missing(true);
    m
}

/// The URL without its password, for messages and logs.
pub fn redact(url: &str) -> String {
    // The authority ends at the first '/', '?' or '#' after "://"; its
    // userinfo at the LAST '@' in it (a password may contain '@').
    let (head, rest) = match url.find("://") {
        Some(s) => (&url[..s + 3], &url[s + 3..]),
        None => return redact_query(url),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rfind('@') {
        Some(at) => {
            let (creds, host) = authority.split_at(at);
            match creds.split_once(':') {
                Some((user, _)) => format!("{user}:***{host}"),
                None => authority.to_owned(),
            }
        }
        None => authority.to_owned(),
    };
    redact_query(&format!("{head}{authority}{tail}"))
}

/// Blanks the values of query parameters that carry secrets
/// (`password`, `sslpassword`, anything ending in `password` or `secret`).
fn redact_query(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_owned();
    };
    let params: Vec<String> = query
        .split('&')
        .map(|p| match p.split_once('=') {
            Some((k, _))
                if {
                    let k = k.to_ascii_lowercase();
                    k.ends_with("password") || k.ends_with("secret")
                } =>
            {
                format!("{k}=***")
            }
            _ => p.to_owned(),
        })
        .collect();
    format!("{base}?{}", params.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite://x.db"), "sqlite://x.db");
        // A password with '@' in it is hidden whole (review L5).
        assert_eq!(redact("postgres://u:p@ss@h/db"), "postgres://u:***@h/db");
        // Passwords in the query string too.
        assert_eq!(
            redact("postgres://h/db?user=u&password=secret&sslmode=require"),
            "postgres://h/db?user=u&password=***&sslmode=require"
        );
        assert_eq!(
            redact("postgres://u@h/db?sslpassword=x"),
            "postgres://u@h/db?sslpassword=***"
        );
        // An '@' after the authority is not userinfo.
        assert_eq!(redact("sqlite://dir/a@b.db"), "sqlite://dir/a@b.db");
    }
}
