//! `paystream project --into URL --as-of T`: the ledger and wallets as they
//! stood at a past moment, built into a separate database.

use crate::projection::{ApplyError, ApplyTally, apply_records, projection_topics};
use crate::shadow::SqliteFileError;
use crate::tables;
use crate::tables::TablesError;
use projections::Projection;
use serde::Serialize;
use sqlx::Connection as _;
use std::path::PathBuf;
use std::str::FromStr;
use storage::Db;
use streaming::KafkaConfig;
use streaming::reader::{End, ReaderError, Start, TopicReader};

/// An instant (`--as-of`, `--to-datetime`) that does not parse.
#[derive(Debug, thiserror::Error)]
pub enum InstantError {
    #[error(
        "invalid instant {input:?}: expected RFC 3339 (2026-11-25T12:00:00Z) or ms since the epoch"
    )]
    Invalid {
        input: String,
        #[source]
        source: time::error::Parse,
    },
    #[error("instant {input:?} out of range")]
    OutOfRange {
        input: String,
        #[source]
        source: Option<std::num::TryFromIntError>,
    },
}

/// Why `paystream project` built nothing (or stopped).
#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    #[error("nothing to build: choose --ledger and/or --wallet")]
    NothingChosen,
    /// `into` (redacted) names the production database.
    #[error("--into {into} is the production database: choose a separate database")]
    IsProduction { into: String },
    /// `into` (redacted) reaches the production database.
    #[error(
        "--into {into} is the production database (same database after connecting): choose a \
         separate database"
    )]
    SameAfterConnecting { into: String },
    #[error("--into {into} already holds projection data: use an empty database")]
    HoldsData { into: String },
    #[error("connecting to --into")]
    ConnectInto(#[source] sqlx::Error),
    #[error(
        "connecting to the production database (--database-url) to make sure \
         --into is a different one"
    )]
    ConnectProduction(#[source] sqlx::Error),
    #[error("asking the database who it is")]
    Identity(#[source] sqlx::Error),
    #[error(transparent)]
    SqliteFile(#[from] SqliteFileError),
    #[error(transparent)]
    Storage(#[from] storage::StorageError),
    #[error(transparent)]
    Tables(#[from] TablesError),
    // (A ReaderError is large: boxed, so every Result here stays small.)
    #[error(transparent)]
    Read(Box<ReaderError>),
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

impl From<ReaderError> for ProjectError {
    fn from(e: ReaderError) -> ProjectError {
        ProjectError::Read(Box::new(e))
    }
}

/// Parses an instant: RFC 3339 or integer milliseconds since the epoch.
pub fn parse_instant_ms(s: &str) -> Result<i64, InstantError> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let t = rfc3339(s)?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).map_err(|e| out_of_range(s, Some(e)))
}

fn rfc3339(s: &str) -> Result<time::OffsetDateTime, InstantError> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).map_err(
        |source| InstantError::Invalid {
            input: s.to_owned(),
            source,
        },
    )
}

fn out_of_range(s: &str, source: Option<std::num::TryFromIntError>) -> InstantError {
    InstantError::OutOfRange {
        input: s.to_owned(),
        source,
    }
}

/// Parses an instant to microseconds since the epoch: RFC 3339 (down to
/// the microsecond; finer digits are cut) or integer milliseconds.
pub fn parse_instant_us(s: &str) -> Result<i64, InstantError> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<i64>() {
        return ms.checked_mul(1000).ok_or_else(|| out_of_range(s, None));
    }
    let t = rfc3339(s)?;
    i64::try_from(t.unix_timestamp_nanos().div_euclid(1000)).map_err(|e| out_of_range(s, Some(e)))
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

/// What a connection to PostgreSQL is connected to.
/// The server is told apart by its start time (to the µs) rather than by
/// `inet_server_addr()`, which differs for one server reached over IPv4
/// and IPv6 (and is NULL over a Unix socket).
async fn pg_identity(
    conn: &mut sqlx::PgConnection,
) -> Result<(String, String, Option<i32>), ProjectError> {
    sqlx::query_as(
        "SELECT current_database()::TEXT, pg_postmaster_start_time()::TEXT, inet_server_port()",
    )
    .fetch_one(conn)
    .await
    .map_err(ProjectError::Identity)
}

/// Whether the database `target` is connected to is the production
/// database at `production_url`, compared after connecting (PostgreSQL:
/// database name, server start time and port as the server reports them;
/// SQLite: the canonical path of the file), so different spellings of
/// one database are caught.
async fn same_real_database(production_url: &str, target: &Db) -> Result<bool, ProjectError> {
    match (target, location(production_url)) {
        (Db::Postgres(pool), Location::Postgres { .. }) => {
            let mut t = pool.acquire().await.map_err(ProjectError::ConnectInto)?;
            let theirs = pg_identity(&mut t).await?;
            let mut prod = sqlx::PgConnection::connect(production_url)
                .await
                .map_err(ProjectError::ConnectProduction)?;
            let ours = pg_identity(&mut prod).await?;
            let _ = prod.close().await;
            Ok(ours == theirs)
        }
        (Db::Sqlite(_), Location::Sqlite(path)) => {
            let file = crate::shadow::sqlite_file(target).await?;
            let target = file.canonicalize().unwrap_or(file);
            Ok(path.canonicalize().is_ok_and(|p| p == target))
        }
        _ => Ok(false),
    }
}

/// What `project` built.
#[derive(Debug, Clone, Serialize)]
pub struct AsOfSummary {
    pub as_of: String,
    /// The instant in microseconds since the epoch.
    pub as_of_us: i64,
    /// Records read (up to the high watermarks when it started).
    pub records_read: u64,
    /// Records whose event time (`occurred_at`) is ≤ the instant (applied;
    /// undecodable records count when their record timestamp is).
    pub records_included: u64,
    pub ledger: Option<ApplyTally>,
    pub wallet: Option<ApplyTally>,
}

/// Builds the chosen projections as of `as_of_us` (µs since the epoch:
/// events whose `occurred_at` ≤ it) into the database at `into` (created
/// and migrated). Refuses when `into` is the production database (by URL,
/// and again by what the database reports after connecting) or already
/// holds projection data (checked before migrating). Touches no consumer
/// group.
pub async fn project_as_of(
    kafka: &KafkaConfig,
    production_url: &str,
    into: &str,
    as_of_us: i64,
    which: &[Projection],
    batch_size: usize,
) -> Result<AsOfSummary, ProjectError> {
    if which.is_empty() {
        return Err(ProjectError::NothingChosen);
    }
    if same_database(production_url, into) {
        return Err(ProjectError::IsProduction {
            into: storage::redact(into),
        });
    }
    let db = Db::connect(into).await?;
    let result = build(
        kafka,
        &db,
        production_url,
        into,
        as_of_us,
        which,
        batch_size,
    )
    .await;
    db.close().await;
    result
}

async fn build(
    kafka: &KafkaConfig,
    db: &Db,
    production_url: &str,
    into: &str,
    as_of_us: i64,
    which: &[Projection],
    batch_size: usize,
) -> Result<AsOfSummary, ProjectError> {
    if same_real_database(production_url, db).await? {
        return Err(ProjectError::SameAfterConnecting {
            into: storage::redact(into),
        });
    }
    // Before migrating: a database holding something else is left as it was.
    if tables::has_projection_data(db).await? {
        return Err(ProjectError::HoldsData {
            into: storage::redact(into),
        });
    }
    projections::migrate(db).await?;
    let as_of_ms = as_of_us.div_euclid(1000);
    let mut reader = TopicReader::open(
        kafka,
        &projection_topics(kafka),
        Start::Beginning,
        End::Latest,
        None,
    )
    .await?;
    let progress = runtime::progress::Progress::new(
        &format!(
            "project as of {}",
            crate::projection::micros_rfc3339(as_of_us)
        ),
        reader.total(),
    );
    let mut tallies = vec![ApplyTally::default(); which.len()];
    let (mut read, mut included) = (0u64, 0u64);
    while let Some(records) = reader.next_batch(batch_size.max(1)).await? {
        let n = u64::try_from(records.len()).unwrap_or(0);
        read += n;
        // The record timestamp (ms) is the event's occurred_at cut to ms:
        // a pre-filter; the decoded occurred_at (µs) decides.
        let keep: Vec<_> = records
            .into_iter()
            .filter(|r| {
                if r.timestamp_ms.is_some_and(|t| t > as_of_ms) {
                    return false;
                }
                match events::avro::decode(&r.payload) {
                    Ok(e) => e.occurred_at.as_micros() <= as_of_us,
                    // Counted as undecodable when its record time is in range.
                    Err(_) => r.timestamp_ms.is_some(),
                }
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
        as_of: crate::projection::micros_rfc3339(as_of_us),
        as_of_us,
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
