//! Analyst and operator tools over the topics: `replay` (jsonl, csv, Avro
//! object container files) and the dead-letter queue (`dlq list|show|redrive`).
//!
//! Both read topics without a consumer group ([`streaming::reader`]): nothing
//! is committed and a read of a live topic stops at the end offsets fixed
//! when it started. Data goes to stdout (or `--out`), progress and messages
//! to stderr. See this crate's README.md for every flag and guarantee.

mod bounds;
mod dlq;
mod output;
mod select;
mod store;

pub use bounds::BoundError;
pub use bounds::{Bound, parse_bound};
pub use dlq::{DeadLetterInfo, H_REDRIVEN_FROM, hex_dump};
pub use dlq::{DlqError, PositionError};
pub use output::{CSV_COLUMNS, ReplayError, Summary, run as replay_summary};
pub use select::SelectError;
pub use store::StoreError;

use clap::{Args, Subcommand, ValueEnum};
use events::TopicKind;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use streaming::KafkaConfig;

/// `paystream replay ...`: the decoded events of some topics, filtered, as
/// JSON lines, CSV or an Avro object container file.
#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// Topic to read (repeatable): `payments`, `payments.inbound`,
    /// `reconciliation` or `dlq` (resolved with the topic prefix), or a full
    /// topic name.
    #[arg(long = "topic", required = true, value_name = "TOPIC")]
    pub topics: Vec<String>,
    /// Start (inclusive): an RFC 3339 timestamp, milliseconds since the
    /// epoch, or `offset:N` (offset N in every partition). Timestamps are
    /// record timestamps (= the event's occurred_at for paystream's events).
    #[arg(long, value_name = "X")]
    pub from: Option<String>,
    /// End (exclusive), same forms as --from: `--to offset:N` stops before
    /// offset N in every partition; a timestamp keeps records strictly
    /// before it.
    #[arg(long, value_name = "X")]
    pub to: Option<String>,
    /// Only events of this payment id (repeatable).
    #[arg(long = "payment", value_name = "ID")]
    pub payments: Vec<String>,
    /// Only events of this type, e.g. OrderSucceeded (repeatable).
    #[arg(long = "type", value_name = "EVENT_TYPE")]
    pub types: Vec<String>,
    /// Only events that concern this seller (see README: order-level events
    /// are matched through the PaymentRequested seen earlier in the replay).
    #[arg(long, value_name = "ID")]
    pub seller: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Jsonl)]
    pub format: Format,
    /// Write to this file (created, or replaced once complete) instead of
    /// stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Fail on the first undecodable message instead of skipping it (with
    /// a warning on stderr and a count in the summary).
    #[arg(long)]
    pub strict: bool,
}

/// Output format of `paystream replay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// One JSON object per line: the envelope (as `events::json`) plus
    /// topic, partition, offset and record timestamp.
    Jsonl,
    /// RFC 4180 CSV with a header row and fixed columns.
    Csv,
    /// An Avro object container file of envelopes (current schema).
    Avro,
}

/// `paystream dlq ...`: the dead-letter topic.
#[derive(Debug, Clone, Subcommand)]
pub enum DlqCommand {
    /// Dead letters with their reasons and origins, then counts by kind.
    List(ListArgs),
    /// One dead letter: headers, and the decoded event (JSON) or a hex dump.
    Show(ShowArgs),
    /// Produce dead letters again to their original topic (dry run unless
    /// --execute); each dead-letter position is redriven once.
    Redrive(RedriveArgs),
}

/// Which dead letters a command looks at.
#[derive(Debug, Clone, Default, Args)]
pub struct DlqFilter {
    /// Only dead letters of this consumer group (the full group name, as in
    /// the `dlq.consumer_group` header).
    #[arg(long)]
    pub group: Option<String>,
    /// Only dead letters of this error kind (`dlq.error_kind`, e.g.
    /// `unknown_order`, `not_single_object`).
    #[arg(long)]
    pub kind: Option<String>,
}

/// `paystream dlq list`
#[derive(Debug, Clone, Default, Args)]
pub struct ListArgs {
    /// JSON output: `{"dead_letters": [...], "counts": {kind: n}, "total": n}`.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub filter: DlqFilter,
}

