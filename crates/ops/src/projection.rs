//! `paystream projection status | reset | rebuild`.

use crate::groups::{self, GroupState, PartitionOffsets, PlanRow, Target};
use crate::lock::LockError;
use crate::lock::RunLock;
use crate::shadow::Shadow;
use crate::shadow::ShadowError;
use crate::tables;
use events::TopicKind;
use projections::{Incoming, Projection, apply_batch};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Instant;
use storage::{Db, with_pool};
use streaming::reader::{End, ReaderError, Start, TopicReader};
use streaming::{KafkaConfig, MessageMeta, Outcome};

/// The topics both projections consume: payments and reconciliation.
pub fn projection_topics(kafka: &KafkaConfig) -> Vec<String> {
    let t = kafka.topology();
    vec![
        t.name(TopicKind::Payments),
        t.name(TopicKind::Reconciliation),
    ]
}

/// How looking at a projection (status, plans) or a reset or rebuild of
/// it fails. Where a step of a reset or rebuild adds what it means for
/// the live projection, the failure of the step is the `source`.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error(transparent)]
    Storage(#[from] storage::StorageError),
    #[error(transparent)]
    Groups(#[from] groups::GroupsError),
    #[error(transparent)]
    Tables(#[from] tables::TablesError),
    #[error("reading applied_events")]
    ReadApplied(#[source] sqlx::Error),
    #[error("counting rejected events")]
    CountRejected(#[source] sqlx::Error),
    /// `list` names each partition and how much of it is gone.
    #[error(
        "{what} refused: the topics no longer hold their full history ({total} records deleted \
         by retention or DeleteRecords: {list}); the projection would silently lack those \
         events. Pass --allow-truncated-history to go ahead anyway (the result then lacks \
         that history)"
    )]
    TruncatedHistory {
        what: String,
        total: i64,
        list: String,
    },
    /// `moved` names each partition whose offset differs.
    #[error(
        "the committed offsets of group {group} moved (a consumer of the group started \
         meanwhile?): {moved}"
    )]
    OffsetsMoved { group: String, moved: String },

    // Resets and rebuilds.
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Shadow(#[from] ShadowError),
    // (A ReaderError is large: boxed, so every Result here stays small.)
    #[error(transparent)]
    Read(Box<ReaderError>),
    #[error("applying events to the {projection} projection")]
    Replay {
        projection: &'static str,
        #[source]
        source: projections::bulk::ReplayError,
    },
    #[error("writing rebuilt rows into the shadow")]
    WriteRows(#[source] sqlx::Error),
    #[error("the shadow writer panicked")]
    WriterPanicked(#[source] tokio::task::JoinError),
    #[error("writing the rebuilt projection's final rows into the shadow")]
    WriteFinalRows(#[source] sqlx::Error),
    #[error(
        "the {projection} projection was reset, but its group's offsets are no longer at the log \
         start: events a consumer read in between may be missing from it. Stop every \
         consumer of group {group} and run the reset again"
    )]
    ResetOffsetsMoved {
        projection: &'static str,
        group: String,
        #[source]
        source: Box<ProjectionError>,
    },
    #[error(
        "the group's offsets changed while the rebuild ran; start it again once \
         its consumers are stopped"
    )]
    OffsetsChangedDuringRebuild(#[source] Box<ProjectionError>),
    #[error("rebuild abandoned; the live projection is unchanged")]
    RebuildAbandoned(#[source] Box<ProjectionError>),
    #[error(
        "the rebuilt projection is in place, but committing the group's offsets failed; \
         the group keeps its old offsets, so starting the consumers is still safe (already \
         applied events are duplicates)"
    )]
    CommitAfterRebuild(#[source] groups::GroupsError),
    #[error(
        "the rebuilt {projection} projection is in place and its offsets were committed, but \
         they moved right after: stop every consumer of group {group} and check \
         `paystream offsets show --group {group}`; if in doubt, rebuild again"
    )]
    MovedAfterRebuild {
        projection: &'static str,
        group: String,
        #[source]
        source: Box<ProjectionError>,
    },
}

impl From<ReaderError> for ProjectionError {
    fn from(e: ReaderError) -> ProjectionError {
        ProjectionError::Read(Box::new(e))
    }
}

