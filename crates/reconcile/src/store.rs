//! SQL: the ledger's PSP references (read) and the reconciliation tables
//! (`reconcile_runs`, `reconcile_discrepancies`), on both backends.

use crate::matching::LedgerRef;
use events::Currency;
use sqlx::Row as _;
use std::collections::HashMap;
use storage::BeginWrite;
use storage::Db;

/// References per SQLite `IN (...)` list; PostgreSQL gets `= ANY($1)`.
const SQLITE_CHUNK: usize = 900;
const PG_CHUNK: usize = 20_000;

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
            for chunk in values.chunks(PG_CHUNK) {
                for row in sqlx::query(&sql).bind(chunk).fetch_all(p).await? {
                    out.push(ledger_ref(&row)?);
                }
            }
        }
        Db::Sqlite(p) => {
            for chunk in values.chunks(SQLITE_CHUNK) {
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

/// Ledger references that occurred in `[from_us, to_us)`.
pub async fn refs_between(
    db: &Db,
    from_us: i64,
    to_us: i64,
) -> Result<Vec<LedgerRef>, sqlx::Error> {
    let sql = format!(
        "SELECT {REF_COLS} FROM ledger_psp_references WHERE occurred_at >= $1 AND occurred_at < $2"
    );
    let mut out = Vec::new();
    storage::with_pool!(db, p => {
        for row in sqlx::query(&sql).bind(from_us).bind(to_us).fetch_all(p).await? {
            out.push(ledger_ref(&row)?);
        }
    });
    Ok(out)
}

/// Payment ids of orders, from the ledger projection's orders.
pub async fn payment_ids(
    db: &Db,
    orders: &[String],
) -> Result<HashMap<String, String>, sqlx::Error> {
    let mut out = HashMap::new();
    for chunk in orders.chunks(SQLITE_CHUNK) {
        let list = (2..chunk.len() + 2)
            .map(|i| format!("${i}"))
            .collect::<Vec<_>>()
            .join(",");
        let sql = format!(
            "SELECT order_id, payment_id FROM projection_orders WHERE projection = $1 AND order_id IN ({list})"
        );
        storage::with_pool!(db, p => {
            let mut q = sqlx::query(&sql).bind("ledger");
            for o in chunk {
                q = q.bind(o);
            }
            for row in q.fetch_all(p).await? {
                out.insert(row.try_get::<String, _>(0)?, row.try_get::<String, _>(1)?);
            }
        });
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

/// Ledger references among `refs` matched by a run of a settlement day other
/// than `day` -> that day.
pub async fn matched_elsewhere(
    db: &Db,
    refs: &[String],
    day: &str,
) -> Result<HashMap<String, String>, sqlx::Error> {
    let mut out = HashMap::new();
    for chunk in refs.chunks(SQLITE_CHUNK) {
        let list = (2..chunk.len() + 2)
            .map(|i| format!("${i}"))
            .collect::<Vec<_>>()
            .join(",");
        let sql = format!(
            "SELECT psp_reference, settlement_date FROM reconcile_matched_refs \
             WHERE settlement_date <> $1 AND psp_reference IN ({list})"
        );
        storage::with_pool!(db, p => {
            let mut q = sqlx::query(&sql).bind(day);
            for r in chunk {
                q = q.bind(r);
            }
            for row in q.fetch_all(p).await? {
                out.insert(row.try_get::<String, _>(0)?, row.try_get::<String, _>(1)?);
            }
        });
    }
    Ok(out)
}

/// Records a run and its discrepancies in one transaction. Discrepancies
/// already known (same id from an earlier run of the day) keep their state;
/// open ones take the new figures (ours, theirs, fee, detail, line) when
/// they differ, resolved ones stay as they were. `claimed`: the ledger
/// references the run matched, `(ours, the row's)`; the first run to match
/// a reference keeps it. Returns the ids that are new. Nothing is written
/// if the run is already recorded (returns `None`).
pub async fn record_run(
    db: &Db,
    run: &crate::report::Report,
    report_json: &str,
    discrepancies: &[DiscrepancyRow],
    claimed: &[(String, String)],
    now: i64,
) -> Result<Option<Vec<String>>, sqlx::Error> {
    let mut new_ids = Vec::new();
    storage::with_pool!(db, p => {
        let mut tx = p.begin_write().await?;
        let inserted = sqlx::query(
            "INSERT INTO reconcile_runs (run_id, settlement_date, source, file_sha256, row_count, matched, report, state, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'recorded', $8) ON CONFLICT (run_id) DO NOTHING",
        )
        .bind(&run.run_id)
        .bind(&run.settlement_date)
        .bind(&run.source)
        .bind(&run.file_sha256)
        .bind(run.rows)
        .bind(run.matched)
        .bind(report_json)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            tx.rollback().await?;
            return Ok(None);
        }
        for d in discrepancies {
            let n = insert_discrepancy_query(d, now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n == 1 {
                new_ids.push(d.discrepancy_id.clone());
            } else {
                // Known already: an open one takes this file's figures.
                sqlx::query(
                    "UPDATE reconcile_discrepancies SET ours_currency = $2, ours_minor = $3, theirs_currency = $4, \
                     theirs_minor = $5, detail = $6, line = $7, theirs_fee_minor = $8 \
                     WHERE discrepancy_id = $1 AND state = 'open'",
                )
                .bind(&d.discrepancy_id)
                .bind(split(&d.ours).0)
                .bind(split(&d.ours).1)
                .bind(split(&d.theirs).0)
                .bind(split(&d.theirs).1)
                .bind(&d.detail)
                .bind(d.line)
                .bind(d.theirs_fee_minor)
                .execute(&mut *tx)
                .await?;
            }
        }
        for chunk in claimed.chunks(150) {
            let values = (0..chunk.len())
                .map(|i| format!("(${}, $1, $2, ${}, $3)", 4 + 2 * i, 5 + 2 * i))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "INSERT INTO reconcile_matched_refs (psp_reference, settlement_date, run_id, row_reference, created_at) \
                 VALUES {values} ON CONFLICT (psp_reference) DO NOTHING"
            );
            let mut q = sqlx::query(&sql).bind(&run.settlement_date).bind(&run.run_id).bind(now);
            for (ours, row) in chunk {
                q = q.bind(ours).bind(row);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
    });
    Ok(Some(new_ids))
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
