//! Operator tools: projection status, reset and rebuild; point-in-time
//! projections into a separate database; consumer-group offsets.

use clap::{Args, Subcommand};
use std::process::ExitCode;
use streaming::KafkaConfig;

/// `paystream projection ...`
#[derive(Debug, Subcommand)]
pub enum ProjectionCommand {
    /// For each projection: group, committed offsets, lag, last event, rows.
    Status,
}

/// `paystream offsets ...`
#[derive(Debug, Subcommand)]
pub enum OffsetsCommand {
    /// Move a consumer group's committed offsets.
    Reset,
}

/// `paystream project --into URL --as-of TIMESTAMP`
#[derive(Debug, Args)]
pub struct ProjectArgs {}

pub async fn projection(
    _kafka: KafkaConfig,
    _db_url: &str,
    _cmd: ProjectionCommand,
) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not built yet")
}

pub async fn offsets(_kafka: KafkaConfig, _cmd: OffsetsCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not built yet")
}

pub async fn project(_kafka: KafkaConfig, _args: ProjectArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not built yet")
}
