//! The shadow a rebuild writes into, and the swap into the live tables.
//!
//! - PostgreSQL: a schema `ops_shadow_<projection>` in the same database
//!   holding one table per table of the projection, each `LIKE` the live
//!   table that holds exactly that projection's rows (its own tables, and
//!   its partition `<table>_<projection>` of each shared table; migration
//!   3008), under the shared table's name, so the projection code runs
//!   unchanged with the shadow first on its `search_path`. The swap is
//!   O(1) in the number of rows: no row is copied or deleted.
//!   1. The shadow gets the live tables' keys, indexes and triggers (a
//!      bulk load strips them first and they are built here, once, over
//!      sorted input), and statistics (`ANALYZE`).
//!   2. It waits until no transaction's snapshot is older than the
//!      shadow's rows (like `CREATE INDEX CONCURRENTLY` does): every
//!      snapshot alive at the swap then sees them, so a reader whose
//!      statement resolves a table after the swap sees the whole rebuilt
//!      projection, never an empty table. A reader that is still inside a
//!      REPEATABLE READ transaction that started before the rebuild ended
//!      is waited for, and keeps seeing the old projection to its end.
//!   3. One transaction takes every live table of the projection (the
//!      shared parents with them) `ACCESS EXCLUSIVE`, each attempt waiting
//!      at most [`SWAP_LOCK_ATTEMPT_MAX`] per lock and letting go of all of
//!      them otherwise (so a reader is never the victim of a deadlock with
//!      the swap), then detaches and drops the old partitions and tables
//!      and moves the shadow's in: `DETACH PARTITION`, `DROP TABLE`,
//!      `RENAME`, `SET SCHEMA`, `ATTACH PARTITION` (the CHECK of the
//!      projection spares the scan). A reader holding one of the old
//!      tables keeps it to the end of its transaction (the swap waits).
//! - SQLite: a separate file next to the database
//!   (`<db file>.ops-shadow-<projection>`), `ATTACH`ed to one connection
//!   of the live database for the swap: `BEGIN IMMEDIATE`; save the
//!   definitions of the projection's own tables, their indexes and
//!   triggers; drop the own tables whole and create them again empty
//!   (SQLite has no `TRUNCATE`, and dropping beats deleting row by row);
//!   delete the projection's rows of the shared tables; `INSERT ...
//!   SELECT` everything from the shadow in key order; create the saved
//!   indexes (each built once over all rows) and triggers again;
//!   `COMMIT`. All of it is transactional in SQLite, and in WAL mode
//!   readers keep seeing the old tables until the commit. This swap
//!   copies rows: O(n).
//!
//! The shadow is written without waiting for durability
//! (`synchronous_commit = off`; SQLite `synchronous = OFF`): a crash
//! during the rebuild only means running it again. The swap itself runs
//! with the live database's full durability (on PostgreSQL its commit
//! flushes the WAL that holds the shadow's rows). The shadow is removed
//! after the swap (and replaced if a previous rebuild left one behind).
//! Callers hold the projection's run lock (`crate::lock`), so two runs
//! never share a shadow.

use crate::limits::{
    SHADOW_INDEX_BUILD_MEMORY_MB_MAX, SHADOW_INDEX_BUILDS_MAX, SQLITE_SWAP_CACHE_KIB_MAX,
    SWAP_LOCK_ATTEMPT_MAX, SWAP_LOCK_BACKOFF_MAX, SWAP_LOCKS_WAIT_MAX, SWAP_OLD_SNAPSHOTS_WAIT_MAX,
    SWAP_WAIT_LOG_EVERY_MAX,
};
use crate::tables::TablesError;
use crate::tables::{OwnedTable, columns, present_tables_of, primary_key};
use projections::Projection;
use sqlx::ConnectOptions as _;
use sqlx::Connection as _;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};
use storage::Db;

