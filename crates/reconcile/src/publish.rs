//! Publishing a recorded run: the events of its discrepancies, then the
//! run event, each marked as published once acknowledged.

use crate::envelope::{found_envelope, run_completed_envelope};
use crate::report::Report;
use crate::{Error, now_us, store};
use std::collections::HashSet;
use storage::Db;
use streaming::EventProducer;

/// Appends what a recorded run has not published yet: its discrepancies
/// first found by it, then the run event; marks each as published.
pub(crate) async fn publish_run(
    db: &Db,
    producer: &EventProducer,
    report: &Report,
) -> Result<(), Error> {
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
    for chunk in pending.chunks(crate::limits::EVENTS_PER_PUBLISH_ROUND_MAX) {
        let envelopes = chunk
            .iter()
            .map(|d| found_envelope(d))
            .collect::<Result<Vec<_>, _>>()?;
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
            return Err(Error::AppendDiscrepancy {
                id,
                source: Box::new(e),
            });
        }
    }
    let env = run_completed_envelope(report)?;
    producer
        .append(&env)
        .await
        .map_err(|e| Error::AppendRunEvent(Box::new(e)))?;
    store::mark_run_published(db, &report.run_id, now_us()).await?;
    Ok(())
}