/// Connects to the live database and applies the projections' migrations
/// (the same as `serve projections` does at start-up).
pub async fn open_live(db_url: &str) -> Result<Db, ProjectionError> {
    let db = Db::connect(db_url).await?;
    projections::migrate(&db).await?;
    Ok(db)
}

/// Rows of one table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableRows {
    pub table: String,
    pub rows: i64,
}

fn table_rows(v: Vec<(String, i64)>) -> Vec<TableRows> {
    v.into_iter()
        .map(|(table, rows)| TableRows { table, rows })
        .collect()
}

/// One partition in `projection status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionStatus {
    pub topic: String,
    pub partition: i32,
    pub committed: Option<i64>,
    pub high: i64,
    pub lag: i64,
}

/// `projection status` of one projection.
#[derive(Debug, Clone, Serialize)]
pub struct ProjectionStatus {
    pub projection: String,
    pub group: GroupState,
    pub partitions: Vec<PartitionStatus>,
    pub total_lag: i64,
    /// When the last event was applied (max `applied_at`), RFC 3339.
    pub last_applied_at: Option<String>,
    pub tables: Vec<TableRows>,
    /// Events this projection rejected (dead-lettered).
    pub dlq: i64,
}

/// Microseconds since the epoch as RFC 3339.
pub fn micros_rfc3339(us: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{us}us"))
}

/// Status of one projection.
pub async fn status(
    kafka: &KafkaConfig,
    db: &Db,
    projection: Projection,
    group: &str,
) -> Result<ProjectionStatus, ProjectionError> {
    let state = groups::describe(kafka, group).await?;
    let offs = groups::offsets(kafka, group, &projection_topics(kafka)).await?;
    let partitions: Vec<PartitionStatus> = offs
        .iter()
        .map(|o: &PartitionOffsets| PartitionStatus {
            topic: o.topic.clone(),
            partition: o.partition,
            committed: o.committed,
            high: o.high,
            lag: o.lag(),
        })
        .collect();
    let total_lag = partitions.iter().map(|p| p.lag).sum();
    let p = projection.as_str();
    let last: Option<i64> = with_pool!(db, pool => sqlx::query_scalar(
        "SELECT MAX(applied_at) FROM applied_events WHERE projection = $1")
        .bind(p).fetch_one(pool).await)
    .map_err(ProjectionError::ReadApplied)?;
    let dlq: i64 = with_pool!(db, pool => sqlx::query_scalar(
        "SELECT COUNT(*) FROM applied_events WHERE projection = $1 AND outcome = 'rejected'")
        .bind(p).fetch_one(pool).await)
    .map_err(ProjectionError::CountRejected)?;
    Ok(ProjectionStatus {
        projection: p.to_owned(),
        group: state,
        partitions,
        total_lag,
        last_applied_at: last.map(micros_rfc3339),
        tables: table_rows(tables::row_counts(db, projection).await?),
        dlq,
    })
}

/// Human rendering of `projection status`.
pub fn render_status(all: &[ProjectionStatus]) -> String {
    let mut s = String::new();
    for st in all {
        s.push_str(&format!(
            "projection {}  group {}  state {}  members {}  lag {}  last applied {}  dlq {}\n",
            st.projection,
            st.group.group,
            st.group.state,
            st.group.members_text(),
            st.total_lag,
            st.last_applied_at.as_deref().unwrap_or("-"),
            st.dlq
        ));
        s.push_str(&format!(
            "  {:<40} {:>9} {:>12} {:>12} {:>10}\n",
            "TOPIC", "PARTITION", "COMMITTED", "HIGH", "LAG"
        ));
        for p in &st.partitions {
            s.push_str(&format!(
                "  {:<40} {:>9} {:>12} {:>12} {:>10}\n",
                p.topic,
                p.partition,
                p.committed
                    .map_or_else(|| "-".to_owned(), |c| c.to_string()),
                p.high,
                p.lag
            ));
        }
        s.push_str(&format!("  {:<40} {:>12}\n", "TABLE", "ROWS"));
        for t in &st.tables {
            s.push_str(&format!("  {:<40} {:>12}\n", t.table, t.rows));
        }
        s.push('\n');
    }
    s
}

