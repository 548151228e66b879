//! `paystream serve reconciler`: the nightly run at the time and for the
//! days `schedule.rs` says (catching up from the watermark), retried after
//! a failure.

use crate::args::ReconcilerArgs;
use crate::limits::RETRY_AFTER_MAX_DEFAULT;
use crate::matching::Tolerance;
use crate::psp::PspSource;
use crate::run::reconcile_from_psp;
use crate::schedule::{day_plan, next_at, parse_at};
use crate::{Error, now_us, open, print, settlement, store};
use std::time::Duration;
use storage::Db;
use streaming::{EventProducer, KafkaConfig};
use tokio_util::sync::CancellationToken;

/// One scheduled run: reconciles the [`day_plan`] in order, moving the
/// watermark after each day; stops at the first failure (later days wait,
/// so the watermark never skips a day).
async fn scheduled_run(
    db: &Db,
    producer: &EventProducer,
    psp: &PspSource,
    lag_days: u16,
    tolerance: Tolerance,
) -> Result<(), Error> {
    let watermark = store::watermark(db)
        .await?
        .map(|d| settlement::parse_date(&d).map_err(Error::Date))
        .transpose()?;
    let plan = day_plan(watermark, time::OffsetDateTime::now_utc().date(), lag_days);
    if plan.len() > 1 {
        tracing::info!(days = plan.len(), "reconciler catching up");
    }
    for date in plan {
        let day = settlement::format_date(date);
        let r = reconcile_from_psp(db, producer, psp, date, tolerance)
            .await
            .map_err(|e| Error::Reconciling {
                day: day.clone(),
                source: Box::new(e),
            })?;
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
) -> Result<(), Error> {
    let (h, m) = parse_at(&args.at)?;
    let tolerance = args.options.tolerance()?;
    let api_key = runtime::secret::require(
        args.psp_api_key.as_ref(),
        "--psp-api-key / PAYSTREAM_PSP_API_KEY",
    )?;
    let psp = PspSource {
        base_url: args.psp_url.trim_end_matches('/').to_owned(),
        api_key,
        query: None,
        timeout: Duration::from_millis(args.psp_timeout_ms),
        attempts: args.fetch_attempts,
        max_retry_after: RETRY_AFTER_MAX_DEFAULT,
    };
    let (db, producer) = open(&kafka, db_url).await?;
    if args.once {
        match &args.date {
            Some(d) => {
                let date = settlement::parse_date(d).map_err(Error::Date)?;
                let report = reconcile_from_psp(&db, &producer, &psp, date, tolerance).await?;
                print::report_to_stderr(&report);
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