/// `paystream dlq show PARTITION:OFFSET`
#[derive(Debug, Clone, Args)]
pub struct ShowArgs {
    /// Position in the dead-letter topic, as `dlq list` prints it.
    #[arg(value_name = "PARTITION:OFFSET")]
    pub position: String,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

/// `paystream dlq redrive`
#[derive(Debug, Clone, Default, Args)]
pub struct RedriveArgs {
    /// Dead-letter positions to redrive.
    #[arg(value_name = "PARTITION:OFFSET", required_unless_present = "all")]
    pub positions: Vec<String>,
    /// Every dead letter (that matches --group/--kind). Positions named
    /// instead are reported as skipped by filter when they do not match.
    #[arg(long, conflicts_with = "positions")]
    pub all: bool,
    #[command(flatten)]
    pub filter: DlqFilter,
    /// Produce. Without it only the plan is printed.
    #[arg(long)]
    pub execute: bool,
    /// Produce again dead letters already redriven (or whose earlier
    /// redrive is in doubt, or whose message, or the message they are a
    /// redriven copy of, was redriven). Still at most one copy per
    /// original message and run. Consumers deduplicate by event id.
    #[arg(long)]
    pub force: bool,
    /// JSON output (the plan and, with --execute, the results).
    #[arg(long)]
    pub json: bool,
}

/// How reading a topic fails (`streaming::reader`'s typed error).
pub use streaming::reader::ReaderError;

/// Runs `paystream replay`, data to stdout or `--out`.
pub async fn replay(kafka: KafkaConfig, args: ReplayArgs) -> Result<ExitCode, ReplayError> {
    match &args.out {
        Some(path) => {
            // Written next to the target and renamed once complete, so a
            // failed replay never leaves a truncated file under its name.
            let partial = partial_path(path);
            let file = create_partial(&partial)?;
            let mut w = std::io::BufWriter::new(file);
            let result = replay_to(&kafka, &args, &mut w).await;
            let result = result.and_then(|code| {
                w.flush()?;
                w.get_ref().sync_all()?;
                std::fs::rename(&partial, path).map_err(|source| ReplayError::Rename {
                    path: path.clone(),
                    source,
                })?;
                Ok(code)
            });
            if result.is_err() {
                let _ = std::fs::remove_file(&partial);
            }
            result
        }
        None => {
            if args.format == Format::Avro && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                return Err(ReplayError::AvroToTerminal);
            }
            let mut w = std::io::BufWriter::new(std::io::stdout());
            let code = replay_to(&kafka, &args, &mut w).await?;
            w.flush().map_err(ReplayError::Stdout)?;
            Ok(code)
        }
    }
}

