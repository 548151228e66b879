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

pub mod matching;
pub mod report;
pub mod settlement;
mod store;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use events::{
    CorrelationId, DiscrepancyClass, DiscrepancyId, Envelope, EventId, Money, OrderId,
    PAYSTREAM_NAMESPACE, PaymentId, ReconciliationDiscrepancyFound,
    ReconciliationDiscrepancyResolved, ReconciliationRunCompleted, ResolutionAction, Timestamp,
};
use matching::{LedgerRef, Tolerance};
use report::{CurrencyTotals, DiscrepancyView, MoneyView, Report};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use storage::Db;
use streaming::secret::Secret;
use streaming::{EventProducer, KafkaConfig};
use time::Date;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use report::Report as ReconciliationReport;

/// Written into every event's `producer`.
pub const PRODUCER: &str = concat!("reconcile/", env!("CARGO_PKG_VERSION"));

/// Exit status of `paystream reconcile` while unresolved discrepancies
/// remain for the settlement day.
pub const EXIT_UNRESOLVED: u8 = 2;

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
    fn tolerance(&self) -> anyhow::Result<Tolerance> {
        if self.fee_tolerance_minor < 0 {
            bail!("--fee-tolerance-minor must not be negative");
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
    #[arg(long, env = "PAYSTREAM_PSP_TIMEOUT_MS", default_value_t = 10_000)]
    pub psp_timeout_ms: u64,
    /// Time of day (UTC, HH:MM) of the nightly run.
    #[arg(long, env = "PAYSTREAM_RECONCILE_AT", default_value = "02:30")]
    pub at: String,
    /// Reconcile the day this many days before the run's day.
    #[arg(long, env = "PAYSTREAM_RECONCILE_LAG_DAYS", default_value_t = 1)]
    pub lag_days: u16,
    /// Attempts to fetch a file (exponential back-off, Retry-After
    /// honoured) before the run is given up until the next day.
    #[arg(long, default_value_t = 8)]
    pub fetch_attempts: u32,
    /// Minutes to wait before retrying a failed scheduled run (instead of
    /// waiting for the next day).
    #[arg(long, default_value_t = 15)]
    pub retry_after_min: u64,
    /// Retries of a failed scheduled run before waiting for the next
    /// scheduled time.
    #[arg(long, default_value_t = 8)]
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

/// Where to fetch settlement files: a PSP (or the simulator) over HTTP.
#[derive(Debug, Clone)]
pub struct PspSource {
    /// e.g. `http://127.0.0.1:8090`
    pub base_url: String,
    pub api_key: Secret,
    /// Extra query string appended to the file's URL (the simulator's
    /// `inject=...&seed=...`), without `?`.
    pub query: Option<String>,
    pub timeout: Duration,
    /// Attempts before giving up (at least 1).
    pub attempts: u32,
    /// Longest wait a PSP's `Retry-After` may ask for between attempts
    /// (longer requests are cut to this).
    pub max_retry_after: Duration,
}

/// Default cap of a PSP's `Retry-After` between fetch attempts.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

impl PspSource {
    /// A simulator's (or PSP's) account at `base_url` with its API key.
    pub fn simulator(base_url: &str, api_key: Secret) -> PspSource {
        PspSource {
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key,
            query: None,
            timeout: Duration::from_secs(30),
            attempts: 5,
            max_retry_after: MAX_RETRY_AFTER,
        }
    }

    /// URL of a day's file.
    pub fn url(&self, date: Date) -> String {
        let mut u = format!(
            "{}/v1/settlements/{}.csv",
            self.base_url.trim_end_matches('/'),
            settlement::format_date(date)
        );
        if let Some(q) = &self.query {
            u.push('?');
            u.push_str(q);
        }
        u
    }
}

/// Applies the migrations reconciliation needs: the projections' (for
/// `ledger_psp_references`) and its own (versions 4xxx).
pub async fn migrate(db: &Db) -> anyhow::Result<()> {
    projections::migrate(db).await?;
    db.migrate(
        &storage::component_migrator(sqlx::migrate!("migrations/postgres")),
        &storage::component_migrator(sqlx::migrate!("migrations/sqlite")),
    )
    .await?;
    Ok(())
}

/// Timings of one run, for the benchmark and logs. The file is read on
/// a thread of its own while the ledger's references of the day are read
/// and (PostgreSQL) the claims are copied, so `parse`, `lookups` and
/// `claims` overlap; the other phases follow the parse.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// Reading and validating the file (its thread).
    pub parse: Duration,
    /// Everything: parse, ledger lookups, matching, recording, publishing.
    pub total: Duration,
    /// Reading the ledger's references (the day's and the others needed).
    pub lookups: Duration,
    /// Matching in memory and building the report.
    pub matching: Duration,
    /// Writing the claims (`reconcile_matched_refs`): those copied while
    /// the file was read plus the rest in the run's transaction.
    pub claims: Duration,
    /// Inserting the run's discrepancies.
    pub discrepancies: Duration,
    /// The run's transaction after matching (run, discrepancies, the
    /// claims not yet written, commit) and statistics.
    pub record: Duration,
    /// Appending the events.
    pub publish: Duration,
    /// How long after the parse ended the work alongside it (the day's
    /// references, the claims' COPY) was still running: the part of it
    /// the parse did not hide.
    pub prepare_tail: Duration,
}

fn now_us() -> i64 {
    Timestamp::now().as_micros()
}

fn discrepancy_uuid(date: &str, class: DiscrepancyClass, reference: &str) -> Uuid {
    Uuid::new_v5(
        &PAYSTREAM_NAMESPACE,
        format!(
            "reconciliation-discrepancy\0{date}\0{}\0{reference}",
            class.as_str()
        )
        .as_bytes(),
    )
}

fn run_uuid(run_id: &str) -> Uuid {
    Uuid::new_v5(
        &PAYSTREAM_NAMESPACE,
        format!("reconciliation-run\0{run_id}").as_bytes(),
    )
}

/// The run id of a file: settlement day plus the first 16 hex digits of
/// its SHA-256.
pub fn run_id(date: Date, sha256: &str) -> String {
    format!(
        "{}-{}",
        settlement::format_date(date),
        &sha256[..16.min(sha256.len())]
    )
}

fn money_of(m: &Option<(String, i64)>) -> anyhow::Result<Option<Money>> {
    m.as_ref()
        .map(|(c, a)| Ok(Money::new(*a, events::Currency::from_code(c)?)))
        .transpose()
}

fn view_money(m: &Option<(String, i64)>) -> Option<MoneyView> {
    m.as_ref().map(|(c, a)| MoneyView {
        amount_minor: *a,
        currency: c.clone(),
    })
}

/// What the thread reading a file sends while it reads.
#[derive(Debug)]
enum FromParser {
    /// The file's SHA-256 and settlement day: first, once.
    Day { sha256: String, date: Date },
    /// The references of the rows accepted since the previous message.
    Refs(Vec<String>),
    /// The whole file was read and is valid.
    Valid,
}

/// Messages of [`settlement::PROGRESS_ROWS`] references in flight from the
/// parser: enough that it seldom waits for the database.
const PARSER_MESSAGES_IN_FLIGHT: usize = 128;

/// Work done while the file is read.
#[derive(Debug)]
struct Early {
    date: Date,
    run_id: String,
    /// The run, when this file was recorded already (nothing else done).
    stored: Option<store::StoredRun>,
    /// The day's ledger references, each with the settlement day of the
    /// run that matched it, if any.
    day_refs: Vec<store::ClaimedRef>,
    /// PostgreSQL: the run's transaction, holding the claims of `streamed`.
    tx: Option<sqlx::Transaction<'static, sqlx::Postgres>>,
    /// References claimed in `tx`, each for the row of the same reference:
    /// the day's, not claimed by any run, in an accepted row.
    streamed: HashSet<String>,
    lookups: Duration,
    claims: Duration,
}

/// While the file is read: the run id (and whether it is recorded), the
/// day's ledger references, and on PostgreSQL the claims the matching is
/// bound to make by reference (a row whose reference is the day's and
/// unclaimed) copied into the run's transaction as their rows arrive.
/// `None` when the parser stopped without a valid file (its error says
/// why); the transaction is then rolled back.
async fn prepare(
    db: &Db,
    rx: &mut tokio::sync::mpsc::Receiver<FromParser>,
) -> anyhow::Result<Option<Early>> {
    let (sha256, date) = loop {
        match rx.recv().await {
            Some(FromParser::Day { sha256, date }) => break (sha256, date),
            Some(_) => continue,
            None => return Ok(None),
        }
    };
    let day = settlement::format_date(date);
    let run_id = run_id(date, &sha256);
    let mut early = Early {
        date,
        run_id,
        stored: None,
        day_refs: Vec::new(),
        tx: None,
        streamed: HashSet::new(),
        lookups: Duration::ZERO,
        claims: Duration::ZERO,
    };
    if let Some(stored) = store::load_run(db, &early.run_id).await? {
        early.stored = Some(stored);
        return Ok(Some(early));
    }
    let t = Instant::now();
    let from_us = settlement::day_start_ms(date) * 1_000;
    early.day_refs = store::day_refs_with_claims(db, from_us, from_us + 86_400_000_000).await?;
    early.lookups = t.elapsed();
    let Db::Postgres(p) = db else {
        // SQLite has one writer: its claims wait for the run's transaction
        // (the re-check of status mismatches writes after the parse).
        return Ok(Some(early));
    };
    let mut unclaimed: HashSet<&str> = early
        .day_refs
        .iter()
        .filter(|(_, claim)| claim.is_none())
        .map(|(r, _)| r.psp_reference.as_str())
        .collect();
    let mut tx = p.begin().await?;
    let mut valid = false;
    let mut streamed = HashSet::new();
    let t = Instant::now();
    let mut copy = store::ClaimCopy::start(&mut tx, &day, &early.run_id, now_us()).await?;
    let mut spent = t.elapsed();
    while let Some(m) = rx.recv().await {
        match m {
            FromParser::Refs(refs) => {
                let t = Instant::now();
                let fresh: Vec<String> = refs
                    .into_iter()
                    .filter(|r| unclaimed.remove(r.as_str()))
                    .collect();
                copy.send(fresh.iter().map(|r| (r.as_str(), r.as_str())))
                    .await?;
                streamed.extend(fresh);
                spent += t.elapsed();
            }
            FromParser::Valid => valid = true,
            FromParser::Day { .. } => {}
        }
    }
    drop(unclaimed);
    if !valid {
        copy.abort("the settlement file was rejected").await?;
        return Ok(None);
    }
    let t = Instant::now();
    copy.finish().await?;
    early.claims = spent + t.elapsed();
    early.tx = Some(tx);
    early.streamed = streamed;
    Ok(Some(early))
}

/// Whether a failed attempt may be tried again: a concurrent run claimed
/// one of the references this one copied (unique violation) or the two
/// waited on each other (deadlock). Nothing of the attempt was committed.
fn retryable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<sqlx::Error>().is_some_and(|e| {
            store::is_unique_violation(e)
                || matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("40P01"))
        })
    })
}

