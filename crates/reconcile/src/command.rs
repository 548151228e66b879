//! `paystream reconcile --settlement FILE` and `paystream reconcile
//! resolve`: the command, from its flags to its exit status.

use crate::args::{Format, ReconcileArgs, ReconcileCommand};
use crate::resolve::resolve;
use crate::run::reconcile_bytes;
use crate::{EXIT_UNRESOLVED, Error, open, print, settlement};
use events::ResolutionAction;
use std::process::ExitCode;
use streaming::KafkaConfig;

/// `paystream reconcile ...`. Exit status [`EXIT_UNRESOLVED`] while
/// unresolved discrepancies remain for the settlement day.
pub async fn run(kafka: KafkaConfig, db_url: &str, args: ReconcileArgs) -> Result<ExitCode, Error> {
    if let Some(ReconcileCommand::Resolve {
        id,
        action,
        reason,
        by,
        json,
    }) = args.command
    {
        let Some(action) = ResolutionAction::parse(&action) else {
            return Err(Error::UnknownAction(action));
        };
        let (db, producer) = open(&kafka, db_url).await?;
        let r = resolve(&db, &producer, &id, action, &reason, &by).await?;
        print::resolved(&r, json)?;
        return Ok(ExitCode::SUCCESS);
    }
    let Some(path) = args.settlement else {
        return Err(Error::NoSettlement);
    };
    let date = args
        .date
        .as_deref()
        .map(settlement::parse_date)
        .transpose()
        .map_err(Error::Date)?;
    let tolerance = args.options.tolerance()?;
    let bytes = std::fs::read(&path).map_err(|source| Error::ReadFile {
        path: path.clone(),
        source,
    })?;
    // Validate before touching the database or the broker.
    settlement::parse(&bytes, date).map_err(|source| Error::Rejected {
        path: path.clone(),
        source,
    })?;
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
    print::report(&report, args.json || args.format == Format::Json)?;
    print::run_summary(&report, &t);
    Ok(if report.unresolved > 0 {
        ExitCode::from(EXIT_UNRESOLVED)
    } else {
        ExitCode::SUCCESS
    })
}
