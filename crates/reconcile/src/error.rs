//! How reconciliation fails: [`Error`], with the refusals of a resolution
//! ([`ResolveError`](crate::ResolveError)), stored rows that do not make an
//! event ([`StoredRowError`](crate::StoredRowError)) and a settlement file
//! the PSP did not hand over ([`FetchError`](crate::FetchError)) in their
//! own types. Every message is one a person can act on; where a failure
//! has a cause, the cause is the variant's `source`, so `{:#}` (what the
//! binary prints) shows the whole chain.

use crate::envelope::StoredRowError;
use crate::psp::FetchError;
use crate::report::TotalsOverflow;
use crate::resolve::ResolveError;
use crate::schedule::AtError;
use crate::settlement::FileError;
use std::path::PathBuf;
use streaming::ProduceError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The flags.
    #[error("give --settlement FILE (or the resolve subcommand)")]
    NoSettlement,
    #[error("unknown action {0:?}: accept_psp_amount, expect_late_settlement or escalate")]
    UnknownAction(String),
    /// A `--date` (or the stored watermark) that is not `YYYY-MM-DD`.
    #[error("{0}")]
    Date(String),
    #[error("--fee-tolerance-minor must not be negative")]
    NegativeTolerance,
    #[error(transparent)]
    At(#[from] AtError),
    #[error(transparent)]
    Secret(#[from] runtime::secret::SecretError),

    // The settlement file.
    #[error("reading {}", path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} rejected", path.display())]
    Rejected {
        path: PathBuf,
        #[source]
        source: FileError,
    },
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Fetch(#[from] FetchError),

    // A run.
    #[error("the settlement parser panicked")]
    ParserPanicked(#[source] tokio::task::JoinError),
    #[error("the settlement file was read but not prepared")]
    NotPrepared,
    #[error("the settlement day changed while the file was read")]
    DayChanged,
    #[error("stored report does not parse")]
    StoredReport(#[source] serde_json::Error),
    /// The file's amount or fee total per currency does not fit in i64.
    #[error("file {0} total overflows")]
    FileTotalOverflow(&'static str),
    #[error(transparent)]
    ReportTotals(#[from] TotalsOverflow),
    /// A count that does not fit in the report's i64.
    #[error(transparent)]
    Count(#[from] std::num::TryFromIntError),
    #[error(
        "{streamed} references were claimed while the file was read but the matching claims {copied} of them; nothing recorded"
    )]
    ClaimsDiverged { streamed: usize, copied: usize },
    #[error("run vanished")]
    RunVanished,
    #[error("discrepancy vanished")]
    DiscrepancyVanished,
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    StoredRow(#[from] StoredRowError),
    /// A scheduled day's run failed.
    #[error("reconciling {day}")]
    Reconciling {
        day: String,
        #[source]
        source: Box<Error>,
    },
    /// The time of day of the next run does not exist.
    #[error(transparent)]
    Time(#[from] time::error::ComponentRange),

    // Publishing.
    // (A ProduceError is large: boxed, so every Result of this crate stays
    // small.)
    #[error("appending discrepancy {id}")]
    AppendDiscrepancy {
        id: String,
        #[source]
        source: Box<ProduceError>,
    },
    #[error("appending the run event")]
    AppendRunEvent(#[source] Box<ProduceError>),
    #[error(transparent)]
    Produce(Box<ProduceError>),
    #[error(transparent)]
    Topics(#[from] streaming::admin::AdminError),

    // The database and the output.
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
    #[error(transparent)]
    Storage(#[from] storage::StorageError),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Output(#[from] std::io::Error),
}

impl From<ProduceError> for Error {
    fn from(e: ProduceError) -> Error {
        Error::Produce(Box::new(e))
    }
}

impl Error {
    /// Whether a run that failed this way may be tried again at once: a
    /// concurrent run claimed one of the references this one copied
    /// (unique violation) or the two waited on each other (deadlock).
    pub(crate) fn is_run_collision(&self) -> bool {
        let collision = |e: &sqlx::Error| {
            crate::store::is_unique_violation(e)
                || matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("40P01"))
        };
        if let Error::Sql(e) = self {
            return collision(e);
        }
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            if c.downcast_ref::<sqlx::Error>().is_some_and(collision) {
                return true;
            }
            cause = c.source();
        }
        false
    }
}
