//! The executor's SQL: payments (with the per-payment lease), orders,
//! refunds, the event outbox and the webhook dedup table. One SQL string per
//! statement serves PostgreSQL and SQLite (see `storage::with_pool!`).
//!
//! Every state change is guarded by the state it expects (`WHERE state IN
//! (...)`, `AND attempts = $n`), so a redelivered event, a second executor
//! or a late webhook can never move an order twice; and every event is
//! written to the outbox in the same transaction as the state change it
//! reports, so a crash never loses it.

use crate::limits::SQLITE_ROWS_PER_STATEMENT_MAX;
use domain::order::StateName;
use events::Envelope;
use std::collections::HashMap;
use storage::BeginWrite;
use storage::{Db, with_pool};

pub async fn migrate(db: &Db) -> Result<(), storage::StorageError> {
    db.migrate(
        &storage::component_migrator(sqlx::migrate!("migrations/postgres")),
        &storage::component_migrator(sqlx::migrate!("migrations/sqlite")),
    )
    .await
}

pub fn now_ms() -> i64 {
    events::Timestamp::now().as_millis()
}

/// An event ready for the outbox: encoded before the transaction starts.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub event_id: String,
    pub payment_id: String,
    pub body: Vec<u8>,
}

impl Outgoing {
    pub fn new(env: &Envelope) -> Outgoing {
        let payment_id = env
            .payment_id
            .expect("executor events always belong to a payment");
        Outgoing {
            event_id: env.event_id.to_string(),
            payment_id: payment_id.to_string(),
            // Our own events are built from valid domain values; failing to
            // encode one is a bug, not an operational error.
            body: events::avro::encode(env).expect("executor events encode"),
        }
    }
}

const INSERT_OUTBOX: &str = "INSERT INTO executor_outbox (event_id, payment_id, body, created_ms) \
     VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING";

/// Inserts outgoing events inside an open transaction.
macro_rules! insert_outbox {
    ($tx:expr, $out:expr, $now:expr) => {
        for o in $out {
            sqlx::query(INSERT_OUTBOX)
                .bind(&o.event_id)
                .bind(&o.payment_id)
                .bind(&o.body)
                .bind($now)
                .execute(&mut *$tx)
                .await?;
        }
    };
}

/// `$from, $from+1, ...`: `n` numbered placeholders.
fn placeholders(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A list of ids or seqs bound as ONE parameter: a PostgreSQL array, or
/// on SQLite a JSON array (read with `json_each`). Matched with
/// [`any_of`], a statement has one text whatever the list's length, so
/// it is prepared once per connection and kept in sqlx's statement cache;
/// an `IN ($1, …, $n)` list makes a new statement (a parse, a plan and an
/// extra round trip) for every batch size.
struct List<'a, T>(&'a [T]);

impl<T> sqlx::Type<sqlx::Postgres> for List<'_, T>
where
    for<'b> &'b [T]: sqlx::Type<sqlx::Postgres>,
{
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        <&[T] as sqlx::Type<sqlx::Postgres>>::type_info()
    }
}

impl<'q, T> sqlx::Encode<'q, sqlx::Postgres> for List<'_, T>
where
    for<'b> &'b [T]: sqlx::Encode<'q, sqlx::Postgres>,
{
    fn encode_by_ref(
        &self,
        buf: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        <&[T] as sqlx::Encode<'q, sqlx::Postgres>>::encode_by_ref(&self.0, buf)
    }
}

impl<T> sqlx::Type<sqlx::Sqlite> for List<'_, T> {
    fn type_info() -> sqlx::sqlite::SqliteTypeInfo {
        <String as sqlx::Type<sqlx::Sqlite>>::type_info()
    }
}

impl<'q, T: serde::Serialize> sqlx::Encode<'q, sqlx::Sqlite> for List<'_, T> {
    fn encode_by_ref(
        &self,
        buf: &mut Vec<sqlx::sqlite::SqliteArgumentValue<'q>>,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        <String as sqlx::Encode<'q, sqlx::Sqlite>>::encode(serde_json::to_string(self.0)?, buf)
    }
}

/// `column` is one of the [`List`] bound as parameter `$n`.
fn any_of(db: &Db, column: &str, n: usize) -> String {
    match db {
        Db::Postgres(_) => format!("{column} = ANY(${n})"),
        Db::Sqlite(_) => format!("{column} IN (SELECT value FROM json_each(${n}))"),
    }
}

// ------------------------------------------------------------------ intake

/// One order of a `PaymentRequested`, as the intake records it.
#[derive(Debug, Clone)]
pub struct NewOrder {
    pub order_id: String,
    pub seq: i32,
    pub seller_id: String,
    pub amount_minor: i64,
    pub currency: String,
}

/// What the intake does with one event, inside the batch's transaction.
#[derive(Debug, Clone)]
pub enum IntakeOp {
    Requested {
        payment_id: String,
        correlation_id: String,
        card_token: String,
        orders: Vec<NewOrder>,
    },
    Approved {
        payment_id: String,
    },
    Rejected {
        payment_id: String,
    },
    Refund {
        refund_id: String,
        order_id: String,
        amount_minor: i64,
        currency: String,
        reason: String,
        /// Where the request came from: the refunds of one payment run in
        /// this order (the request order).
        source_partition: i32,
        source_offset: i64,
    },
}

/// The result of one [`IntakeOp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntakeResult {
    Applied,
    Duplicate,
    /// The event refers to a payment or order the executor never saw.
    Unknown,
}

/// Whether `ops` can be applied set-based with the same results as one
/// after the other: no refunds, each payment requested at most once and
/// decided at most once, and a decision never before its payment's request
/// in the batch. (The usual batch: a payment's `PaymentRequested` and its
/// risk decision, side by side with other payments'.) Anything else takes
/// the one-after-the-other path.
fn set_based_intake(ops: &[IntakeOp]) -> bool {
    let mut requested = std::collections::HashSet::new();
    let mut decided = std::collections::HashSet::new();
    ops.iter().all(|op| match op {
        IntakeOp::Requested { payment_id, .. } => {
            !decided.contains(payment_id.as_str()) && requested.insert(payment_id.as_str())
        }
        IntakeOp::Approved { payment_id } | IntakeOp::Rejected { payment_id } => {
            decided.insert(payment_id.as_str())
        }
        IntakeOp::Refund { .. } => false,
    })
}

