//! The shadow a rebuild writes into, and the atomic swap into the live
//! tables.
//!
//! - PostgreSQL: a schema `ops_shadow_<projection>` in the same database,
//!   migrated like the live one; the rebuild's connections put it first on
//!   their `search_path`, so the projection code runs unchanged. The swap
//!   is one transaction on the live database: disable the user triggers of
//!   the projection's own tables (the ledger's immutability triggers refuse
//!   `DELETE`), `DELETE` its rows (children first), `INSERT ... SELECT`
//!   everything from the shadow, re-enable the triggers, commit. Trigger
//!   enabling is transactional, so nobody else sees them disabled. `DELETE`
//!   (unlike `TRUNCATE`) is MVCC-safe: readers see the old contents until
//!   the commit, and a REPEATABLE READ reader with an older snapshot keeps
//!   seeing them; nobody sees a half-built projection.
//! - SQLite: a separate file next to the database
//!   (`<db file>.ops-shadow-<projection>`), `ATTACH`ed to one connection
//!   of the live database for the swap: `BEGIN IMMEDIATE`, save and drop
//!   the projection's triggers (SQLite has no `TRUNCATE`, and the ledger's
//!   triggers refuse `DELETE`), delete, `INSERT ... SELECT` from the
//!   shadow, re-create the triggers from their saved SQL, `COMMIT`. In WAL
//!   mode readers keep seeing the old rows until the commit.
//!
//! The shadow is written without durability (`synchronous_commit = off`,
//! and a rebuild makes its tables UNLOGGED; SQLite `synchronous = OFF`): a crash during the rebuild only means
//! running it again. The swap itself runs with the live database's full
//! durability. The shadow is removed after the swap (and replaced if a
//! previous rebuild left one behind). Callers hold the projection's run
//! lock (`crate::lock`), so two runs never share a shadow.

use crate::tables::{OwnedTable, columns, present_tables_of, primary_key};
use anyhow::Context as _;
use projections::Projection;
use sqlx::ConnectOptions as _;
use sqlx::Connection as _;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;
use storage::Db;

/// A migrated, initially empty copy of the projection tables.
#[derive(Debug)]
pub struct Shadow {
    /// Where the rebuild applies events.
    pub db: Db,
    place: Place,
}

#[derive(Debug, Clone)]
enum Place {
    Postgres { schema: String },
    Sqlite { path: PathBuf, main: PathBuf },
}