/// Attempts of a run that collided with a concurrent one ([`retryable`]).
const RUN_ATTEMPTS: u32 = 3;

/// Reconciles a settlement file's bytes. Re-running the same bytes for the
/// same day returns the recorded report and publishes nothing new (except
/// what a crashed earlier attempt had not published yet).
pub async fn reconcile_bytes(
    db: &Db,
    producer: &EventProducer,
    bytes: &[u8],
    source: &str,
    date: Option<Date>,
    tolerance: Tolerance,
) -> anyhow::Result<(Report, Timings)> {
    let mut attempt = 1;
    loop {
        match reconcile_once(db, producer, bytes, source, date, tolerance).await {
            Err(e) if attempt < RUN_ATTEMPTS && retryable(&e) => {
                tracing::warn!(error = %format!("{e:#}"), attempt, "reconciliation collided with a concurrent run; trying again");
                attempt += 1;
            }
            r => return r,
        }
    }
}

async fn reconcile_once(
    db: &Db,
    producer: &EventProducer,
    bytes: &[u8],
    source: &str,
    date: Option<Date>,
    tolerance: Tolerance,
) -> anyhow::Result<(Report, Timings)> {
    let started = Instant::now();
    // The file is read on a thread of its own; meanwhile the day's ledger
    // references are read and (PostgreSQL) the claims copied.
    let (to_prepare, mut rx) = tokio::sync::mpsc::channel(PARSER_MESSAGES_IN_FLIGHT);
    let owned = bytes.to_vec();
    let parser = tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        let mut announced = false;
        let file = settlement::parse_with(&owned, date, |p| {
            if let (false, Some(date)) = (announced, p.date) {
                announced = true;
                // A closed channel: the run needs no more (recorded).
                let _ = to_prepare.blocking_send(FromParser::Day {
                    sha256: p.sha256.to_owned(),
                    date,
                });
            }
            if announced && !p.rows.is_empty() {
                let refs = p.rows.iter().map(|r| r.psp_reference.clone()).collect();
                let _ = to_prepare.blocking_send(FromParser::Refs(refs));
            }
        });
        if file.is_ok() {
            let _ = to_prepare.blocking_send(FromParser::Valid);
        }
        (file, t.elapsed(), Instant::now())
    });
    let early = prepare(db, &mut rx).await;
    let prepared_at = Instant::now();
    drop(rx);
    let (file, parse, parsed_at) = parser.await.context("the settlement parser panicked")?;
    let prepare_tail = prepared_at.saturating_duration_since(parsed_at);
    let file = file?;
    let early = early?.context("the settlement file was read but not prepared")?;
    if early.date != file.date {
        bail!("the settlement day changed while the file was read");
    }
    // Earlier status mismatches whose charge the ledger has booked since.
    let auto_resolved = recheck_status_mismatches(db, producer, tolerance).await?;
    let day = settlement::format_date(file.date);
    let run_id = early.run_id;

    if let Some(stored) = early.stored {
        let mut report: Report =
            serde_json::from_str(&stored.report).context("stored report does not parse")?;
        if stored.state != "published" {
            publish_run(db, producer, &report).await?;
        }
        report.already_recorded = true;
        report.auto_resolved = auto_resolved;
        refresh(db, &mut report).await?;
        return Ok((
            report,
            Timings {
                parse,
                total: started.elapsed(),
                ..Timings::default()
            },
        ));
    }

    let lookups_started = Instant::now();
    // Ledger lookups: the day's references were read (each with the run
    // that matched it, if any) while the file was; now by `= ANY` only the
    // file's references not on the day (usually few) and the order ids of
    // rows still unknown.
    let mut earlier: HashMap<String, String> = HashMap::new();
    let mut note = |claimed: Option<String>, r: &LedgerRef| {
        if let Some(d) = claimed {
            earlier.insert(r.psp_reference.clone(), d);
        }
    };
    let mut day_refs: Vec<LedgerRef> = Vec::with_capacity(early.day_refs.len());
    for (r, claimed) in early.day_refs {
        // This day's own claims (an earlier file of the day) do not count.
        note(claimed.filter(|d| *d != day), &r);
        day_refs.push(r);
    }
    let on_day: HashSet<&str> = day_refs.iter().map(|r| r.psp_reference.as_str()).collect();
    let mut off_day: Vec<String> = file
        .rows
        .iter()
        .filter(|r| !on_day.contains(r.psp_reference.as_str()))
        .map(|r| r.psp_reference.clone())
        .collect();
    drop(on_day);
    off_day.sort_unstable();
    off_day.dedup();
    let mut other_refs: Vec<LedgerRef> = Vec::new();
    for (r, claimed) in store::refs_claimed_where_in(db, "psp_reference", &off_day, &day).await? {
        note(claimed, &r);
        other_refs.push(r);
    }
    let mut by_ref: HashMap<&str, &LedgerRef> =
        HashMap::with_capacity(day_refs.len() + other_refs.len());
    for r in day_refs.iter().chain(&other_refs) {
        by_ref.insert(r.psp_reference.as_str(), r);
    }
    let mut unknown_orders: Vec<String> = file
        .rows
        .iter()
        .filter(|r| !by_ref.contains_key(r.psp_reference.as_str()))
        .flat_map(|r| r.order_ids.iter().cloned())
        .collect();
    unknown_orders.sort_unstable();
    unknown_orders.dedup();
    let mut by_order: HashMap<String, Vec<LedgerRef>> = HashMap::new();
    for (r, claimed) in store::refs_claimed_where_in(db, "order_id", &unknown_orders, &day).await? {
        note(claimed, &r);
        by_order.entry(r.order_id.clone()).or_default().push(r);
    }
    let lookups = early.lookups + lookups_started.elapsed();
    let matching_started = Instant::now();
    let mut outcome = matching::match_rows(
        &file.rows, &by_ref, &by_order, &day_refs, &earlier, tolerance,
    );
    drop(by_ref);
    // Identical copies of a row: counted once, each copy reported.
    for (copy, first) in &file.duplicates {
        outcome.findings.push(matching::Finding {
            class: DiscrepancyClass::MissingInLedger,
            psp_reference: copy.psp_reference.clone(),
            order_ids: copy.order_ids.clone(),
            ours: None,
            theirs: Some(Money::new(copy.amount_minor, copy.currency)),
            detail: format!(
                "listed twice: line {} repeats line {first} exactly; counted once",
                copy.line
            ),
            line: Some(copy.line),
            psp_fee_minor: Some(copy.fee_minor),
        });
    }

    // Payment ids (partition keys, ledger payment of an adjustment).
    let mut orders: Vec<String> = outcome
        .findings
        .iter()
        .filter(|f| f.order_ids.len() == 1)
        .map(|f| f.order_ids[0].clone())
        .collect();
    orders.sort();
    orders.dedup();
    let payments = store::payment_ids(db, &orders).await?;

    let now = now_us();
    let mut seen: HashSet<Uuid> = HashSet::new();
    let mut rows: Vec<store::DiscrepancyRow> = Vec::new();
    for f in &outcome.findings {
        let id = discrepancy_uuid(&day, f.class, &f.psp_reference);
        if !seen.insert(id) {
            continue;
        }
        let m = |m: &Option<Money>| m.map(|m| (m.currency().code().to_owned(), m.amount_minor()));
        rows.push(store::DiscrepancyRow {
            discrepancy_id: id.to_string(),
            settlement_date: day.clone(),
            run_id: run_id.clone(),
            class: f.class.as_str().to_owned(),
            psp_reference: f.psp_reference.clone(),
            order_ids: f.order_ids.join(";"),
            payment_id: f
                .order_ids
                .first()
                .filter(|_| f.order_ids.len() == 1)
                .and_then(|o| payments.get(o).cloned()),
            ours: m(&f.ours),
            theirs: m(&f.theirs),
            detail: f.detail.clone(),
            line: f.line.and_then(|l| i64::try_from(l).ok()),
            found_event_id: EventId::derive(id, "found").to_string(),
            found_published: false,
            state: "open".into(),
            action: None,
            reason: None,
            resolved_by: None,
            adjustment: None,
            resolution_event_id: None,
            resolution_published: false,
            resolved_at: None,
            created_at: now,
            theirs_fee_minor: f.psp_fee_minor,
        });
    }
    let mut per_currency: std::collections::BTreeMap<String, CurrencyTotals> = Default::default();
    for r in &file.rows {
        let t = per_currency
            .entry(r.currency.code().to_owned())
            .or_default();
        t.rows += 1;
        t.amount_minor = t
            .amount_minor
            .checked_add(r.amount_minor)
            .context("file amount total overflows")?;
        t.fee_minor = t
            .fee_minor
            .checked_add(r.fee_minor)
            .context("file fee total overflows")?;
    }
    let mut report = Report {
        run_id: run_id.clone(),
        settlement_date: day.clone(),
        source: source.to_owned(),
        file_sha256: file.sha256.clone(),
        rows: i64::try_from(file.rows.len() + file.duplicates.len())?,
        matched: i64::try_from(outcome.matched)?,
        matched_by_order: i64::try_from(outcome.matched_by_order)?,
        discrepancies: rows
            .iter()
            .map(|d| DiscrepancyView {
                discrepancy_id: d.discrepancy_id.clone(),
                class: d.class.clone(),
                psp_reference: d.psp_reference.clone(),
                order_ids: d.order_ids.clone(),
                ours: view_money(&d.ours),
                theirs: view_money(&d.theirs),
                detail: d.detail.clone(),
                line: d.line,
                state: "open".into(),
                first_found_by: run_id.clone(),
            })
            .collect(),
        new_discrepancies: 0,
        per_class: Default::default(),
        per_class_currency: Default::default(),
        per_currency,
        already_recorded: false,
        unresolved: 0,
        updated_discrepancies: Vec::new(),
        auto_resolved: Vec::new(),
    };
    report.tally()?;
    // The ids new to this run are only known once recorded; the stored
    // report counts them.
    let existing: HashMap<String, store::DiscrepancyRow> = store::discrepancies_of_day(db, &day)
        .await?
        .into_iter()
        .map(|d| (d.discrepancy_id.clone(), d))
        .collect();
    report.new_discrepancies = i64::try_from(
        rows.iter()
            .filter(|d| !existing.contains_key(&d.discrepancy_id))
            .count(),
    )?;
    // Known and still open with other figures (a corrected file): updated.
    report.updated_discrepancies = rows
        .iter()
        .filter(|d| {
            existing.get(&d.discrepancy_id).is_some_and(|e| {
                e.state == "open"
                    && (e.ours != d.ours
                        || e.theirs != d.theirs
                        || e.theirs_fee_minor != d.theirs_fee_minor)
            })
        })
        .map(|d| d.discrepancy_id.clone())
        .collect();
    let json = serde_json::to_string(&report)?;
    // The claims copied while the file was read are exactly the matching's
    // claims by reference of the day's unclaimed references; the rest is
    // written with the run.
    let mut copied = 0;
    let rest: Vec<(String, String)> = outcome
        .claimed
        .iter()
        .filter(|(ours, row)| {
            let was = ours == row && early.streamed.contains(ours);
            copied += usize::from(was);
            !was
        })
        .cloned()
        .collect();
    if copied != early.streamed.len() {
        bail!(
            "{} references were claimed while the file was read but the matching claims {copied} of them; nothing recorded",
            early.streamed.len()
        );
    }
    let matching = matching_started.elapsed();
    let record_started = Instant::now();
    let mut claims = early.claims;
    let mut discrepancies = Duration::ZERO;
    let begun = early.tx.map(|tx| (tx, copied));
    match store::record_run(db, begun, &report, &json, &rows, &rest, now).await? {
        Some(r) => {
            claims += r.claims;
            discrepancies = r.discrepancies;
        }
        None => {
            // Recorded concurrently by another attempt: use its report.
            let stored = store::load_run(db, &run_id)
                .await?
                .context("run vanished")?;
            report = serde_json::from_str(&stored.report)?;
            report.already_recorded = true;
        }
    }
    let record = record_started.elapsed();
    let publish_started = Instant::now();
    publish_run(db, producer, &report).await?;
    let publish = publish_started.elapsed();
    report.auto_resolved = auto_resolved;
    refresh(db, &mut report).await?;
    Ok((
        report,
        Timings {
            parse,
            total: started.elapsed(),
            lookups,
            matching,
            claims,
            discrepancies,
            record,
            publish,
            prepare_tail,
        },
    ))
}

