//! Reconciliation: the PSP's settlement files against the ledger.

use clap::Args;
use std::process::ExitCode;
use streaming::KafkaConfig;
use tokio_util::sync::CancellationToken;

/// `paystream reconcile ...`
#[derive(Debug, Args)]
pub struct ReconcileArgs {}

/// `paystream serve reconciler ...`
#[derive(Debug, Args)]
pub struct ReconcilerArgs {}

pub async fn run(
    _kafka: KafkaConfig,
    _db_url: &str,
    _args: ReconcileArgs,
) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not built yet")
}

pub async fn serve(
    _kafka: KafkaConfig,
    _db_url: &str,
    _args: ReconcilerArgs,
    _shutdown: CancellationToken,
) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
