//! Operator tools: projection status, reset and rebuild; point-in-time
//! projections into a separate database; consumer-group offsets.
//!
//! See this crate's README.md for each command's flags and guarantees.

pub mod groups;
pub mod limits;
pub mod lock;
pub mod project;
pub mod projection;
pub mod shadow;
pub mod tables;

use clap::{Args, Subcommand, ValueEnum};
use projections::Projection;
use std::process::ExitCode;
use streaming::KafkaConfig;

/// A projection by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProjectionName {
    Ledger,
    Wallet,
}

impl From<ProjectionName> for Projection {
    fn from(n: ProjectionName) -> Projection {
        match n {
            ProjectionName::Ledger => Projection::Ledger,
            ProjectionName::Wallet => Projection::Wallet,
        }
    }
}

/// The projections' consumer groups (the same flags and variables as
/// `serve projections`).
#[derive(Debug, Clone, Args)]
pub struct GroupArgs {
    /// Consumer group of the ledger projection. Default: `{topic prefix}ledger`.
    #[arg(long, env = "PAYSTREAM_LEDGER_GROUP")]
    pub ledger_group: Option<String>,
    /// Consumer group of the wallet projection. Default: `{topic prefix}wallet`.
    #[arg(long, env = "PAYSTREAM_WALLET_GROUP")]
    pub wallet_group: Option<String>,
}

impl GroupArgs {
    /// The group of `p`.
    pub fn group(&self, kafka: &KafkaConfig, p: Projection) -> String {
        let (flag, name) = match p {
            Projection::Ledger => (&self.ledger_group, "ledger"),
            Projection::Wallet => (&self.wallet_group, "wallet"),
        };
        flag.clone().unwrap_or_else(|| kafka.topology().group(name))
    }
}

/// `--execute` / `--dry-run` (the default).
#[derive(Debug, Clone, Args)]
pub struct ExecMode {
    /// Apply the plan (after printing it).
    #[arg(long, conflicts_with = "dry_run")]
    pub execute: bool,
    /// Only print the plan (the default).
    #[arg(long)]
    pub dry_run: bool,
}