/// Current states, first runs and the day's unresolved count.
async fn refresh(db: &Db, report: &mut Report) -> anyhow::Result<()> {
    let day = store::discrepancies_of_day(db, &report.settlement_date).await?;
    let by_id: HashMap<&str, &store::DiscrepancyRow> =
        day.iter().map(|d| (d.discrepancy_id.as_str(), d)).collect();
    for v in &mut report.discrepancies {
        if let Some(d) = by_id.get(v.discrepancy_id.as_str()) {
            v.state.clone_from(&d.state);
            v.first_found_by.clone_from(&d.run_id);
        }
    }
    report.unresolved = i64::try_from(
        day.iter()
            .filter(|d| d.state == "open" || d.state == "escalated")
            .count(),
    )?;
    Ok(())
}

fn found_envelope(d: &store::DiscrepancyRow) -> anyhow::Result<Envelope> {
    let id = Uuid::parse_str(&d.discrepancy_id)?;
    let class = DiscrepancyClass::parse(&d.class).context("stored class")?;
    let order_id = if d.order_ids.contains(';') {
        None
    } else {
        d.order_ids.parse::<OrderId>().ok()
    };
    Ok(Envelope {
        event_id: d.found_event_id.parse()?,
        occurred_at: Timestamp::from_micros(d.created_at),
        payment_id: d.payment_id.as_deref().map(str::parse).transpose()?,
        correlation_id: CorrelationId::from_uuid(run_uuid(&d.run_id)),
        causation_id: None,
        producer: PRODUCER.to_owned(),
        schema_version: events::SCHEMA_VERSION,
        event: ReconciliationDiscrepancyFound {
            discrepancy_id: DiscrepancyId::from_uuid(id),
            run_id: d.run_id.clone(),
            class,
            psp_reference: Some(d.psp_reference.clone()),
            order_id,
            ours: money_of(&d.ours)?,
            theirs: money_of(&d.theirs)?,
            detail: if order_id.is_none() && !d.order_ids.is_empty() {
                format!("{} (order ids: {})", d.detail, d.order_ids)
            } else {
                d.detail.clone()
            },
        }
        .into(),
    })
}