/// [`intake`] on PostgreSQL for a batch that [`set_based_intake`] admits:
/// three statements (new payments, their orders, the risk decisions) and
/// one look-up of the payments a decision found nothing to change for,
/// whatever the batch's size. Same rows, same results as per operation.
async fn intake_pg_set_based(
    p: &sqlx::PgPool,
    ops: &[IntakeOp],
    now: i64,
) -> Result<Vec<IntakeResult>, sqlx::Error> {
    let mut tx = p.begin_write().await?;
    let (mut pids, mut corrs, mut cards) = (Vec::new(), Vec::new(), Vec::new());
    for op in ops {
        if let IntakeOp::Requested {
            payment_id,
            correlation_id,
            card_token,
            ..
        } = op
        {
            pids.push(payment_id.as_str());
            corrs.push(correlation_id.as_str());
            cards.push(card_token.as_str());
        }
    }
    let inserted: std::collections::HashSet<String> = if pids.is_empty() {
        Default::default()
    } else {
        sqlx::query_scalar::<_, String>(
            "INSERT INTO executor_payments (payment_id, correlation_id, card_token, created_ms) \
             SELECT p, c, t, $4 FROM UNNEST($1::text[], $2::text[], $3::text[]) \
             WITH ORDINALITY AS u(p, c, t, i) ORDER BY i \
             ON CONFLICT DO NOTHING RETURNING payment_id",
        )
        .bind(&pids)
        .bind(&corrs)
        .bind(&cards)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect()
    };
    // A payment already known keeps its orders (H1): only new payments'.
    // In the batch's order, so an order id met twice keeps its first row,
    // as one by one.
    let (mut o_ids, mut o_pay, mut o_seq, mut o_seller, mut o_amount, mut o_cur) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for op in ops {
        if let IntakeOp::Requested {
            payment_id, orders, ..
        } = op
            && inserted.contains(payment_id)
        {
            for o in orders {
                o_ids.push(o.order_id.as_str());
                o_pay.push(payment_id.as_str());
                o_seq.push(o.seq);
                o_seller.push(o.seller_id.as_str());
                o_amount.push(o.amount_minor);
                o_cur.push(o.currency.as_str());
            }
        }
    }
    if !o_ids.is_empty() {
        sqlx::query(
            "INSERT INTO executor_orders (order_id, payment_id, seq, seller_id, amount_minor, currency, state, created_ms, updated_ms) \
             SELECT o, p, s, sl, a, c, $8, $7, $7 FROM UNNEST($1::text[], $2::text[], $3::int4[], $4::text[], $5::int8[], $6::text[]) \
             WITH ORDINALITY AS t(o, p, s, sl, a, c, i) ORDER BY i \
             ON CONFLICT DO NOTHING",
        )
        .bind(&o_ids)
        .bind(&o_pay)
        .bind(&o_seq)
        .bind(&o_seller)
        .bind(&o_amount)
        .bind(&o_cur)
        .bind(now)
        .bind(StateName::AwaitingRisk.as_str())
        .execute(&mut *tx)
        .await?;
    }
    let (mut d_pay, mut d_state, mut d_next) = (Vec::new(), Vec::new(), Vec::new());
    for op in ops {
        match op {
            IntakeOp::Approved { payment_id } => {
                d_pay.push(payment_id.as_str());
                d_state.push(StateName::Ready.as_str());
                d_next.push(Some(now));
            }
            IntakeOp::Rejected { payment_id } => {
                d_pay.push(payment_id.as_str());
                d_state.push(StateName::Cancelled.as_str());
                d_next.push(None::<i64>);
            }
            _ => {}
        }
    }
    let (mut applied, mut known) = (
        std::collections::HashSet::new(),
        std::collections::HashSet::new(),
    );
    if !d_pay.is_empty() {
        applied = sqlx::query_scalar::<_, String>(
            "UPDATE executor_orders SET state = u.s, next_attempt_ms = u.n, updated_ms = $4 \
             FROM UNNEST($1::text[], $2::text[], $3::int8[]) AS u(p, s, n) \
             WHERE executor_orders.payment_id = u.p AND executor_orders.state = $5 \
             RETURNING executor_orders.payment_id",
        )
        .bind(&d_pay)
        .bind(&d_state)
        .bind(&d_next)
        .bind(now)
        .bind(StateName::AwaitingRisk.as_str())
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
        let rest: Vec<&str> = d_pay
            .iter()
            .copied()
            .filter(|p| !applied.contains(*p))
            .collect();
        if !rest.is_empty() {
            known = sqlx::query_scalar::<_, String>(
                "SELECT DISTINCT payment_id FROM executor_orders WHERE payment_id = ANY($1)",
            )
            .bind(&rest)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
        }
    }
    tx.commit().await?;
    Ok(ops
        .iter()
        .map(|op| match op {
            IntakeOp::Requested { payment_id, .. } if inserted.contains(payment_id) => {
                IntakeResult::Applied
            }
            IntakeOp::Requested { .. } => IntakeResult::Duplicate,
            IntakeOp::Approved { payment_id } | IntakeOp::Rejected { payment_id } => {
                if applied.contains(payment_id) {
                    IntakeResult::Applied
                } else if known.contains(payment_id) {
                    IntakeResult::Duplicate
                } else {
                    IntakeResult::Unknown
                }
            }
            IntakeOp::Refund { .. } => unreachable!("set_based_intake admits no refunds"),
        })
        .collect())
}

/// Applies a batch of intake operations in one transaction.
pub async fn intake(db: &Db, ops: &[IntakeOp]) -> Result<Vec<IntakeResult>, sqlx::Error> {
    let now = now_ms();
    if let Db::Postgres(p) = db
        && set_based_intake(ops)
    {
        return intake_pg_set_based(p, ops, now).await;
    }
    intake_one_by_one(db, ops, now).await
}

