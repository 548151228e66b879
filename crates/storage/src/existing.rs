//! Opening a database that must already hold a component's tables, for the
//! read-only commands (`ledger verify`, `projection status`, `dlq list`, …):
//! a wrong URL gets an answer in words, with the databases nearby that do
//! hold the tables, and creates nothing (no empty SQLite file left behind).

use crate::{Db, StorageError, redact};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// What a read-only command needs from the database: a name for messages
/// ("ledger projection") and one table that proves it is there.
#[derive(Debug, Clone, Copy)]
pub struct Needs {
    pub what: &'static str,
    pub table: &'static str,
}

impl Db {
    /// Connects to an existing database that holds `needs.table`; never
    /// creates a file or a table.
    pub async fn open_existing(url: &str, needs: Needs) -> Result<Db, StorageError> {
        if let Some(path) = sqlite_path(url)
            && !path.exists()
        {
            return Err(StorageError::Missing(format!(
                "no {} in {}: the file {} does not exist (nothing was created).{} \
                 Run `paystream up` (or scripts/demo.sh) first, or point --database-url \
                 (PAYSTREAM_DATABASE_URL) at the database the components use.",
                needs.what,
                redact(url),
                path.display(),
                did_you_mean(&path, needs.table).await
            )));
        }
        let db = Db::connect_with_create(url, false).await?;
        if !db.has_table(needs.table).await? {
            db.close().await;
            let hint = match sqlite_path(url) {
                Some(path) => did_you_mean(&path, needs.table).await,
                None => String::new(),
            };
            return Err(StorageError::Missing(format!(
                "no {} in {}: it has no table {} (nothing was created).{hint} \
                 Point --database-url (PAYSTREAM_DATABASE_URL) at the database that \
                 `paystream serve ...` or `paystream up` uses.",
                needs.what,
                redact(url),
                needs.table,
            )));
        }
        Ok(db)
    }

    /// Whether a table of that name exists (in the search path on
    /// PostgreSQL).
    pub async fn has_table(&self, table: &str) -> Result<bool, StorageError> {
        Ok(match self {
            Db::Postgres(p) => {
                sqlx::query_scalar::<_, bool>("SELECT to_regclass($1) IS NOT NULL")
                    .bind(table)
                    .fetch_one(p)
                    .await?
            }
            Db::Sqlite(p) => {
                sqlx::query_scalar::<_, i64>(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = $1",
                )
                .bind(table)
                .fetch_one(p)
                .await?
                    > 0
            }
        })
    }
}

/// The file behind an `sqlite:` URL (none for in-memory databases).
fn sqlite_path(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or(rest);
    if path.is_empty() || path == ":memory:" {
        return None;
    }
    Some(PathBuf::from(path))
}

/// " Did you mean sqlite://…?" for SQLite files next to `path` and under
/// `./.local` that hold `table`, or "" when there are none.
async fn did_you_mean(path: &Path, table: &str) -> String {
    let mut dirs = vec![
        path.parent()
            .filter(|d| !d.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(".")),
    ];
    dirs.push(PathBuf::from(".local"));
    dirs.push(PathBuf::from("."));
    let mut found = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "db") && p.as_path() != path)
            .collect();
        files.sort();
        for file in files {
            let url = format!("sqlite://{}", file.display());
            if found.contains(&url) || found.len() >= 3 {
                continue;
            }
            if sqlite_file_has_table(&file, table).await {
                found.push(url);
            }
        }
    }
    if found.is_empty() {
        String::new()
    } else {
        format!(" Did you mean {}?", found.join(" or "))
    }
}

/// Opens the file read-only (creating nothing) and looks for the table.
async fn sqlite_file_has_table(file: &Path, table: &str) -> bool {
    let Ok(opts) = SqliteConnectOptions::from_str(&format!("sqlite://{}", file.display())) else {
        return false;
    };
    let opts = opts.read_only(true).create_if_missing(false);
    let Ok(pool) = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(opts)
        .await
    else {
        return false;
    };
    let found = Db::Sqlite(pool.clone())
        .has_table(table)
        .await
        .unwrap_or(false);
    pool.close().await;
    found
}
