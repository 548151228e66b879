//! Which projection owns which table: the one list reset, rebuild, status
//! and the point-in-time projection go by.
//!
//! A test (`tests/it/tables.rs`) checks that every table
//! `projections::migrate` creates is listed here, so a table added by a
//! future migration cannot be forgotten by reset or rebuild.

use projections::Projection;
use std::collections::BTreeSet;
use storage::{Db, with_pool};

/// How reading the projection tables' catalogue or row counts fails.
#[derive(Debug, thiserror::Error)]
pub enum TablesError {
    #[error("listing the database's tables")]
    List(#[source] sqlx::Error),
    #[error("reading the columns of {table}")]
    Columns {
        table: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("table {table} has no columns (missing?)")]
    NoColumns { table: String },
    #[error("reading the primary key of {table}")]
    PrimaryKey {
        table: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("counting rows of {table}")]
    Count {
        table: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

/// Who a table's rows belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// Shared bookkeeping: rows keyed by a `projection` column
    /// (`ledger` / `wallet`); only that projection's rows are touched. On
    /// PostgreSQL the table is LIST-partitioned by that column, one
    /// partition per projection (`<table>_<projection>`, migration 3008).
    Shared,
    /// Only the ledger writes it: the whole table is the ledger's.
    Ledger,
    /// Only the wallet projection writes it.
    Wallet,
}

/// Every projection table, parents before children (foreign keys): rows
/// are inserted in this order and deleted in the reverse order. Tables
/// listed here that a database does not have (yet) are skipped, e.g.
/// `ledger_psp_references` before migration 3003.
pub const TABLES: &[(&str, Owner)] = &[
    ("applied_events", Owner::Shared),
    ("projection_orders", Owner::Shared),
    ("projection_bookings", Owner::Shared),
    ("projection_totals", Owner::Shared),
    ("ledger_transactions", Owner::Ledger),
    ("ledger_entries", Owner::Ledger),
    ("ledger_chain_head", Owner::Ledger),
    ("ledger_psp_references", Owner::Ledger),
    ("wallet_balances", Owner::Wallet),
    ("buyer_totals", Owner::Wallet),
];

/// Tables that are not projection data (migration bookkeeping).
pub const NOT_PROJECTION_DATA: &[&str] = &["_sqlx_migrations"];

/// One table a projection writes, and whether only some of its rows
/// (`projection = name`) are that projection's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnedTable {
    pub name: &'static str,
    pub shared: bool,
}

impl OwnedTable {
    /// The table that holds exactly `projection`'s rows on PostgreSQL: the
    /// projection's partition of a shared table, or the table itself.
    pub fn postgres_physical(&self, projection: Projection) -> String {
        if self.shared {
            format!("{}_{}", self.name, projection.as_str())
        } else {
            self.name.to_owned()
        }
    }
}

/// The tables `projection` writes, in insertion order.
pub fn tables_of(projection: Projection) -> Vec<OwnedTable> {
    TABLES
        .iter()
        .filter(|(_, o)| {
            matches!(
                (o, projection),
                (Owner::Shared, _)
                    | (Owner::Ledger, Projection::Ledger)
                    | (Owner::Wallet, Projection::Wallet)
            )
        })
        .map(|(name, o)| OwnedTable {
            name,
            shared: *o == Owner::Shared,
        })
        .collect()
}

/// Tables of the connection's current schema (PostgreSQL) or main
/// database (SQLite).
pub async fn existing_tables(db: &Db) -> Result<BTreeSet<String>, TablesError> {
    let names: Vec<String> =
        match db {
            // Tables and partitioned tables, not their partitions (a
            // shared table's per-projection partitions are part of it).
            Db::Postgres(p) => {
                sqlx::query_scalar(
                    "SELECT relname::TEXT FROM pg_class \
                 WHERE relnamespace = current_schema()::regnamespace \
                 AND relkind IN ('r', 'p') AND NOT relispartition",
                )
                .fetch_all(p)
                .await
            }
            Db::Sqlite(p) => sqlx::query_scalar(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
            )
            .fetch_all(p)
            .await,
        }
        .map_err(TablesError::List)?;
    Ok(names.into_iter().collect())
}

/// The tables of `projection` that exist in `db`, in insertion order.
pub async fn present_tables_of(
    db: &Db,
    projection: Projection,
) -> Result<Vec<OwnedTable>, TablesError> {
    let have = existing_tables(db).await?;
    Ok(tables_of(projection)
        .into_iter()
        .filter(|t| have.contains(t.name))
        .collect())
}

/// Column names of `table`, in table order.
pub async fn columns(db: &Db, table: &str) -> Result<Vec<String>, TablesError> {
    let cols: Vec<String> = match db {
        Db::Postgres(p) => {
            sqlx::query_scalar(
                "SELECT column_name::TEXT FROM information_schema.columns \
                 WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
            )
            .bind(table)
            .fetch_all(p)
            .await
        }
        Db::Sqlite(p) => {
            sqlx::query_scalar("SELECT name FROM pragma_table_info($1) ORDER BY cid")
                .bind(table)
                .fetch_all(p)
                .await
        }
    }
    .map_err(|source| TablesError::Columns {
        table: table.to_owned(),
        source,
    })?;
    if cols.is_empty() {
        return Err(TablesError::NoColumns {
            table: table.to_owned(),
        });
    }
    Ok(cols)
}

/// The primary key columns of `table`, in key order (empty if none).
pub async fn primary_key(db: &Db, table: &str) -> Result<Vec<String>, TablesError> {
    let cols: Vec<String> = match db {
        Db::Postgres(p) => {
            sqlx::query_scalar(
                "SELECT a.attname::TEXT FROM pg_index i \
                 JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) ON TRUE \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                 WHERE i.indrelid = (quote_ident(current_schema()) || '.' || quote_ident($1))::regclass \
                 AND i.indisprimary ORDER BY k.n",
            )
            .bind(table)
            .fetch_all(p)
            .await
        }
        Db::Sqlite(p) => {
            sqlx::query_scalar("SELECT name FROM pragma_table_info($1) WHERE pk > 0 ORDER BY pk")
                .bind(table)
                .fetch_all(p)
                .await
        }
    }
    .map_err(|source| TablesError::PrimaryKey {
        table: table.to_owned(),
        source,
    })?;
    Ok(cols)
}

/// Rows of `table` that belong to `projection`.
pub async fn count_rows(
    db: &Db,
    table: OwnedTable,
    projection: Projection,
) -> Result<i64, TablesError> {
    let n: i64 = if table.shared {
        let sql = format!("SELECT COUNT(*) FROM {} WHERE projection = $1", table.name);
        with_pool!(db, p => sqlx::query_scalar(&sql).bind(projection.as_str()).fetch_one(p).await)
    } else {
        let sql = format!("SELECT COUNT(*) FROM {}", table.name);
        with_pool!(db, p => sqlx::query_scalar(&sql).fetch_one(p).await)
    }
    .map_err(|source| TablesError::Count {
        table: table.name,
        source,
    })?;
    Ok(n)
}

/// Row counts of every table `projection` owns, in table order.
pub async fn row_counts(
    db: &Db,
    projection: Projection,
) -> Result<Vec<(String, i64)>, TablesError> {
    let mut out = Vec::new();
    for t in present_tables_of(db, projection).await? {
        out.push((t.name.to_owned(), count_rows(db, t, projection).await?));
    }
    Ok(out)
}

/// Whether `db` holds any projection data (an applied event of either
/// projection, or a ledger transaction).
pub async fn has_projection_data(db: &Db) -> Result<bool, TablesError> {
    let have = existing_tables(db).await?;
    for (name, _) in TABLES {
        if !have.contains(*name) || *name == "ledger_chain_head" {
            continue; // the chain head always has its genesis row
        }
        let sql = format!("SELECT COUNT(*) FROM {name}");
        let n: i64 = with_pool!(db, p => sqlx::query_scalar(&sql).fetch_one(p).await)?;
        if n > 0 {
            return Ok(true);
        }
    }
    Ok(false)
}
