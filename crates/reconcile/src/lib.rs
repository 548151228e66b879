//! Reconciliation: the PSP's settlement files against the ledger.
//!
//! A settlement file is parsed and validated whole ([`settlement::parse`]),
//! matched against the ledger projection's `ledger_psp_references`
//! ([`matching::match_rows`]), recorded with its discrepancies in one
//! database transaction, and only then published: one
//! `ReconciliationDiscrepancyFound` per new difference and one
//! `ReconciliationRunCompleted`, with ids derived from the run and the
//! difference, so a crash between recording and publishing re-publishes
//! the same ids. Differences are worked off with [`resolve`]. Rules, flags
//! and guarantees: this crate's README.md.
//!
//! One job a module: the flags (`args`), the `paystream reconcile` command
//! (`command`) and its output (`print`), the nightly service (`service`)
//! and its calendar (`schedule`), fetching files from the PSP (`psp`), a
//! run (`run`: parse, match, record) and its publishing (`publish`), the
//! re-check of status mismatches (`recheck`), resolutions (`resolve`), the
//! ids (`ids`) and the events (`envelope`) derived from the stored rows,
//! SQL (`store`), and how all of it fails (`error`).

mod args;
mod command;
mod envelope;
mod error;
mod ids;
pub mod limits;
pub mod matching;
mod print;
mod psp;
mod publish;
mod recheck;
pub mod report;
mod resolve;
mod run;
mod schedule;
mod service;
pub mod settlement;
mod store;

pub use args::{Format, MatchArgs, ReconcileArgs, ReconcileCommand, ReconcilerArgs};
pub use command::run;
pub use envelope::StoredRowError;
pub use error::Error;
pub use ids::run_id;
pub use limits::{CATCH_UP_DAYS_MAX, RETRY_AFTER_MAX_DEFAULT};
pub use psp::{FetchError, PspSource, fetch_settlement};
pub use report::Report as ReconciliationReport;
pub use resolve::{ResolveError, Resolved, resolve};
pub use run::{Timings, reconcile_bytes, reconcile_from_psp};
pub use schedule::{AtError, day_plan};
pub use service::serve;

use events::Timestamp;
use storage::Db;
use streaming::{EventProducer, KafkaConfig};

/// Written into every event's `producer`.
pub const PRODUCER: &str = concat!("reconcile/", env!("CARGO_PKG_VERSION"));

/// Exit status of `paystream reconcile` while unresolved discrepancies
/// remain for the settlement day.
pub const EXIT_UNRESOLVED: u8 = 2;

/// Applies the migrations reconciliation needs: the projections' (for
/// `ledger_psp_references`) and its own (versions 4xxx).
pub async fn migrate(db: &Db) -> Result<(), storage::StorageError> {
    projections::migrate(db).await?;
    db.migrate(
        &storage::component_migrator(sqlx::migrate!("migrations/postgres")),
        &storage::component_migrator(sqlx::migrate!("migrations/sqlite")),
    )
    .await?;
    Ok(())
}

fn now_us() -> i64 {
    Timestamp::now().as_micros()
}

/// The database (migrated), the topics (created) and a producer: what the
/// command and the service work with.
async fn open(kafka: &KafkaConfig, db_url: &str) -> Result<(Db, EventProducer), Error> {
    let db = Db::connect(db_url).await?;
    migrate(&db).await?;
    streaming::admin::ensure_topics(kafka, &kafka.topology().specs()).await?;
    let producer = EventProducer::new(kafka, "paystream-reconcile")?;
    Ok((db, producer))
}