/// [`intake`] one operation after the other (SQLite, and batches that
/// [`set_based_intake`] does not admit). Public for the test that proves
/// the set-based path equal to it.
#[doc(hidden)]
pub async fn intake_one_by_one(
    db: &Db,
    ops: &[IntakeOp],
    now: i64,
) -> Result<Vec<IntakeResult>, sqlx::Error> {
    let mut results = Vec::with_capacity(ops.len());
    with_pool!(db, p => {
        let mut tx = p.begin_write().await?;
        for op in ops {
            let r = match op {
                IntakeOp::Requested { payment_id, correlation_id, card_token, orders } => {
                    let n = sqlx::query(
                        "INSERT INTO executor_payments (payment_id, correlation_id, card_token, created_ms) \
                         VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                    ).bind(payment_id).bind(correlation_id).bind(card_token).bind(now)
                    .execute(&mut *tx).await?.rows_affected();
                    // A payment already known keeps its orders: a second
                    // PaymentRequested under the same ids (a key reused after
                    // the handler's retention) never adds orders (H1).
                    for o in orders.iter().filter(|_| n == 1) {
                        sqlx::query(
                            "INSERT INTO executor_orders (order_id, payment_id, seq, seller_id, amount_minor, currency, state, created_ms, updated_ms) \
                             VALUES ($1, $2, $3, $4, $5, $6, $8, $7, $7) ON CONFLICT DO NOTHING",
                        ).bind(&o.order_id).bind(payment_id).bind(o.seq).bind(&o.seller_id)
                        .bind(o.amount_minor).bind(&o.currency).bind(now).bind(StateName::AwaitingRisk.as_str())
                        .execute(&mut *tx).await?;
                    }
                    if n == 1 { IntakeResult::Applied } else { IntakeResult::Duplicate }
                }
                IntakeOp::Approved { payment_id } | IntakeOp::Rejected { payment_id } => {
                    let (state, next) = match op {
                        IntakeOp::Approved { .. } => (StateName::Ready, Some(now)),
                        _ => (StateName::Cancelled, None),
                    };
                    let n = sqlx::query(
                        "UPDATE executor_orders SET state = $1, next_attempt_ms = $2, updated_ms = $3 \
                         WHERE payment_id = $4 AND state = $5",
                    ).bind(state.as_str()).bind(next).bind(now).bind(payment_id).bind(StateName::AwaitingRisk.as_str())
                    .execute(&mut *tx).await?.rows_affected();
                    if n > 0 {
                        IntakeResult::Applied
                    } else {
                        let known: i64 = sqlx::query_scalar("SELECT count(*) FROM executor_orders WHERE payment_id = $1")
                            .bind(payment_id).fetch_one(&mut *tx).await?;
                        if known > 0 { IntakeResult::Duplicate } else { IntakeResult::Unknown }
                    }
                }
                IntakeOp::Refund { refund_id, order_id, amount_minor, currency, reason, source_partition, source_offset } => {
                    let payment: Option<String> = sqlx::query_scalar("SELECT payment_id FROM executor_orders WHERE order_id = $1")
                        .bind(order_id).fetch_optional(&mut *tx).await?;
                    match payment {
                        None => IntakeResult::Unknown,
                        Some(payment_id) => {
                            let n = sqlx::query(
                                "INSERT INTO executor_refunds (refund_id, order_id, payment_id, amount_minor, currency, reason, state, next_attempt_ms, created_ms, updated_ms, source_partition, source_offset) \
                                 VALUES ($1, $2, $3, $4, $5, $6, 'ready', $7, $7, $7, $8, $9) ON CONFLICT DO NOTHING",
                            ).bind(refund_id).bind(order_id).bind(&payment_id).bind(amount_minor)
                            .bind(currency).bind(reason).bind(now).bind(source_partition).bind(source_offset)
                            .execute(&mut *tx).await?.rows_affected();
                            if n == 1 { IntakeResult::Applied } else { IntakeResult::Duplicate }
                        }
                    }
                }
            };
            results.push(r);
        }
        tx.commit().await?;
    });
    Ok(results)
}

// -------------------------------------------------------------- dispatcher

/// Payments with work due now whose lease is free, oldest work first.
pub async fn due_payments(db: &Db, now: i64, limit: i64) -> Result<Vec<String>, sqlx::Error> {
    assert!(limit > 0, "limit must be positive");
    let rows: Vec<(String,)> = with_pool!(db, p => sqlx::query_as(
        "SELECT w.payment_id FROM ( \
           SELECT payment_id, min(next_attempt_ms) AS due FROM ( \
             SELECT payment_id, next_attempt_ms FROM executor_orders WHERE next_attempt_ms <= $1 \
             UNION ALL \
             SELECT payment_id, next_attempt_ms FROM executor_refunds WHERE next_attempt_ms <= $1 \
           ) d GROUP BY payment_id \
         ) w JOIN executor_payments p ON p.payment_id = w.payment_id \
         WHERE p.lease_until_ms < $1 ORDER BY w.due LIMIT $2",
    ).bind(now).bind(limit).fetch_all(p).await?);
    Ok(rows.into_iter().map(|(p,)| p).collect())
}

/// A fresh fencing token for [`lease_payments`].
pub fn new_lease_owner() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Takes the leases of those of `payment_ids` that are free, in one
/// statement, under the fencing token `owner`; returns the ones taken. Only
/// the lease holder works on a payment: renewing, releasing and recording
/// attempts require `owner`, so a holder whose lease ran out and was
/// retaken by another dispatcher can no longer act; a crashed holder's
/// lease simply runs out.
pub async fn lease_payments(
    db: &Db,
    payment_ids: &[String],
    now: i64,
    lease_ms: i64,
    owner: &str,
) -> Result<Vec<String>, sqlx::Error> {
    assert!(lease_ms > 0, "a lease must be positive");
    assert!(!owner.is_empty(), "a lease needs an owner token");
    if payment_ids.is_empty() {
        return Ok(Vec::new());
    }
    let sql = format!(
        "UPDATE executor_payments SET lease_until_ms = $1, lease_owner = $3 WHERE lease_until_ms < $2 \
         AND {} RETURNING payment_id",
        any_of(db, "payment_id", 4)
    );
    let rows: Vec<(String,)> = with_pool!(db, p => sqlx::query_as(&sql)
        .bind(now + lease_ms).bind(now).bind(owner).bind(List(payment_ids))
        .fetch_all(p).await?);
    Ok(rows.into_iter().map(|(p,)| p).collect())
}

/// Extends `owner`'s lease; false when the payment is no longer `owner`'s
/// (the caller must stop working on it).
pub async fn renew_lease(
    db: &Db,
    payment_id: &str,
    owner: &str,
    now: i64,
    lease_ms: i64,
) -> Result<bool, sqlx::Error> {
    let n = with_pool!(db, p => sqlx::query(
        "UPDATE executor_payments SET lease_until_ms = $1 WHERE payment_id = $2 AND lease_owner = $3",
    ).bind(now + lease_ms).bind(payment_id).bind(owner).execute(p).await?.rows_affected());
    Ok(n == 1)
}

/// Gives `owner`'s lease up; false when it was no longer `owner`'s.
pub async fn release_payment(db: &Db, payment_id: &str, owner: &str) -> Result<bool, sqlx::Error> {
    let n = with_pool!(db, p => sqlx::query(
        "UPDATE executor_payments SET lease_until_ms = 0 WHERE payment_id = $1 AND lease_owner = $2",
    ).bind(payment_id).bind(owner).execute(p).await?.rows_affected());
    Ok(n == 1)
}

/// Extends `owner`'s leases of `payment_ids` in one statement; returns
/// those still `owner`'s.
pub async fn renew_leases(
    db: &Db,
    payment_ids: &[String],
    owner: &str,
    now: i64,
    lease_ms: i64,
) -> Result<Vec<String>, sqlx::Error> {
    if payment_ids.is_empty() {
        return Ok(Vec::new());
    }
    let sql = format!(
        "UPDATE executor_payments SET lease_until_ms = $1 WHERE lease_owner = $2 \
         AND {} RETURNING payment_id",
        any_of(db, "payment_id", 3)
    );
    let rows: Vec<(String,)> = with_pool!(db, p => sqlx::query_as(&sql)
        .bind(now + lease_ms).bind(owner).bind(List(payment_ids))
        .fetch_all(p).await?);
    Ok(rows.into_iter().map(|(p,)| p).collect())
}

/// Gives `owner`'s leases of `payment_ids` up in one statement (those no
/// longer `owner`'s are left alone); returns how many were released.
pub async fn release_payments(
    db: &Db,
    payment_ids: &[String],
    owner: &str,
) -> Result<u64, sqlx::Error> {
    if payment_ids.is_empty() {
        return Ok(0);
    }
    let sql = format!(
        "UPDATE executor_payments SET lease_until_ms = 0 WHERE lease_owner = $1 AND {}",
        any_of(db, "payment_id", 2)
    );
    Ok(with_pool!(db, p => sqlx::query(&sql)
        .bind(owner).bind(List(payment_ids))
        .execute(p).await?.rows_affected()))
}

/// The rows of several payments (one query).
pub async fn payments(db: &Db, payment_ids: &[String]) -> Result<Vec<PaymentRow>, sqlx::Error> {
    if payment_ids.is_empty() {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT payment_id, correlation_id, card_token FROM executor_payments WHERE {}",
        any_of(db, "payment_id", 1)
    );
    Ok(with_pool!(db, p => sqlx::query_as(&sql).bind(List(payment_ids)).fetch_all(p).await?))
}

/// The due orders of several payments, by payment then in order (one
/// query).
pub async fn due_orders_of(
    db: &Db,
    payment_ids: &[String],
    now: i64,
) -> Result<Vec<OrderRow>, sqlx::Error> {
    if payment_ids.is_empty() {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT {ORDER_COLUMNS} FROM executor_orders WHERE next_attempt_ms <= $1 AND {} \
         ORDER BY payment_id, seq",
        any_of(db, "payment_id", 2)
    );
    Ok(
        with_pool!(db, p => sqlx::query_as(&sql).bind(now).bind(List(payment_ids)).fetch_all(p).await?),
    )
}

/// Which of `payment_ids` have refunds due (one query).
pub async fn with_due_refunds(
    db: &Db,
    payment_ids: &[String],
    now: i64,
) -> Result<Vec<String>, sqlx::Error> {
    if payment_ids.is_empty() {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT DISTINCT payment_id FROM executor_refunds WHERE next_attempt_ms <= $1 AND {}",
        any_of(db, "payment_id", 2)
    );
    let rows: Vec<(String,)> = with_pool!(db, p => sqlx::query_as(&sql)
        .bind(now).bind(List(payment_ids)).fetch_all(p).await?);
    Ok(rows.into_iter().map(|(p,)| p).collect())
}

/// One attempt's intent: the order, its new attempt number and its
/// `OrderExecutionStarted`.
#[derive(Debug, Clone)]
pub struct Intent {
    pub order_id: String,
    pub attempt: i32,
    pub deadline_ms: i64,
    pub started: Outgoing,
}

/// Parameters each row of the SQLite outcomes statement binds (the widest
/// multi-row statement), and those bound once before the rows.
pub(crate) const OUTCOME_ROW_PARAMS: usize = 10;
pub(crate) const OUTCOME_LEADING_PARAMS: usize = 2;

/// `($f,...,$f+cols-1),(...)`: `rows` tuples of numbered placeholders.
fn value_rows(from: usize, cols: usize, rows: usize) -> String {
    (0..rows)
        .map(|r| format!("({})", placeholders(from + r * cols, cols)))
        .collect::<Vec<_>>()
        .join(",")
}

/// The guard of an intent (per row, the same in the one-row and the batch
/// statement): the order still has `prev` attempts (`prev` is an SQL
/// expression), is in a state that allows an attempt, is not being looked
/// up, and its payment is leased by the owner bound at `$owner`.
fn intent_guard(prev: &str, owner: u8) -> String {
    format!(
        "attempts = {prev} AND state IN ('{}', '{}', '{}') AND lookup_since_ms IS NULL AND {}",
        StateName::Ready.as_str(),
        StateName::RetryWait.as_str(),
        StateName::Executing.as_str(),
        owned("executor_orders", owner)
    )
}

/// The guard of an outcome (per row, the same in the one-row and the batch
/// statement): the order is still in attempt `attempt` (an SQL
/// expression), executing or being looked up, and its payment is leased by
/// the owner bound at `$owner`.
fn outcome_guard(attempt: &str, owner: u8) -> String {
    format!(
        "attempts = {attempt} AND (state = '{}' OR (state = '{}' AND lookup_since_ms IS NOT NULL)) AND {}",
        StateName::Executing.as_str(),
        StateName::RetryWait.as_str(),
        owned("executor_orders", owner)
    )
}

/// What an intent writes; `u` is the batch's row source (`u_attempt`,
/// `u_deadline`), `$next`/`$now` the shared values.
fn intent_set(next: &str, now: &str) -> String {
    format!(
        "state = '{}', attempts = u.u_attempt, next_attempt_ms = {next}, \
         deadline_ms = COALESCE(deadline_ms, u.u_deadline), updated_ms = {now}",
        StateName::Executing.as_str()
    )
}

/// What an outcome writes from the batch's row source `u`.
fn outcome_set(now: &str) -> String {
    format!(
        "state = u.u_state, next_attempt_ms = u.u_next, psp_charge_id = COALESCE(u.u_charge, psp_charge_id), \
         fee_minor = u.u_fee, last_error = u.u_err, pending_since_ms = u.u_pending, updated_ms = {now}, \
         last_unknown_ms = COALESCE(u.u_unknown, last_unknown_ms), lookup_since_ms = COALESCE(u.u_lookup, lookup_since_ms)"
    )
}

/// PostgreSQL: the tail of a batch statement whose `upd` CTE returned the
/// order ids it changed: inserts the outbox rows of those orders only (the
/// events bound as arrays from `$from`: order id, event id, payment id,
/// body; in the order given, so seq order is the events' order) and
/// returns the changed order ids and the inserted `(seq, event_id)`s.
fn pg_outbox_of_updated(from: usize, now: &str) -> String {
    format!(
        "ev AS (SELECT * FROM UNNEST(${}::text[], ${}::text[], ${}::text[], ${}::bytea[]) \
           WITH ORDINALITY AS t(e_order, e_id, e_payment, e_body, e_n)), \
         ins AS (INSERT INTO executor_outbox (event_id, payment_id, body, created_ms) \
           SELECT ev.e_id, ev.e_payment, ev.e_body, {now} FROM ev JOIN upd ON upd.order_id = ev.e_order \
           ORDER BY ev.e_n ON CONFLICT DO NOTHING RETURNING seq, event_id) \
         SELECT order_id, NULL::int8 AS seq, NULL::text AS event_id FROM upd \
         UNION ALL SELECT NULL, seq, event_id FROM ins",
        from,
        from + 1,
        from + 2,
        from + 3
    )
}

/// The events of a batch statement as arrays: order id, event id, payment
/// id, body.
type EventArrays = (Vec<String>, Vec<String>, Vec<String>, Vec<Vec<u8>>);

fn event_arrays<'a>(events: impl Iterator<Item = (&'a str, &'a Outgoing)>) -> EventArrays {
    let mut a: EventArrays = Default::default();
    for (order, e) in events {
        a.0.push(order.to_owned());
        a.1.push(e.event_id.clone());
        a.2.push(e.payment_id.clone());
        a.3.push(e.body.clone());
    }
    a
}

