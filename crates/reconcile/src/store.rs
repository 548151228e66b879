//! SQL: the ledger's PSP references (read) and the reconciliation tables
//! (`reconcile_runs`, `reconcile_discrepancies`), on both backends.

use crate::limits::{SQLITE_IN_LIST_VALUES_MAX, SQLITE_JSON_ROWS_MAX, SQLITE_ROWS_PER_INSERT_MAX};
use crate::matching::LedgerRef;
use events::Currency;
use sqlx::Row as _;
use std::collections::{HashMap, HashSet};
use storage::BeginWrite;
use storage::Db;

/// Parameters each row of the SQLite discrepancies insert binds.
pub(crate) const DISCREPANCY_ROW_PARAMS: usize = 15;
/// A table that got at least this many rows from one statement batch is
/// analysed afterwards: the planner must not depend on autovacuum (off on
/// these machines) to learn a table grew from nothing to a million rows.
const ANALYZE_AFTER_ROWS: usize = 10_000;

const REF_COLS: &str =
    "psp_reference, kind, order_id, status, currency, amount_minor, fee_minor, occurred_at";

fn ledger_ref<R>(row: &R) -> Result<LedgerRef, sqlx::Error>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let currency: String = row.try_get("currency")?;
    Ok(LedgerRef {
        psp_reference: row.try_get("psp_reference")?,
        kind: row.try_get("kind")?,
        order_id: row.try_get("order_id")?,
        status: row.try_get("status")?,
        currency: Currency::from_code(&currency).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        amount_minor: row.try_get("amount_minor")?,
        fee_minor: row.try_get("fee_minor")?,
        occurred_at: row.try_get("occurred_at")?,
    })
}

/// A ledger reference, columns by position (decoding by name costs a
/// lookup per column, noticeable at a million rows), then the settlement
/// day of a run of another day that matched it, if any.
fn ledger_ref_claimed<R>(row: &R) -> Result<(LedgerRef, Option<String>), sqlx::Error>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> &'a str: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let currency: &str = row.try_get(4)?;
    Ok((
        LedgerRef {
            psp_reference: row.try_get(0)?,
            kind: row.try_get(1)?,
            order_id: row.try_get(2)?,
            status: row.try_get(3)?,
            currency: Currency::from_code(currency)
                .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
            amount_minor: row.try_get(5)?,
            fee_minor: row.try_get(6)?,
            occurred_at: row.try_get(7)?,
        },
        row.try_get(8)?,
    ))
}

/// Ledger references with, joined, the day of a run of a settlement day
/// other than `$1` that matched them (one statement instead of a second
/// look-up by every reference).
const REFS_CLAIMED: &str = "SELECT l.psp_reference, l.kind, l.order_id, l.status, l.currency, \
     l.amount_minor, l.fee_minor, l.occurred_at, m.settlement_date \
     FROM ledger_psp_references l LEFT JOIN reconcile_matched_refs m \
     ON m.psp_reference = l.psp_reference AND m.settlement_date <> $1";

/// A ledger reference and the other settlement day that matched it.
pub type ClaimedRef = (LedgerRef, Option<String>);

/// The ledger references that occurred in `[from_us, to_us)`, each with
/// the settlement day of the run that matched it, if any (whatever the
/// day: the caller tells its own day's claims, which need no new claim,
/// from another day's). Streamed: rows are decoded as they arrive.
pub async fn day_refs_with_claims(
    db: &Db,
    from_us: i64,
    to_us: i64,
) -> Result<Vec<ClaimedRef>, sqlx::Error> {
    use futures::TryStreamExt as _;
    let cols = "l.psp_reference, l.kind, l.order_id, l.status, l.currency, \
         l.amount_minor, l.fee_minor, l.occurred_at, m.settlement_date";
    let from = format!(
        "FROM ledger_psp_references l LEFT JOIN reconcile_matched_refs m \
         ON m.psp_reference = l.psp_reference \
         WHERE l.occurred_at >= {from_us} AND l.occurred_at < {to_us}"
    );
    let sql = format!("SELECT {cols} {from}");
    let mut out = Vec::new();
    match db {
        Db::Postgres(p) => {
            // COPY's text rows: a fraction of the decoding cost of a
            // million result rows (the bounds are integers, inlined).
            let mut conn = p.acquire().await?;
            let mut rows = conn
                .copy_out_raw(&format!("COPY ({sql}) TO STDOUT"))
                .await?;
            let mut partial: Vec<u8> = Vec::new();
            while let Some(chunk) = rows.try_next().await? {
                let mut data: &[u8] = &chunk;
                if !partial.is_empty() {
                    partial.extend_from_slice(data);
                    data = &[];
                }
                let buf: &[u8] = if partial.is_empty() { data } else { &partial };
                let mut consumed = 0;
                for line in buf.split_inclusive(|&b| b == b'\n') {
                    if line.last() != Some(&b'\n') {
                        break;
                    }
                    out.push(copy_row(&line[..line.len() - 1])?);
                    consumed += line.len();
                }
                let rest = buf[consumed..].to_vec();
                partial = rest;
            }
        }
        Db::Sqlite(p) => {
            // One JSON array instead of a million result rows: each row
            // crossing from SQLite's thread costs more than its fields.
            let json: Option<String> = sqlx::query_scalar(&format!(
                "SELECT json_group_array(json_array(psp_reference, kind, order_id, status, currency, \
                 amount_minor, fee_minor, occurred_at, settlement_date)) FROM (SELECT {cols} {from})"
            ))
            .fetch_one(p)
            .await?;
            type Row = (
                String,
                String,
                String,
                String,
                String,
                i64,
                i64,
                i64,
                Option<String>,
            );
            let rows: Vec<Row> = serde_json::from_str(json.as_deref().unwrap_or("[]"))
                .map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
            for (
                psp_reference,
                kind,
                order_id,
                status,
                currency,
                amount_minor,
                fee_minor,
                occurred_at,
                claim,
            ) in rows
            {
                out.push((
                    LedgerRef {
                        psp_reference,
                        kind,
                        order_id,
                        status,
                        currency: Currency::from_code(&currency)
                            .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
                        amount_minor,
                        fee_minor,
                        occurred_at,
                    },
                    claim,
                ));
            }
        }
    }
    Ok(out)
}

