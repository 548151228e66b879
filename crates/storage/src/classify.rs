//! Which SQL errors will happen again with the same input.
//!
//! Consumers retry a failed batch when the failure may go away (transient)
//! and dead-letter the message that causes it when it cannot
//! (deterministic); see `streaming::consumer::FailureClass`. This module
//! says which is which for `sqlx` errors:
//!
//! | deterministic (kind) | PostgreSQL | SQLite |
//! |---|---|---|
//! | `sql_data_exception` | SQLSTATE class 22 (22021 NUL byte / invalid encoding, 22003 numeric value out of range, 22001 string too long, 22P02 invalid text representation, ...) | `SQLITE_TOOBIG`, `SQLITE_MISMATCH`, `SQLITE_RANGE`, "integer overflow" (`SUM` beyond i64) |
//! | `sql_integrity_violation` | SQLSTATE class 23 (not null, foreign key, unique, check, exclusion) | `SQLITE_CONSTRAINT` and its extended codes |
//!
//! Everything else is transient: connection lost or refused, pool timeout
//! or closed, I/O and TLS errors, serialization failure 40001, deadlock
//! 40P01, lock not available 55P03, admin shutdown and other class 57/08/53
//! errors, `SQLITE_BUSY`, `SQLITE_LOCKED`, `SQLITE_IOERR`, `SQLITE_FULL`,
//! and anything unknown. Unknown errors count as transient on purpose: a
//! stalled partition is visible and heals when the cause is fixed, while a
//! valid event wrongly dead-lettered needs an operator to redrive it.

use sqlx::error::DatabaseError;

/// How a failure is to be treated by a consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlErrorClass {
    /// May succeed if tried again.
    Transient,
    /// The same statement with the same values fails the same way: the
    /// bounded code says why.
    Deterministic(&'static str),
}

pub const KIND_DATA: &str = "sql_data_exception";
pub const KIND_INTEGRITY: &str = "sql_integrity_violation";

// SQLite primary result codes (the low byte of the extended code).
const SQLITE_ERROR: i64 = 1;
const SQLITE_TOOBIG: i64 = 18;
const SQLITE_CONSTRAINT: i64 = 19;
const SQLITE_MISMATCH: i64 = 20;
const SQLITE_RANGE: i64 = 25;

/// Classifies one `sqlx` error (see the module docs).
pub fn sql_error_class(e: &sqlx::Error) -> SqlErrorClass {
    match e {
        sqlx::Error::Database(db) => database_error_class(db.as_ref()),
        _ => SqlErrorClass::Transient,
    }
}

fn database_error_class(db: &dyn DatabaseError) -> SqlErrorClass {
    let code = db.code();
    let code = code.as_deref().unwrap_or_default();
    if db
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .is_some()
    {
        return match code.get(..2) {
            Some("22") => SqlErrorClass::Deterministic(KIND_DATA),
            Some("23") => SqlErrorClass::Deterministic(KIND_INTEGRITY),
            _ => SqlErrorClass::Transient,
        };
    }
    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        // sqlx reports SQLite's extended result code.
        let Ok(extended) = code.parse::<i64>() else {
            return SqlErrorClass::Transient;
        };
        return match extended & 0xff {
            SQLITE_CONSTRAINT => SqlErrorClass::Deterministic(KIND_INTEGRITY),
            SQLITE_TOOBIG | SQLITE_MISMATCH | SQLITE_RANGE => {
                SqlErrorClass::Deterministic(KIND_DATA)
            }
            SQLITE_ERROR if db.message().contains("integer overflow") => {
                SqlErrorClass::Deterministic(KIND_DATA)
            }
            _ => SqlErrorClass::Transient,
        };
    }
    SqlErrorClass::Transient
}

/// The deterministic kind of the first `sqlx` error in `e`'s source chain
/// (`e` itself included), or `None` if there is none or it is transient.
/// Works through wrappers (`thiserror` `#[from]`/`#[source]`, `anyhow`).
pub fn deterministic_kind(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        // A `#[error(transparent)]` wrapper skips the `sqlx::Error` itself
        // and goes straight to the driver's error: look for both.
        let class = if let Some(sql) = err.downcast_ref::<sqlx::Error>() {
            Some(sql_error_class(sql))
        } else {
            err.downcast_ref::<Box<dyn DatabaseError>>()
                .map(|db| database_error_class(db.as_ref()))
        };
        match class {
            Some(SqlErrorClass::Deterministic(kind)) => return Some(kind),
            Some(SqlErrorClass::Transient) => return None,
            None => cur = err.source(),
        }
    }
    None
}