/// `paystream projection ...`
#[derive(Debug, Subcommand)]
pub enum ProjectionCommand {
    /// For each projection: group state, committed offsets, lag, last
    /// applied event, rows, dead-lettered (rejected) events.
    Status {
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        groups: GroupArgs,
    },
    /// Drop one projection's rows and move its group to the earliest
    /// offsets; its consumers rebuild it when started. Refused while the
    /// group has active members.
    Reset {
        #[arg(value_enum)]
        name: ProjectionName,
        #[command(flatten)]
        mode: ExecMode,
        #[command(flatten)]
        groups: GroupArgs,
        /// Go ahead although the topics' log starts are above 0 (records
        /// deleted by retention or DeleteRecords); the projection then
        /// lacks that history.
        #[arg(long)]
        allow_truncated_history: bool,
        /// Print the plan (and the result) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild one projection from the topics into a shadow, swap it in
    /// atomically, then commit the group's offsets to where it read up to.
    /// Refused while the group has active members.
    Rebuild {
        #[arg(value_enum)]
        name: ProjectionName,
        #[command(flatten)]
        mode: ExecMode,
        #[command(flatten)]
        groups: GroupArgs,
        /// Events applied per database transaction.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        batch_size: u32,
        /// Go ahead although the topics' log starts are above 0 (records
        /// deleted by retention or DeleteRecords); the projection then
        /// lacks that history.
        #[arg(long)]
        allow_truncated_history: bool,
        /// Print the plan (and the result) as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Where `offsets reset` moves a group (exactly one).
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct ResetTarget {
    /// The log start offset of each partition.
    #[arg(long)]
    pub to_earliest: bool,
    /// The high watermark of each partition.
    #[arg(long)]
    pub to_latest: bool,
    /// The first offset whose record timestamp is at or after T (RFC 3339
    /// or ms since the epoch); the high watermark where there is none.
    #[arg(long, value_name = "T")]
    pub to_datetime: Option<String>,
    /// The committed offset plus N (may be negative); from the log start
    /// where nothing is committed.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub shift_by: Option<i64>,
    /// Offset N in every partition.
    #[arg(long, value_name = "N")]
    pub to_offset: Option<i64>,
}

/// A [`ResetTarget`] that selects nothing usable.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(transparent)]
    Instant(#[from] project::InstantError),
    #[error("choose one of --to-earliest, --to-latest, --to-datetime, --shift-by, --to-offset")]
    NoTarget,
}

impl ResetTarget {
    /// The target this selects.
    pub fn target(&self) -> Result<groups::Target, TargetError> {
        Ok(if self.to_earliest {
            groups::Target::Earliest
        } else if self.to_latest {
            groups::Target::Latest
        } else if let Some(t) = &self.to_datetime {
            groups::Target::Datetime(project::parse_instant_ms(t)?)
        } else if let Some(n) = self.shift_by {
            groups::Target::ShiftBy(n)
        } else if let Some(o) = self.to_offset {
            groups::Target::Offset(o)
        } else {
            return Err(TargetError::NoTarget);
        })
    }
}

/// `paystream offsets ...`
#[derive(Debug, Subcommand)]
pub enum OffsetsCommand {
    /// A group's committed offsets, watermarks and lag per partition.
    Show {
        #[arg(long)]
        group: String,
        /// Topics (repeatable). Default: those the group has committed
        /// offsets for, else paystream's payments and reconciliation.
        #[arg(long = "topic")]
        topics: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Move a consumer group's committed offsets (dry run unless
    /// `--execute`; refused while the group has active members; targets
    /// clamped to [log start, high watermark]).
    Reset {
        #[arg(long)]
        group: String,
        #[command(flatten)]
        target: ResetTarget,
        /// Topics (repeatable). Default: those the group has committed
        /// offsets for, else paystream's payments and reconciliation.
        #[arg(long = "topic")]
        topics: Vec<String>,
        #[command(flatten)]
        mode: ExecMode,
        #[arg(long)]
        json: bool,
    },
}

/// `paystream project --into URL --as-of TIMESTAMP`
#[derive(Debug, Args)]
pub struct ProjectArgs {
    /// Database to build into (created and migrated), e.g.
    /// sqlite://analysis.db. Must not be the production database and must
    /// hold no projection data yet.
    #[arg(long, value_name = "URL")]
    pub into: String,
    /// Include events whose time (`occurred_at`, µs) is at or before this
    /// instant (RFC 3339 to the microsecond, or ms since the epoch).
    #[arg(long, value_name = "TIMESTAMP")]
    pub as_of: String,
    /// Build the ledger (default: both).
    #[arg(long)]
    pub ledger: bool,
    /// Build the wallets (default: both).
    #[arg(long)]
    pub wallet: bool,
    /// Events applied per database transaction.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch_size: u32,
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn batch(n: u32) -> usize {
    usize::try_from(n).unwrap_or(1000)
}

/// Runs a `projection` subcommand.
pub async fn projection(
    kafka: KafkaConfig,
    db_url: &str,
    cmd: ProjectionCommand,
) -> anyhow::Result<ExitCode> {
    match cmd {
        ProjectionCommand::Status { json, groups } => {
            let db = storage::Db::open_existing(
                db_url,
                storage::Needs {
                    what: "ledger or wallet projection",
                    table: "applied_events",
                },
            )
            .await?;
            let mut all = Vec::new();
            for p in [Projection::Ledger, Projection::Wallet] {
                all.push(projection::status(&kafka, &db, p, &groups.group(&kafka, p)).await?);
            }
            db.close().await;
            if json {
                print_json(&all)?;
            } else {
                print!("{}", projection::render_status(&all));
            }
            Ok(ExitCode::SUCCESS)
        }
        ProjectionCommand::Reset {
            name,
            mode,
            groups,
            allow_truncated_history,
            json,
        } => {
            let Some(PlannedRun { p, group, db, plan }) = open_and_plan(
                &kafka,
                db_url,
                name,
                &groups,
                RunKind::Reset,
                mode.execute,
                json,
            )
            .await?
            else {
                return Ok(ExitCode::SUCCESS);
            };
            let opts = projection::RunOptions {
                allow_truncated_history,
            };
            let rows = projection::execute_reset(&kafka, db_url, &db, p, &group, opts).await?;
            db.close().await;
            eprintln!(
                "reset done: {} rows dropped, group {group} at the earliest offsets on {} partitions; \
                 start the {} consumers to rebuild",
                plan.tables.iter().map(|t| t.rows).sum::<i64>(),
                rows.len(),
                p.as_str()
            );
            if json {
                print_json(&serde_json::json!({"executed": true, "offsets": rows}))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        ProjectionCommand::Rebuild {
            name,
            mode,
            groups,
            batch_size,
            allow_truncated_history,
            json,
        } => {
            let Some(PlannedRun { p, group, db, .. }) = open_and_plan(
                &kafka,
                db_url,
                name,
                &groups,
                RunKind::Rebuild,
                mode.execute,
                json,
            )
            .await?
            else {
                return Ok(ExitCode::SUCCESS);
            };
            let opts = projection::RunOptions {
                allow_truncated_history,
            };
            let s = projection::execute_rebuild(
                &kafka,
                db_url,
                &db,
                p,
                &group,
                batch(batch_size),
                opts,
            )
            .await?;
            db.close().await;
            if json {
                print_json(&s)?;
            } else {
                println!(
                    "rebuilt {}: {} events read in {} ms ({} events/s): {} applied, {} duplicate, \
                     {} ignored, {} rejected, {} undecodable (the consumers dead-letter those \
                     they had not reached yet when they meet them)",
                    s.projection,
                    s.events.read,
                    s.millis,
                    s.events_per_sec,
                    s.events.applied,
                    s.events.duplicate,
                    s.events.ignored,
                    s.events.rejected,
                    s.events.undecodable
                );
                print!("{}", groups::render_plan(&s.offsets));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Which of `projection reset` / `projection rebuild` [`open_and_plan`] plans.
#[derive(Debug, Clone, Copy)]
enum RunKind {
    Reset,
    Rebuild,
}

/// A `projection reset|rebuild` run, planned and its plan shown.
#[derive(Debug)]
struct PlannedRun {
    p: Projection,
    group: String,
    db: storage::Db,
    plan: projection::ProjectionPlan,
}

/// What `projection reset` and `projection rebuild` do before executing:
/// resolve the projection and its group, open the live database, plan,
/// show the plan. `None` on a dry run (the note printed, nothing done).
async fn open_and_plan(
    kafka: &KafkaConfig,
    db_url: &str,
    name: ProjectionName,
    groups: &GroupArgs,
    kind: RunKind,
    execute: bool,
    json: bool,
) -> anyhow::Result<Option<PlannedRun>> {
    let p = Projection::from(name);
    let group = groups.group(kafka, p);
    let db = projection::open_live(db_url).await?;
    let plan = match kind {
        RunKind::Reset => projection::plan_reset(kafka, &db, p, &group).await?,
        RunKind::Rebuild => projection::plan_rebuild(kafka, &db, p, &group).await?,
    };
    show_plan(&plan, json)?;
    if !execute {
        dry_run_note(&plan);
        return Ok(None);
    }
    Ok(Some(PlannedRun { p, group, db, plan }))
}

fn show_plan(plan: &projection::ProjectionPlan, json: bool) -> anyhow::Result<()> {
    if json {
        print_json(plan)
    } else {
        print!("{}", projection::render_plan(plan));
        Ok(())
    }
}

fn dry_run_note(plan: &projection::ProjectionPlan) {
    if plan.group.is_active() {
        eprintln!(
            "note: group {} is active (state {}); --execute would be refused until its consumers are stopped",
            plan.group.group, plan.group.state
        );
    }
    eprintln!("dry run: nothing changed; add --execute to apply");
}

async fn default_topics(
    kafka: &KafkaConfig,
    group: &str,
    topics: Vec<String>,
) -> anyhow::Result<Vec<String>> {
    if !topics.is_empty() {
        return Ok(topics);
    }
    let committed = groups::committed_topics(kafka, group).await?;
    if committed.is_empty() {
        Ok(projection::projection_topics(kafka))
    } else {
        Ok(committed)
    }
}

/// Runs an `offsets` subcommand.
pub async fn offsets(kafka: KafkaConfig, cmd: OffsetsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        OffsetsCommand::Show {
            group,
            topics,
            json,
        } => {
            let topics = default_topics(&kafka, &group, topics).await?;
            let state = groups::describe(&kafka, &group).await?;
            let rows = groups::offsets(&kafka, &group, &topics).await?;
            if json {
                let parts: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "topic": r.topic, "partition": r.partition, "low": r.low,
                            "high": r.high, "committed": r.committed, "lag": r.lag(),
                        })
                    })
                    .collect();
                print_json(&serde_json::json!({
                    "group": state,
                    "total_lag": rows.iter().map(groups::PartitionOffsets::lag).sum::<i64>(),
                    "partitions": parts,
                }))?;
            } else {
                println!(
                    "group {}  state {}  members {}  lag {}",
                    state.group,
                    state.state,
                    state.members_text(),
                    rows.iter().map(groups::PartitionOffsets::lag).sum::<i64>()
                );
                println!(
                    "{:<40} {:>9} {:>12} {:>12} {:>12} {:>10}",
                    "TOPIC", "PARTITION", "LOW", "HIGH", "COMMITTED", "LAG"
                );
                for r in &rows {
                    println!(
                        "{:<40} {:>9} {:>12} {:>12} {:>12} {:>10}",
                        r.topic,
                        r.partition,
                        r.low,
                        r.high,
                        r.committed
                            .map_or_else(|| "-".to_owned(), |c| c.to_string()),
                        r.lag()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        OffsetsCommand::Reset {
            group,
            target,
            topics,
            mode,
            json,
        } => {
            let target = target.target()?;
            let topics = default_topics(&kafka, &group, topics).await?;
            let state = groups::describe(&kafka, &group).await?;
            let rows = groups::plan(&kafka, &group, &topics, &target).await?;
            if json {
                print_json(&serde_json::json!({
                    "group": state, "execute": mode.execute, "plan": rows,
                }))?;
            } else {
                println!(
                    "group {}  state {}  members {}",
                    state.group,
                    state.state,
                    state.members_text()
                );
                print!("{}", groups::render_plan(&rows));
            }
            if !mode.execute {
                if state.is_active() {
                    eprintln!(
                        "note: group {group} is active; --execute would be refused until its consumers are stopped"
                    );
                }
                eprintln!("dry run: nothing changed; add --execute to apply");
                return Ok(ExitCode::SUCCESS);
            }
            groups::execute(&kafka, &group, &rows).await?;
            eprintln!(
                "offsets of group {group} moved on {} partitions",
                rows.len()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Runs `project`: builds the ledger and/or wallets as of a past instant
/// into a separate database, touching no consumer group.
/// `db_url` is the production database (the global `--database-url`),
/// which `--into` must differ from; it is never written.
pub async fn project(
    kafka: KafkaConfig,
    db_url: &str,
    args: ProjectArgs,
) -> anyhow::Result<ExitCode> {
    let as_of = project::parse_instant_us(&args.as_of)?;
    let which: Vec<Projection> = match (args.ledger, args.wallet) {
        (true, false) => vec![Projection::Ledger],
        (false, true) => vec![Projection::Wallet],
        _ => vec![Projection::Ledger, Projection::Wallet],
    };
    let s = project::project_as_of(
        &kafka,
        db_url,
        &args.into,
        as_of,
        &which,
        batch(args.batch_size),
    )
    .await?;
    print_json(&s)?;
    Ok(ExitCode::SUCCESS)
}