/// Splits a PostgreSQL batch statement's answer into the changed order ids
/// and the inserted outbox rows.
fn pg_split(
    rows: Vec<(Option<String>, Option<i64>, Option<String>)>,
) -> (std::collections::HashSet<String>, Vec<(i64, String)>) {
    let mut changed = std::collections::HashSet::new();
    let mut inserted = Vec::new();
    for row in rows {
        match row {
            (Some(order), _, _) => {
                changed.insert(order);
            }
            (None, Some(seq), Some(event)) => inserted.push((seq, event)),
            _ => {}
        }
    }
    (changed, inserted)
}

/// SQLite, inside the batch's transaction: inserts the outbox rows of
/// `events` (multi-row statements, in order, so seq order is their order;
/// one already there by event id is skipped) and returns the inserted
/// `(seq, event_id)`s.
async fn sqlite_insert_outbox(
    tx: &mut sqlx::SqliteConnection,
    events: &[&Outgoing],
    now: i64,
) -> Result<Vec<(i64, String)>, sqlx::Error> {
    let mut inserted = Vec::with_capacity(events.len());
    for chunk in events.chunks(SQLITE_ROWS_PER_STATEMENT_MAX) {
        let sql = format!(
            "INSERT INTO executor_outbox (event_id, payment_id, body, created_ms) VALUES {} \
             ON CONFLICT DO NOTHING RETURNING seq, event_id",
            value_rows(2, 3, chunk.len()).replace(')', ", $1)")
        );
        let mut q = sqlx::query_as::<_, (i64, String)>(&sql).bind(now);
        for e in chunk {
            q = q.bind(&e.event_id).bind(&e.payment_id).bind(&e.body);
        }
        inserted.extend(q.fetch_all(&mut *tx).await?);
    }
    Ok(inserted)
}

