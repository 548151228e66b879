//! The ledger and wallet projections of the payment topics.
//!
//! Two consumer groups (`{prefix}ledger`, `{prefix}wallet`, e.g. `paystream.ledger`) apply the
//! payment and reconciliation events to SQL tables, at least once with the
//! effect of exactly once: a batch's effects and its event ids are written
//! in one database transaction, and the Kafka offset is committed only
//! after it. The chart of accounts and every booking are documented in
//! this crate's README.md.

pub mod apply;
pub mod auth;
pub mod booking;
pub mod bulk;
pub mod cli;
pub mod error_code;
pub mod http;
pub mod limits;
pub mod query;
mod sql;
pub mod verify;

pub use apply::{Incoming, Projection, ProjectionHandler, apply_batch};
pub use cli::{LedgerCommand, ProjectionsArgs, run_ledger_command, serve};
pub use error_code::ErrorCode;
pub use http::{QueryLimits, router, router_with};
pub use verify::{VerifyReport, verify};

/// Applies the projections' migrations (versions 3xxx) for `db`'s backend.
pub async fn migrate(db: &storage::Db) -> Result<(), storage::StorageError> {
    db.migrate(
        &storage::component_migrator(sqlx::migrate!("migrations/postgres")),
        &storage::component_migrator(sqlx::migrate!("migrations/sqlite")),
    )
    .await
}
