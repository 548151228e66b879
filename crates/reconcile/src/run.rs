//! One reconciliation run: the file parsed on its own thread while the
//! day's ledger references are read (and, on PostgreSQL, the claims copied
//! into the run's transaction), then matched, recorded in one transaction
//! and published.

use crate::ids::{discrepancy_uuid, found_event_id, run_id};
use crate::matching::{self, LedgerRef, Tolerance};
use crate::psp::{PspSource, fetch_settlement};
use crate::publish::publish_run;
use crate::recheck::recheck_status_mismatches;
use crate::report::{CurrencyTotals, DiscrepancyView, Report, view_money};
use crate::{Error, now_us, settlement, store};
use events::{DiscrepancyClass, Money};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use storage::Db;
use streaming::EventProducer;
use time::Date;
use uuid::Uuid;

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
) -> Result<Option<Early>, Error> {
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
) -> Result<(Report, Timings), Error> {
    let mut attempt = 1;
    loop {
        match reconcile_once(db, producer, bytes, source, date, tolerance).await {
            // A concurrent run collided with this one; nothing of the
            // attempt was committed.
            Err(e) if attempt < crate::limits::RUN_ATTEMPTS_MAX && e.is_run_collision() => {
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
) -> Result<(Report, Timings), Error> {
    let started = Instant::now();
    // The file is read on a thread of its own; meanwhile the day's ledger
    // references are read and (PostgreSQL) the claims copied.
    let (to_prepare, mut rx) =
        tokio::sync::mpsc::channel(crate::limits::PARSER_MESSAGES_IN_FLIGHT_MAX);
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
    let (file, parse, parsed_at) = parser.await.map_err(Error::ParserPanicked)?;
    let prepare_tail = prepared_at.saturating_duration_since(parsed_at);
    let file = file?;
    let early = early?.ok_or(Error::NotPrepared)?;
    if early.date != file.date {
        return Err(Error::DayChanged);
    }
    // Earlier status mismatches whose charge the ledger has booked since.
    let auto_resolved = recheck_status_mismatches(db, producer, tolerance).await?;
    let day = settlement::format_date(file.date);
    let run_id = early.run_id;

    if let Some(stored) = early.stored {
        let mut report: Report =
            serde_json::from_str(&stored.report).map_err(Error::StoredReport)?;
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
            found_event_id: found_event_id(id).to_string(),
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
            .ok_or(Error::FileTotalOverflow("amount"))?;
        t.fee_minor = t
            .fee_minor
            .checked_add(r.fee_minor)
            .ok_or(Error::FileTotalOverflow("fee"))?;
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
        return Err(Error::ClaimsDiverged {
            streamed: early.streamed.len(),
            copied,
        });
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
                .ok_or(Error::RunVanished)?;
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
async fn refresh(db: &Db, report: &mut Report) -> Result<(), Error> {
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
) -> Result<Report, Error> {
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