/// One field of COPY's text format: `None` for `\N`, escapes undone.
fn copy_field(f: &[u8]) -> Result<Option<String>, sqlx::Error> {
    let bad = || sqlx::Error::Protocol("malformed COPY row of ledger_psp_references".into());
    if f == b"\\N" {
        return Ok(None);
    }
    let s = if f.contains(&b'\\') {
        let mut v = Vec::with_capacity(f.len());
        let mut it = f.iter();
        while let Some(&b) = it.next() {
            if b != b'\\' {
                v.push(b);
                continue;
            }
            match it.next() {
                Some(b't') => v.push(b'\t'),
                Some(b'n') => v.push(b'\n'),
                Some(b'r') => v.push(b'\r'),
                Some(b'b') => v.push(8),
                Some(b'f') => v.push(12),
                Some(b'v') => v.push(11),
                Some(&c) => v.push(c),
                None => return Err(bad()),
            }
        }
        String::from_utf8(v).map_err(|_| bad())?
    } else {
        std::str::from_utf8(f).map_err(|_| bad())?.to_owned()
    };
    Ok(Some(s))
}

/// A row of the day's references from COPY's text format.
fn copy_row(line: &[u8]) -> Result<ClaimedRef, sqlx::Error> {
    let bad = || sqlx::Error::Protocol("malformed COPY row of ledger_psp_references".into());
    let mut f = line.split(|&b| b == b'\t');
    let mut text = || -> Result<String, sqlx::Error> {
        copy_field(f.next().ok_or_else(bad)?)?.ok_or_else(bad)
    };
    let psp_reference = text()?;
    let kind = text()?;
    let order_id = text()?;
    let status = text()?;
    let currency = text()?;
    let amount_minor = text()?.parse::<i64>().map_err(|_| bad())?;
    let fee_minor = text()?.parse::<i64>().map_err(|_| bad())?;
    let occurred_at = text()?.parse::<i64>().map_err(|_| bad())?;
    let claim = copy_field(f.next().ok_or_else(bad)?)?;
    if f.next().is_some() {
        return Err(bad());
    }
    Ok((
        LedgerRef {
            psp_reference,
            kind,
            order_id,
            status,
            currency: Currency::from_code(&currency)
                .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
            amount_minor,
            fee_minor,
            occurred_at,
        },
        claim,
    ))
}

/// Ledger references whose `column` (`psp_reference` or `order_id`) is one
/// of `values`, each with the settlement day other than `day` whose run
/// matched it: one statement on PostgreSQL, `IN` lists on SQLite.
pub async fn refs_claimed_where_in(
    db: &Db,
    column: &str,
    values: &[String],
    day: &str,
) -> Result<Vec<ClaimedRef>, sqlx::Error> {
    let mut out = Vec::new();
    if values.is_empty() {
        return Ok(out);
    }
    match db {
        Db::Postgres(p) => {
            let sql = format!("{REFS_CLAIMED} WHERE l.{column} = ANY($2)");
            for row in sqlx::query(&sql)
                .bind(day)
                .bind(values)
                .fetch_all(p)
                .await?
            {
                out.push(ledger_ref_claimed(&row)?);
            }
        }
        Db::Sqlite(p) => {
            for chunk in values.chunks(SQLITE_IN_LIST_VALUES_MAX) {
                let list = (2..chunk.len() + 2)
                    .map(|i| format!("${i}"))
                    .collect::<Vec<_>>()
                    .join(",");
                let sql = format!("{REFS_CLAIMED} WHERE l.{column} IN ({list})");
                let mut q = sqlx::query(&sql).bind(day);
                for v in chunk {
                    q = q.bind(v);
                }
                for row in q.fetch_all(p).await? {
                    out.push(ledger_ref_claimed(&row)?);
                }
            }
        }
    }
    Ok(out)
}

/// Ledger references whose `column` is one of `values`.
pub async fn refs_where_in(
    db: &Db,
    column: &str,
    values: &[String],
) -> Result<Vec<LedgerRef>, sqlx::Error> {
    let mut out = Vec::new();
    match db {
        Db::Postgres(p) => {
            let sql =
                format!("SELECT {REF_COLS} FROM ledger_psp_references WHERE {column} = ANY($1)");
            for row in sqlx::query(&sql).bind(values).fetch_all(p).await? {
                out.push(ledger_ref(&row)?);
            }
        }
        Db::Sqlite(p) => {
            for chunk in values.chunks(SQLITE_IN_LIST_VALUES_MAX) {
                let list = vec!["?"; chunk.len()].join(",");
                let sql = format!(
                    "SELECT {REF_COLS} FROM ledger_psp_references WHERE {column} IN ({list})"
                );
                let mut q = sqlx::query(&sql);
                for v in chunk {
                    q = q.bind(v);
                }
                for row in q.fetch_all(p).await? {
                    out.push(ledger_ref(&row)?);
                }
            }
        }
    }
    Ok(out)
}