/// Re-checks every open `status_mismatch` (single-order rows, all days)
/// against the current ledger. When the ledger now has the reference with
/// the status the PSP reported: the difference is closed (`resolved`,
/// action `expect_late_settlement`, reason "ledger caught up", no
/// adjustment, `ReconciliationDiscrepancyResolved` published); if the
/// amount or the fee (beyond the tolerance) now differ from the PSP row's,
/// an `amount_mismatch` / `fee_mismatch` is recorded and published first.
/// Returns the ids closed.
async fn recheck_status_mismatches(
    db: &Db,
    producer: &EventProducer,
    tol: Tolerance,
) -> anyhow::Result<Vec<String>> {
    let mut closed = Vec::new();
    for d in store::open_status_mismatches(db).await? {
        let (Some(theirs), Some(psp_fee)) = (money_of(&d.theirs)?, d.theirs_fee_minor) else {
            continue;
        };
        let refs =
            store::refs_where_in(db, "psp_reference", std::slice::from_ref(&d.psp_reference))
                .await?;
        let Some(r) = refs.first() else { continue };
        let (kind, status) = if theirs.amount_minor() < 0 {
            ("refund", "refunded")
        } else {
            ("charge", "succeeded")
        };
        if r.kind != kind || r.status != status || r.currency != theirs.currency() {
            continue;
        }
        let mut follow: Vec<(DiscrepancyClass, Money, Money, String)> = Vec::new();
        if r.amount_minor != theirs.amount_minor() {
            follow.push((
                DiscrepancyClass::AmountMismatch,
                Money::new(r.amount_minor, r.currency),
                theirs,
                format!(
                    "after the ledger caught up ({} {}): amount differs by {} {}",
                    r.kind,
                    r.status,
                    i128::from(theirs.amount_minor()) - i128::from(r.amount_minor),
                    r.currency
                ),
            ));
        }
        let fee_diff = i128::from(psp_fee) - i128::from(r.fee_minor);
        if fee_diff.abs() > i128::from(tol.fee_minor) {
            follow.push((
                DiscrepancyClass::FeeMismatch,
                Money::new(r.fee_minor, r.currency),
                Money::new(psp_fee, r.currency),
                format!(
                    "after the ledger caught up ({} {}): fee differs by {fee_diff} {} (tolerance {})",
                    r.kind, r.status, r.currency, tol.fee_minor
                ),
            ));
        }
        let now = now_us();
        let mut recorded = Vec::new();
        for (class, ours, theirs, detail) in follow {
            let id = discrepancy_uuid(&d.settlement_date, class, &d.psp_reference);
            let row = store::DiscrepancyRow {
                discrepancy_id: id.to_string(),
                class: class.as_str().to_owned(),
                ours: Some((ours.currency().code().to_owned(), ours.amount_minor())),
                theirs: Some((theirs.currency().code().to_owned(), theirs.amount_minor())),
                detail,
                found_event_id: EventId::derive(id, "found").to_string(),
                found_published: false,
                created_at: now,
                theirs_fee_minor: Some(psp_fee),
                ..d.clone()
            };
            if store::insert_discrepancy(db, &row).await? {
                producer.append(&found_envelope(&row)?).await?;
                store::mark_found_published(db, &row.discrepancy_id).await?;
            }
            recorded.push(format!("{} {}", row.class, row.discrepancy_id));
        }
        let mut reason = "ledger caught up".to_owned();
        if !recorded.is_empty() {
            reason.push_str(&format!("; recorded {}", recorded.join(", ")));
        }
        let disc = Uuid::parse_str(&d.discrepancy_id)?;
        let action = ResolutionAction::ExpectLateSettlement;
        let res = store::Resolution {
            state: "resolved",
            action: action.as_str().to_owned(),
            reason,
            resolved_by: PRODUCER.to_owned(),
            adjustment: None,
            event_id: EventId::derive(disc, &format!("resolved-{}", action.as_str())).to_string(),
        };
        if store::resolve(db, &d.discrepancy_id, &["open"], &res, now).await? {
            let d = store::load_discrepancy(db, &d.discrepancy_id)
                .await?
                .context("discrepancy vanished")?;
            producer.append(&resolution_envelope(&d)?).await?;
            store::mark_resolution_published(db, &d.discrepancy_id).await?;
            tracing::info!(discrepancy = %d.discrepancy_id, "status_mismatch closed: the ledger caught up");
            closed.push(d.discrepancy_id);
        }
    }
    Ok(closed)
}