/// What a reset or rebuild will do.
#[derive(Debug, Clone, Serialize)]
pub struct ProjectionPlan {
    /// `reset` or `rebuild`.
    pub action: String,
    pub projection: String,
    pub group: GroupState,
    /// The projection's rows now (dropped by a reset, replaced by a rebuild).
    pub tables: Vec<TableRows>,
    /// Offsets old → new. A rebuild keeps the group's offset where it is
    /// below the high watermark (so the live consumers still meet, and
    /// dead-letter, what they had not reached) and uses the high watermark
    /// otherwise; the executed rebuild uses the ends it captures when it
    /// starts.
    pub offsets: Vec<PlanRow>,
    /// Partitions whose log start is above 0 (history deleted): an
    /// executed reset or rebuild refuses unless `--allow-truncated-history`.
    pub history_gaps: Vec<HistoryGap>,
}

/// Human rendering of a plan.
pub fn render_plan(plan: &ProjectionPlan) -> String {
    let mut s = format!(
        "{} of projection {} (group {}, state {}, members {})\n",
        plan.action,
        plan.projection,
        plan.group.group,
        plan.group.state,
        plan.group.members_text()
    );
    let verb = if plan.action == "reset" {
        "rows to drop"
    } else {
        "rows to replace"
    };
    s.push_str(&format!("{:<40} {:>12}\n", "TABLE", verb.to_uppercase()));
    for t in &plan.tables {
        let note = if tables::TABLES
            .iter()
            .any(|(n, o)| *n == t.table && *o == tables::Owner::Shared)
        {
            format!(" (rows with projection = '{}')", plan.projection)
        } else {
            String::new()
        };
        s.push_str(&format!("{:<40} {:>12}{note}\n", t.table, t.rows));
    }
    s.push_str(&groups::render_plan(&plan.offsets));
    for g in &plan.history_gaps {
        s.push_str(&format!(
            "history incomplete: {}/{} starts at offset {} ({} records deleted); --execute needs \
             --allow-truncated-history and the result lacks them\n",
            g.topic, g.partition, g.low, g.low
        ));
    }
    s
}

async fn plan_common(
    kafka: &KafkaConfig,
    db: &Db,
    projection: Projection,
    group: &str,
    action: &str,
    target: Target,
) -> Result<ProjectionPlan, ProjectionError> {
    let state = groups::describe(kafka, group).await?;
    let mut offsets = groups::plan(kafka, group, &projection_topics(kafka), &target).await?;
    if action == "rebuild" {
        for r in &mut offsets {
            r.target = r.current.unwrap_or(r.low).min(r.high).max(r.low);
        }
    }
    let history_gaps = gaps_of_plan(&offsets);
    Ok(ProjectionPlan {
        history_gaps,
        action: action.to_owned(),
        projection: projection.as_str().to_owned(),
        group: state,
        tables: table_rows(tables::row_counts(db, projection).await?),
        offsets,
    })
}

/// The plan of a reset: drop the projection's rows, offsets to the earliest.
pub async fn plan_reset(
    kafka: &KafkaConfig,
    db: &Db,
    projection: Projection,
    group: &str,
) -> Result<ProjectionPlan, ProjectionError> {
    plan_common(kafka, db, projection, group, "reset", Target::Earliest).await
}

/// The plan of a rebuild: replace the rows; offsets to the current ends,
/// or kept where the group lags behind them.
pub async fn plan_rebuild(
    kafka: &KafkaConfig,
    db: &Db,
    projection: Projection,
    group: &str,
) -> Result<ProjectionPlan, ProjectionError> {
    plan_common(kafka, db, projection, group, "rebuild", Target::Latest).await
}

/// Options of an executed reset or rebuild.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// Go ahead although some partitions' log start is above 0 (records
    /// deleted by retention or DeleteRecords): the rebuilt (or, after a
    /// reset, re-consumed) projection then lacks that history.
    pub allow_truncated_history: bool,
}

/// A partition whose log no longer starts at offset 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryGap {
    pub topic: String,
    pub partition: i32,
    /// The log start: offsets `0..low` are gone.
    pub low: i64,
}

/// The partitions among `parts` (topic, partition, log start) whose log
/// start is above 0.
pub fn history_gaps<'a>(parts: impl IntoIterator<Item = (&'a str, i32, i64)>) -> Vec<HistoryGap> {
    parts
        .into_iter()
        .filter(|(_, _, low)| *low > 0)
        .map(|(topic, partition, low)| HistoryGap {
            topic: topic.to_owned(),
            partition,
            low,
        })
        .collect()
}