/// Payment ids of orders, from the ledger projection's orders: one
/// statement on PostgreSQL, `IN` lists on SQLite.
pub async fn payment_ids(
    db: &Db,
    orders: &[String],
) -> Result<HashMap<String, String>, sqlx::Error> {
    let mut out = HashMap::new();
    if orders.is_empty() {
        return Ok(out);
    }
    match db {
        Db::Postgres(p) => {
            let rows = sqlx::query(
                "SELECT order_id, payment_id FROM projection_orders WHERE projection = $1 AND order_id = ANY($2)",
            )
            .bind("ledger")
            .bind(orders)
            .fetch_all(p)
            .await?;
            for row in rows {
                out.insert(row.try_get::<String, _>(0)?, row.try_get::<String, _>(1)?);
            }
        }
        Db::Sqlite(p) => {
            for chunk in orders.chunks(SQLITE_IN_LIST_VALUES_MAX) {
                let list = vec!["?"; chunk.len()].join(",");
                let sql = format!(
                    "SELECT order_id, payment_id FROM projection_orders WHERE projection = ? AND order_id IN ({list})"
                );
                let mut q = sqlx::query(&sql).bind("ledger");
                for o in chunk {
                    q = q.bind(o);
                }
                for row in q.fetch_all(p).await? {
                    out.insert(row.try_get::<String, _>(0)?, row.try_get::<String, _>(1)?);
                }
            }
        }
    }
    Ok(out)
}

/// A stored run.
#[derive(Debug, Clone)]
pub struct StoredRun {
    pub report: String,
    pub state: String,
}

pub async fn load_run(db: &Db, run_id: &str) -> Result<Option<StoredRun>, sqlx::Error> {
    let row = storage::with_pool!(db, p => {
        sqlx::query("SELECT report, state FROM reconcile_runs WHERE run_id = $1")
            .bind(run_id)
            .fetch_optional(p)
            .await?
            .map(|r| -> Result<StoredRun, sqlx::Error> {
                Ok(StoredRun { report: r.try_get(0)?, state: r.try_get(1)? })
            })
            .transpose()?
    });
    Ok(row)
}

/// A discrepancy row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscrepancyRow {
    pub discrepancy_id: String,
    pub settlement_date: String,
    pub run_id: String,
    pub class: String,
    pub psp_reference: String,
    pub order_ids: String,
    pub payment_id: Option<String>,
    pub ours: Option<(String, i64)>,
    pub theirs: Option<(String, i64)>,
    pub detail: String,
    pub line: Option<i64>,
    pub found_event_id: String,
    pub found_published: bool,
    pub state: String,
    pub action: Option<String>,
    pub reason: Option<String>,
    pub resolved_by: Option<String>,
    pub adjustment: Option<(String, i64)>,
    pub resolution_event_id: Option<String>,
    pub resolution_published: bool,
    pub resolved_at: Option<i64>,
    pub created_at: i64,
    /// The PSP's fee of the row (status_mismatch; see migration 4002).
    pub theirs_fee_minor: Option<i64>,
}

const DISC_COLS: &str = "discrepancy_id, settlement_date, run_id, class, psp_reference, order_ids, payment_id, \
     ours_currency, ours_minor, theirs_currency, theirs_minor, detail, line, found_event_id, found_published, \
     state, action, reason, resolved_by, adjustment_currency, adjustment_minor, resolution_event_id, \
     resolution_published, resolved_at, created_at, theirs_fee_minor";

fn money_cols<R>(row: &R, c: &str, m: &str) -> Result<Option<(String, i64)>, sqlx::Error>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<i64>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let cur: Option<String> = row.try_get(c)?;
    let minor: Option<i64> = row.try_get(m)?;
    Ok(cur.zip(minor))
}

fn disc_row<R>(row: &R) -> Result<DiscrepancyRow, sqlx::Error>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<i64>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    Ok(DiscrepancyRow {
        discrepancy_id: row.try_get("discrepancy_id")?,
        settlement_date: row.try_get("settlement_date")?,
        run_id: row.try_get("run_id")?,
        class: row.try_get("class")?,
        psp_reference: row.try_get("psp_reference")?,
        order_ids: row.try_get("order_ids")?,
        payment_id: row.try_get("payment_id")?,
        ours: money_cols(row, "ours_currency", "ours_minor")?,
        theirs: money_cols(row, "theirs_currency", "theirs_minor")?,
        detail: row.try_get("detail")?,
        line: row.try_get("line")?,
        found_event_id: row.try_get("found_event_id")?,
        found_published: row.try_get::<i64, _>("found_published")? != 0,
        state: row.try_get("state")?,
        action: row.try_get("action")?,
        reason: row.try_get("reason")?,
        resolved_by: row.try_get("resolved_by")?,
        adjustment: money_cols(row, "adjustment_currency", "adjustment_minor")?,
        resolution_event_id: row.try_get("resolution_event_id")?,
        resolution_published: row.try_get::<i64, _>("resolution_published")? != 0,
        resolved_at: row.try_get("resolved_at")?,
        created_at: row.try_get("created_at")?,
        theirs_fee_minor: row.try_get("theirs_fee_minor")?,
    })
}

pub async fn load_discrepancy(db: &Db, id: &str) -> Result<Option<DiscrepancyRow>, sqlx::Error> {
    let sql = format!("SELECT {DISC_COLS} FROM reconcile_discrepancies WHERE discrepancy_id = $1");
    let r = storage::with_pool!(db, p => {
        match sqlx::query(&sql).bind(id).fetch_optional(p).await? {
            Some(row) => Some(disc_row(&row)?),
            None => None,
        }
    });
    Ok(r)
}

/// Discrepancies of a settlement day.
pub async fn discrepancies_of_day(db: &Db, date: &str) -> Result<Vec<DiscrepancyRow>, sqlx::Error> {
    let sql = format!(
        "SELECT {DISC_COLS} FROM reconcile_discrepancies WHERE settlement_date = $1 ORDER BY class, psp_reference"
    );
    let mut out = Vec::new();
    storage::with_pool!(db, p => {
        for row in sqlx::query(&sql).bind(date).fetch_all(p).await? {
            out.push(disc_row(&row)?);
        }
    });
    Ok(out)
}

fn split(m: &Option<(String, i64)>) -> (Option<String>, Option<i64>) {
    match m {
        Some((c, a)) => (Some(c.clone()), Some(*a)),
        None => (None, None),
    }
}