/// Discrepancy events sent before awaiting their acknowledgements.
const PUBLISH_CHUNK: usize = 10_000;

/// Appends what a recorded run has not published yet: its discrepancies
/// first found by it, then the run event; marks each as published.
async fn publish_run(db: &Db, producer: &EventProducer, report: &Report) -> anyhow::Result<()> {
    let day = store::discrepancies_of_day(db, &report.settlement_date).await?;
    let ours: HashSet<&str> = report
        .discrepancies
        .iter()
        .map(|d| d.discrepancy_id.as_str())
        .collect();
    let pending: Vec<&store::DiscrepancyRow> = day
        .iter()
        .filter(|d| ours.contains(d.discrepancy_id.as_str()) && !d.found_published)
        .collect();
    // Sent all at once (the producer batches and pipelines them), awaited
    // all, then marked with one statement: a file with many differences no
    // longer costs two round trips each. Chunked only to bound memory.
    // Whatever was acknowledged is marked even when another send failed;
    // the rest is sent again by the next attempt (same event ids).
    for chunk in pending.chunks(PUBLISH_CHUNK) {
        let envelopes = chunk
            .iter()
            .map(|d| found_envelope(d))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let acks = futures::future::join_all(envelopes.iter().map(|e| producer.append(e))).await;
        let mut published = Vec::with_capacity(chunk.len());
        let mut failed = None;
        for (d, ack) in chunk.iter().zip(acks) {
            match ack {
                Ok(_) => published.push(d.discrepancy_id.clone()),
                Err(e) => {
                    failed.get_or_insert((d.discrepancy_id.clone(), e));
                }
            }
        }
        store::mark_found_published_many(db, &published).await?;
        if let Some((id, e)) = failed {
            return Err(e).with_context(|| format!("appending discrepancy {id}"));
        }
    }
    let run = run_uuid(&report.run_id);
    let env = Envelope {
        event_id: EventId::derive(run, "completed"),
        occurred_at: Timestamp::now(),
        payment_id: None,
        correlation_id: CorrelationId::from_uuid(run),
        causation_id: None,
        producer: PRODUCER.to_owned(),
        schema_version: events::SCHEMA_VERSION,
        event: ReconciliationRunCompleted {
            run_id: report.run_id.clone(),
            settlement_date: report.settlement_date.clone(),
            source: report.source.clone(),
            file_sha256: report.file_sha256.clone(),
            rows: report.rows,
            matched: report.matched,
            discrepancies: i64::try_from(report.discrepancies.len())?,
            class_counts: report.per_class.clone(),
        }
        .into(),
    };
    producer
        .append(&env)
        .await
        .context("appending the run event")?;
    store::mark_run_published(db, &report.run_id, now_us()).await?;
    Ok(())
}

/// Fetches a day's settlement file, retrying transient failures
/// (connection errors, timeouts, 5xx, 429) with exponential back-off and
/// honouring `Retry-After` up to `psp.max_retry_after`.
pub async fn fetch_settlement(psp: &PspSource, date: Date) -> anyhow::Result<Vec<u8>> {
    let client = reqwest::Client::builder().timeout(psp.timeout).build()?;
    let url = psp.url(date);
    let attempts = psp.attempts.max(1);
    let mut delay = Duration::from_millis(250);
    let mut last = String::new();
    for attempt in 1..=attempts {
        let res = client
            .get(&url)
            .bearer_auth(psp.api_key.expose())
            .send()
            .await;
        let wait = match res {
            Ok(r) if r.status().is_success() => {
                let body = r.bytes().await.with_context(|| format!("reading {url}"));
                match body {
                    Ok(b) => return Ok(b.to_vec()),
                    Err(e) => {
                        last = e.to_string();
                        None
                    }
                }
            }
            Ok(r) => {
                let status = r.status();
                let retry_after = r
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let body = r.text().await.unwrap_or_default();
                last = if status.as_u16() == 404 {
                    format!("HTTP {status} (the file is not ready yet): {body}")
                } else {
                    format!("HTTP {status}: {body}")
                };
                if !(status.is_server_error() || matches!(status.as_u16(), 404 | 429)) {
                    bail!("fetching {url}: {last}");
                }
                retry_after
            }
            Err(e) => {
                last = e.to_string();
                None
            }
        };
        if attempt < attempts {
            // A PSP (or whoever answers in its name) cannot park the
            // reconciler for hours.
            let d = wait
                .map(|w| w.min(psp.max_retry_after))
                .unwrap_or(delay)
                .max(delay);
            tracing::warn!(%url, attempt, error = %last, wait_ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX), "settlement fetch failed; retrying");
            tokio::time::sleep(d).await;
            delay = (delay * 2).min(Duration::from_secs(60));
        }
    }
    bail!("fetching {url} failed after {attempts} attempts: {last}")
}