/// Refuses a reset or rebuild over topics whose history was partly
/// deleted, unless `allow` (`--allow-truncated-history`), in which case it
/// only warns on stderr.
pub fn check_history(gaps: &[HistoryGap], allow: bool, what: &str) -> Result<(), ProjectionError> {
    if gaps.is_empty() {
        return Ok(());
    }
    let list = gaps
        .iter()
        .map(|g| {
            format!(
                "{}/{}: log starts at offset {} ({} records gone)",
                g.topic, g.partition, g.low, g.low
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    let total: i64 = gaps.iter().map(|g| g.low).sum();
    if allow {
        eprintln!(
            "warning: --allow-truncated-history: the {what} goes ahead without {total} deleted \
             records ({list}); the projection will lack that history"
        );
        return Ok(());
    }
    Err(ProjectionError::TruncatedHistory {
        what: what.to_owned(),
        total,
        list,
    })
}

fn gaps_of_plan(rows: &[PlanRow]) -> Vec<HistoryGap> {
    history_gaps(rows.iter().map(|r| (r.topic.as_str(), r.partition, r.low)))
}

/// Runs `run` (not started before) holding the projection's [`RunLock`],
/// then releases the lock; the run's error comes first.
async fn under_run_lock<T>(
    db: &Db,
    db_url: &str,
    projection: Projection,
    run: impl std::future::Future<Output = Result<T, ProjectionError>>,
) -> Result<T, ProjectionError> {
    let lock = RunLock::acquire(db, db_url, projection).await?;
    let result = run.await;
    let released = lock.release().await;
    let value = result?;
    released?;
    Ok(value)
}

/// The offsets a plan commits, as [`verify_committed`] wants them.
fn planned_targets(rows: &[PlanRow]) -> BTreeMap<(String, i32), Option<i64>> {
    rows.iter()
        .map(|r| ((r.topic.clone(), r.partition), Some(r.target)))
        .collect()
}

/// Reads the group's committed offsets and fails unless every partition
/// of `want` has the offset given there (`None`: nothing committed),
/// naming each partition that differs. Reset and rebuild use it to notice
/// a consumer that started meanwhile.
pub async fn verify_committed(
    kafka: &KafkaConfig,
    group: &str,
    topics: &[String],
    want: &BTreeMap<(String, i32), Option<i64>>,
) -> Result<(), ProjectionError> {
    let now = groups::offsets(kafka, group, topics).await?;
    let moved: Vec<String> = now
        .iter()
        .filter_map(|o| {
            let w = want.get(&(o.topic.clone(), o.partition))?;
            (*w != o.committed).then(|| {
                format!(
                    "{}/{}: expected {}, found {}",
                    o.topic,
                    o.partition,
                    w.map_or_else(|| "-".to_owned(), |v| v.to_string()),
                    o.committed
                        .map_or_else(|| "-".to_owned(), |v| v.to_string())
                )
            })
        })
        .collect();
    if !moved.is_empty() {
        return Err(ProjectionError::OffsetsMoved {
            group: group.to_owned(),
            moved: moved.join("; "),
        });
    }
    Ok(())
}

/// Executes a reset: takes the projection's run lock (one reset/rebuild
/// of a projection at a time); refuses while the group is active and
/// when the topics' history is incomplete (unless
/// `opts.allow_truncated_history`); moves the group's offsets to the
/// earliest first, then drops the projection's rows (its own tables
/// emptied, its rows of the shared tables deleted; the chain head back to
/// genesis) in one transaction; finally reads the offsets back.
///
/// In this order a crash in between is harmless: the consumers re-read
/// everything and drop what is already applied by event id. The other
/// order could leave empty tables with offsets at the end (history lost).
pub async fn execute_reset(
    kafka: &KafkaConfig,
    db_url: &str,
    db: &Db,
    projection: Projection,
    group: &str,
    opts: RunOptions,
) -> Result<Vec<PlanRow>, ProjectionError> {
    under_run_lock(
        db,
        db_url,
        projection,
        reset_locked(kafka, db_url, db, projection, group, opts),
    )
    .await
}

async fn reset_locked(
    kafka: &KafkaConfig,
    db_url: &str,
    db: &Db,
    projection: Projection,
    group: &str,
    opts: RunOptions,
) -> Result<Vec<PlanRow>, ProjectionError> {
    groups::describe(kafka, group)
        .await?
        .ensure_inactive("resetting the projection")?;
    let topics = projection_topics(kafka);
    let rows = groups::plan(kafka, group, &topics, &Target::Earliest).await?;
    check_history(&gaps_of_plan(&rows), opts.allow_truncated_history, "reset")?;
    groups::execute(kafka, group, &rows).await?;
    // An empty, migrated shadow is exactly a fresh projection.
    let shadow = Shadow::create(db, db_url, projection).await?;
    shadow.swap(db, projection).await?;
    verify_committed(kafka, group, &topics, &planned_targets(&rows))
        .await
        .map_err(|e| ProjectionError::ResetOffsetsMoved {
            projection: projection.as_str(),
            group: group.to_owned(),
            source: Box::new(e),
        })?;
    Ok(rows)
}

/// Counts of what a rebuild (or a point-in-time projection) read and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ApplyTally {
    pub read: u64,
    pub applied: u64,
    pub duplicate: u64,
    pub ignored: u64,
    /// Rejected by the booking rules (not dead-lettered again).
    pub rejected: u64,
    /// Not decodable as an event (not dead-lettered again).
    pub undecodable: u64,
}

impl ApplyTally {
    pub(crate) fn add(&mut self, outcomes: &[Outcome]) {
        for o in outcomes {
            match o {
                Outcome::Applied => self.applied += 1,
                Outcome::Duplicate => self.duplicate += 1,
                Outcome::Ignored => self.ignored += 1,
                Outcome::Rejected { .. } => self.rejected += 1,
            }
        }
    }
}

/// What an executed rebuild did.
#[derive(Debug, Clone, Serialize)]
pub struct RebuildSummary {
    pub projection: String,
    pub group: String,
    pub events: ApplyTally,
    pub millis: u64,
    pub events_per_sec: u64,
    /// The group's offsets, old → the ends captured at the start.
    pub offsets: Vec<PlanRow>,
    pub tables: Vec<TableRows>,
    /// Events per slice: a tenth of what there was to read (100,000 of
    /// 1,000,000).
    pub slice_events: u64,
    /// Milliseconds from the start of reading until the rows of each
    /// further `slice_events` events were read, decided and written into
    /// the shadow (the rate per slice shows whether it stays flat with
    /// size). The rows written at the end (orders, rejected events, PSP
    /// references, totals: what later events may still change) are in
    /// `millis` only.
    pub slice_millis: Vec<u64>,
}

/// Rows decided but not yet handed to the writer before a hand-off: large
/// enough that each COPY / INSERT batch is big, small enough to overlap.
const HANDOFF_ROWS: usize = 20_000;

/// The bulk rebuild's apply phase: reads and decodes the records, decides
/// them in memory ([`projections::bulk::Replay`], the live path's rules in
/// its batches), while a second task writes the rows that never change
/// into the shadow as they come; the final state of the other tables is
/// written at the end.
async fn bulk_apply(
    reader: &mut TopicReader,
    shadow: &Db,
    projection: Projection,
    batch_size: usize,
    progress: &runtime::progress::Progress,
    tally: &mut ApplyTally,
    slice: u64,
) -> Result<Vec<u64>, ProjectionError> {
    use projections::bulk;
    let started = Instant::now();
    // Rows, and how many events were read when they were decided.
    let (to_writer, mut rx) = tokio::sync::mpsc::channel::<(Vec<bulk::Rows>, u64)>(2);
    let db = shadow.clone();
    // The slices are timed where the rows are written: that is where the
    // time goes, and a slice ends only once its rows are in the shadow.
    let writer = tokio::spawn(async move {
        let mut slice_millis = Vec::new();
        let mut next_slice = slice;
        while let Some((rows, read)) = rx.recv().await {
            bulk::load(&db, &rows)
                .await
                .map_err(ProjectionError::WriteRows)?;
            while read >= next_slice {
                slice_millis.push(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
                next_slice += slice;
            }
        }
        Ok::<_, ProjectionError>(slice_millis)
    });
    let mut replay = bulk::Replay::with_capacity(projection, reader.total());
    let read = async {
        while let Some(records) = reader.next_batch(batch_size.max(1)).await? {
            let mut envs = Vec::with_capacity(records.len());
            let mut metas: Vec<MessageMeta> = Vec::with_capacity(records.len());
            for r in &records {
                match events::avro::decode(&r.payload) {
                    Ok(e) => {
                        envs.push(e);
                        metas.push(r.meta());
                    }
                    Err(_) => tally.undecodable += 1,
                }
            }
            let batch: Vec<Incoming<'_>> = envs
                .iter()
                .zip(&metas)
                .map(|(envelope, meta)| Incoming { envelope, meta })
                .collect();
            let now = events::Timestamp::now().as_micros();
            let outcomes = replay
                .apply(&batch, now)
                .map_err(|source| ProjectionError::Replay {
                    projection: projection.as_str(),
                    source,
                })?;
            tally.add(&outcomes);
            let n = u64::try_from(records.len()).unwrap_or(u64::MAX);
            tally.read += n;
            if replay.pending_appends() >= HANDOFF_ROWS
                && to_writer
                    .send((replay.take_appends(), tally.read))
                    .await
                    .is_err()
            {
                break; // the writer failed: its error is reported below
            }
            progress.inc(n);
        }
        Ok::<(), ProjectionError>(())
    }
    .await;
    if let Err(e) = read {
        writer.abort();
        return Err(e);
    }
    let _ = to_writer.send((replay.take_appends(), tally.read)).await;
    drop(to_writer);
    let slice_millis = writer.await.map_err(ProjectionError::WriterPanicked)??;
    let finished = replay.finish();
    bulk::load_finished(shadow, &finished)
        .await
        .map_err(ProjectionError::WriteFinalRows)?;
    Ok(slice_millis)
}

/// Applying a batch of events to a projection failed.
#[derive(Debug, thiserror::Error)]
#[error("applying events to the {projection} projection")]
pub struct ApplyError {
    pub projection: &'static str,
    #[source]
    pub source: sqlx::Error,
}

/// Decodes and applies records to `projections` of `db`; `keep` filters
/// records (point-in-time).
pub(crate) async fn apply_records(
    db: &Db,
    projections: &[Projection],
    records: &[streaming::reader::Record],
    tallies: &mut [ApplyTally],
) -> Result<(), ApplyError> {
    let mut envs = Vec::with_capacity(records.len());
    let mut metas: Vec<MessageMeta> = Vec::with_capacity(records.len());
    let mut undecodable = 0u64;
    for r in records {
        match events::avro::decode(&r.payload) {
            Ok(e) => {
                envs.push(e);
                metas.push(r.meta());
            }
            Err(_) => undecodable += 1,
        }
    }
    let batch: Vec<Incoming<'_>> = envs
        .iter()
        .zip(&metas)
        .map(|(envelope, meta)| Incoming { envelope, meta })
        .collect();
    for (p, t) in projections.iter().zip(tallies.iter_mut()) {
        let outcomes = apply_batch(db, *p, &batch)
            .await
            .map_err(|source| ApplyError {
                projection: p.as_str(),
                source,
            })?;
        t.read += u64::try_from(records.len()).unwrap_or(u64::MAX);
        t.undecodable += undecodable;
        t.add(&outcomes);
    }
    Ok(())
}

/// Executes a rebuild: takes the projection's run lock; refuses while the
/// group is active and when the topics' history is incomplete (unless
/// `opts.allow_truncated_history`); notes the group's committed offsets,
/// captures the high watermarks, reads both topics from the beginning up
/// to them (no group), applies with the projection code into a shadow,
/// checks the group is still inactive and its offsets did not move, swaps
/// the shadow in (one transaction), then commits per partition the lower
/// of the group's old offset and the captured end (the log start where it
/// had none) and reads them back.
///
/// Keeping the old offsets where the group lagged behind makes the live
/// consumers re-read what they had not reached: events the rebuild
/// applied come back as duplicates, and the ones it rejected get their
/// stored rejection (same position) and are dead-lettered by the live
/// consumers as usual. A crash between the swap and the offset commit is
/// harmless for the same reason: the old offsets are at or before the
/// captured ends.
pub async fn execute_rebuild(
    kafka: &KafkaConfig,
    db_url: &str,
    db: &Db,
    projection: Projection,
    group: &str,
    batch_size: usize,
    opts: RunOptions,
) -> Result<RebuildSummary, ProjectionError> {
    under_run_lock(
        db,
        db_url,
        projection,
        rebuild_locked(kafka, db_url, db, projection, group, batch_size, opts),
    )
    .await
}

async fn rebuild_locked(
    kafka: &KafkaConfig,
    db_url: &str,
    db: &Db,
    projection: Projection,
    group: &str,
    batch_size: usize,
    opts: RunOptions,
) -> Result<RebuildSummary, ProjectionError> {
    groups::describe(kafka, group)
        .await?
        .ensure_inactive("rebuilding the projection")?;
    let topics = projection_topics(kafka);
    let before = groups::offsets(kafka, group, &topics).await?;
    let old: BTreeMap<(String, i32), Option<i64>> = before
        .iter()
        .map(|o| ((o.topic.clone(), o.partition), o.committed))
        .collect();
    let mut reader = TopicReader::open(kafka, &topics, Start::Beginning, End::Latest, None).await?;
    // The log starts the reader actually reads from (retention may have
    // moved them since the lookup above).
    let gaps = history_gaps(
        reader
            .ranges()
            .iter()
            .map(|r| (r.topic.as_str(), r.partition, r.start)),
    );
    check_history(&gaps, opts.allow_truncated_history, "rebuild")?;
    let ends: BTreeMap<(String, i32), i64> = reader
        .ranges()
        .iter()
        .map(|r| ((r.topic.clone(), r.partition), r.end))
        .collect();
    let starts: BTreeMap<(String, i32), i64> = reader
        .ranges()
        .iter()
        .map(|r| ((r.topic.clone(), r.partition), r.start))
        .collect();
    // Per partition: the group's old offset where it is lower than the
    // end, else the end; the log start where nothing was committed.
    let targets: BTreeMap<(String, i32), i64> = ends
        .iter()
        .map(|(k, end)| {
            let from = old
                .get(k)
                .copied()
                .flatten()
                .unwrap_or_else(|| starts.get(k).copied().unwrap_or(0));
            (k.clone(), from.min(*end))
        })
        .collect();
    let shadow = Shadow::create(db, db_url, projection).await?;
    tracing::info!(shadow = %shadow.describe(), "rebuilding into the shadow");
    let started = Instant::now();
    let progress = runtime::progress::Progress::new(
        &format!("rebuild {}", projection.as_str()),
        reader.total(),
    );
    let mut tally = ApplyTally::default();
    let mut slice_millis = Vec::new();
    let slice_events = (reader.total() / 10).max(1);
    let read = match shadow.strip_indexes().await {
        Ok(()) => bulk_apply(
            &mut reader,
            &shadow.db,
            projection,
            batch_size,
            &progress,
            &mut tally,
            slice_events,
        )
        .await
        .map(|s| slice_millis = s),
        Err(e) => Err(e.into()),
    };
    progress.finish();
    let checked = match read {
        Ok(()) => match groups::describe(kafka, group)
            .await
            .and_then(|g| g.ensure_inactive("swapping in the rebuilt projection"))
        {
            Ok(()) => verify_committed(kafka, group, &topics, &old)
                .await
                .map_err(|e| ProjectionError::OffsetsChangedDuringRebuild(Box::new(e))),
            Err(e) => Err(e.into()),
        },
        Err(e) => Err(e),
    };
    if let Err(e) = checked {
        let _ = shadow.discard(db).await;
        return Err(ProjectionError::RebuildAbandoned(Box::new(e)));
    }
    let millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    shadow.swap(db, projection).await?;
    let rows = groups::plan(kafka, group, &topics, &groups::Target::Exact(targets)).await?;
    groups::execute(kafka, group, &rows)
        .await
        .map_err(ProjectionError::CommitAfterRebuild)?;
    verify_committed(kafka, group, &topics, &planned_targets(&rows))
        .await
        .map_err(|e| ProjectionError::MovedAfterRebuild {
            projection: projection.as_str(),
            group: group.to_owned(),
            source: Box::new(e),
        })?;
    let events = tally;
    let events_per_sec = events.read.saturating_mul(1000) / millis.max(1);
    Ok(RebuildSummary {
        projection: projection.as_str().to_owned(),
        group: group.to_owned(),
        events,
        millis,
        events_per_sec,
        offsets: rows,
        tables: table_rows(tables::row_counts(db, projection).await?),
        slice_events,
        slice_millis,
    })
}
