//! `paystream dlq list|show|redrive`.
//!
//! Each command reads the dead-letter topic (`read.rs`), looks at what
//! each dead letter says about itself (`info.rs`) and prints text or JSON
//! (`render.rs`). A redrive decides what to do with each dead letter from
//! the dead letters and the redrive records alone (`plan.rs`, pure), then,
//! with --execute, claims, produces and records (`execute.rs`).

mod execute;
mod info;
mod plan;
mod read;
mod render;

pub use info::{DeadLetterInfo, PositionError};
pub use render::hex_dump;

use crate::store::{self, StoreError};
use crate::{ListArgs, ReaderError, RedriveArgs, ShowArgs};
use events::avro;
use info::parse_position;
use plan::Plan;
use std::io::Write;
use std::process::ExitCode;
use streaming::KafkaConfig;

/// Header naming the dead-letter position a redriven message came from
/// (`<dlq topic>:<partition>:<offset>`). Not a `dlq.*` header, so it stays
/// on the message if it is dead-lettered again.
pub const H_REDRIVEN_FROM: &str = "paystream.redriven_from";

/// Why `paystream dlq ...` failed.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("name the dead letters to redrive (PARTITION:OFFSET ...) or pass --all")]
    NothingNamed,
    #[error(transparent)]
    Position(#[from] PositionError),
    #[error("cannot open the dead-letter topic {topic}")]
    OpenTopic {
        topic: String,
        #[source]
        source: Box<ReaderError>,
    },
    /// Reading the dead-letter topic (or its watermarks) failed.
    // (A ReaderError is large: boxed, so every Result here stays small.)
    #[error(transparent)]
    Read(Box<ReaderError>),
    #[error("{topic} has no partition {partition} (partitions 0..{partitions})")]
    NoPartition {
        topic: String,
        partition: i32,
        partitions: usize,
    },
    #[error(
        "no dead letter at {partition}:{offset}: partition {partition} of {topic} holds offsets {low}..{high} (end exclusive)"
    )]
    OutsidePartition {
        topic: String,
        partition: i32,
        offset: i64,
        low: i64,
        high: i64,
    },
    /// Within the partition's offsets, but not read back.
    #[error("no dead letter at {partition}:{offset} (compacted away?)")]
    Gone { partition: i32, offset: i64 },
    /// A position named for a redrive that the topic does not hold.
    #[error("no dead letter at {partition}:{offset} in {topic}")]
    NotInTopic {
        topic: String,
        partition: i32,
        offset: i64,
    },
    #[error("connecting to the database that records redrives")]
    Connect(#[source] storage::StorageError),
    #[error("migrating the redrive records")]
    Migrate(#[source] storage::StorageError),
    /// The redrive records.
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Producer(#[from] streaming::ProduceError),
    /// Writing the output.
    #[error(transparent)]
    Output(#[from] std::io::Error),
    #[error("writing to stdout")]
    Stdout(#[source] std::io::Error),
}

impl From<ReaderError> for DlqError {
    fn from(e: ReaderError) -> DlqError {
        DlqError::Read(Box::new(e))
    }
}

impl From<sqlx::Error> for DlqError {
    fn from(e: sqlx::Error) -> DlqError {
        DlqError::Store(StoreError::Sql(e))
    }
}

pub async fn list(
    kafka: &KafkaConfig,
    args: &ListArgs,
    out: &mut (dyn Write + Send),
) -> Result<ExitCode, DlqError> {
    let infos: Vec<DeadLetterInfo> = read::read_all(kafka)
        .await?
        .iter()
        .map(DeadLetterInfo::of)
        .filter(|i| i.matches(&args.filter))
        .collect();
    if args.json {
        render::list_json(out, &read::dlq_topic(kafka), &infos)?;
    } else {
        render::list_text(out, &infos)?;
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn show(
    kafka: &KafkaConfig,
    args: &ShowArgs,
    out: &mut (dyn Write + Send),
) -> Result<ExitCode, DlqError> {
    let pos = parse_position(&args.position)?;
    let rec = read::read_one(kafka, pos).await?;
    let info = DeadLetterInfo::of(&rec);
    let decoded = avro::decode(&rec.payload);
    if args.json {
        render::show_json(out, &rec, &info, &decoded)?;
    } else {
        render::show_text(out, &rec, &info, &decoded)?;
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn redrive(
    kafka: &KafkaConfig,
    db_url: &str,
    args: &RedriveArgs,
    out: &mut (dyn Write + Send),
) -> Result<ExitCode, DlqError> {
    if !args.all && args.positions.is_empty() {
        return Err(DlqError::NothingNamed);
    }
    let wanted: Vec<(i32, i64)> = args
        .positions
        .iter()
        .map(|p| parse_position(p))
        .collect::<Result<_, _>>()?;
    let topic = read::dlq_topic(kafka);
    let all = read::read_all(kafka).await?;
    let selected = plan::select(&all, &wanted, args.all, &args.filter, &topic)?;

    let db = storage::Db::connect(db_url)
        .await
        .map_err(DlqError::Connect)?;
    crate::migrate(&db).await.map_err(DlqError::Migrate)?;
    let records = store::load(&db, &topic).await?;
    let planned = plan::plan_all(&topic, selected, &records, args.force);
    let invalid = planned
        .iter()
        .filter(|p| matches!(p.plan, Plan::Invalid(_)))
        .count();
    if !args.json {
        render::plan_text(out, &topic, &planned, args)?;
    }

    let mut results = Vec::new();
    let mut tally = execute::Tally::default();
    if args.execute {
        execute::execute(kafka, &db, &topic, &planned, args.force, |p, outcome| {
            tally.add(&p.plan, outcome);
            results.push(render::result_json(p, outcome));
            render::step_text(out, p, outcome, args.json)
        })
        .await?;
    }
    if args.json {
        render::redrive_json(out, &topic, &planned, args, results, tally, invalid)?;
    } else {
        render::redrive_summary_text(out, args.execute, tally, invalid)?;
    }
    db.close().await;
    Ok(if tally.failed > 0 || (args.execute && invalid > 0) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