/// For `paystream up` and the service: fetches `date`'s settlement file
/// from the PSP (or the running simulator) and reconciles it against the
/// ledger in `db` (migrations applied), publishing through `producer`.
/// Returns the report (its `unresolved` says whether work remains).
pub async fn reconcile_from_psp(
    db: &Db,
    producer: &EventProducer,
    psp: &PspSource,
    date: Date,
    tolerance: Tolerance,
) -> anyhow::Result<Report> {
    let bytes = fetch_settlement(psp, date).await?;
    let (report, t) =
        reconcile_bytes(db, producer, &bytes, &psp.url(date), Some(date), tolerance).await?;
    tracing::info!(
        run_id = %report.run_id,
        date = %report.settlement_date,
        rows = report.rows,
        matched = report.matched,
        discrepancies = report.discrepancies.len(),
        unresolved = report.unresolved,
        seconds = %format!("{:.3}", t.total.as_secs_f64()),
        "reconciliation run"
    );
    Ok(report)
}

/// What a resolution did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Resolved {
    pub discrepancy_id: String,
    pub class: String,
    pub action: String,
    pub state: String,
    /// Signed change of `psp_receivable` the ledger books (against
    /// `reconciliation_adjustments`), for accept_psp_amount.
    pub adjustment: Option<MoneyView>,
    pub event_id: String,
    /// True when this call only re-published a resolution recorded earlier
    /// whose event had not been appended.
    pub republished: bool,
}

fn resolution_envelope(d: &store::DiscrepancyRow) -> anyhow::Result<Envelope> {
    let id = Uuid::parse_str(&d.discrepancy_id)?;
    let action = d
        .action
        .as_deref()
        .and_then(ResolutionAction::parse)
        .context("stored action")?;
    Ok(Envelope {
        event_id: d
            .resolution_event_id
            .as_deref()
            .context("stored resolution event id")?
            .parse()?,
        occurred_at: Timestamp::from_micros(d.resolved_at.unwrap_or_else(now_us)),
        payment_id: d
            .payment_id
            .as_deref()
            .map(str::parse::<PaymentId>)
            .transpose()?,
        correlation_id: CorrelationId::from_uuid(id),
        causation_id: Some(d.found_event_id.parse()?),
        producer: PRODUCER.to_owned(),
        schema_version: events::SCHEMA_VERSION,
        event: ReconciliationDiscrepancyResolved {
            discrepancy_id: DiscrepancyId::from_uuid(id),
            action,
            reason: d.reason.clone().unwrap_or_default(),
            adjustment: money_of(&d.adjustment)?,
            resolved_by: d.resolved_by.clone().unwrap_or_default(),
        }
        .into(),
    })
}

/// Resolves a discrepancy: records the decision (conditionally: an open
/// discrepancy, or an escalated one getting a final action), then appends
/// `ReconciliationDiscrepancyResolved`. accept_psp_amount carries the
/// adjustment the ledger books: amount_mismatch theirs − ours, fee_mismatch
/// ours − theirs (a higher PSP fee lowers what the PSP owes us). Refused for
/// other classes, for a resolved discrepancy, and without a reason.
pub async fn resolve(
    db: &Db,
    producer: &EventProducer,
    id: &str,
    action: ResolutionAction,
    reason: &str,
    by: &str,
) -> anyhow::Result<Resolved> {
    let id = Uuid::parse_str(id.trim())
        .with_context(|| format!("discrepancy id {id:?} is not a UUID"))?
        .to_string();
    if reason.trim().is_empty() {
        bail!("a resolution needs a --reason (it is the audit trail)");
    }
    let d = store::load_discrepancy(db, &id)
        .await?
        .with_context(|| format!("no discrepancy {id}"))?;
    let done = |d: &store::DiscrepancyRow, republished| -> anyhow::Result<Resolved> {
        Ok(Resolved {
            discrepancy_id: d.discrepancy_id.clone(),
            class: d.class.clone(),
            action: d.action.clone().unwrap_or_default(),
            state: d.state.clone(),
            adjustment: view_money(&d.adjustment),
            event_id: d.resolution_event_id.clone().unwrap_or_default(),
            republished,
        })
    };
    let from: &[&str] = match d.state.as_str() {
        "open" => &["open"],
        "escalated" if action != ResolutionAction::Escalate => &["escalated"],
        _ => {
            if d.resolution_event_id.is_some() && !d.resolution_published {
                producer.append(&resolution_envelope(&d)?).await?;
                store::mark_resolution_published(db, &d.discrepancy_id).await?;
                return done(&d, true);
            }
            bail!(
                "discrepancy {id} is already {} ({} by {}: {}); it cannot be resolved twice",
                d.state,
                d.action.as_deref().unwrap_or("-"),
                d.resolved_by.as_deref().unwrap_or("-"),
                d.reason.as_deref().unwrap_or("-")
            );
        }
    };
    let class = DiscrepancyClass::parse(&d.class).context("stored class")?;
    let adjustment = match action {
        ResolutionAction::AcceptPspAmount => {
            let (Some(ours), Some(theirs)) = (money_of(&d.ours)?, money_of(&d.theirs)?) else {
                bail!(
                    "cannot accept the PSP's amount for a {} discrepancy: one side has no amount; use expect_late_settlement or escalate",
                    d.class
                );
            };
            if ours.currency() != theirs.currency() {
                bail!(
                    "cannot accept the PSP's amount across currencies ({} vs {}); escalate instead",
                    ours.currency(),
                    theirs.currency()
                );
            }
            let adj = match class {
                DiscrepancyClass::AmountMismatch => theirs.checked_sub(ours)?,
                DiscrepancyClass::FeeMismatch => ours.checked_sub(theirs)?,
                other => bail!(
                    "accept_psp_amount applies to amount_mismatch and fee_mismatch, not {}: a {} is settled by the PSP's outcome reaching the ledger; use expect_late_settlement or escalate",
                    other.as_str(),
                    other.as_str()
                ),
            };
            if adj.is_zero() {
                bail!("nothing to adjust: the amounts are equal");
            }
            if (ours.amount_minor() < 0) != (theirs.amount_minor() < 0) {
                bail!(
                    "cannot accept the PSP's amount: ours ({ours}) and theirs ({theirs}) differ in sign (a refund against a charge?); escalate instead"
                );
            }
            let max = projections::booking::MAX_AMOUNT_MINOR;
            if adj.amount_minor().unsigned_abs() > max.unsigned_abs() {
                bail!(
                    "cannot accept the PSP's amount: the adjustment {adj} is above the bound of {max} minor units; escalate instead"
                );
            }
            // The same settlement row also disagreed on status or currency:
            // the amounts compared are not the same kind of thing.
            let same_row: Vec<String> = store::discrepancies_of_day(db, &d.settlement_date)
                .await?
                .into_iter()
                .filter(|o| {
                    o.psp_reference == d.psp_reference
                        && o.line == d.line
                        && o.state != "resolved"
                        && (o.class == "status_mismatch" || o.class == "currency_mismatch")
                })
                .map(|o| format!("{} {}", o.class, o.discrepancy_id))
                .collect();
            if !same_row.is_empty() {
                bail!(
                    "cannot accept the PSP's amount: the same settlement row also has {}; settle that first or escalate",
                    same_row.join(", ")
                );
            }
            Some((adj.currency().code().to_owned(), adj.amount_minor()))
        }
        ResolutionAction::ExpectLateSettlement | ResolutionAction::Escalate => None,
    };
    let state = match action {
        ResolutionAction::AcceptPspAmount => "resolved",
        ResolutionAction::ExpectLateSettlement => "expected",
        ResolutionAction::Escalate => "escalated",
    };
    let disc = Uuid::parse_str(&d.discrepancy_id)?;
    let r = store::Resolution {
        state,
        action: action.as_str().to_owned(),
        reason: reason.trim().to_owned(),
        resolved_by: by.to_owned(),
        adjustment,
        event_id: EventId::derive(disc, &format!("resolved-{}", action.as_str())).to_string(),
    };
    if !store::resolve(db, &id, from, &r, now_us()).await? {
        bail!("discrepancy {id} was resolved concurrently; nothing done");
    }
    let d = store::load_discrepancy(db, &id)
        .await?
        .context("discrepancy vanished")?;
    producer
        .append(&resolution_envelope(&d)?)
        .await
        .context("appending the resolution (recorded; re-run the same resolve to publish it)")?;
    store::mark_resolution_published(db, &id).await?;
    let d = store::load_discrepancy(db, &id)
        .await?
        .context("discrepancy vanished")?;
    done(&d, false)
}