/// Per order (in `order_ids` order) whether the batch statement changed
/// it, and the inserted outbox rows as `(seq, body)`.
fn batch_result<'a>(
    order_ids: impl Iterator<Item = &'a str>,
    events: impl Iterator<Item = &'a Outgoing>,
    changed: &std::collections::HashSet<String>,
    inserted: Vec<(i64, String)>,
) -> (Vec<bool>, Vec<(i64, Vec<u8>)>) {
    let done = order_ids.map(|o| changed.contains(o)).collect();
    let bodies: HashMap<&str, &Vec<u8>> = events.map(|e| (e.event_id.as_str(), &e.body)).collect();
    let rows = inserted
        .into_iter()
        .filter_map(|(seq, id)| bodies.get(id.as_str()).map(|b| (seq, (*b).clone())))
        .collect();
    (done, rows)
}

/// Records the intents of a batch of orders, set-based, in one transaction
/// (on PostgreSQL one statement: an `UPDATE ... FROM UNNEST(...)` of the
/// orders and an `INSERT ... SELECT` of the outbox rows of exactly the
/// orders it changed). Each row keeps its own guard ([`intent_guard`]:
/// attempt, state, not in lookup, lease owner), so a row that lost it
/// writes nothing while the others are recorded. Returns per intent
/// whether it was recorded, and the outbox rows written (to append after
/// the outcomes).
pub async fn begin_attempts(
    db: &Db,
    owner: &str,
    intents: &[Intent],
    lease_ms: i64,
) -> Result<(Vec<bool>, Vec<(i64, Vec<u8>)>), sqlx::Error> {
    if intents.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let now = now_ms();
    let next = now + lease_ms;
    let (changed, inserted) = match db {
        Db::Postgres(p) => {
            let sql = format!(
                "WITH u AS (SELECT * FROM UNNEST($1::text[], $2::int4[], $3::int8[]) AS t(u_order, u_attempt, u_deadline)), \
                 upd AS (UPDATE executor_orders SET {} FROM u WHERE order_id = u.u_order AND {} RETURNING order_id), {}",
                intent_set("$4", "$5"),
                intent_guard("u.u_attempt - 1", 6),
                pg_outbox_of_updated(7, "$5")
            );
            let ids: Vec<&str> = intents.iter().map(|i| i.order_id.as_str()).collect();
            let attempts: Vec<i32> = intents.iter().map(|i| i.attempt).collect();
            let deadlines: Vec<i64> = intents.iter().map(|i| i.deadline_ms).collect();
            let ev = event_arrays(intents.iter().map(|i| (i.order_id.as_str(), &i.started)));
            let rows = sqlx::query_as(&sql)
                .bind(&ids)
                .bind(&attempts)
                .bind(&deadlines)
                .bind(next)
                .bind(now)
                .bind(owner)
                .bind(&ev.0)
                .bind(&ev.1)
                .bind(&ev.2)
                .bind(&ev.3)
                .fetch_all(p)
                .await?;
            pg_split(rows)
        }
        Db::Sqlite(p) => {
            let mut tx = p.begin_write().await?;
            let mut changed = std::collections::HashSet::new();
            for chunk in intents.chunks(SQLITE_ROWS_PER_STATEMENT_MAX) {
                let sql = format!(
                    "WITH u(u_order, u_attempt, u_deadline) AS (VALUES {}) \
                     UPDATE executor_orders SET {} FROM u WHERE order_id = u.u_order AND {} RETURNING order_id",
                    value_rows(4, 3, chunk.len()),
                    intent_set("$1", "$2"),
                    intent_guard("u.u_attempt - 1", 3)
                );
                let mut q = sqlx::query_scalar::<_, String>(&sql)
                    .bind(next)
                    .bind(now)
                    .bind(owner);
                for i in chunk {
                    q = q.bind(&i.order_id).bind(i.attempt).bind(i.deadline_ms);
                }
                changed.extend(q.fetch_all(&mut *tx).await?);
            }
            let evs: Vec<&Outgoing> = intents
                .iter()
                .filter(|i| changed.contains(&i.order_id))
                .map(|i| &i.started)
                .collect();
            let inserted = sqlite_insert_outbox(&mut tx, &evs, now).await?;
            tx.commit().await?;
            (changed, inserted)
        }
    };
    Ok(batch_result(
        intents.iter().map(|i| i.order_id.as_str()),
        intents.iter().map(|i| &i.started),
        &changed,
        inserted,
    ))
}

/// One attempt's outcome.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub order_id: String,
    pub attempt: i32,
    pub update: OrderUpdate,
    pub events: Vec<Outgoing>,
}

/// Records the outcomes of a batch of attempts, set-based, in one
/// transaction (on PostgreSQL one statement: one `UPDATE ... FROM
/// UNNEST(...)` for every kind of outcome, each row with its own columns,
/// and one `INSERT ... SELECT` of the outbox rows of exactly the orders it
/// changed). Each row keeps its own guard ([`outcome_guard`]: attempt,
/// state, lease owner). Returns per outcome whether it was recorded, and
/// the outbox rows written.
pub async fn record_attempts(
    db: &Db,
    owner: &str,
    outcomes: &[Outcome],
) -> Result<(Vec<bool>, Vec<(i64, Vec<u8>)>), sqlx::Error> {
    if outcomes.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let now = now_ms();
    let cols: Vec<OrderCols<'_>> = outcomes
        .iter()
        .map(|o| OrderCols::of(&o.update, now))
        .collect();
    let all_events = || {
        outcomes
            .iter()
            .flat_map(|o| o.events.iter().map(move |e| (o.order_id.as_str(), e)))
    };
    let (changed, inserted) = match db {
        Db::Postgres(p) => {
            let sql = format!(
                "WITH u AS (SELECT * FROM UNNEST($1::text[], $2::int4[], $3::text[], $4::int8[], $5::text[], \
                   $6::int8[], $7::text[], $8::int8[], $9::int8[], $10::int8[]) \
                   AS t(u_order, u_attempt, u_state, u_next, u_charge, u_fee, u_err, u_pending, u_unknown, u_lookup)), \
                 upd AS (UPDATE executor_orders SET {} FROM u WHERE order_id = u.u_order AND {} RETURNING order_id), {}",
                outcome_set("$11"),
                outcome_guard("u.u_attempt", 12),
                pg_outbox_of_updated(13, "$11")
            );
            let ids: Vec<&str> = outcomes.iter().map(|o| o.order_id.as_str()).collect();
            let attempts: Vec<i32> = outcomes.iter().map(|o| o.attempt).collect();
            let states: Vec<&str> = cols.iter().map(|c| c.state).collect();
            let next: Vec<Option<i64>> = cols.iter().map(|c| c.next).collect();
            let charge: Vec<Option<&str>> = cols.iter().map(|c| c.charge).collect();
            let fee: Vec<Option<i64>> = cols.iter().map(|c| c.fee).collect();
            let err: Vec<Option<&str>> = cols.iter().map(|c| c.err).collect();
            let pending: Vec<Option<i64>> = cols.iter().map(|c| c.pending_since).collect();
            let unknown: Vec<Option<i64>> = cols.iter().map(|c| c.unknown_at).collect();
            let lookup: Vec<Option<i64>> = cols.iter().map(|c| c.lookup_since).collect();
            let ev = event_arrays(all_events());
            let rows = sqlx::query_as(&sql)
                .bind(&ids)
                .bind(&attempts)
                .bind(&states)
                .bind(&next)
                .bind(&charge)
                .bind(&fee)
                .bind(&err)
                .bind(&pending)
                .bind(&unknown)
                .bind(&lookup)
                .bind(now)
                .bind(owner)
                .bind(&ev.0)
                .bind(&ev.1)
                .bind(&ev.2)
                .bind(&ev.3)
                .fetch_all(p)
                .await?;
            pg_split(rows)
        }
        Db::Sqlite(p) => {
            let mut tx = p.begin_write().await?;
            let mut changed = std::collections::HashSet::new();
            for (chunk, cols) in outcomes
                .chunks(SQLITE_ROWS_PER_STATEMENT_MAX)
                .zip(cols.chunks(SQLITE_ROWS_PER_STATEMENT_MAX))
            {
                let sql = format!(
                    "WITH u(u_order, u_attempt, u_state, u_next, u_charge, u_fee, u_err, u_pending, u_unknown, u_lookup) \
                     AS (VALUES {}) UPDATE executor_orders SET {} FROM u WHERE order_id = u.u_order AND {} RETURNING order_id",
                    value_rows(OUTCOME_LEADING_PARAMS + 1, OUTCOME_ROW_PARAMS, chunk.len()),
                    outcome_set("$1"),
                    outcome_guard("u.u_attempt", 2)
                );
                let mut q = sqlx::query_scalar::<_, String>(&sql).bind(now).bind(owner);
                for (o, c) in chunk.iter().zip(cols) {
                    q = q
                        .bind(&o.order_id)
                        .bind(o.attempt)
                        .bind(c.state)
                        .bind(c.next)
                        .bind(c.charge)
                        .bind(c.fee)
                        .bind(c.err)
                        .bind(c.pending_since)
                        .bind(c.unknown_at)
                        .bind(c.lookup_since);
                }
                changed.extend(q.fetch_all(&mut *tx).await?);
            }
            let evs: Vec<&Outgoing> = all_events()
                .filter(|(o, _)| changed.contains(*o))
                .map(|(_, e)| e)
                .collect();
            let inserted = sqlite_insert_outbox(&mut tx, &evs, now).await?;
            tx.commit().await?;
            (changed, inserted)
        }
    };
    Ok(batch_result(
        outcomes.iter().map(|o| o.order_id.as_str()),
        all_events().map(|(_, e)| e),
        &changed,
        inserted,
    ))
}

