//! The command-line flags of `paystream reconcile` and `paystream serve
//! reconciler`.

use crate::matching::Tolerance;
use clap::{Args, Subcommand, ValueEnum};
use runtime::secret::Secret;
use std::path::PathBuf;

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// A readable table.
    Table,
    /// One JSON document.
    Json,
}

/// `paystream reconcile --settlement FILE [--date D]` or
/// `paystream reconcile resolve ID --action A --reason R`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ReconcileArgs {
    #[command(subcommand)]
    pub command: Option<ReconcileCommand>,
    /// The PSP's settlement file (CSV: psp_reference, order_id,
    /// amount_minor, currency, status, fee_minor, settled_at).
    #[arg(long)]
    pub settlement: Option<PathBuf>,
    /// The settlement day (UTC, YYYY-MM-DD); every row must fall on it.
    /// Default: the day of the rows.
    #[arg(long)]
    pub date: Option<String>,
    #[command(flatten)]
    pub options: MatchArgs,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
    /// Same as --format json.
    #[arg(long)]
    pub json: bool,
}

/// Matching options shared by the command and the service.
#[derive(Debug, Clone, Args)]
pub struct MatchArgs {
    /// Fee differences up to this many minor units are not reported.
    #[arg(
        long,
        env = "PAYSTREAM_RECONCILE_FEE_TOLERANCE_MINOR",
        default_value_t = 0
    )]
    pub fee_tolerance_minor: i64,
}

impl MatchArgs {
    pub(crate) fn tolerance(&self) -> Result<Tolerance, crate::Error> {
        if self.fee_tolerance_minor < 0 {
            return Err(crate::Error::NegativeTolerance);
        }
        Ok(Tolerance {
            fee_minor: self.fee_tolerance_minor,
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum ReconcileCommand {
    /// Work off one discrepancy: an event (and, for accept_psp_amount, a
    /// balanced adjustment booked by the ledger). Nothing is edited in place.
    Resolve {
        /// The discrepancy id (from the report).
        id: String,
        /// accept_psp_amount, expect_late_settlement or escalate.
        #[arg(long)]
        action: String,
        /// Why (kept in the event: the audit trail).
        #[arg(long)]
        reason: String,
        /// Who resolves it.
        #[arg(long, env = "USER", default_value = "paystream-cli")]
        by: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `paystream serve reconciler`: fetch the PSP's settlement file of
/// `today - lag_days` every day at `--at` (UTC) and reconcile it.
#[derive(Debug, Clone, Args)]
pub struct ReconcilerArgs {
    /// Base URL of the PSP.
    #[arg(
        long,
        env = "PAYSTREAM_PSP_URL",
        default_value = "http://127.0.0.1:8090"
    )]
    pub psp_url: String,
    /// API key for the PSP (sent as a bearer token). Required, at least 32
    /// characters, no well-known value: generate one with
    /// `openssl rand -hex 32`.
    #[arg(long, env = "PAYSTREAM_PSP_API_KEY", hide_env_values = true)]
    pub psp_api_key: Option<Secret>,
    /// Timeout of one PSP request.
    #[arg(long, env = "PAYSTREAM_PSP_TIMEOUT_MS", default_value_t = crate::limits::PSP_TIMEOUT_MS_DEFAULT)]
    pub psp_timeout_ms: u64,
    /// Time of day (UTC, HH:MM) of the nightly run.
    #[arg(long, env = "PAYSTREAM_RECONCILE_AT", default_value = "02:30")]
    pub at: String,
    /// Reconcile the day this many days before the run's day.
    #[arg(long, env = "PAYSTREAM_RECONCILE_LAG_DAYS", default_value_t = 1)]
    pub lag_days: u16,
    /// Attempts to fetch a file (exponential back-off, Retry-After
    /// honoured) before the run is given up until the next day.
    #[arg(long, default_value_t = crate::limits::FETCH_ATTEMPTS_MAX_DEFAULT)]
    pub fetch_attempts: u32,
    /// Minutes to wait before retrying a failed scheduled run (instead of
    /// waiting for the next day).
    #[arg(long, default_value_t = 15)]
    pub retry_after_min: u64,
    /// Retries of a failed scheduled run before waiting for the next
    /// scheduled time.
    #[arg(long, default_value_t = crate::limits::RUN_RETRIES_MAX_DEFAULT)]
    pub retry_attempts: u32,
    /// Run once now and exit (non-zero on failure): without --date, the
    /// schedule's catch-up (every day after the watermark up to today - lag).
    #[arg(long)]
    pub once: bool,
    /// With --once: the settlement day (default today - lag days).
    #[arg(long, requires = "once")]
    pub date: Option<String>,
    #[command(flatten)]
    pub options: MatchArgs,
}