async fn open(kafka: &KafkaConfig, db_url: &str) -> anyhow::Result<(Db, EventProducer)> {
    let db = Db::connect(db_url).await?;
    migrate(&db).await?;
    streaming::admin::ensure_topics(kafka, &kafka.topology().specs()).await?;
    let producer = EventProducer::new(kafka, "paystream-reconcile")?;
    Ok((db, producer))
}

/// Writes to stdout; a closed pipe (`| head`) is not an error.
fn out(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut o = std::io::stdout().lock();
    match o.write_all(text.as_bytes()).and_then(|()| o.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn print_report(report: &Report, json: bool) -> anyhow::Result<()> {
    if json {
        out(&format!("{}\n", serde_json::to_string_pretty(report)?))
    } else {
        out(&report.table())
    }
}

/// `paystream reconcile ...`. Exit status [`EXIT_UNRESOLVED`] while
/// unresolved discrepancies remain for the settlement day.
pub async fn run(
    kafka: KafkaConfig,
    db_url: &str,
    args: ReconcileArgs,
) -> anyhow::Result<ExitCode> {
    if let Some(ReconcileCommand::Resolve {
        id,
        action,
        reason,
        by,
        json,
    }) = args.command
    {
        let action = ResolutionAction::parse(&action).with_context(|| {
            format!(
                "unknown action {action:?}: accept_psp_amount, expect_late_settlement or escalate"
            )
        })?;
        let (db, producer) = open(&kafka, db_url).await?;
        let r = resolve(&db, &producer, &id, action, &reason, &by).await?;
        if json {
            out(&format!("{}\n", serde_json::to_string_pretty(&r)?))?;
        } else {
            let adj = r
                .adjustment
                .as_ref()
                .map(|m| {
                    format!(
                        ", adjustment {} {} (psp_receivable)",
                        m.amount_minor, m.currency
                    )
                })
                .unwrap_or_default();
            out(&format!(
                "discrepancy {} ({}) -> {} by {}{adj}; event {}{}\n",
                r.discrepancy_id,
                r.class,
                r.state,
                r.action,
                r.event_id,
                if r.republished { " (re-published)" } else { "" }
            ))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let Some(path) = args.settlement else {
        bail!("give --settlement FILE (or the resolve subcommand)");
    };
    let date = args
        .date
        .as_deref()
        .map(settlement::parse_date)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let tolerance = args.options.tolerance()?;
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    // Validate before touching the database or the broker.
    settlement::parse(&bytes, date).with_context(|| format!("{} rejected", path.display()))?;
    let (db, producer) = open(&kafka, db_url).await?;
    let (report, t) = reconcile_bytes(
        &db,
        &producer,
        &bytes,
        &path.display().to_string(),
        date,
        tolerance,
    )
    .await?;
    print_report(&report, args.json || args.format == Format::Json)?;
    eprintln!(
        "parsed in {:.3} s, reconciled in {:.3} s",
        t.parse.as_secs_f64(),
        t.total.as_secs_f64()
    );
    Ok(if report.unresolved > 0 {
        eprintln!(
            "{} unresolved discrepancies for {}",
            report.unresolved, report.settlement_date
        );
        ExitCode::from(EXIT_UNRESOLVED)
    } else {
        ExitCode::SUCCESS
    })
}

/// `HH:MM` → minutes after midnight.
fn parse_at(s: &str) -> anyhow::Result<(u8, u8)> {
    let (h, m) = s
        .split_once(':')
        .with_context(|| format!("--at {s:?}: expected HH:MM"))?;
    let h: u8 = h.parse().with_context(|| format!("--at {s:?}: bad hour"))?;
    let m: u8 = m
        .parse()
        .with_context(|| format!("--at {s:?}: bad minute"))?;
    if h > 23 || m > 59 {
        bail!("--at {s:?}: expected HH:MM between 00:00 and 23:59");
    }
    Ok((h, m))
}

/// The next instant at `h:m` UTC strictly after `now`.
fn next_at(now: time::OffsetDateTime, h: u8, m: u8) -> anyhow::Result<time::OffsetDateTime> {
    let today = now.date().with_hms(h, m, 0)?.assume_utc();
    Ok(if today > now {
        today
    } else {
        today + time::Duration::days(1)
    })
}

/// Most days the schedule reconciles in one go (catching up after an
/// outage), counting the target day.
pub const MAX_CATCH_UP_DAYS: i64 = 31;

/// The days a scheduled run reconciles, oldest first: every day after the
/// watermark (the last day the schedule reconciled successfully) up to
/// `today - lag_days`, at most [`MAX_CATCH_UP_DAYS`]; without a watermark
/// (first start) only `today - lag_days`.
pub fn day_plan(watermark: Option<Date>, today: Date, lag_days: u16) -> Vec<Date> {
    let target = today - time::Duration::days(i64::from(lag_days));
    let oldest = target - time::Duration::days(MAX_CATCH_UP_DAYS - 1);
    let start = match watermark {
        Some(w) => (w + time::Duration::days(1)).max(oldest),
        None => target,
    };
    let mut out = Vec::new();
    let mut d = start;
    while d <= target {
        out.push(d);
        match d.next_day() {
            Some(n) => d = n,
            None => break,
        }
    }
    out
}

/// One scheduled run: reconciles the [`day_plan`] in order, moving the
/// watermark after each day; stops at the first failure (later days wait,
/// so the watermark never skips a day).
async fn scheduled_run(
    db: &Db,
    producer: &EventProducer,
    psp: &PspSource,
    lag_days: u16,
    tolerance: Tolerance,
) -> anyhow::Result<()> {
    let watermark = store::watermark(db)
        .await?
        .map(|d| settlement::parse_date(&d).map_err(anyhow::Error::msg))
        .transpose()?;
    let plan = day_plan(watermark, time::OffsetDateTime::now_utc().date(), lag_days);
    if plan.len() > 1 {
        tracing::info!(days = plan.len(), "reconciler catching up");
    }
    for date in plan {
        let day = settlement::format_date(date);
        let r = reconcile_from_psp(db, producer, psp, date, tolerance)
            .await
            .with_context(|| format!("reconciling {day}"))?;
        if r.unresolved > 0 {
            tracing::warn!(date = %r.settlement_date, unresolved = r.unresolved, "unresolved reconciliation discrepancies");
        }
        store::advance_watermark(db, &day, now_us()).await?;
    }
    Ok(())
}

/// `paystream serve reconciler`: nightly at `--at` (UTC) reconcile every
/// day from the watermark + 1 to `today - lag_days`; a failed run is
/// retried after `--retry-after-min` (up to `--retry-attempts` times);
/// `--once` runs once now.
pub async fn serve(
    kafka: KafkaConfig,
    db_url: &str,
    args: ReconcilerArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (h, m) = parse_at(&args.at)?;
    let tolerance = args.options.tolerance()?;
    let api_key = streaming::secret::require(
        args.psp_api_key.as_ref(),
        "--psp-api-key / PAYSTREAM_PSP_API_KEY",
    )?;
    let psp = PspSource {
        base_url: args.psp_url.trim_end_matches('/').to_owned(),
        api_key,
        query: None,
        timeout: Duration::from_millis(args.psp_timeout_ms),
        attempts: args.fetch_attempts,
        max_retry_after: MAX_RETRY_AFTER,
    };
    let (db, producer) = open(&kafka, db_url).await?;
    if args.once {
        match &args.date {
            Some(d) => {
                let date = settlement::parse_date(d).map_err(anyhow::Error::msg)?;
                let report = reconcile_from_psp(&db, &producer, &psp, date, tolerance).await?;
                eprint!("{}", report.table());
            }
            None => scheduled_run(&db, &producer, &psp, args.lag_days, tolerance).await?,
        }
        return Ok(());
    }
    tracing::info!(at = %args.at, lag_days = args.lag_days, psp = %psp.base_url, "reconciler scheduled");
    let retry = Duration::from_secs(args.retry_after_min.max(1).saturating_mul(60));
    let mut failures: u32 = 0;
    let mut next = next_at(time::OffsetDateTime::now_utc(), h, m)?;
    loop {
        let now = time::OffsetDateTime::now_utc();
        let wait = Duration::try_from(next - now).unwrap_or(Duration::ZERO);
        tracing::info!(next = %next, "next reconciliation run");
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(wait) => {}
        }
        match scheduled_run(&db, &producer, &psp, args.lag_days, tolerance).await {
            Ok(()) => {
                failures = 0;
                next = next_at(time::OffsetDateTime::now_utc(), h, m)?;
            }
            Err(e) if failures < args.retry_attempts => {
                failures += 1;
                tracing::error!(error = %format!("{e:#}"), attempt = failures, retry_in_s = retry.as_secs(), "reconciliation run failed; retrying");
                next = time::OffsetDateTime::now_utc() + retry;
            }
            Err(e) => {
                failures = 0;
                tracing::error!(error = %format!("{e:#}"), "reconciliation run failed; retries exhausted, next attempt at the next scheduled time (it catches up from the watermark)");
                next = next_at(time::OffsetDateTime::now_utc(), h, m)?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_the_next_run() {
        let now = time::macros::datetime!(2026-11-25 02:29:59 UTC);
        assert_eq!(
            next_at(now, 2, 30).unwrap(),
            time::macros::datetime!(2026-11-25 02:30:00 UTC)
        );
        let now = time::macros::datetime!(2026-11-25 02:30:00 UTC);
        assert_eq!(
            next_at(now, 2, 30).unwrap(),
            time::macros::datetime!(2026-11-26 02:30:00 UTC)
        );
        assert!(parse_at("24:00").is_err());
        assert_eq!(parse_at("02:30").unwrap(), (2, 30));
    }

    #[test]
    fn the_day_plan_catches_up_from_the_watermark() {
        use time::macros::date;
        let today = date!(2026 - 11 - 25);
        // First start: only today - lag.
        assert_eq!(day_plan(None, today, 1), [date!(2026 - 11 - 24)]);
        // Up to date: nothing.
        assert!(day_plan(Some(date!(2026 - 11 - 24)), today, 1).is_empty());
        // Two days failed or missed: both, oldest first.
        assert_eq!(
            day_plan(Some(date!(2026 - 11 - 21)), today, 1),
            [
                date!(2026 - 11 - 22),
                date!(2026 - 11 - 23),
                date!(2026 - 11 - 24)
            ]
        );
        // Long outage: bounded to MAX_CATCH_UP_DAYS, ending at today - lag.
        let p = day_plan(Some(date!(2026 - 01 - 01)), today, 2);
        assert_eq!(p.len(), 31);
        assert_eq!(p.last(), Some(&date!(2026 - 11 - 23)));
        assert_eq!(p[0], date!(2026 - 10 - 24));
    }
}