/// The INSERT of one discrepancy, `created_at` as given; nothing when its
/// id exists (`rows_affected` 0). Shared by [`record_run`] and
/// [`insert_discrepancy`].
fn insert_discrepancy_query<'q, DB>(
    d: &'q DiscrepancyRow,
    created_at: i64,
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
where
    DB: sqlx::Database,
    String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<String>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<i64>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    let (oc, om) = split(&d.ours);
    let (tc, tm) = split(&d.theirs);
    sqlx::query(
        "INSERT INTO reconcile_discrepancies (discrepancy_id, settlement_date, run_id, class, psp_reference, order_ids, payment_id, \
         ours_currency, ours_minor, theirs_currency, theirs_minor, detail, line, found_event_id, found_published, state, created_at, \
         theirs_fee_minor) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, 0, 'open', $15, $16) \
         ON CONFLICT (discrepancy_id) DO NOTHING",
    )
    .bind(&d.discrepancy_id)
    .bind(&d.settlement_date)
    .bind(&d.run_id)
    .bind(&d.class)
    .bind(&d.psp_reference)
    .bind(&d.order_ids)
    .bind(&d.payment_id)
    .bind(oc)
    .bind(om)
    .bind(tc)
    .bind(tm)
    .bind(&d.detail)
    .bind(d.line)
    .bind(&d.found_event_id)
    .bind(created_at)
    .bind(d.theirs_fee_minor)
}

/// Records a run and its discrepancies in one transaction. Discrepancies
/// already known (same id from an earlier run of the day) keep their state;
/// open ones take the new figures (ours, theirs, fee, detail, line) when
/// they differ, resolved ones stay as they were. `claimed`: the ledger
/// references the run matched, `(ours, the row's)`; the first run to match
/// a reference keeps it. `started`: on PostgreSQL, the run's transaction
/// if it was begun already, with the number of claims it holds (copied
/// while the file was read, [`ClaimCopy`]; `claimed` is then the rest). Returns the ids that
/// are new and the time spent inserting the claims. Nothing is written if
/// the run is already recorded (returns `None`).
pub async fn record_run(
    db: &Db,
    started: Option<(sqlx::Transaction<'static, sqlx::Postgres>, usize)>,
    run: &crate::report::Report,
    report_json: &str,
    discrepancies: &[DiscrepancyRow],
    claimed: &[(String, String)],
    now: i64,
) -> Result<Option<Recorded>, sqlx::Error> {
    let mut streamed_claims = 0;
    let recorded = match db {
        Db::Postgres(p) => {
            let tx = match started {
                Some((tx, copied)) => {
                    streamed_claims = copied;
                    tx
                }
                None => p.begin_write().await?,
            };
            record_in(tx, run, report_json, discrepancies, claimed, now).await?
        }
        Db::Sqlite(p) => {
            let tx = p.begin_write().await?;
            record_in(tx, run, report_json, discrepancies, claimed, now).await?
        }
    };
    if let Some(Recorded { new_ids, .. }) = &recorded {
        if claimed.len() + streamed_claims >= ANALYZE_AFTER_ROWS {
            analyze(db, "reconcile_matched_refs").await?;
        }
        if new_ids.len() >= ANALYZE_AFTER_ROWS {
            analyze(db, "reconcile_discrepancies").await?;
        }
    }
    Ok(recorded)
}

async fn record_in<DB>(
    mut tx: sqlx::Transaction<'static, DB>,
    run: &crate::report::Report,
    report_json: &str,
    discrepancies: &[DiscrepancyRow],
    claimed: &[(String, String)],
    now: i64,
) -> Result<Option<Recorded>, sqlx::Error>
where
    DB: BulkRows,
{
    let mut new_ids = Vec::new();
    if !DB::insert_run(&mut tx, run, report_json, now).await? {
        tx.rollback().await?;
        return Ok(None);
    }
    let t = std::time::Instant::now();
    insert_discrepancies(&mut tx, discrepancies, now, &mut new_ids).await?;
    let discrepancies = t.elapsed();
    let t = std::time::Instant::now();
    insert_claims(&mut tx, run, claimed, now).await?;
    let claims = t.elapsed();
    tx.commit().await?;
    Ok(Some(Recorded {
        new_ids,
        claims,
        discrepancies,
    }))
}

/// A run recorded by [`record_run`].
#[derive(Debug)]
pub struct Recorded {
    /// Discrepancy ids new to the day.
    pub new_ids: Vec<String>,
    /// Time inserting the claims given.
    pub claims: std::time::Duration,
    /// Time inserting (or updating) the discrepancies.
    pub discrepancies: std::time::Duration,
}

/// Claims streamed into `reconcile_matched_refs` with `COPY ... FROM STDIN`
/// inside the run's transaction, while the file is still being read. The
/// caller sends only references no run has claimed yet (a COPY has no `ON
/// CONFLICT`): one claimed meanwhile by a concurrent run fails the COPY
/// with a unique violation, and the whole run is rolled back (and tried
/// again by the caller), so the first claim still wins.
pub struct ClaimCopy<'c> {
    copy: sqlx::postgres::PgCopyIn<&'c mut sqlx::PgConnection>,
    /// `\t{day}\t{run}\t` between a claim's two references.
    mid: Vec<u8>,
    /// `\t{now}\n` after them.
    tail: Vec<u8>,
    buf: Vec<u8>,
}

/// Statement of [`ClaimCopy`].
const COPY_CLAIMS: &str = "COPY reconcile_matched_refs (psp_reference, settlement_date, run_id, row_reference, created_at) FROM STDIN";

impl std::fmt::Debug for ClaimCopy<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimCopy").finish_non_exhaustive()
    }
}

/// `s` as a field of COPY's text format.
fn copy_text(buf: &mut Vec<u8>, s: &str) {
    for &b in s.as_bytes() {
        match b {
            b'\\' => buf.extend_from_slice(b"\\\\"),
            b'\t' => buf.extend_from_slice(b"\\t"),
            b'\n' => buf.extend_from_slice(b"\\n"),
            b'\r' => buf.extend_from_slice(b"\\r"),
            _ => buf.push(b),
        }
    }
}

