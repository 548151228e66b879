//! A thin layer that runs the same SQL text on PostgreSQL and SQLite.
//!
//! Every statement here is written in the dialect both share (`$n`
//! placeholders, `ON CONFLICT`, `RETURNING`, `CAST(... AS BIGINT)`), so the
//! two backends cannot drift apart: there is one query per operation, not
//! one per backend.

use sqlx::{Postgres, Row as _, Sqlite, Transaction};
use storage::Db;

/// A bound parameter or a decoded column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum V {
    I(i64),
    T(String),
    N(Option<String>),
    /// Arrays, bound on PostgreSQL only (`UNNEST`, `= ANY`).
    IA(Vec<i64>),
    TA(Vec<String>),
    NA(Vec<Option<String>>),
}

impl V {
    pub(crate) fn int(&self) -> i64 {
        match self {
            V::I(i) => *i,
            other => panic!("expected an integer column, got {other:?}"),
        }
    }
    pub(crate) fn text(&self) -> String {
        match self {
            V::T(s) => s.clone(),
            other => panic!("expected a text column, got {other:?}"),
        }
    }
    pub(crate) fn opt_text(&self) -> Option<String> {
        match self {
            V::N(s) => s.clone(),
            V::T(s) => Some(s.clone()),
            other => panic!("expected a nullable text column, got {other:?}"),
        }
    }
}

/// How to decode one result column.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Ty {
    I,
    T,
    N,
}

/// One open database transaction on either backend.
pub(crate) enum Tx {
    Pg(Transaction<'static, Postgres>),
    Lite(Transaction<'static, Sqlite>),
}

macro_rules! bind_pg {
    ($q:expr, $vals:expr) => {{
        let mut q = $q;
        for v in $vals {
            q = match v {
                V::I(i) => q.bind(*i),
                V::T(s) => q.bind(s.as_str()),
                V::N(o) => q.bind(o.as_deref()),
                V::IA(a) => q.bind(a.as_slice()),
                V::TA(a) => q.bind(a.as_slice()),
                V::NA(a) => q.bind(a.as_slice()),
            };
        }
        q
    }};
}

macro_rules! bind_lite {
    ($q:expr, $vals:expr) => {{
        let mut q = $q;
        for v in $vals {
            q = match v {
                V::I(i) => q.bind(*i),
                V::T(s) => q.bind(s.as_str()),
                V::N(o) => q.bind(o.as_deref()),
                V::IA(_) | V::TA(_) | V::NA(_) => {
                    panic!("array parameters are for PostgreSQL only")
                }
            };
        }
        q
    }};
}

macro_rules! decode_row {
    ($row:expr, $cols:expr) => {{
        let mut out = Vec::with_capacity($cols.len());
        for (i, ty) in $cols.iter().enumerate() {
            out.push(match ty {
                Ty::I => V::I($row.try_get::<i64, _>(i)?),
                Ty::T => V::T($row.try_get::<String, _>(i)?),
                Ty::N => V::N($row.try_get::<Option<String>, _>(i)?),
            });
        }
        out
    }};
}

impl Tx {
    pub(crate) async fn begin(db: &Db) -> Result<Tx, sqlx::Error> {
        Ok(match db {
            Db::Postgres(p) => Tx::Pg(p.begin().await?),
            Db::Sqlite(p) => Tx::Lite(storage::BeginWrite::begin_write(p).await?),
        })
    }

    /// A transaction that only reads (queries, verify): a plain deferred
    /// `BEGIN` on SQLite, so readers never take the write lock and never
    /// hold up the projections' writers (WAL: one snapshot from the first
    /// read on).
    pub(crate) async fn begin_read(db: &Db) -> Result<Tx, sqlx::Error> {
        Ok(match db {
            Db::Postgres(p) => Tx::Pg(p.begin().await?),
            Db::Sqlite(p) => Tx::Lite(p.begin().await?),
        })
    }

    pub(crate) fn is_postgres(&self) -> bool {
        matches!(self, Tx::Pg(_))
    }

    pub(crate) async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Tx::Pg(t) => t.commit().await,
            Tx::Lite(t) => t.commit().await,
        }
    }

    /// Runs a statement; returns the rows it affected.
    pub(crate) async fn exec(&mut self, sql: &str, vals: &[V]) -> Result<u64, sqlx::Error> {
        Ok(match self {
            Tx::Pg(t) => bind_pg!(sqlx::query(sql), vals)
                .execute(&mut **t)
                .await?
                .rows_affected(),
            Tx::Lite(t) => bind_lite!(sqlx::query(sql), vals)
                .execute(&mut **t)
                .await?
                .rows_affected(),
        })
    }

