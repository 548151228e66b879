//! Analyst and operator tools over the topics: `replay` (jsonl, csv, Avro
//! object container files) and the dead-letter queue (`dlq list|show|redrive`).

use clap::{Args, Subcommand};
use std::process::ExitCode;
use streaming::KafkaConfig;

/// `paystream replay ...`
#[derive(Debug, Args)]
pub struct ReplayArgs {}

/// `paystream dlq ...`
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Dead letters with their reasons and origins.
    List,
}

pub async fn replay(_kafka: KafkaConfig, _args: ReplayArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not built yet")
}

pub async fn dlq(_kafka: KafkaConfig, _db_url: &str, _cmd: DlqCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not built yet")
}