impl<'c> ClaimCopy<'c> {
    /// Starts the COPY on the run's transaction.
    pub async fn start(
        tx: &'c mut sqlx::Transaction<'static, sqlx::Postgres>,
        day: &str,
        run_id: &str,
        now: i64,
    ) -> Result<ClaimCopy<'c>, sqlx::Error> {
        let conn: &'c mut sqlx::PgConnection = tx;
        let copy = conn.copy_in_raw(COPY_CLAIMS).await?;
        let mut mid = Vec::new();
        mid.push(b'\t');
        copy_text(&mut mid, day);
        mid.push(b'\t');
        copy_text(&mut mid, run_id);
        mid.push(b'\t');
        Ok(ClaimCopy {
            copy,
            mid,
            tail: format!("\t{now}\n").into_bytes(),
            buf: Vec::with_capacity(1 << 20),
        })
    }

    /// Sends claims `(ours, the row's)`: one message, no round trip.
    pub async fn send<'a>(
        &mut self,
        claims: impl Iterator<Item = (&'a str, &'a str)>,
    ) -> Result<(), sqlx::Error> {
        self.buf.clear();
        for (ours, row) in claims {
            copy_text(&mut self.buf, ours);
            self.buf.extend_from_slice(&self.mid);
            copy_text(&mut self.buf, row);
            self.buf.extend_from_slice(&self.tail);
        }
        if !self.buf.is_empty() {
            self.copy.send(self.buf.as_slice()).await?;
        }
        Ok(())
    }

    /// Ends the COPY; returns the rows copied.
    pub async fn finish(self) -> Result<u64, sqlx::Error> {
        self.copy.finish().await
    }

    /// Abandons the COPY (the transaction is rolled back by the caller).
    pub async fn abort(self, why: &str) -> Result<(), sqlx::Error> {
        self.copy.abort(why).await
    }
}

/// Whether `e` is a unique violation (PostgreSQL 23505, SQLite 2067/1555).
pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

/// Fresh planner statistics for a table that was just bulk-filled. SQLite
/// samples a bounded number of rows per index (`analysis_limit`), as
/// PostgreSQL does by itself, so the cost stays flat as the table grows.
async fn analyze(db: &Db, table: &str) -> Result<(), sqlx::Error> {
    match db {
        Db::Postgres(p) => {
            sqlx::raw_sql(&format!("ANALYZE {table}"))
                .execute(p)
                .await?;
        }
        Db::Sqlite(p) => {
            sqlx::raw_sql(&format!("PRAGMA analysis_limit = 1000; ANALYZE {table}"))
                .execute(p)
                .await?;
        }
    }
    Ok(())
}

/// Inserts the run's discrepancies unless their id exists (pushing the new
/// ids to `new_ids`, in input order); a known one still open takes the new
/// figures (ours, theirs, fee, detail, line). PostgreSQL: one `INSERT ...
/// SELECT FROM UNNEST` and at most one `UPDATE ... FROM UNNEST`; SQLite:
/// multi-row `VALUES` inserts, then one UPDATE per known row.
async fn insert_discrepancies<DB>(
    tx: &mut sqlx::Transaction<'static, DB>,
    discrepancies: &[DiscrepancyRow],
    now: i64,
    new_ids: &mut Vec<String>,
) -> Result<(), sqlx::Error>
where
    DB: BulkRows,
{
    if discrepancies.is_empty() {
        return Ok(());
    }
    let inserted = DB::insert_discrepancies(tx, discrepancies, now).await?;
    let known: Vec<&DiscrepancyRow> = discrepancies
        .iter()
        .filter(|d| {
            if inserted.contains(&d.discrepancy_id) {
                new_ids.push(d.discrepancy_id.clone());
                false
            } else {
                true
            }
        })
        .collect();
    if !known.is_empty() {
        DB::update_open_discrepancies(tx, &known).await?;
    }
    Ok(())
}

/// Claims the ledger references the run matched; a reference claimed
/// already (by an earlier run) keeps its first claim. Sorted, so the
/// primary key's B-tree is filled in order.
async fn insert_claims<DB>(
    tx: &mut sqlx::Transaction<'static, DB>,
    run: &crate::report::Report,
    claimed: &[(String, String)],
    now: i64,
) -> Result<(), sqlx::Error>
where
    DB: BulkRows,
{
    if claimed.is_empty() {
        return Ok(());
    }
    let mut sorted: Vec<&(String, String)> = claimed.iter().collect();
    sorted.sort_unstable();
    DB::insert_claims(tx, run, &sorted, now).await
}

/// The INSERT of a run's row; nothing when its id exists.
fn insert_run_query<'q, DB>(
    run: &'q crate::report::Report,
    report_json: &'q str,
    now: i64,
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
where
    DB: sqlx::Database,
    &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    sqlx::query(
        "INSERT INTO reconcile_runs (run_id, settlement_date, source, file_sha256, row_count, matched, report, state, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, 'recorded', $8) ON CONFLICT (run_id) DO NOTHING",
    )
    .bind(run.run_id.as_str())
    .bind(run.settlement_date.as_str())
    .bind(run.source.as_str())
    .bind(run.file_sha256.as_str())
    .bind(run.rows)
    .bind(run.matched)
    .bind(report_json)
    .bind(now)
}