    /// Runs a query and decodes every row by `cols`.
    pub(crate) async fn rows(
        &mut self,
        sql: &str,
        vals: &[V],
        cols: &[Ty],
    ) -> Result<Vec<Vec<V>>, sqlx::Error> {
        let mut out = Vec::new();
        match self {
            Tx::Pg(t) => {
                for row in bind_pg!(sqlx::query(sql), vals).fetch_all(&mut **t).await? {
                    out.push(decode_row!(row, cols));
                }
            }
            Tx::Lite(t) => {
                for row in bind_lite!(sqlx::query(sql), vals)
                    .fetch_all(&mut **t)
                    .await?
                {
                    out.push(decode_row!(row, cols));
                }
            }
        }
        Ok(out)
    }
}

use crate::limits::{INSERT_COLUMNS_MAX, ROWS_PER_STATEMENT_MAX};

/// `$first,$first+1,...` for an `IN (...)` list of `n` items.
pub(crate) fn in_list(n: usize, first: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Inserts `rows` (each `cols.len()` values):
/// `INSERT INTO {table} ({cols}) ... {suffix}`, returning the rows
/// `returning` decodes (empty `returning`: nothing).
///
/// PostgreSQL gets one `SELECT * FROM UNNEST($1::TEXT[], ...)` statement
/// whatever the row count, so its text (and prepared plan) is the same for
/// every batch; SQLite, where preparing is cheap, gets multi-row `VALUES`
/// in chunks.
pub(crate) async fn insert_many(
    tx: &mut Tx,
    table: &str,
    cols: &[&str],
    rows: &[Vec<V>],
    suffix: &str,
    returning: &[Ty],
) -> Result<Vec<Vec<V>>, sqlx::Error> {
    let mut out = Vec::new();
    if rows.is_empty() {
        return Ok(out);
    }
    for r in rows {
        assert_eq!(r.len(), cols.len(), "row width must match the columns");
    }
    debug_assert!(
        cols.len() <= INSERT_COLUMNS_MAX,
        "{table} has {} columns; raise limits::INSERT_COLUMNS_MAX (its SQLite bind budget is checked)",
        cols.len()
    );
    if tx.is_postgres() {
        let mut arrays = Vec::with_capacity(cols.len());
        let mut casts = Vec::with_capacity(cols.len());
        for c in 0..cols.len() {
            let (array, cast) = match &rows[0][c] {
                V::I(_) => (V::IA(rows.iter().map(|r| r[c].int()).collect()), "BIGINT[]"),
                V::T(_) => (V::TA(rows.iter().map(|r| r[c].text()).collect()), "TEXT[]"),
                V::N(_) => (
                    V::NA(rows.iter().map(|r| r[c].opt_text()).collect()),
                    "TEXT[]",
                ),
                other => panic!("arrays cannot be column values: {other:?}"),
            };
            arrays.push(array);
            casts.push(format!("${}::{cast}", c + 1));
        }
        let sql = format!(
            "INSERT INTO {table} ({}) SELECT * FROM UNNEST({}) {suffix}",
            cols.join(","),
            casts.join(",")
        );
        if returning.is_empty() {
            tx.exec(&sql, &arrays).await?;
        } else {
            out = tx.rows(&sql, &arrays, returning).await?;
        }
        return Ok(out);
    }
    for chunk in rows.chunks(ROWS_PER_STATEMENT_MAX) {
        // Anonymous `?` placeholders: SQLite looks a numbered parameter's
        // name up by walking a list, which makes binding thousands of `$n`
        // quadratic.
        let row = format!("({})", vec!["?"; cols.len()].join(","));
        let sql = format!(
            "INSERT INTO {table} ({}) VALUES {} {suffix}",
            cols.join(","),
            vec![row.as_str(); chunk.len()].join(",")
        );
        let vals: Vec<V> = chunk.iter().flat_map(|r| r.iter().cloned()).collect();
        if returning.is_empty() {
            tx.exec(&sql, &vals).await?;
        } else {
            out.extend(tx.rows(&sql, &vals, returning).await?);
        }
    }
    Ok(out)
}

/// `column IN (...)` for SQLite, `column = ANY($n)` for PostgreSQL (one
/// statement text whatever the list length), with its parameters numbered
/// from `first`. Callers chunk SQLite lists by [`ROWS_PER_STATEMENT_MAX`].
pub(crate) fn in_clause(tx: &Tx, column: &str, items: &[String], first: usize) -> (String, Vec<V>) {
    if tx.is_postgres() {
        (
            format!("{column} = ANY(${first})"),
            vec![V::TA(items.to_vec())],
        )
    } else {
        (
            format!("{column} IN ({})", in_list(items.len(), first)),
            items.iter().map(|s| V::T(s.clone())).collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_placeholder_lists() {
        assert_eq!(in_list(3, 2), "$2,$3,$4");
    }
}
