//! `paystream project --into URL --as-of T`: the ledger and wallets as they
//! stood at a past moment, built into a separate database.

use crate::projection::{ApplyTally, apply_records, projection_topics};
use crate::tables;
use anyhow::Context as _;
use projections::Projection;
use serde::Serialize;
use std::path::PathBuf;
use std::str::FromStr;
use storage::Db;
use streaming::KafkaConfig;
use streaming::reader::{End, Start, TopicReader};

/// Parses an instant: RFC 3339 or integer milliseconds since the epoch.
pub fn parse_instant_ms(s: &str) -> anyhow::Result<i64> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .with_context(|| {
            format!("invalid instant {s:?}: expected RFC 3339 (2026-11-25T12:00:00Z) or ms since the epoch")
        })?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000)
        .with_context(|| format!("instant {s:?} out of range"))
}

/// Milliseconds since the epoch as RFC 3339.
pub fn ms_rfc3339(ms: i64) -> String {
    crate::projection::micros_rfc3339(ms.saturating_mul(1000))
}

/// Where a database URL points, to tell whether two URLs are the same
/// database.
#[derive(Debug, PartialEq, Eq)]
enum Location {
    Postgres {
        host: String,
        port: u16,
        database: String,
    },
    Sqlite(PathBuf),
    Other(String),
}

fn location(url: &str) -> Location {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        if let Ok(o) = sqlx::postgres::PgConnectOptions::from_str(url) {
            return Location::Postgres {
                host: o.get_host().to_owned(),
                port: o.get_port(),
                database: o
                    .get_database()
                    .map_or_else(|| o.get_username().to_owned(), str::to_owned),
            };
        }
    } else if let Some(rest) = url.strip_prefix("sqlite:") {
        let rest = rest.strip_prefix("//").unwrap_or(rest);
        let path = PathBuf::from(rest.split('?').next().unwrap_or(rest));
        let abs = match (path.parent(), path.file_name()) {
            (Some(dir), Some(file)) => {
                let dir = if dir.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    dir.to_path_buf()
                };
                dir.canonicalize().map_or(path.clone(), |d| d.join(file))
            }
            _ => path,
        };
        return Location::Sqlite(abs);
    }
    Location::Other(url.trim().to_owned())
}

/// Whether two URLs name the same database.
pub fn same_database(a: &str, b: &str) -> bool {
    location(a) == location(b)
}

/// What `project` built.
#[derive(Debug, Clone, Serialize)]
pub struct AsOfSummary {
    pub as_of: String,
    pub as_of_ms: i64,
    /// Records read (up to the high watermarks when it started).
    pub records_read: u64,
    /// Records whose timestamp is ≤ the instant (applied).
    pub records_included: u64,
    pub ledger: Option<ApplyTally>,
    pub wallet: Option<ApplyTally>,
}

/// Builds the chosen projections as of `as_of_ms` (records with timestamp
/// ≤ it) into the database at `into` (created and migrated). Refuses when
/// `into` is the production database or already holds projection data.
/// Touches no consumer group.
pub async fn project_as_of(
    kafka: &KafkaConfig,
    production_url: &str,
    into: &str,
    as_of_ms: i64,
    which: &[Projection],
    batch_size: usize,
) -> anyhow::Result<AsOfSummary> {
    anyhow::ensure!(
        !which.is_empty(),
        "nothing to build: choose --ledger and/or --wallet"
    );
    anyhow::ensure!(
        !same_database(production_url, into),
        "--into {} is the production database: choose a separate database",
        storage::redact(into)
    );
    let db = Db::connect(into).await?;
    let result = build(kafka, &db, into, as_of_ms, which, batch_size).await;
    db.close().await;
    result
}

async fn build(
    kafka: &KafkaConfig,
    db: &Db,
    into: &str,
    as_of_ms: i64,
    which: &[Projection],
    batch_size: usize,
) -> anyhow::Result<AsOfSummary> {
    projections::migrate(db).await?;
    anyhow::ensure!(
        !tables::has_projection_data(db).await?,
        "--into {} already holds projection data: use an empty database",
        storage::redact(into)
    );
    let mut reader = TopicReader::open(
        kafka,
        &projection_topics(kafka),
        Start::Beginning,
        End::Latest,
        None,
    )
    .await?;
    let progress = streaming::progress::Progress::new(
        &format!("project as of {}", ms_rfc3339(as_of_ms)),
        reader.total(),
    );
    let mut tallies = vec![ApplyTally::default(); which.len()];
    let (mut read, mut included) = (0u64, 0u64);
    while let Some(records) = reader.next_batch(batch_size.max(1)).await? {
        let n = u64::try_from(records.len()).unwrap_or(0);
        read += n;
        let keep: Vec<_> = records
            .into_iter()
            .filter(|r| {
                r.timestamp_ms.is_some_and(|t| t <= as_of_ms)
                    || r.timestamp_ms.is_none()
                        && timestamp_from_event(r).is_some_and(|t| t <= as_of_ms)
            })
            .collect();
        included += u64::try_from(keep.len()).unwrap_or(0);
        if !keep.is_empty() {
            apply_records(db, which, &keep, &mut tallies).await?;
        }
        progress.inc(n);
    }
    progress.finish();
    let mut out = AsOfSummary {
        as_of: ms_rfc3339(as_of_ms),
        as_of_ms,
        records_read: read,
        records_included: included,
        ledger: None,
        wallet: None,
    };
    for (p, t) in which.iter().zip(tallies) {
        match p {
            Projection::Ledger => out.ledger = Some(t),
            Projection::Wallet => out.wallet = Some(t),
        }
    }
    Ok(out)
}

/// A record without a broker timestamp: the event's `occurred_at` (ms),
/// which is what producers set the record timestamp to.
fn timestamp_from_event(r: &streaming::reader::Record) -> Option<i64> {
    events::avro::decode(&r.payload)
        .ok()
        .map(|e| e.occurred_at.as_micros() / 1000)
}