/// The two backends' ways of writing many rows in one transaction.
pub(crate) trait BulkRows: sqlx::Database {
    /// Inserts the run's row; false when the run is recorded already.
    fn insert_run(
        tx: &mut sqlx::Transaction<'static, Self>,
        run: &crate::report::Report,
        report_json: &str,
        now: i64,
    ) -> impl std::future::Future<Output = Result<bool, sqlx::Error>> + Send;
    /// Inserts, skipping existing ids; returns the ids inserted.
    fn insert_discrepancies(
        tx: &mut sqlx::Transaction<'static, Self>,
        rows: &[DiscrepancyRow],
        now: i64,
    ) -> impl std::future::Future<Output = Result<HashSet<String>, sqlx::Error>> + Send;
    /// Open ones among `rows` take the rows' figures.
    fn update_open_discrepancies(
        tx: &mut sqlx::Transaction<'static, Self>,
        rows: &[&DiscrepancyRow],
    ) -> impl std::future::Future<Output = Result<(), sqlx::Error>> + Send;
    fn insert_claims(
        tx: &mut sqlx::Transaction<'static, Self>,
        run: &crate::report::Report,
        claimed: &[&(String, String)],
        now: i64,
    ) -> impl std::future::Future<Output = Result<(), sqlx::Error>> + Send;
}

/// Column arrays of discrepancy rows, for `UNNEST`.
#[derive(Default)]
struct DiscrepancyColumns {
    id: Vec<String>,
    date: Vec<String>,
    run: Vec<String>,
    class: Vec<String>,
    reference: Vec<String>,
    orders: Vec<String>,
    payment: Vec<Option<String>>,
    ours_currency: Vec<Option<String>>,
    ours_minor: Vec<Option<i64>>,
    theirs_currency: Vec<Option<String>>,
    theirs_minor: Vec<Option<i64>>,
    detail: Vec<String>,
    line: Vec<Option<i64>>,
    found_event: Vec<String>,
    fee: Vec<Option<i64>>,
}

impl DiscrepancyColumns {
    fn of<'a>(rows: impl Iterator<Item = &'a DiscrepancyRow>) -> DiscrepancyColumns {
        let mut c = DiscrepancyColumns::default();
        for d in rows {
            let (oc, om) = split(&d.ours);
            let (tc, tm) = split(&d.theirs);
            c.id.push(d.discrepancy_id.clone());
            c.date.push(d.settlement_date.clone());
            c.run.push(d.run_id.clone());
            c.class.push(d.class.clone());
            c.reference.push(d.psp_reference.clone());
            c.orders.push(d.order_ids.clone());
            c.payment.push(d.payment_id.clone());
            c.ours_currency.push(oc);
            c.ours_minor.push(om);
            c.theirs_currency.push(tc);
            c.theirs_minor.push(tm);
            c.detail.push(d.detail.clone());
            c.line.push(d.line);
            c.found_event.push(d.found_event_id.clone());
            c.fee.push(d.theirs_fee_minor);
        }
        c
    }
}