/// Creates the `.partial` file afresh. A stale one (a regular file, from
/// a run that died) is replaced; anything else there, such as a symlink
/// planted in a shared folder, is refused, never followed (review L10).
fn create_partial(partial: &std::path::Path) -> Result<std::fs::File, ReplayError> {
    if std::fs::symlink_metadata(partial).is_ok_and(|m| m.file_type().is_file()) {
        std::fs::remove_file(partial).map_err(|source| ReplayError::RemoveStale {
            path: partial.to_owned(),
            source,
        })?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(partial)
        .map_err(|source| ReplayError::Create {
            path: partial.to_owned(),
            source,
        })
}

fn partial_path(path: &std::path::Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

/// `paystream replay` writing its data to `out` (tests, embedding).
pub async fn replay_to(
    kafka: &KafkaConfig,
    args: &ReplayArgs,
    out: &mut (dyn Write + Send),
) -> Result<ExitCode, ReplayError> {
    output::run(kafka, args, out).await.map(|summary| {
        summary.print();
        ExitCode::SUCCESS
    })
}

/// Runs `paystream dlq ...`, data to stdout.
pub async fn dlq(kafka: KafkaConfig, db_url: &str, cmd: DlqCommand) -> Result<ExitCode, DlqError> {
    let mut w = std::io::BufWriter::new(std::io::stdout());
    let code = dlq_to(&kafka, db_url, &cmd, &mut w).await;
    w.flush().map_err(DlqError::Stdout)?;
    code
}

/// `paystream dlq ...` writing its data to `out` (tests, embedding).
pub async fn dlq_to(
    kafka: &KafkaConfig,
    db_url: &str,
    cmd: &DlqCommand,
    out: &mut (dyn Write + Send),
) -> Result<ExitCode, DlqError> {
    match cmd {
        DlqCommand::List(a) => dlq::list(kafka, a, out).await,
        DlqCommand::Show(a) => dlq::show(kafka, a, out).await,
        DlqCommand::Redrive(a) => dlq::redrive(kafka, db_url, a, out).await,
    }
}

/// Applies this crate's migrations (versions 5xxx: the redrive records).
pub async fn migrate(db: &storage::Db) -> Result<(), storage::StorageError> {
    db.migrate(
        &storage::component_migrator(sqlx::migrate!("migrations/postgres")),
        &storage::component_migrator(sqlx::migrate!("migrations/sqlite")),
    )
    .await
}

/// A topic named on the command line: a short name of one of paystream's
/// topics (resolved with the topic prefix) or a full name.
pub fn resolve_topic(kafka: &KafkaConfig, name: &str) -> String {
    let topology = kafka.topology();
    TopicKind::ALL
        .iter()
        .find(|k| k.suffix() == name)
        .map(|k| topology.name(*k))
        .unwrap_or_else(|| name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: Cmd,
    }

    #[derive(Debug, Subcommand)]
    enum Cmd {
        Replay(ReplayArgs),
        #[command(subcommand)]
        Dlq(DlqCommand),
    }

    fn parse(args: &[&str]) -> Result<Cmd, clap::Error> {
        Cli::try_parse_from(std::iter::once("paystream").chain(args.iter().copied())).map(|c| c.cmd)
    }

    #[test]
    fn flags_parse_as_documented() {
        Cli::command().debug_assert();
        let Cmd::Replay(a) = parse(&[
            "replay",
            "--topic",
            "payments",
            "--topic",
            "dlq",
            "--from",
            "offset:3",
            "--type",
            "OrderSucceeded",
            "--format",
            "csv",
            "--strict",
        ])
        .unwrap() else {
            panic!("replay")
        };
        assert_eq!(a.topics, ["payments", "dlq"]);
        assert_eq!(a.format, Format::Csv);
        assert!(a.strict && a.from.as_deref() == Some("offset:3"));
        assert!(parse(&["replay"]).is_err(), "--topic is required");

        let Cmd::Dlq(DlqCommand::Redrive(r)) =
            parse(&["dlq", "redrive", "1:2", "3:4", "--kind", "unknown_order"]).unwrap()
        else {
            panic!("redrive")
        };
        assert_eq!(r.positions, ["1:2", "3:4"]);
        assert!(!r.execute && !r.all, "a dry run unless --execute");
        assert!(parse(&["dlq", "redrive"]).is_err(), "positions or --all");
        assert!(parse(&["dlq", "redrive", "--all", "1:2"]).is_err());
        assert!(parse(&["dlq", "redrive", "--all", "--execute", "--force"]).is_ok());
        assert!(parse(&["dlq", "show", "0:5", "--json"]).is_ok());
        assert!(parse(&["dlq", "list", "--group", "g", "--kind", "k", "--json"]).is_ok());
    }

    #[test]
    fn a_symlink_at_the_partial_path_is_refused_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep me").unwrap();
        let partial = dir.path().join("out.avro.partial");
        std::os::unix::fs::symlink(&victim, &partial).unwrap();
        assert!(super::create_partial(&partial).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
        // A stale regular .partial is replaced.
        std::fs::remove_file(&partial).unwrap();
        std::fs::write(&partial, "stale").unwrap();
        let f = super::create_partial(&partial).unwrap();
        drop(f);
        assert_eq!(std::fs::read_to_string(&partial).unwrap(), "");
    }

    #[test]
    fn short_topic_names_resolve_with_the_prefix() {
        let k = KafkaConfig::local("127.0.0.1:9092", "x.", 1);
        assert_eq!(resolve_topic(&k, "payments"), "x.payments");
        assert_eq!(resolve_topic(&k, "payments.inbound"), "x.payments.inbound");
        assert_eq!(resolve_topic(&k, "reconciliation"), "x.reconciliation");
        assert_eq!(resolve_topic(&k, "dlq"), "x.dlq");
        assert_eq!(resolve_topic(&k, "other.topic"), "other.topic");
        assert_eq!(
            partial_path(std::path::Path::new("/tmp/a.avro")),
            std::path::Path::new("/tmp/a.avro.partial")
        );
    }
}