/// SQL condition: the order's (or refund's) payment is leased by the owner
/// bound at `$n`.
fn owned(table: &str, n: u8) -> String {
    format!(
        "EXISTS (SELECT 1 FROM executor_payments lp WHERE lp.payment_id = {table}.payment_id AND lp.lease_owner = ${n})"
    )
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PaymentRow {
    pub payment_id: String,
    pub correlation_id: String,
    pub card_token: String,
    /// The lease's fencing token while a dispatcher works the payment
    /// (set by the dispatcher, not read from the table; empty elsewhere).
    #[sqlx(skip)]
    pub owner: String,
}

pub async fn payment(db: &Db, payment_id: &str) -> Result<Option<PaymentRow>, sqlx::Error> {
    Ok(with_pool!(db, p => sqlx::query_as(
        "SELECT payment_id, correlation_id, card_token FROM executor_payments WHERE payment_id = $1",
    ).bind(payment_id).fetch_optional(p).await?))
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OrderRow {
    pub order_id: String,
    pub payment_id: String,
    pub seq: i32,
    pub amount_minor: i64,
    pub currency: String,
    pub state: String,
    pub attempts: i32,
    pub next_attempt_ms: Option<i64>,
    pub deadline_ms: Option<i64>,
    pub pending_since_ms: Option<i64>,
    pub psp_charge_id: Option<String>,
    pub fee_minor: Option<i64>,
    pub last_error: Option<String>,
    /// When the last attempt whose outcome is unknown ended.
    pub last_unknown_ms: Option<i64>,
    /// Set while attempts are used up and the PSP is being asked whether a
    /// charge exists (state `retry_wait`).
    pub lookup_since_ms: Option<i64>,
}

const ORDER_COLUMNS: &str = "order_id, payment_id, seq, amount_minor, currency, state, attempts, \
     next_attempt_ms, deadline_ms, pending_since_ms, psp_charge_id, fee_minor, last_error, \
     last_unknown_ms, lookup_since_ms";

/// The payment's orders that are due, in order.
pub async fn due_orders(db: &Db, payment_id: &str, now: i64) -> Result<Vec<OrderRow>, sqlx::Error> {
    let sql = format!(
        "SELECT {ORDER_COLUMNS} FROM executor_orders WHERE payment_id = $1 AND next_attempt_ms <= $2 ORDER BY seq"
    );
    Ok(with_pool!(db, p => sqlx::query_as(&sql).bind(payment_id).bind(now).fetch_all(p).await?))
}

pub async fn order(db: &Db, order_id: &str) -> Result<Option<OrderRow>, sqlx::Error> {
    let sql = format!("SELECT {ORDER_COLUMNS} FROM executor_orders WHERE order_id = $1");
    Ok(with_pool!(db, p => sqlx::query_as(&sql).bind(order_id).fetch_optional(p).await?))
}

/// Records the intent of attempt `attempt` (the previous count + 1) and its
/// `OrderExecutionStarted`. Returns false when the order moved meanwhile.
/// While executing, the order is due again after the lease: if this process
/// dies mid-call, the next one resumes it. The one-row case of
/// [`begin_attempts`] (the same statement and guard).
pub async fn begin_attempt(
    db: &Db,
    owner: &str,
    order_id: &str,
    attempt: i32,
    lease_ms: i64,
    max_total_ms: i64,
    started: &Outgoing,
) -> Result<bool, sqlx::Error> {
    let intent = Intent {
        order_id: order_id.to_owned(),
        attempt,
        deadline_ms: now_ms().saturating_add(max_total_ms),
        started: started.clone(),
    };
    let (done, _) = begin_attempts(db, owner, std::slice::from_ref(&intent), lease_ms).await?;
    Ok(done == [true])
}

/// Where an attempt left the order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderUpdate {
    Succeeded {
        charge_id: String,
        fee_minor: i64,
    },
    Failed {
        reason: String,
        charge_id: Option<String>,
    },
    Pending {
        charge_id: String,
        poll_at_ms: i64,
    },
    RetryWait {
        at_ms: i64,
        reason: String,
        /// The attempt may have created a charge (see
        /// `PspError::outcome_unknown`).
        outcome_unknown: bool,
    },
    /// Attempts are used up but the outcome is unknown: ask the PSP for its
    /// charges at `at_ms` (and on until it gives a definite answer).
    Lookup {
        at_ms: i64,
        reason: String,
        outcome_unknown: bool,
    },
}

/// The columns an [`OrderUpdate`] writes.
struct OrderCols<'a> {
    state: &'static str,
    next: Option<i64>,
    charge: Option<&'a str>,
    fee: Option<i64>,
    err: Option<&'a str>,
    pending_since: Option<i64>,
    unknown_at: Option<i64>,
    lookup_since: Option<i64>,
}