impl BulkRows for sqlx::Postgres {
    async fn insert_run(
        tx: &mut sqlx::Transaction<'static, Self>,
        run: &crate::report::Report,
        report_json: &str,
        now: i64,
    ) -> Result<bool, sqlx::Error> {
        let n = insert_run_query(run, report_json, now)
            .execute(&mut **tx)
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    async fn insert_discrepancies(
        tx: &mut sqlx::Transaction<'static, Self>,
        rows: &[DiscrepancyRow],
        now: i64,
    ) -> Result<HashSet<String>, sqlx::Error> {
        let c = DiscrepancyColumns::of(rows.iter());
        let inserted: Vec<String> = sqlx::query_scalar(
            "INSERT INTO reconcile_discrepancies (discrepancy_id, settlement_date, run_id, class, psp_reference, order_ids, payment_id, \
             ours_currency, ours_minor, theirs_currency, theirs_minor, detail, line, found_event_id, found_published, state, created_at, \
             theirs_fee_minor) \
             SELECT id, dt, run, class, ref, orders, payment, oc, om, tc, tm, detail, line, found, 0, 'open', $1, fee \
             FROM UNNEST($2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::TEXT[], $7::TEXT[], $8::TEXT[], $9::TEXT[], \
             $10::BIGINT[], $11::TEXT[], $12::BIGINT[], $13::TEXT[], $14::BIGINT[], $15::TEXT[], $16::BIGINT[]) \
             AS x(id, dt, run, class, ref, orders, payment, oc, om, tc, tm, detail, line, found, fee) \
             ON CONFLICT (discrepancy_id) DO NOTHING RETURNING discrepancy_id",
        )
        .bind(now)
        .bind(&c.id)
        .bind(&c.date)
        .bind(&c.run)
        .bind(&c.class)
        .bind(&c.reference)
        .bind(&c.orders)
        .bind(&c.payment)
        .bind(&c.ours_currency)
        .bind(&c.ours_minor)
        .bind(&c.theirs_currency)
        .bind(&c.theirs_minor)
        .bind(&c.detail)
        .bind(&c.line)
        .bind(&c.found_event)
        .bind(&c.fee)
        .fetch_all(&mut **tx)
        .await?;
        Ok(inserted.into_iter().collect())
    }

    async fn update_open_discrepancies(
        tx: &mut sqlx::Transaction<'static, Self>,
        rows: &[&DiscrepancyRow],
    ) -> Result<(), sqlx::Error> {
        let c = DiscrepancyColumns::of(rows.iter().copied());
        sqlx::query(
            "UPDATE reconcile_discrepancies d SET ours_currency = x.oc, ours_minor = x.om, theirs_currency = x.tc, \
             theirs_minor = x.tm, detail = x.detail, line = x.line, theirs_fee_minor = x.fee \
             FROM UNNEST($1::TEXT[], $2::TEXT[], $3::BIGINT[], $4::TEXT[], $5::BIGINT[], $6::TEXT[], $7::BIGINT[], $8::BIGINT[]) \
             AS x(id, oc, om, tc, tm, detail, line, fee) \
             WHERE d.discrepancy_id = x.id AND d.state = 'open'",
        )
        .bind(&c.id)
        .bind(&c.ours_currency)
        .bind(&c.ours_minor)
        .bind(&c.theirs_currency)
        .bind(&c.theirs_minor)
        .bind(&c.detail)
        .bind(&c.line)
        .bind(&c.fee)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn insert_claims(
        tx: &mut sqlx::Transaction<'static, Self>,
        run: &crate::report::Report,
        claimed: &[&(String, String)],
        now: i64,
    ) -> Result<(), sqlx::Error> {
        let (ours, rows): (Vec<&str>, Vec<&str>) = claimed
            .iter()
            .map(|(o, r)| (o.as_str(), r.as_str()))
            .unzip();
        sqlx::query(
            "INSERT INTO reconcile_matched_refs (psp_reference, settlement_date, run_id, row_reference, created_at) \
             SELECT ours, $1, $2, theirs, $3 FROM UNNEST($4::TEXT[], $5::TEXT[]) AS x(ours, theirs) \
             ON CONFLICT (psp_reference) DO NOTHING",
        )
        .bind(&run.settlement_date)
        .bind(&run.run_id)
        .bind(now)
        .bind(&ours)
        .bind(&rows)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

/// `(... ), (...)` placeholders: `rows` tuples of `width` from `$first`.
fn values_list(rows: usize, width: usize, first: usize, fixed: &str) -> String {
    (0..rows)
        .map(|r| {
            let cols = (0..width)
                .map(|c| format!("${}", first + r * width + c))
                .collect::<Vec<_>>()
                .join(", ");
            format!("({cols}{fixed})")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl BulkRows for sqlx::Sqlite {
    async fn insert_run(
        tx: &mut sqlx::Transaction<'static, Self>,
        run: &crate::report::Report,
        report_json: &str,
        now: i64,
    ) -> Result<bool, sqlx::Error> {
        let n = insert_run_query(run, report_json, now)
            .execute(&mut **tx)
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    async fn insert_discrepancies(
        tx: &mut sqlx::Transaction<'static, Self>,
        rows: &[DiscrepancyRow],
        now: i64,
    ) -> Result<HashSet<String>, sqlx::Error> {
        // 15 parameters a row: SQLITE_ROWS_PER_INSERT_MAX / 8 rows stay
        // under SQLite's old limit of 999 parameters (checked in limits).
        let mut inserted = HashSet::new();
        for chunk in rows.chunks(SQLITE_ROWS_PER_INSERT_MAX / 8) {
            let values = values_list(chunk.len(), DISCREPANCY_ROW_PARAMS, 2, ", 0, 'open', $1");
            let sql = format!(
                "INSERT INTO reconcile_discrepancies (discrepancy_id, settlement_date, run_id, class, psp_reference, order_ids, payment_id, \
                 ours_currency, ours_minor, theirs_currency, theirs_minor, detail, line, found_event_id, theirs_fee_minor, \
                 found_published, state, created_at) VALUES {values} \
                 ON CONFLICT (discrepancy_id) DO NOTHING RETURNING discrepancy_id"
            );
            let mut q = sqlx::query_scalar::<_, String>(&sql).bind(now);
            for d in chunk {
                let (oc, om) = split(&d.ours);
                let (tc, tm) = split(&d.theirs);
                q = q
                    .bind(&d.discrepancy_id)
                    .bind(&d.settlement_date)
                    .bind(&d.run_id)
                    .bind(&d.class)
                    .bind(&d.psp_reference)
                    .bind(&d.order_ids)
                    .bind(&d.payment_id)
                    .bind(oc)
                    .bind(om)
                    .bind(tc)
                    .bind(tm)
                    .bind(&d.detail)
                    .bind(d.line)
                    .bind(&d.found_event_id)
                    .bind(d.theirs_fee_minor);
            }
            inserted.extend(q.fetch_all(&mut **tx).await?);
        }
        Ok(inserted)
    }

    async fn update_open_discrepancies(
        tx: &mut sqlx::Transaction<'static, Self>,
        rows: &[&DiscrepancyRow],
    ) -> Result<(), sqlx::Error> {
        // Known discrepancies come back only when a corrected file of the
        // same day is run: few, and SQLite has no round trip to save.
        for d in rows {
            update_open_discrepancy_query(d).execute(&mut **tx).await?;
        }
        Ok(())
    }

    async fn insert_claims(
        tx: &mut sqlx::Transaction<'static, Self>,
        run: &crate::report::Report,
        claimed: &[&(String, String)],
        now: i64,
    ) -> Result<(), sqlx::Error> {
        // The pairs as one JSON parameter per chunk: binding two values a
        // row costs more than SQLite's own JSON reading.
        for chunk in claimed.chunks(SQLITE_JSON_ROWS_MAX) {
            let pairs =
                serde_json::to_string(chunk).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
            sqlx::query(
                "INSERT INTO reconcile_matched_refs (psp_reference, row_reference, settlement_date, run_id, created_at) \
                 SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), $1, $2, $3 FROM json_each($4) \
                 WHERE true ON CONFLICT (psp_reference) DO NOTHING",
            )
            .bind(&run.settlement_date)
            .bind(&run.run_id)
            .bind(now)
            .bind(pairs)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }
}

fn update_open_discrepancy_query<'q, DB>(
    d: &'q DiscrepancyRow,
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
where
    DB: sqlx::Database,
    &'q String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<String>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<i64>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    let (oc, om) = split(&d.ours);
    let (tc, tm) = split(&d.theirs);
    sqlx::query(
        "UPDATE reconcile_discrepancies SET ours_currency = $2, ours_minor = $3, theirs_currency = $4, \
         theirs_minor = $5, detail = $6, line = $7, theirs_fee_minor = $8 \
         WHERE discrepancy_id = $1 AND state = 'open'",
    )
    .bind(&d.discrepancy_id)
    .bind(oc)
    .bind(om)
    .bind(tc)
    .bind(tm)
    .bind(&d.detail)
    .bind(d.line)
    .bind(d.theirs_fee_minor)
}

/// Marks discrepancies' found events as published: one statement on
/// PostgreSQL, `IN` lists on SQLite.
pub async fn mark_found_published_many(db: &Db, ids: &[String]) -> Result<(), sqlx::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    match db {
        Db::Postgres(p) => {
            sqlx::query(
                "UPDATE reconcile_discrepancies SET found_published = 1 WHERE discrepancy_id = ANY($1)",
            )
            .bind(ids)
            .execute(p)
            .await?;
        }
        Db::Sqlite(p) => {
            let mut tx = p.begin_write().await?;
            for chunk in ids.chunks(SQLITE_IN_LIST_VALUES_MAX) {
                let list = vec!["?"; chunk.len()].join(",");
                let sql = format!(
                    "UPDATE reconcile_discrepancies SET found_published = 1 WHERE discrepancy_id IN ({list})"
                );
                let mut q = sqlx::query(&sql);
                for id in chunk {
                    q = q.bind(id);
                }
                q.execute(&mut *tx).await?;
            }
            tx.commit().await?;
        }
    }
    Ok(())
}

pub async fn mark_found_published(db: &Db, id: &str) -> Result<(), sqlx::Error> {
    storage::with_pool!(db, p => {
        sqlx::query("UPDATE reconcile_discrepancies SET found_published = 1 WHERE discrepancy_id = $1")
            .bind(id)
            .execute(p)
            .await?;
    });
    Ok(())
}

pub async fn mark_run_published(db: &Db, run_id: &str, now: i64) -> Result<(), sqlx::Error> {
    storage::with_pool!(db, p => {
        sqlx::query("UPDATE reconcile_runs SET state = 'published', published_at = $2 WHERE run_id = $1")
            .bind(run_id)
            .bind(now)
            .execute(p)
            .await?;
    });
    Ok(())
}

/// What a resolution writes.
#[derive(Debug, Clone)]
pub struct Resolution {
    pub state: &'static str,
    pub action: String,
    pub reason: String,
    pub resolved_by: String,
    pub adjustment: Option<(String, i64)>,
    pub event_id: String,
}

/// Moves a discrepancy from one of `from` states to the resolution's state
/// (a conditional UPDATE, so two concurrent resolutions cannot both win).
/// Returns whether it did.
pub async fn resolve(
    db: &Db,
    id: &str,
    from: &[&str],
    r: &Resolution,
    now: i64,
) -> Result<bool, sqlx::Error> {
    let (ac, am) = split(&r.adjustment);
    let states = from
        .iter()
        .map(|s| format!("'{s}'"))
        .collect::<Vec<_>>()
        .join(",");
    let sql = format!(
        "UPDATE reconcile_discrepancies SET state = $2, action = $3, reason = $4, resolved_by = $5, \
         adjustment_currency = $6, adjustment_minor = $7, resolved_at = $8, resolution_event_id = $9, \
         resolution_published = 0 WHERE discrepancy_id = $1 AND state IN ({states})"
    );
    let n = storage::with_pool!(db, p => {
        sqlx::query(&sql)
            .bind(id)
            .bind(r.state)
            .bind(&r.action)
            .bind(&r.reason)
            .bind(&r.resolved_by)
            .bind(ac)
            .bind(am)
            .bind(now)
            .bind(&r.event_id)
            .execute(p)
            .await?
            .rows_affected()
    });
    Ok(n == 1)
}

pub async fn mark_resolution_published(db: &Db, id: &str) -> Result<(), sqlx::Error> {
    storage::with_pool!(db, p => {
        sqlx::query("UPDATE reconcile_discrepancies SET resolution_published = 1 WHERE discrepancy_id = $1")
            .bind(id)
            .execute(p)
            .await?;
    });
    Ok(())
}

/// Open `status_mismatch` discrepancies of single-order rows, all days.
pub async fn open_status_mismatches(db: &Db) -> Result<Vec<DiscrepancyRow>, sqlx::Error> {
    let sql = format!(
        "SELECT {DISC_COLS} FROM reconcile_discrepancies WHERE class = 'status_mismatch' AND state = 'open' \
         ORDER BY settlement_date, psp_reference"
    );
    let mut out = Vec::new();
    storage::with_pool!(db, p => {
        for row in sqlx::query(&sql).fetch_all(p).await? {
            let d = disc_row(&row)?;
            if !d.order_ids.contains(';') {
                out.push(d);
            }
        }
    });
    Ok(out)
}

/// Inserts one discrepancy found outside a file run (a re-check), unless
/// its id exists. Returns whether it was inserted.
pub async fn insert_discrepancy(db: &Db, d: &DiscrepancyRow) -> Result<bool, sqlx::Error> {
    let n = storage::with_pool!(db, p => {
        insert_discrepancy_query(d, d.created_at)
        .execute(p)
        .await?
        .rows_affected()
    });
    Ok(n == 1)
}

/// The scheduled reconciler's watermark (last day reconciled by the
/// schedule), `YYYY-MM-DD`.
pub async fn watermark(db: &Db) -> Result<Option<String>, sqlx::Error> {
    let r = storage::with_pool!(db, p => {
        sqlx::query_scalar::<_, String>("SELECT last_day FROM reconcile_watermark WHERE name = 'scheduled'")
            .fetch_optional(p)
            .await?
    });
    Ok(r)
}

/// Moves the watermark forward to `day` (never back).
pub async fn advance_watermark(db: &Db, day: &str, now: i64) -> Result<(), sqlx::Error> {
    storage::with_pool!(db, p => {
        sqlx::query(
            "INSERT INTO reconcile_watermark (name, last_day, updated_at) VALUES ('scheduled', $1, $2) \
             ON CONFLICT (name) DO UPDATE SET last_day = excluded.last_day, updated_at = excluded.updated_at \
             WHERE reconcile_watermark.last_day < excluded.last_day",
        )
        .bind(day)
        .bind(now)
        .execute(p)
        .await?;
    });
    Ok(())
}