/// The file of an SQLite database's main schema.
pub async fn sqlite_file(db: &Db) -> anyhow::Result<PathBuf> {
    let Db::Sqlite(p) = db else {
        anyhow::bail!("not an SQLite database");
    };
    let file: String =
        sqlx::query_scalar("SELECT file FROM pragma_database_list WHERE name = 'main'")
            .fetch_one(p)
            .await
            .context("locating the SQLite database file")?;
    anyhow::ensure!(
        !file.is_empty(),
        "the SQLite database is in memory: a rebuild needs a database file"
    );
    Ok(PathBuf::from(file))
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

impl Shadow {
    /// Creates (or re-creates) the shadow of `projection` for the live
    /// database `main` reached at `main_url`.
    pub async fn create(
        main: &Db,
        main_url: &str,
        projection: Projection,
    ) -> anyhow::Result<Shadow> {
        match main {
            Db::Postgres(p) => {
                let schema = format!("ops_shadow_{}", projection.as_str());
                sqlx::query(&format!(
                    "DROP SCHEMA IF EXISTS {} CASCADE",
                    quote_ident(&schema)
                ))
                .execute(p)
                .await
                .context("dropping a previous shadow schema")?;
                sqlx::query(&format!("CREATE SCHEMA {}", quote_ident(&schema)))
                    .execute(p)
                    .await
                    .context("creating the shadow schema")?;
                let opts = PgConnectOptions::from_str(main_url)
                    .context("parsing the database URL")?
                    .options([
                        ("search_path", schema.as_str()),
                        ("synchronous_commit", "off"),
                    ]);
                let pool = PgPoolOptions::new()
                    .max_connections(2)
                    .acquire_timeout(Duration::from_secs(30))
                    .connect_with(opts)
                    .await
                    .context("connecting to the shadow schema")?;
                let db = Db::Postgres(pool);
                projections::migrate(&db)
                    .await
                    .context("migrating the shadow schema")?;
                Ok(Shadow {
                    db,
                    place: Place::Postgres { schema },
                })
            }
            Db::Sqlite(_) => {
                let main_path = sqlite_file(main).await?;
                let mut name = main_path.as_os_str().to_owned();
                name.push(format!(".ops-shadow-{}", projection.as_str()));
                let path = PathBuf::from(name);
                remove_sqlite_files(&path)?;
                let opts = SqliteConnectOptions::new()
                    .filename(&path)
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Memory)
                    .synchronous(SqliteSynchronous::Off)
                    .foreign_keys(true)
                    .busy_timeout(Duration::from_secs(30));
                let pool = SqlitePoolOptions::new()
                    .max_connections(1)
                    .connect_with(opts)
                    .await
                    .with_context(|| format!("creating the shadow file {}", path.display()))?;
                let db = Db::Sqlite(pool);
                projections::migrate(&db)
                    .await
                    .context("migrating the shadow database")?;
                Ok(Shadow {
                    db,
                    place: Place::Sqlite {
                        path,
                        main: main_path,
                    },
                })
            }
        }
    }

    /// Drops every index and key constraint of the shadow's tables, so a
    /// bulk load appends rows without maintaining random-key B-trees or
    /// checking keys row by row (the rows come from one in-memory decision
    /// that already holds every key once). The shadow is only the staging
    /// area of the swap, which copies its rows into the live tables, whose
    /// own keys and constraints check every row again: the shadow needs no
    /// index of its own.
    pub async fn strip_indexes(&self) -> anyhow::Result<()> {
        match &self.db {
            Db::Postgres(p) => {
                // Foreign keys first: they depend on the keys they point at.
                let cons: Vec<(String, String)> = sqlx::query_as(
                    "SELECT c.conrelid::regclass::TEXT, c.conname::TEXT FROM pg_constraint c \
                     WHERE c.connamespace = current_schema()::regnamespace \
                     AND c.contype IN ('f', 'p', 'u') \
                     ORDER BY (c.contype = 'f') DESC",
                )
                .fetch_all(p)
                .await
                .context("listing the shadow's constraints")?;
                for (table, name) in cons {
                    sqlx::query(&format!(
                        "ALTER TABLE {table} DROP CONSTRAINT {}",
                        quote_ident(&name)
                    ))
                    .execute(p)
                    .await
                    .with_context(|| format!("dropping {name} of the shadow's {table}"))?;
                }
                // Unlogged: the shadow is thrown away after a crash anyway
                // (the next rebuild replaces it), so its bulk load need not
                // write WAL. The swap copies into the logged live tables.
                let tables: Vec<String> = sqlx::query_scalar(
                    "SELECT quote_ident(tablename::TEXT) FROM pg_tables WHERE schemaname = current_schema()",
                )
                .fetch_all(p)
                .await
                .context("listing the shadow's tables")?;
                for t in tables {
                    sqlx::query(&format!("ALTER TABLE {t} SET UNLOGGED"))
                        .execute(p)
                        .await
                        .with_context(|| format!("making the shadow's {t} unlogged"))?;
                }
                let idx: Vec<String> = sqlx::query_scalar(
                    "SELECT indexname::TEXT FROM pg_indexes WHERE schemaname = current_schema()",
                )
                .fetch_all(p)
                .await
                .context("listing the shadow's indexes")?;
                for name in idx {
                    sqlx::query(&format!("DROP INDEX {}", quote_ident(&name)))
                        .execute(p)
                        .await
                        .with_context(|| format!("dropping index {name} of the shadow"))?;
                }
            }
            Db::Sqlite(p) => {
                // SQLite cannot drop a primary key: each table is replaced
                // by a plain copy (`CREATE TABLE ... AS SELECT`: same
                // columns and rows, no key, index, constraint or trigger).
                let tables: Vec<String> = sqlx::query_scalar(
                    "SELECT name FROM sqlite_master WHERE type = 'table' \
                     AND name NOT LIKE 'sqlite_%' AND name <> '_sqlx_migrations'",
                )
                .fetch_all(p)
                .await
                .context("listing the shadow's tables")?;
                let mut conn = p.acquire().await.context("connecting to the shadow")?;
                for t in tables {
                    let (q, plain) = (quote_ident(&t), quote_ident(&format!("{t}_plain")));
                    for sql in [
                        format!("CREATE TABLE {plain} AS SELECT * FROM {q}"),
                        format!("DROP TABLE {q}"),
                        format!("ALTER TABLE {plain} RENAME TO {q}"),
                    ] {
                        sqlx::query(&sql)
                            .execute(&mut *conn)
                            .await
                            .with_context(|| format!("stripping the shadow's {t}"))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Where the shadow lives, for messages.
    pub fn describe(&self) -> String {
        match &self.place {
            Place::Postgres { schema } => format!("schema {schema}"),
            Place::Sqlite { path, .. } => format!("file {}", path.display()),
        }
    }

    /// Replaces `projection`'s rows in `main` with the shadow's, in one
    /// transaction, then removes the shadow.
    pub async fn swap(self, main: &Db, projection: Projection) -> anyhow::Result<()> {
        let tables = present_tables_of(main, projection).await?;
        let mut cols = Vec::new();
        for t in &tables {
            cols.push(TableCopy {
                columns: columns(main, t.name).await?.join(", "),
                key: primary_key(main, t.name).await?,
            });
        }
        self.db.close().await;
        let place = self.place.clone();
        let result = match (&place, main) {
            (Place::Postgres { schema }, Db::Postgres(p)) => {
                swap_postgres(p, schema, projection, &tables, &cols).await
            }
            (Place::Sqlite { path, main: file }, Db::Sqlite(_)) => {
                swap_sqlite(file, path, projection, &tables, &cols).await
            }
            _ => Err(anyhow::anyhow!(
                "shadow and live database differ in backend"
            )),
        };
        result?;
        discard_place(&place, main).await?;
        // The live tables just received every row at once: statistics now,
        // not whenever something else takes them (autovacuum may be off).
        projections::apply::analyze(main, projection)
            .await
            .context("taking statistics of the swapped-in tables")?;
        Ok(())
    }

    /// Removes the shadow without touching the live tables.
    pub async fn discard(self, main: &Db) -> anyhow::Result<()> {
        self.db.close().await;
        discard_place(&self.place, main).await
    }
}

async fn discard_place(place: &Place, main: &Db) -> anyhow::Result<()> {
    match (place, main) {
        (Place::Postgres { schema }, Db::Postgres(p)) => {
            sqlx::query(&format!(
                "DROP SCHEMA IF EXISTS {} CASCADE",
                quote_ident(schema)
            ))
            .execute(p)
            .await
            .context("dropping the shadow schema")?;
        }
        (Place::Sqlite { path, .. }, _) => remove_sqlite_files(path)?,
        _ => {}
    }
    Ok(())
}

fn remove_sqlite_files(path: &std::path::Path) -> anyhow::Result<()> {
    for suffix in ["", "-journal", "-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        match std::fs::remove_file(PathBuf::from(&name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("removing {}", PathBuf::from(name).display()));
            }
        }
    }
    Ok(())
}

async fn swap_postgres(
    pool: &sqlx::PgPool,
    schema: &str,
    projection: Projection,
    tables: &[OwnedTable],
    cols: &[TableCopy],
) -> anyhow::Result<()> {
    let p = projection.as_str();
    let mut tx = pool.begin().await.context("starting the swap")?;
    let own: Vec<&str> = tables
        .iter()
        .filter(|t| !t.shared)
        .map(|t| t.name)
        .collect();
    // DELETE, not TRUNCATE: TRUNCATE is not MVCC-safe (a REPEATABLE READ
    // reader with an older snapshot, e.g. `ledger verify`, would see the
    // tables empty). The immutability triggers refuse DELETE, so they are
    // disabled for this transaction only: ALTER TABLE ... DISABLE/ENABLE
    // TRIGGER is transactional, nobody else ever sees them disabled, and a
    // failure rolls it back with everything else.
    for t in &own {
        sqlx::query(&format!("ALTER TABLE {t} DISABLE TRIGGER USER"))
            .execute(&mut *tx)
            .await
            .with_context(|| format!("disabling the triggers of {t} for the swap"))?;
    }
    for step in swap_steps(p, tables, cols, "", &quote_ident(schema)) {
        let started = std::time::Instant::now();
        let q = sqlx::query(&step.sql);
        let q = if step.binds_projection { q.bind(p) } else { q };
        let rows = q
            .execute(&mut *tx)
            .await
            .with_context(|| step.what.clone())?
            .rows_affected();
        step.log(rows, started);
    }
    for t in &own {
        sqlx::query(&format!("ALTER TABLE {t} ENABLE TRIGGER USER"))
            .execute(&mut *tx)
            .await
            .with_context(|| format!("re-enabling the triggers of {t}"))?;
    }
    tx.commit().await.context("committing the swap")?;
    Ok(())
}

/// How the swap copies one table: its columns, and its primary key, the
/// order the rows are copied in (the key's B-tree then takes them in
/// order, appends and cache-friendly merges, instead of one random leaf
/// per row).
#[derive(Debug, Clone)]
struct TableCopy {
    columns: String,
    key: Vec<String>,
}

/// One statement of a swap: its SQL, whether it takes the projection as
/// `$1`, and what it does (the error's context).
#[derive(Debug)]
struct SwapStep {
    sql: String,
    binds_projection: bool,
    what: String,
}

impl SwapStep {
    /// One line per step: where a swap's time goes.
    fn log(&self, rows: u64, started: std::time::Instant) {
        tracing::info!(
            rows,
            ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "swap: {}",
            self.what
        );
    }
}

/// The swap's statements, the same on both backends: the live tables'
/// rows deleted (children first; of the shared tables only projection
/// `p`'s), then copied from the shadow. `live` prefixes the live tables
/// (`""` or `"main."`), `shadow` is the shadow's schema.
fn swap_steps(
    p: &str,
    tables: &[OwnedTable],
    cols: &[TableCopy],
    live: &str,
    shadow: &str,
) -> Vec<SwapStep> {
    let mut steps = Vec::new();
    for t in tables.iter().rev() {
        let sql = if t.shared {
            format!("DELETE FROM {live}{} WHERE projection = $1", t.name)
        } else {
            format!("DELETE FROM {live}{}", t.name)
        };
        steps.push(SwapStep {
            sql,
            binds_projection: t.shared,
            what: format!("deleting {p} rows of {}", t.name),
        });
    }
    for (t, c) in tables.iter().zip(cols) {
        let filter = if t.shared {
            " WHERE projection = $1"
        } else {
            ""
        };
        let order = if c.key.is_empty() {
            String::new()
        } else {
            format!(" ORDER BY {}", c.key.join(", "))
        };
        let c = &c.columns;
        steps.push(SwapStep {
            sql: format!(
                "INSERT INTO {live}{name} ({c}) SELECT {c} FROM {shadow}.{name}{filter}{order}",
                name = t.name
            ),
            binds_projection: t.shared,
            what: format!("copying {} from the shadow", t.name),
        });
    }
    steps
}

async fn swap_sqlite(
    main_file: &std::path::Path,
    shadow_file: &std::path::Path,
    projection: Projection,
    tables: &[OwnedTable],
    cols: &[TableCopy],
) -> anyhow::Result<()> {
    let mut conn = SqliteConnectOptions::new()
        .filename(main_file)
        .busy_timeout(Duration::from_secs(30))
        .foreign_keys(true)
        .synchronous(SqliteSynchronous::Full)
        .connect()
        .await
        .context("opening the SQLite database for the swap")?;
    let shadow = shadow_file
        .to_str()
        .context("the shadow file's path is not UTF-8")?;
    sqlx::query(&format!(
        "ATTACH DATABASE {} AS ops_shadow",
        quote_literal(shadow)
    ))
    .execute(&mut conn)
    .await
    .context("attaching the shadow file")?;
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut conn)
        .await
        .context("starting the swap")?;
    match swap_sqlite_body(&mut conn, projection, tables, cols).await {
        Ok(()) => {
            sqlx::query("COMMIT")
                .execute(&mut conn)
                .await
                .context("committing the swap")?;
        }
        Err(e) => {
            let _ = sqlx::query("ROLLBACK").execute(&mut conn).await;
            let _ = conn.close().await;
            return Err(e);
        }
    }
    sqlx::query("DETACH DATABASE ops_shadow")
        .execute(&mut conn)
        .await
        .context("detaching the shadow file")?;
    conn.close().await.context("closing the swap connection")?;
    Ok(())
}

async fn swap_sqlite_body(
    conn: &mut SqliteConnection,
    projection: Projection,
    tables: &[OwnedTable],
    cols: &[TableCopy],
) -> anyhow::Result<()> {
    let p = projection.as_str();
    let names: Vec<String> = tables.iter().map(|t| quote_literal(t.name)).collect();
    let triggers: Vec<(String, String)> = sqlx::query_as(&format!(
        "SELECT name, sql FROM main.sqlite_master WHERE type = 'trigger' AND tbl_name IN ({})",
        names.join(", ")
    ))
    .fetch_all(&mut *conn)
    .await
    .context("reading the projection's triggers")?;
    for (name, _) in &triggers {
        sqlx::query(&format!("DROP TRIGGER main.{}", quote_ident(name)))
            .execute(&mut *conn)
            .await
            .with_context(|| format!("dropping trigger {name} for the swap"))?;
    }
    for step in swap_steps(p, tables, cols, "main.", "ops_shadow") {
        let started = std::time::Instant::now();
        let q = sqlx::query(&step.sql);
        let q = if step.binds_projection { q.bind(p) } else { q };
        let rows = q
            .execute(&mut *conn)
            .await
            .with_context(|| step.what.clone())?
            .rows_affected();
        step.log(rows, started);
    }
    for (name, sql) in &triggers {
        sqlx::query(sql)
            .execute(&mut *conn)
            .await
            .with_context(|| format!("re-creating trigger {name}"))?;
    }
    Ok(())
}