impl<'a> OrderCols<'a> {
    fn of(update: &'a OrderUpdate, now: i64) -> OrderCols<'a> {
        let base = |state: StateName| OrderCols {
            state: state.as_str(),
            next: None,
            charge: None,
            fee: None,
            err: None,
            pending_since: None,
            unknown_at: None,
            lookup_since: None,
        };
        match update {
            OrderUpdate::Succeeded {
                charge_id,
                fee_minor,
            } => OrderCols {
                charge: Some(charge_id),
                fee: Some(*fee_minor),
                ..base(StateName::Succeeded)
            },
            OrderUpdate::Failed { reason, charge_id } => OrderCols {
                charge: charge_id.as_deref(),
                err: Some(reason),
                ..base(StateName::Failed)
            },
            OrderUpdate::Pending {
                charge_id,
                poll_at_ms,
            } => OrderCols {
                next: Some(*poll_at_ms),
                charge: Some(charge_id),
                pending_since: Some(now),
                ..base(StateName::Pending)
            },
            OrderUpdate::RetryWait {
                at_ms,
                reason,
                outcome_unknown,
            } => OrderCols {
                next: Some(*at_ms),
                err: Some(reason),
                unknown_at: outcome_unknown.then_some(now),
                ..base(StateName::RetryWait)
            },
            OrderUpdate::Lookup {
                at_ms,
                reason,
                outcome_unknown,
            } => OrderCols {
                next: Some(*at_ms),
                err: Some(reason),
                unknown_at: outcome_unknown.then_some(now),
                lookup_since: Some(now),
                ..base(StateName::RetryWait)
            },
        }
    }
}

/// Records the outcome of attempt `attempt` with its events; false when the
/// order is no longer in that attempt (nothing written). The one-row case
/// of [`record_attempts`] (the same statement and guard).
pub async fn record_attempt(
    db: &Db,
    owner: &str,
    order_id: &str,
    attempt: i32,
    update: &OrderUpdate,
    out: &[Outgoing],
) -> Result<bool, sqlx::Error> {
    let outcome = Outcome {
        order_id: order_id.to_owned(),
        attempt,
        update: update.clone(),
        events: out.to_vec(),
    };
    let (done, _) = record_attempts(db, owner, std::slice::from_ref(&outcome)).await?;
    Ok(done == [true])
}

/// Looks a charge up again at `at_ms` for an order in the lookup state.
pub async fn lookup_later(db: &Db, order_id: &str, at_ms: i64) -> Result<(), sqlx::Error> {
    with_pool!(db, p => sqlx::query(
        "UPDATE executor_orders SET next_attempt_ms = $1, updated_ms = $2 \
         WHERE order_id = $3 AND state = $4 AND lookup_since_ms IS NOT NULL",
    ).bind(at_ms).bind(now_ms()).bind(order_id).bind(StateName::RetryWait.as_str()).execute(p).await?.rows_affected());
    Ok(())
}

/// Resolves a pending order (webhook or poll) with its settlement event;
/// false when it was not pending (already resolved: nothing written). With a
/// webhook event id, the delivery is recorded in the same transaction.
pub async fn resolve_pending(
    db: &Db,
    order_id: &str,
    succeeded: bool,
    fee_minor: Option<i64>,
    reason: Option<&str>,
    settled: &Outgoing,
) -> Result<bool, sqlx::Error> {
    let now = now_ms();
    let state = if succeeded {
        StateName::Succeeded
    } else {
        StateName::Failed
    };
    with_pool!(db, p => {
        let mut tx = p.begin_write().await?;
        let n = sqlx::query(
            "UPDATE executor_orders SET state = $1, next_attempt_ms = NULL, fee_minor = $2, last_error = $3, updated_ms = $4 \
             WHERE order_id = $5 AND state = $6",
        ).bind(state.as_str()).bind(fee_minor).bind(reason).bind(now).bind(order_id).bind(StateName::Pending.as_str())
        .execute(&mut *tx).await?.rows_affected();
        if n != 1 {
            return Ok(false);
        }
        insert_outbox!(tx, [settled], now);
        tx.commit().await?;
    });
    Ok(true)
}

/// A pending order still pending at the PSP: poll again later.
pub async fn repoll_later(db: &Db, order_id: &str, at_ms: i64) -> Result<(), sqlx::Error> {
    with_pool!(db, p => sqlx::query(
        "UPDATE executor_orders SET next_attempt_ms = $1, updated_ms = $2 WHERE order_id = $3 AND state = $4",
    ).bind(at_ms).bind(now_ms()).bind(order_id).bind(StateName::Pending.as_str()).execute(p).await?.rows_affected());
    Ok(())
}

/// A webhook for this order failed verification: ask the PSP now instead
/// of trusting (or waiting for) it.
pub async fn poll_now(db: &Db, order_id: &str) -> Result<(), sqlx::Error> {
    repoll_later(db, order_id, now_ms()).await
}

/// Records a webhook delivery; false if it was seen before.
pub async fn record_webhook(db: &Db, psp_event_id: &str, kind: &str) -> Result<bool, sqlx::Error> {
    let n = with_pool!(db, p => sqlx::query(
        "INSERT INTO executor_webhook_events (psp_event_id, event_type, received_ms) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
    ).bind(psp_event_id).bind(kind).bind(now_ms()).execute(p).await?.rows_affected());
    Ok(n == 1)
}

// ------------------------------------------------------------------ refunds

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RefundRow {
    pub refund_id: String,
    pub order_id: String,
    pub payment_id: String,
    pub amount_minor: i64,
    pub currency: String,
    pub state: String,
    pub attempts: i32,
    pub deadline_ms: Option<i64>,
    /// When the last attempt whose outcome is unknown ended.
    pub last_unknown_ms: Option<i64>,
}

pub async fn due_refunds(
    db: &Db,
    payment_id: &str,
    now: i64,
) -> Result<Vec<RefundRow>, sqlx::Error> {
    Ok(with_pool!(db, p => sqlx::query_as(
        "SELECT refund_id, order_id, payment_id, amount_minor, currency, state, attempts, deadline_ms, last_unknown_ms \
         FROM executor_refunds WHERE payment_id = $1 AND next_attempt_ms <= $2 \
         ORDER BY source_partition IS NOT NULL, source_partition, source_offset, created_ms, refund_id",
    ).bind(payment_id).bind(now).fetch_all(p).await?))
}

/// What other refunds of the order may already have taken at the PSP:
/// succeeded ones, and any that reached the PSP and may yet succeed.
pub async fn refunds_taken(
    db: &Db,
    order_id: &str,
    except_refund: &str,
) -> Result<i64, sqlx::Error> {
    let sum: Option<i64> = with_pool!(db, p => sqlx::query_scalar(
        "SELECT CAST(sum(amount_minor) AS BIGINT) FROM executor_refunds WHERE order_id = $1 AND refund_id <> $2 \
         AND (state = 'succeeded' OR (state IN ('executing', 'retry_wait') AND attempts > 0))",
    ).bind(order_id).bind(except_refund).fetch_one(p).await?);
    Ok(sum.unwrap_or(0))
}

/// What the order's succeeded refunds add up to.
pub async fn refunds_succeeded(db: &Db, order_id: &str) -> Result<i64, sqlx::Error> {
    let sum: Option<i64> = with_pool!(db, p => sqlx::query_scalar(
        "SELECT CAST(sum(amount_minor) AS BIGINT) FROM executor_refunds WHERE order_id = $1 AND state = 'succeeded'",
    ).bind(order_id).fetch_one(p).await?);
    Ok(sum.unwrap_or(0))
}

/// Postpones a refund whose order is not final yet.
pub async fn refund_later(db: &Db, refund_id: &str, at_ms: i64) -> Result<(), sqlx::Error> {
    with_pool!(db, p => sqlx::query(
        "UPDATE executor_refunds SET next_attempt_ms = $1, updated_ms = $2 WHERE refund_id = $3 AND state IN ('ready', 'retry_wait')",
    ).bind(at_ms).bind(now_ms()).bind(refund_id).execute(p).await?.rows_affected());
    Ok(())
}

pub async fn begin_refund_attempt(
    db: &Db,
    owner: &str,
    refund_id: &str,
    attempt: i32,
    lease_ms: i64,
    max_total_ms: i64,
) -> Result<bool, sqlx::Error> {
    let now = now_ms();
    let sql = format!(
        "UPDATE executor_refunds SET state = 'executing', attempts = $1, next_attempt_ms = $2, \
         deadline_ms = COALESCE(deadline_ms, $3), updated_ms = $4 \
         WHERE refund_id = $5 AND attempts = $6 AND state IN ('ready', 'retry_wait', 'executing') AND {}",
        owned("executor_refunds", 7)
    );
    let n = with_pool!(db, p => sqlx::query(&sql).bind(attempt).bind(now + lease_ms).bind(now.saturating_add(max_total_ms)).bind(now)
    .bind(refund_id).bind(attempt - 1).bind(owner).execute(p).await?.rows_affected());
    Ok(n == 1)
}

/// Where a refund ended up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundUpdate {
    Succeeded {
        psp_refund_id: String,
    },
    Failed {
        reason: String,
    },
    RetryWait {
        at_ms: i64,
        reason: String,
        /// The attempt may have made the refund.
        outcome_unknown: bool,
    },
}