/// How creating, stripping, swapping in or discarding a shadow fails.
#[derive(Debug, thiserror::Error)]
pub enum ShadowError {
    /// A statement (or connection) of one step failed; `what` names the
    /// step as an operator reads it (e.g. `creating the shadow schema`,
    /// `building <index> of the shadow's <table>`, `swapping the rebuilt
    /// ledger tables in: <SQL>`).
    #[error("{what}")]
    Sql {
        what: String,
        #[source]
        source: sqlx::Error,
    },
    #[error(transparent)]
    Tables(#[from] TablesError),
    #[error(transparent)]
    SqliteFile(#[from] SqliteFileError),
    #[error("migrating the shadow database")]
    Migrate(#[source] storage::StorageError),
    #[error("removing {}", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("shadow and live database differ in backend")]
    BackendMismatch,
    #[error("cannot retarget {ddl:?} from {on} (expected exactly one `{from}`)")]
    Retarget {
        ddl: String,
        on: String,
        from: String,
    },
    /// The index build queue's lock was poisoned (a build task panicked).
    #[error("poisoned")]
    Poisoned,
    #[error("an index build task panicked")]
    BuildPanicked(#[source] tokio::task::JoinError),
    #[error(
        "{count} transaction(s) older than the rebuilt tables were still open after {waited_secs} s, so \
         the swap could not go ahead without showing them empty tables: {list}. End them \
         (or wait for them) and run the rebuild again"
    )]
    OldSnapshots {
        count: usize,
        waited_secs: u64,
        list: String,
    },
    #[error("the shadow file's path is not UTF-8")]
    PathNotUtf8,
}

/// Names the step a failed statement belongs to ([`ShadowError::Sql`]).
trait Step<T> {
    fn step(self, what: &str) -> Result<T, ShadowError>;
    fn step_with(self, what: impl FnOnce() -> String) -> Result<T, ShadowError>;
}

impl<T> Step<T> for Result<T, sqlx::Error> {
    fn step(self, what: &str) -> Result<T, ShadowError> {
        self.step_with(|| what.to_owned())
    }

    fn step_with(self, what: impl FnOnce() -> String) -> Result<T, ShadowError> {
        self.map_err(|source| ShadowError::Sql {
            what: what(),
            source,
        })
    }
}

/// A migrated, initially empty copy of the projection tables.
#[derive(Debug)]
pub struct Shadow {
    /// Where the rebuild applies events.
    pub db: Db,
    place: Place,
}

#[derive(Debug, Clone)]
enum Place {
    /// `schema` the shadow's, `live` the live tables' schema.
    Postgres {
        schema: String,
        live: String,
    },
    Sqlite {
        path: PathBuf,
        main: PathBuf,
    },
}

/// The file of an SQLite database's main schema.
pub async fn sqlite_file(db: &Db) -> Result<PathBuf, SqliteFileError> {
    let Db::Sqlite(p) = db else {
        return Err(SqliteFileError::NotSqlite);
    };
    let file: String =
        sqlx::query_scalar("SELECT file FROM pragma_database_list WHERE name = 'main'")
            .fetch_one(p)
            .await
            .map_err(SqliteFileError::Locate)?;
    if file.is_empty() {
        return Err(SqliteFileError::InMemory);
    }
    Ok(PathBuf::from(file))
}

/// Why [`sqlite_file`] found no database file.
#[derive(Debug, thiserror::Error)]
pub enum SqliteFileError {
    #[error("not an SQLite database")]
    NotSqlite,
    #[error("locating the SQLite database file")]
    Locate(#[source] sqlx::Error),
    #[error("the SQLite database is in memory: a rebuild needs a database file")]
    InMemory,
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
    ) -> Result<Shadow, ShadowError> {
        match main {
            Db::Postgres(p) => {
                let schema = format!("ops_shadow_{}", projection.as_str());
                let live: String = sqlx::query_scalar("SELECT current_schema()::TEXT")
                    .fetch_one(p)
                    .await
                    .step("reading the live schema")?;
                sqlx::query(&format!(
                    "DROP SCHEMA IF EXISTS {} CASCADE",
                    quote_ident(&schema)
                ))
                .execute(p)
                .await
                .step("dropping a previous shadow schema")?;
                sqlx::query(&format!("CREATE SCHEMA {}", quote_ident(&schema)))
                    .execute(p)
                    .await
                    .step("creating the shadow schema")?;
                let tables = present_tables_of(main, projection).await?;
                for t in &tables {
                    sqlx::query(&format!(
                        "CREATE TABLE {}.{} (LIKE {} INCLUDING ALL EXCLUDING INDEXES)",
                        quote_ident(&schema),
                        quote_ident(t.name),
                        LiveTable::new(&live, t, projection).qualified()
                    ))
                    .execute(p)
                    .await
                    .step_with(|| format!("creating the shadow's {}", t.name))?;
                }
                complete_postgres(p, &schema, &live, projection, &tables).await?;
                // What the migrations seed: the ledger's genesis chain head.
                if projection == Projection::Ledger {
                    sqlx::query(&format!(
                        "INSERT INTO {}.ledger_chain_head (id, seq, hash) VALUES (1, 0, $1)",
                        quote_ident(&schema)
                    ))
                    .bind(projections::apply::GENESIS_HASH)
                    .execute(p)
                    .await
                    .step("seeding the shadow's chain head")?;
                }
                let opts = PgConnectOptions::from_str(main_url)
                    .step("parsing the database URL")?
                    .options([
                        ("search_path", schema.as_str()),
                        ("synchronous_commit", "off"),
                    ]);
                let pool = PgPoolOptions::new()
                    .max_connections(2)
                    .acquire_timeout(Duration::from_secs(30))
                    .connect_with(opts)
                    .await
                    .step("connecting to the shadow schema")?;
                Ok(Shadow {
                    db: Db::Postgres(pool),
                    place: Place::Postgres { schema, live },
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
                    .step_with(|| format!("creating the shadow file {}", path.display()))?;
                let db = Db::Sqlite(pool);
                projections::migrate(&db)
                    .await
                    .map_err(ShadowError::Migrate)?;
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
    /// that already holds every key once). On PostgreSQL the swap builds
    /// them again, each once over all rows, before the tables go live (a
    /// duplicate key fails the swap there, and the live projection stays
    /// as it was); on SQLite the shadow is only the staging area of a
    /// swap that copies its rows into the live tables, whose keys check
    /// every row again.
    pub async fn strip_indexes(&self) -> Result<(), ShadowError> {
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
                .step("listing the shadow's constraints")?;
                for (table, name) in cons {
                    sqlx::query(&format!(
                        "ALTER TABLE {table} DROP CONSTRAINT {}",
                        quote_ident(&name)
                    ))
                    .execute(p)
                    .await
                    .step_with(|| format!("dropping {name} of the shadow's {table}"))?;
                }
                let idx: Vec<String> = sqlx::query_scalar(
                    "SELECT indexname::TEXT FROM pg_indexes WHERE schemaname = current_schema()",
                )
                .fetch_all(p)
                .await
                .step("listing the shadow's indexes")?;
                for name in idx {
                    sqlx::query(&format!("DROP INDEX {}", quote_ident(&name)))
                        .execute(p)
                        .await
                        .step_with(|| format!("dropping index {name} of the shadow"))?;
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
                .step("listing the shadow's tables")?;
                let mut conn = p.acquire().await.step("connecting to the shadow")?;
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
                            .step_with(|| format!("stripping the shadow's {t}"))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Where the shadow lives, for messages.
    pub fn describe(&self) -> String {
        match &self.place {
            Place::Postgres { schema, .. } => format!("schema {schema}"),
            Place::Sqlite { path, .. } => format!("file {}", path.display()),
        }
    }

    /// Replaces `projection`'s rows in `main` with the shadow's, in one
    /// transaction, then removes the shadow. See the module docs for how
    /// each backend does it.
    pub async fn swap(self, main: &Db, projection: Projection) -> Result<(), ShadowError> {
        let tables = present_tables_of(main, projection).await?;
        self.db.close().await;
        let place = self.place.clone();
        match (&place, main) {
            (Place::Postgres { schema, live }, Db::Postgres(p)) => {
                swap_postgres(p, schema, live, projection, &tables).await?;
            }
            (Place::Sqlite { path, main: file }, Db::Sqlite(_)) => {
                let mut cols = Vec::new();
                for t in &tables {
                    cols.push(TableCopy {
                        columns: columns(main, t.name).await?.join(", "),
                        key: primary_key(main, t.name).await?,
                    });
                }
                swap_sqlite(file, path, projection, &tables, &cols).await?;
            }
            _ => return Err(ShadowError::BackendMismatch),
        }
        discard_place(&place, main).await?;
        // The live tables just received every row at once: statistics now,
        // not whenever something else takes them (autovacuum may be off).
        // On PostgreSQL the swapped-in tables brought theirs along; only
        // the shared parents' (over both partitions) need taking again.
        let started = Instant::now();
        match main {
            Db::Postgres(p) => {
                let parents: Vec<&str> =
                    tables.iter().filter(|t| t.shared).map(|t| t.name).collect();
                if !parents.is_empty() {
                    sqlx::query(&format!("ANALYZE {}", parents.join(", ")))
                        .execute(p)
                        .await
                        .step("taking statistics of the shared tables")?;
                }
            }
            Db::Sqlite(_) => projections::apply::analyze(main, projection)
                .await
                .step("taking statistics of the swapped-in tables")?,
        }
        tracing::info!(ms = millis(started), "swap: statistics taken");
        Ok(())
    }

    /// Removes the shadow without touching the live tables.
    pub async fn discard(self, main: &Db) -> Result<(), ShadowError> {
        self.db.close().await;
        discard_place(&self.place, main).await
    }
}

async fn discard_place(place: &Place, main: &Db) -> Result<(), ShadowError> {
    match (place, main) {
        (Place::Postgres { schema, .. }, Db::Postgres(p)) => {
            sqlx::query(&format!(
                "DROP SCHEMA IF EXISTS {} CASCADE",
                quote_ident(schema)
            ))
            .execute(p)
            .await
            .step("dropping the shadow schema")?;
        }
        (Place::Sqlite { path, .. }, _) => remove_sqlite_files(path)?,
        _ => {}
    }
    Ok(())
}

fn remove_sqlite_files(path: &std::path::Path) -> Result<(), ShadowError> {
    for suffix in ["", "-journal", "-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        match std::fs::remove_file(PathBuf::from(&name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ShadowError::Remove {
                    path: PathBuf::from(name),
                    source,
                });
            }
        }
    }
    Ok(())
}

fn millis(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The live PostgreSQL table that holds exactly one projection's rows of
/// one of its tables.
#[derive(Debug, Clone)]
struct LiveTable {
    schema: String,
    /// The projection's partition of a shared table, or the table.
    physical: String,
    /// The shared parent, for a partition.
    parent: Option<&'static str>,
}

impl LiveTable {
    fn new(schema: &str, t: &OwnedTable, projection: Projection) -> LiveTable {
        LiveTable {
            schema: schema.to_owned(),
            physical: t.postgres_physical(projection),
            parent: t.shared.then_some(t.name),
        }
    }

    fn qualified(&self) -> String {
        format!(
            "{}.{}",
            quote_ident(&self.schema),
            quote_ident(&self.physical)
        )
    }
}

/// The keys, indexes and triggers of a live table, as DDL that names the
/// table `on` (what PostgreSQL prints, schema-qualified), by name.
#[derive(Debug, Default)]
struct Definitions {
    /// (name, kind `p`/`u`/`x`, `PRIMARY KEY (...)`-style definition,
    /// `CREATE UNIQUE INDEX ... ON <on> ...` of its index)
    constraints: Vec<(String, String, String, String)>,
    /// (name, `CREATE INDEX ... ON <on> USING ...`)
    indexes: Vec<(String, String)>,
    /// (name, `CREATE TRIGGER ... ON <on> ...`)
    triggers: Vec<(String, String)>,
    on: String,
}

/// Reads `table`'s definitions with `search_path` empty, so PostgreSQL
/// qualifies every name it prints (the DDL then means the same from any
/// schema).
async fn definitions(pool: &sqlx::PgPool, table: &LiveTable) -> Result<Definitions, ShadowError> {
    let what = || {
        format!(
            "reading the keys, indexes and triggers of {}",
            table.physical
        )
    };
    let mut tx = pool.begin().await.step_with(what)?;
    sqlx::query("SET LOCAL search_path = pg_catalog")
        .execute(&mut *tx)
        .await
        .step_with(what)?;
    let rel = table.qualified();
    let on: String = sqlx::query_scalar("SELECT $1::TEXT::regclass::TEXT")
        .bind(&rel)
        .fetch_one(&mut *tx)
        .await
        .step_with(what)?;
    let constraints = sqlx::query_as(
        "SELECT conname::TEXT, contype::TEXT, pg_get_constraintdef(oid), \
         pg_get_indexdef(conindid) FROM pg_constraint \
         WHERE conrelid = $1::TEXT::regclass AND contype IN ('p', 'u', 'x') ORDER BY conname",
    )
    .bind(&rel)
    .fetch_all(&mut *tx)
    .await
    .step_with(what)?;
    let indexes = sqlx::query_as(
        "SELECT i.relname::TEXT, pg_get_indexdef(x.indexrelid) FROM pg_index x \
         JOIN pg_class i ON i.oid = x.indexrelid \
         WHERE x.indrelid = $1::TEXT::regclass \
         AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid \
                         AND c.conrelid = x.indrelid) \
         ORDER BY 1",
    )
    .bind(&rel)
    .fetch_all(&mut *tx)
    .await
    .step_with(what)?;
    // Not the internal ones (constraint triggers) nor the clones of a
    // partitioned parent's triggers (attaching makes those).
    let triggers = sqlx::query_as(
        "SELECT tgname::TEXT, pg_get_triggerdef(oid) FROM pg_trigger \
         WHERE tgrelid = $1::TEXT::regclass AND NOT tgisinternal AND tgparentid = 0 \
         ORDER BY tgname",
    )
    .bind(&rel)
    .fetch_all(&mut *tx)
    .await
    .step_with(what)?;
    tx.commit().await.step_with(what)?;
    Ok(Definitions {
        constraints,
        indexes,
        triggers,
        on,
    })
}

/// `ddl` with the table it is ON (`" ON <live> "`) replaced by `to`;
/// exactly one occurrence, or an error.
fn retarget(ddl: &str, on: &str, to: &str) -> Result<String, ShadowError> {
    let from = format!(" ON {on} ");
    if ddl.matches(&from).count() != 1 {
        return Err(ShadowError::Retarget {
            ddl: ddl.to_owned(),
            on: on.to_owned(),
            from,
        });
    }
    Ok(ddl.replacen(&from, &format!(" ON {to} "), 1))
}

/// DDL that gives shadow tables what they lack: index builds, which are
/// independent of each other (they run [`SHADOW_INDEX_BUILDS_MAX`] at a
/// time, largest table first), then what uses them (key constraints over
/// the built indexes, triggers), in order. Each entry: (what, SQL).
#[derive(Debug, Default)]
struct Completion {
    builds: Vec<(u64, String, String)>,
    then: Vec<(String, String)>,
}

impl Completion {
    async fn run(mut self, pool: &sqlx::PgPool) -> Result<(), ShadowError> {
        self.builds.sort_by_key(|b| std::cmp::Reverse(b.0));
        let builds: Vec<(String, String)> = self
            .builds
            .into_iter()
            .map(|(_, w, sql)| (w, sql))
            .collect();
        run_parallel(pool, builds, SHADOW_INDEX_BUILDS_MAX).await?;
        for (what, sql) in self.then {
            let started = Instant::now();
            sqlx::query(&sql)
                .execute(pool)
                .await
                .step_with(|| format!("building {what}"))?;
            tracing::debug!(ms = millis(started), "shadow: built {what}");
        }
        Ok(())
    }
}

/// Runs `jobs` (what, SQL) on `workers` connections of `pool` at once,
/// each in its own transaction with [`SHADOW_INDEX_BUILD_MEMORY_MB_MAX`]
/// of `maintenance_work_mem` (an index build sorts in memory instead of
/// merging runs from disk); the first failure is returned once all
/// workers stopped.
async fn run_parallel(
    pool: &sqlx::PgPool,
    jobs: Vec<(String, String)>,
    workers: usize,
) -> Result<(), ShadowError> {
    let queue = std::sync::Arc::new(std::sync::Mutex::new(
        jobs.into_iter().collect::<std::collections::VecDeque<_>>(),
    ));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers.max(1) {
        let (pool, queue) = (pool.clone(), queue.clone());
        set.spawn(async move {
            loop {
                let next = queue.lock().map_err(|_| ShadowError::Poisoned)?.pop_front();
                let Some((what, sql)) = next else {
                    return Ok::<(), ShadowError>(());
                };
                let started = Instant::now();
                let mut tx = pool
                    .begin()
                    .await
                    .step_with(|| format!("building {what}"))?;
                sqlx::query(&format!(
                    "SET LOCAL maintenance_work_mem = '{SHADOW_INDEX_BUILD_MEMORY_MB_MAX}MB'"
                ))
                .execute(&mut *tx)
                .await
                .step_with(|| format!("building {what}"))?;
                sqlx::query(&sql)
                    .execute(&mut *tx)
                    .await
                    .step_with(|| format!("building {what}"))?;
                tx.commit().await.step_with(|| format!("building {what}"))?;
                tracing::debug!(ms = millis(started), "shadow: built {what}");
            }
        });
    }
    let mut first = None;
    while let Some(done) = set.join_next().await {
        let r = done.map_err(ShadowError::BuildPanicked).and_then(|r| r);
        if let Err(e) = r {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// Gives the shadow's tables what their live tables have and they lack
/// (see [`completion`]), every table's index builds run together.
async fn complete_postgres(
    pool: &sqlx::PgPool,
    schema: &str,
    live: &str,
    projection: Projection,
    tables: &[OwnedTable],
) -> Result<(), ShadowError> {
    let mut c = Completion::default();
    for t in tables {
        completion(
            pool,
            &LiveTable::new(live, t, projection),
            schema,
            t.name,
            &mut c,
        )
        .await?;
    }
    c.run(pool).await
}

/// What the shadow's `name` lacks (by name) of the keys, indexes and
/// triggers `live` has: all of them after `CREATE TABLE ... LIKE`, the
/// keys and indexes again after [`Shadow::strip_indexes`]. A key
/// constraint is built as its unique index first, then declared over it
/// (`ADD CONSTRAINT ... USING INDEX`), so every index build can run
/// beside the others.
async fn completion(
    pool: &sqlx::PgPool,
    live: &LiveTable,
    schema: &str,
    name: &str,
    into: &mut Completion,
) -> Result<(), ShadowError> {
    let defs = definitions(pool, live).await?;
    let target = format!("{}.{}", quote_ident(schema), quote_ident(name));
    let (have, size): (Vec<String>, i64) = sqlx::query_as(
        "SELECT ARRAY(SELECT c.relname::TEXT FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid \
                      WHERE x.indrelid = $1::TEXT::regclass \
                      UNION ALL SELECT tgname::TEXT FROM pg_trigger WHERE tgrelid = $1::TEXT::regclass \
                      UNION ALL SELECT conname::TEXT FROM pg_constraint WHERE conrelid = $1::TEXT::regclass), \
                pg_relation_size($1::TEXT::regclass)",
    )
    .bind(&target)
    .fetch_one(pool)
    .await
    .step_with(|| format!("reading the shadow's indexes of {name}"))?;
    let size = u64::try_from(size).unwrap_or(0);
    let of = |what: &str| format!("{what} of the shadow's {name}");
    for (con, kind, def, index) in &defs.constraints {
        if have.contains(con) {
            continue;
        }
        let using = match kind.as_str() {
            "p" => Some("PRIMARY KEY"),
            "u" => Some("UNIQUE"),
            _ => None,
        };
        let q = quote_ident(con);
        match using {
            Some(using) => {
                // The live index has the constraint's name, so the built
                // one does too.
                into.builds
                    .push((size, of(con), retarget(index, &defs.on, &target)?));
                into.then.push((
                    of(&format!("{con} (the key)")),
                    format!("ALTER TABLE {target} ADD CONSTRAINT {q} {using} USING INDEX {q}"),
                ));
            }
            None => into.then.push((
                of(con),
                format!("ALTER TABLE {target} ADD CONSTRAINT {q} {def}"),
            )),
        }
    }
    for (idx, def) in &defs.indexes {
        if !have.contains(idx) {
            into.builds
                .push((size, of(idx), retarget(def, &defs.on, &target)?));
        }
    }
    for (trg, def) in &defs.triggers {
        if !have.contains(trg) {
            into.then.push((of(trg), retarget(def, &defs.on, &target)?));
        }
    }
    Ok(())
}

/// Waits until no other session of this database holds a snapshot older
/// than now (the shadow's rows are committed): such a snapshot would not
/// see the rebuilt rows in the swapped-in tables. Only client sessions
/// count: (auto)vacuum workers and WAL senders read no projection rows
/// through their snapshots. A marker transaction's
/// id, taken after the shadow's last commit, is the horizon; a snapshot
/// whose `xmin` precedes it may predate that commit.
async fn wait_for_older_snapshots(pool: &sqlx::PgPool) -> Result<(), ShadowError> {
    let what = "waiting for transactions older than the rebuilt tables";
    let mut tx = pool.begin().await.step(what)?;
    let marker: String = sqlx::query_scalar(
        "SELECT (pg_current_xact_id()::TEXT::NUMERIC % 4294967296)::BIGINT::TEXT",
    )
    .fetch_one(&mut *tx)
    .await
    .step(what)?;
    tx.commit().await.step(what)?;
    let started = Instant::now();
    let mut said = started;
    loop {
        let older: Vec<(i32, String, String)> = sqlx::query_as(
            "SELECT pid, COALESCE(state, ''), COALESCE(LEFT(query, 100), '') \
             FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() \
             AND backend_type = 'client backend' \
             AND backend_xmin IS NOT NULL AND age(backend_xmin) > age($1::TEXT::xid) \
             ORDER BY pid",
        )
        .bind(&marker)
        .fetch_all(pool)
        .await
        .step(what)?;
        if older.is_empty() {
            tracing::info!(
                ms = millis(started),
                "swap: no snapshot older than the shadow"
            );
            return Ok(());
        }
        let list = || {
            older
                .iter()
                .map(|(pid, state, q)| format!("pid {pid} ({state}): {q}"))
                .collect::<Vec<_>>()
                .join("; ")
        };
        if started.elapsed() >= SWAP_OLD_SNAPSHOTS_WAIT_MAX {
            return Err(ShadowError::OldSnapshots {
                count: older.len(),
                waited_secs: SWAP_OLD_SNAPSHOTS_WAIT_MAX.as_secs(),
                list: list(),
            });
        }
        if said.elapsed() >= SWAP_WAIT_LOG_EVERY_MAX {
            tracing::info!(
                waited_ms = millis(started),
                "swap: waiting for {} transaction(s) older than the rebuilt tables: {}",
                older.len(),
                list()
            );
            said = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn lock_not_available(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("55P03"))
}

async fn swap_postgres(
    pool: &sqlx::PgPool,
    schema: &str,
    live: &str,
    projection: Projection,
    tables: &[OwnedTable],
) -> Result<(), ShadowError> {
    let p = projection.as_str();
    let qs = quote_ident(schema);
    let ql = quote_ident(live);
    let live_tables: Vec<LiveTable> = tables
        .iter()
        .map(|t| LiveTable::new(live, t, projection))
        .collect();
    // 1. Keys, indexes, triggers and statistics, as the live tables have.
    let started = Instant::now();
    complete_postgres(pool, schema, live, projection, tables).await?;
    tracing::info!(ms = millis(started), "swap: shadow keys and indexes built");
    let started = Instant::now();
    let analyze = tables
        .iter()
        .map(|t| {
            (
                format!("statistics of the shadow's {}", t.name),
                format!("ANALYZE {qs}.{}", quote_ident(t.name)),
            )
        })
        .collect();
    run_parallel(pool, analyze, SHADOW_INDEX_BUILDS_MAX).await?;
    tracing::info!(ms = millis(started), "swap: shadow statistics taken");
    // 2. Every snapshot from here on sees the shadow's rows.
    wait_for_older_snapshots(pool).await?;
    // 3. The exchange, in one transaction.
    let mut lock: Vec<String> = tables
        .iter()
        .zip(&live_tables)
        .map(|(t, l)| {
            if t.shared {
                format!("{ql}.{}", quote_ident(t.name))
            } else {
                l.qualified()
            }
        })
        .collect();
    lock.dedup();
    let lock = format!("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", lock.join(", "));
    let mut steps = Vec::new();
    for (t, l) in tables.iter().zip(&live_tables) {
        let (name, phys) = (quote_ident(t.name), quote_ident(&l.physical));
        match l.parent {
            Some(parent) => {
                let parent = format!("{ql}.{}", quote_ident(parent));
                steps.push(format!("ALTER TABLE {parent} DETACH PARTITION {ql}.{phys}"));
                steps.push(format!("DROP TABLE {ql}.{phys}"));
                steps.push(format!("ALTER TABLE {qs}.{name} RENAME TO {phys}"));
                steps.push(format!("ALTER TABLE {qs}.{phys} SET SCHEMA {ql}"));
                steps.push(format!(
                    "ALTER TABLE {parent} ATTACH PARTITION {ql}.{phys} FOR VALUES IN ({})",
                    quote_literal(p)
                ));
            }
            None => {
                steps.push(format!("DROP TABLE {ql}.{phys}"));
                steps.push(format!("ALTER TABLE {qs}.{name} SET SCHEMA {ql}"));
            }
        }
    }
    let started = Instant::now();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let mut tx = pool.begin().await.step("starting the swap")?;
        sqlx::query(&format!(
            "SET LOCAL lock_timeout = '{}ms'",
            SWAP_LOCK_ATTEMPT_MAX.as_millis()
        ))
        .execute(&mut *tx)
        .await
        .step("starting the swap")?;
        match sqlx::query(&lock).execute(&mut *tx).await {
            Ok(_) => {}
            Err(e) if lock_not_available(&e) && started.elapsed() < SWAP_LOCKS_WAIT_MAX => {
                drop(tx); // rolls back: lets go of the locks taken so far
                let pause = Duration::from_millis(50 * u64::from(attempts.min(10)));
                tokio::time::sleep(pause.min(SWAP_LOCK_BACKOFF_MAX)).await;
                continue;
            }
            Err(e) => {
                return Err(e).step_with(|| {
                    format!(
                        "taking the live {p} tables for the swap ({attempts} attempt(s) in {} ms)",
                        millis(started)
                    )
                });
            }
        }
        let locked = millis(started);
        for sql in &steps {
            sqlx::query(sql)
                .execute(&mut *tx)
                .await
                .step_with(|| format!("swapping the rebuilt {p} tables in: {sql}"))?;
        }
        tx.commit().await.step("committing the swap")?;
        tracing::info!(
            attempts,
            lock_ms = locked,
            ms = millis(started),
            "swap: rebuilt {p} tables exchanged for the live ones"
        );
        return Ok(());
    }
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

/// The SQLite swap's statements: the shared tables' rows of projection
/// `p` deleted (the own tables were dropped and created again), then
/// every table copied from the shadow. `live` prefixes the live tables
/// (`"main."`), `shadow` is the shadow's schema.
fn swap_steps(
    p: &str,
    tables: &[OwnedTable],
    cols: &[TableCopy],
    live: &str,
    shadow: &str,
) -> Vec<SwapStep> {
    let mut steps = Vec::new();
    for t in tables.iter().rev().filter(|t| t.shared) {
        steps.push(SwapStep {
            sql: format!("DELETE FROM {live}{} WHERE projection = $1", t.name),
            binds_projection: true,
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
) -> Result<(), ShadowError> {
    let mut conn = SqliteConnectOptions::new()
        .filename(main_file)
        .busy_timeout(Duration::from_secs(30))
        .foreign_keys(true)
        .synchronous(SqliteSynchronous::Full)
        .pragma("cache_size", format!("-{SQLITE_SWAP_CACHE_KIB_MAX}"))
        .connect()
        .await
        .step("opening the SQLite database for the swap")?;
    let shadow = shadow_file.to_str().ok_or(ShadowError::PathNotUtf8)?;
    sqlx::query(&format!(
        "ATTACH DATABASE {} AS ops_shadow",
        quote_literal(shadow)
    ))
    .execute(&mut conn)
    .await
    .step("attaching the shadow file")?;
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut conn)
        .await
        .step("starting the swap")?;
    match swap_sqlite_body(&mut conn, projection, tables, cols).await {
        Ok(()) => {
            sqlx::query("COMMIT")
                .execute(&mut conn)
                .await
                .step("committing the swap")?;
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
        .step("detaching the shadow file")?;
    conn.close().await.step("closing the swap connection")?;
    Ok(())
}

/// Runs saved `CREATE` statements (kind, name, SQL) again.
async fn exec_saved<'a>(
    conn: &mut SqliteConnection,
    saved: impl Iterator<Item = &'a (String, String, String)>,
) -> Result<(), ShadowError> {
    for (kind, name, sql) in saved {
        sqlx::query(sql)
            .execute(&mut *conn)
            .await
            .step_with(|| format!("creating {kind} {name} again"))?;
    }
    Ok(())
}

async fn swap_sqlite_body(
    conn: &mut SqliteConnection,
    projection: Projection,
    tables: &[OwnedTable],
    cols: &[TableCopy],
) -> Result<(), ShadowError> {
    let p = projection.as_str();
    let list = |shared: Option<bool>| {
        tables
            .iter()
            .filter(|t| shared.is_none_or(|s| t.shared == s))
            .map(|t| quote_literal(t.name))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // The projection's own tables are dropped whole and created again
    // empty (no row-by-row delete), their secondary indexes built after
    // the copy, each over all rows at once; the shared tables lose only
    // this projection's rows. What comes back afterwards, in this order:
    // the own tables' definitions, then indexes, then every trigger (the
    // ledger's refuse the delete).
    let saved: Vec<(String, String, String)> = sqlx::query_as(&format!(
        "SELECT type, name, sql FROM main.sqlite_master WHERE sql IS NOT NULL AND \
         ((type IN ('table', 'index') AND tbl_name IN ({own})) \
          OR (type = 'trigger' AND tbl_name IN ({all}))) \
         ORDER BY CASE type WHEN 'table' THEN 0 WHEN 'index' THEN 1 ELSE 2 END, rowid",
        own = list(Some(false)),
        all = list(None),
    ))
    .fetch_all(&mut *conn)
    .await
    .step("reading the projection's table definitions")?;
    let started = Instant::now();
    for (kind, name, _) in saved.iter().filter(|(k, _, _)| k == "trigger") {
        sqlx::query(&format!("DROP TRIGGER main.{}", quote_ident(name)))
            .execute(&mut *conn)
            .await
            .step_with(|| format!("dropping {kind} {name} for the swap"))?;
    }
    for t in tables.iter().rev().filter(|t| !t.shared) {
        sqlx::query(&format!("DROP TABLE main.{}", quote_ident(t.name)))
            .execute(&mut *conn)
            .await
            .step_with(|| format!("dropping the old {}", t.name))?;
    }
    exec_saved(conn, saved.iter().filter(|(k, _, _)| k == "table")).await?;
    tracing::info!(
        ms = millis(started),
        "swap: own {p} tables dropped and created empty"
    );
    for step in swap_steps(p, tables, cols, "main.", "ops_shadow") {
        let started = std::time::Instant::now();
        let q = sqlx::query(&step.sql);
        let q = if step.binds_projection { q.bind(p) } else { q };
        let rows = q
            .execute(&mut *conn)
            .await
            .step_with(|| step.what.clone())?
            .rows_affected();
        step.log(rows, started);
    }
    let started = Instant::now();
    exec_saved(conn, saved.iter().filter(|(k, _, _)| k != "table")).await?;
    tracing::info!(
        ms = millis(started),
        "swap: indexes and triggers created again"
    );
    Ok(())
}