/// Records a refund outcome (guarded by its state and attempt count; a
/// refund rejected before any attempt has attempt 0 and state 'ready').
pub async fn record_refund(
    db: &Db,
    owner: &str,
    refund_id: &str,
    attempt: i32,
    update: &RefundUpdate,
    out: &[Outgoing],
) -> Result<bool, sqlx::Error> {
    let now = now_ms();
    let (state, next, psp, err): (&str, Option<i64>, Option<&str>, Option<&str>) = match update {
        RefundUpdate::Succeeded { psp_refund_id } => ("succeeded", None, Some(psp_refund_id), None),
        RefundUpdate::Failed { reason } => ("failed", None, None, Some(reason)),
        RefundUpdate::RetryWait { at_ms, reason, .. } => {
            ("retry_wait", Some(*at_ms), None, Some(reason))
        }
    };
    let unknown_at = matches!(
        update,
        RefundUpdate::RetryWait {
            outcome_unknown: true,
            ..
        }
    )
    .then_some(now);
    let sql = format!(
        "UPDATE executor_refunds SET state = $1, next_attempt_ms = $2, psp_refund_id = COALESCE($3, psp_refund_id), \
         last_error = $4, updated_ms = $5, last_unknown_ms = COALESCE($9, last_unknown_ms) \
         WHERE refund_id = $6 AND attempts = $7 AND state IN ('ready', 'executing', 'retry_wait') AND {}",
        owned("executor_refunds", 8)
    );
    with_pool!(db, p => {
        let mut tx = p.begin_write().await?;
        let n = sqlx::query(&sql).bind(state).bind(next).bind(psp).bind(err).bind(now).bind(refund_id).bind(attempt).bind(owner).bind(unknown_at)
        .execute(&mut *tx).await?.rows_affected();
        if n != 1 {
            return Ok(false);
        }
        insert_outbox!(tx, out, now);
        tx.commit().await?;
    });
    Ok(true)
}

// ------------------------------------------------------------------- outbox

/// Events recorded but not yet acknowledged by the broker, in the order they
/// were recorded: of one payment, or (payment None) of all payments, only
/// those older than `older_than_ms`. Two statements, not one with
/// `($1 IS NULL OR payment_id = $1)`: a generic plan of that cannot use the
/// payment index and scans every row. Appended rows are deleted
/// ([`delete_appended`]), so both scans only meet rows still to append.
pub async fn unappended(
    db: &Db,
    payment_id: Option<&str>,
    older_than_ms: i64,
    limit: i64,
) -> Result<Vec<(i64, Vec<u8>)>, sqlx::Error> {
    Ok(match payment_id {
        Some(pid) => with_pool!(db, p => sqlx::query_as(
            "SELECT seq, body FROM executor_outbox WHERE payment_id = $1 AND created_ms <= $2 \
             ORDER BY seq LIMIT $3",
        ).bind(pid).bind(older_than_ms).bind(limit).fetch_all(p).await?),
        None => with_pool!(db, p => sqlx::query_as(
            "SELECT seq, body FROM executor_outbox WHERE created_ms <= $1 ORDER BY seq LIMIT $2",
        ).bind(older_than_ms).bind(limit).fetch_all(p).await?),
    })
}

/// The unappended events of several payments, in the order recorded.
pub async fn unappended_of(
    db: &Db,
    payment_ids: &[String],
) -> Result<Vec<(i64, Vec<u8>)>, sqlx::Error> {
    if payment_ids.is_empty() {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT seq, body FROM executor_outbox WHERE {} ORDER BY seq",
        any_of(db, "payment_id", 1)
    );
    Ok(with_pool!(db, p => sqlx::query_as(&sql).bind(List(payment_ids)).fetch_all(p).await?))
}

/// Forgets events the broker acknowledged. Deleted rather than marked: a
/// marked row would stay in the table and its indexes (and, on PostgreSQL
/// without vacuum, dead index entries pile up under every scan); a deleted
/// one is gone from SQLite at once and from PostgreSQL at the executor's
/// own [`vacuum`].
pub async fn delete_appended(db: &Db, seqs: &[i64]) -> Result<(), sqlx::Error> {
    if seqs.is_empty() {
        return Ok(());
    }
    let sql = format!("DELETE FROM executor_outbox WHERE {}", any_of(db, "seq", 1));
    with_pool!(db, p => sqlx::query(&sql).bind(List(seqs)).execute(p).await?.rows_affected());
    Ok(())
}

/// Kept for callers of the old name: appended rows are deleted.
pub async fn mark_appended(db: &Db, seqs: &[i64]) -> Result<(), sqlx::Error> {
    delete_appended(db, seqs).await
}

/// PostgreSQL only (SQLite frees deleted rows at once): vacuums and
/// analyzes the executor's busiest tables. Autovacuum may be off; without
/// this, dead index entries of finished orders (the due index) and of
/// appended outbox rows would be visited by every due-work scan and outbox
/// sweep, slowing them in proportion to all history. The work is in
/// proportion to the rows changed since the last call.
pub async fn vacuum(db: &Db) -> Result<(), sqlx::Error> {
    if let Db::Postgres(p) = db {
        sqlx::query("VACUUM (ANALYZE) executor_outbox, executor_orders, executor_payments")
            .execute(p)
            .await?;
    }
    Ok(())
}

pub async fn webhook_seen(db: &Db, psp_event_id: &str) -> Result<bool, sqlx::Error> {
    let n: i64 = with_pool!(db, p => sqlx::query_scalar("SELECT count(*) FROM executor_webhook_events WHERE psp_event_id = $1")
        .bind(psp_event_id).fetch_one(p).await?);
    Ok(n > 0)
}
