//! The simulator's SQL: idempotency claims, charges, refunds, webhook
//! deliveries. Each write is an op (`crate::writer::Op`): the statements of
//! one transaction, run on the connection the writer gives it, which has
//! begun the transaction with `BEGIN IMMEDIATE` (so SQLite takes the write
//! lock up front) and commits it, alone or with other ops (`--durability
//! batched`). Ops decide nothing from outside the database, so running one
//! again after a rolled-back batch is the same as running it once.

use futures::future::BoxFuture;
use serde::Serialize;
use sqlx::{SqliteConnection, SqliteExecutor, SqlitePool};

/// Renders epoch milliseconds as RFC 3339 UTC.
pub(crate) fn rfc3339(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .expect("simulator timestamps are within time's range");
    t.format(&time::format_description::well_known::Rfc3339)
        .expect("RFC 3339 formats any UTC time")
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct ChargeRow {
    pub id: String,
    pub account: String,
    pub reference: String,
    pub amount_minor: i64,
    pub currency: String,
    pub card_token: String,
    pub status: String,
    pub fee_minor: i64,
    pub decline_code: Option<String>,
    pub created_at_ms: i64,
    pub settled_at_ms: Option<i64>,
    pub refunded_minor: i64,
}

const CHARGE_COLUMNS: &str = "id, account, reference, amount_minor, currency, card_token, status, \
     fee_minor, decline_code, created_at_ms, settled_at_ms, refunded_minor";

/// The Charge object of the HTTP contract.
#[derive(Debug, Serialize)]
pub(crate) struct ChargeJson<'a> {
    pub id: &'a str,
    pub status: &'a str,
    pub amount_minor: i64,
    pub currency: &'a str,
    pub fee_minor: i64,
    pub reference: &'a str,
    pub card_token: &'a str,
    pub created_at: String,
    pub settled_at: Option<String>,
    pub decline_code: Option<&'a str>,
    pub refunded_minor: i64,
}

impl ChargeRow {
    pub(crate) fn json(&self) -> ChargeJson<'_> {
        ChargeJson {
            id: &self.id,
            status: &self.status,
            amount_minor: self.amount_minor,
            currency: &self.currency,
            fee_minor: self.fee_minor,
            reference: &self.reference,
            card_token: &self.card_token,
            created_at: rfc3339(self.created_at_ms),
            settled_at: self.settled_at_ms.map(rfc3339),
            decline_code: self.decline_code.as_deref(),
            refunded_minor: self.refunded_minor,
        }
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct RefundRow {
    pub id: String,
    pub charge_id: String,
    pub amount_minor: i64,
    pub currency: String,
    pub status: String,
    pub created_at_ms: i64,
}

/// The Refund object of the HTTP contract.
#[derive(Debug, Serialize)]
pub(crate) struct RefundJson<'a> {
    pub id: &'a str,
    pub charge_id: &'a str,
    pub amount_minor: i64,
    pub currency: &'a str,
    pub status: &'a str,
    pub created_at: String,
}

impl RefundRow {
    pub(crate) fn json(&self) -> RefundJson<'_> {
        RefundJson {
            id: &self.id,
            charge_id: &self.charge_id,
            amount_minor: self.amount_minor,
            currency: &self.currency,
            status: &self.status,
            created_at: rfc3339(self.created_at_ms),
        }
    }
}

pub(crate) async fn release_all_in_flight(pool: &SqlitePool) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE psp_idempotency SET state = 'open' WHERE state = 'in_flight'")
        .execute(pool)
        .await?;
    Ok(())
}

/// What a request found under its idempotency key.
#[derive(Debug)]
pub(crate) enum Claim {
    /// This request holds the key; `attempt` counts processing attempts
    /// with this key, this one included (1 = first).
    Owned { attempt: u32 },
    /// A final answer is stored: replay it.
    Replay { body: String },
    /// Same key, different request.
    Reused,
    /// Another request with this key is being processed.
    InUse,
}

/// A request for an idempotency key.
#[derive(Debug)]
pub(crate) struct ClaimArgs {
    pub account: String,
    pub key: String,
    pub request_hash: String,
    /// This request's id.
    pub owner: String,
    pub now_ms: i64,
    /// Counts a charge request for this reference in the stats.
    pub count_reference: Option<String>,
}

/// Takes the key in one statement (an upsert), so of any number of
/// concurrent requests exactly one becomes the owner.
/// With `count_reference`, also counts a charge request for the stats, in
/// the same transaction (one commit, one fsync, fewer than two).
pub(crate) fn claim<'c>(
    conn: &'c mut SqliteConnection,
    a: &'c ClaimArgs,
) -> BoxFuture<'c, Result<Claim, sqlx::Error>> {
    Box::pin(claim_in(conn, a))
}

async fn claim_in(conn: &mut SqliteConnection, a: &ClaimArgs) -> Result<Claim, sqlx::Error> {
    // Two statements, one round trip to the connection's thread: the
    // request count (none without ?6), then the claim, whose row is
    // returned.
    let row: (String, String, String, i64, Option<String>) = sqlx::query_as(
        "INSERT INTO psp_create_requests (reference, requests) SELECT ?6, 1 WHERE ?6 IS NOT NULL
         ON CONFLICT (reference) DO UPDATE SET requests = requests + 1;
         INSERT INTO psp_idempotency
             (account, idempotency_key, request_hash, state, owner, attempts, created_at_ms)
         VALUES (?1, ?2, ?3, 'in_flight', ?4, 1, ?5)
         ON CONFLICT (account, idempotency_key) DO UPDATE SET
             attempts = CASE WHEN state = 'open' AND request_hash = excluded.request_hash
                             THEN attempts + 1 ELSE attempts END,
             owner    = CASE WHEN state = 'open' AND request_hash = excluded.request_hash
                             THEN excluded.owner ELSE owner END,
             state    = CASE WHEN state = 'open' AND request_hash = excluded.request_hash
                             THEN 'in_flight' ELSE state END
         RETURNING request_hash, state, owner, attempts, response_body",
    )
    .bind(&a.account)
    .bind(&a.key)
    .bind(&a.request_hash)
    .bind(&a.owner)
    .bind(a.now_ms)
    .bind(&a.count_reference)
    .fetch_one(&mut *conn)
    .await?;
    Ok(classify_claim(&a.request_hash, &a.owner, row))
}

/// What the key's row, as the claim left it, means for this request.
fn classify_claim(
    request_hash: &str,
    owner: &str,
    row: (String, String, String, i64, Option<String>),
) -> Claim {
    let (hash, state, row_owner, attempts, body) = row;
    if hash != request_hash {
        Claim::Reused
    } else if state == "done" {
        Claim::Replay {
            body: body.unwrap_or_default(),
        }
    } else if state == "in_flight" && row_owner == owner {
        Claim::Owned {
            attempt: u32::try_from(attempts).unwrap_or(u32::MAX),
        }
    } else {
        Claim::InUse
    }
}

/// A key held by a request: (account, key, owner).
pub(crate) type KeyHold = (String, String, String);

/// Gives the key back without a final answer (transient failure).
pub(crate) fn release<'c>(
    conn: &'c mut SqliteConnection,
    (account, key, owner): &'c KeyHold,
) -> BoxFuture<'c, Result<(), sqlx::Error>> {
    Box::pin(async move {
        sqlx::query(
            "UPDATE psp_idempotency SET state = 'open'
             WHERE account = ? AND idempotency_key = ? AND owner = ? AND state = 'in_flight'",
        )
        .bind(account)
        .bind(key)
        .bind(owner)
        .execute(conn)
        .await?;
        Ok(())
    })
}

/// Stores the final answer under the key: binds status, body, account,
/// key, owner; returns a row if this request still held the key.
macro_rules! finish_sql {
    () => {
        "UPDATE psp_idempotency SET state = 'done', response_status = ?, response_body = ?
         WHERE account = ? AND idempotency_key = ? AND owner = ? AND state = 'in_flight'
         RETURNING 1"
    };
}

fn no_longer_held(key: &str) -> sqlx::Error {
    sqlx::Error::Protocol(format!(
        "idempotency key {key:?} is no longer held by this request"
    ))
}

/// Stores the final answer under the key, inside the transaction that
/// created the resource. Fails if this request no longer owns the key.
async fn finish(
    conn: &mut SqliteConnection,
    account: &str,
    key: &str,
    owner: &str,
    status: u16,
    body: &str,
) -> Result<(), sqlx::Error> {
    let done: Option<i64> = sqlx::query_scalar(finish_sql!())
        .bind(i64::from(status))
        .bind(body)
        .bind(account)
        .bind(key)
        .bind(owner)
        .fetch_optional(conn)
        .await?;
    done.map(drop).ok_or_else(|| no_longer_held(key))
}

/// A charge about to be created.
#[derive(Debug)]
pub(crate) struct NewCharge {
    pub row: ChargeRow,
    pub idempotency_key: String,
    /// The request holding the key.
    pub owner: String,
    pub description: Option<String>,
    pub resolve_at_ms: Option<i64>,
    pub resolve_to: Option<&'static str>,
}

/// Creates the charge and stores the answer under its key, atomically; the
/// unique (account, key) constraint makes a second charge impossible.
pub(crate) fn create_charge<'c>(
    conn: &'c mut SqliteConnection,
    c: &'c NewCharge,
) -> BoxFuture<'c, Result<String, sqlx::Error>> {
    Box::pin(create_charge_in(conn, c))
}

async fn create_charge_in(
    conn: &mut SqliteConnection,
    c: &NewCharge,
) -> Result<String, sqlx::Error> {
    let body = serde_json::to_string(&c.row.json()).expect("charges serialise");
    // The charge, then the answer under its key (as `finish`): two
    // statements, one round trip to the connection's thread.
    let done: Option<i64> = sqlx::query_scalar(concat!(
        "INSERT INTO psp_charges (id, account, idempotency_key, reference, amount_minor,
             currency, card_token, description, status, fee_minor, decline_code,
             created_at_ms, settled_at_ms, resolve_at_ms, resolve_to, refunded_minor)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0);
         ",
        finish_sql!()
    ))
    .bind(&c.row.id)
    .bind(&c.row.account)
    .bind(&c.idempotency_key)
    .bind(&c.row.reference)
    .bind(c.row.amount_minor)
    .bind(&c.row.currency)
    .bind(&c.row.card_token)
    .bind(&c.description)
    .bind(&c.row.status)
    .bind(c.row.fee_minor)
    .bind(&c.row.decline_code)
    .bind(c.row.created_at_ms)
    .bind(c.row.settled_at_ms)
    .bind(c.resolve_at_ms)
    .bind(c.resolve_to)
    .bind(201_i64)
    .bind(&body)
    .bind(&c.row.account)
    .bind(&c.idempotency_key)
    .bind(&c.owner)
    .fetch_optional(&mut *conn)
    .await?;
    done.map(|_| body)
        .ok_or_else(|| no_longer_held(&c.idempotency_key))
}

pub(crate) async fn get_charge(
    ex: impl SqliteExecutor<'_>,
    account: &str,
    id: &str,
) -> Result<Option<ChargeRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {CHARGE_COLUMNS} FROM psp_charges WHERE account = ? AND id = ?"
    ))
    .bind(account)
    .bind(id)
    .fetch_optional(ex)
    .await
}

/// Charges of one reference, oldest first (bounded: a reference is one
/// order, which a sane caller charges a handful of times at most).
pub(crate) async fn charges_by_reference(
    pool: &SqlitePool,
    account: &str,
    reference: &str,
) -> Result<Vec<ChargeRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {CHARGE_COLUMNS} FROM psp_charges WHERE account = ? AND reference = ?
         ORDER BY created_at_ms, id LIMIT 100"
    ))
    .bind(account)
    .bind(reference)
    .fetch_all(pool)
    .await
}

pub(crate) async fn stats(pool: &SqlitePool, reference: &str) -> Result<(i64, i64), sqlx::Error> {
    let charges: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM psp_charges WHERE reference = ?")
        .bind(reference)
        .fetch_one(pool)
        .await?;
    let requests: Option<i64> =
        sqlx::query_scalar("SELECT requests FROM psp_create_requests WHERE reference = ?")
            .bind(reference)
            .fetch_optional(pool)
            .await?;
    Ok((charges, requests.unwrap_or(0)))
}

/// Why a refund was refused (nothing was written).
#[derive(Debug)]
pub(crate) enum RefundRefused {
    NotFound,
    NotRefundable(String),
    ExceedsRefundable { refundable: i64 },
}

/// A webhook to enqueue in the same transaction as its cause.
#[derive(Debug)]
pub(crate) struct WebhookPlan {
    pub url: String,
    /// 1, or 2 for a duplicate delivery.
    pub copies: u8,
    /// Wall-clock ms of the first attempt (later than now when delayed).
    pub first_attempt_at_ms: i64,
}

/// A refund about to be made.
#[derive(Debug)]
pub(crate) struct NewRefund {
    pub account: String,
    pub charge_id: String,
    /// None: everything left.
    pub amount: Option<i64>,
    pub key: String,
    /// The request holding the key.
    pub owner: String,
    pub refund_id: String,
    pub now_ms: i64,
    pub webhook: Option<WebhookPlan>,
}

/// Refunds `amount` (None = everything left) of a succeeded charge. The
/// guarded update makes over-refunding impossible even for concurrent
/// refunds with different keys. A refusal writes nothing.
pub(crate) fn create_refund<'c>(
    conn: &'c mut SqliteConnection,
    r: &'c NewRefund,
) -> BoxFuture<'c, Result<Result<String, RefundRefused>, sqlx::Error>> {
    Box::pin(create_refund_in(conn, r))
}

async fn create_refund_in(
    conn: &mut SqliteConnection,
    r: &NewRefund,
) -> Result<Result<String, RefundRefused>, sqlx::Error> {
    let NewRefund {
        account,
        charge_id,
        amount,
        key,
        owner,
        refund_id,
        now_ms,
        webhook,
    } = r;
    let (amount, now_ms) = (*amount, *now_ms);
    // The amount is resolved inside SQL.
    let updated: Option<(i64, String)> = sqlx::query_as(
        "UPDATE psp_charges
         SET refunded_minor = refunded_minor + COALESCE(?1, amount_minor - refunded_minor)
         WHERE account = ?2 AND id = ?3 AND status = 'succeeded'
           AND COALESCE(?1, amount_minor - refunded_minor) > 0
           AND refunded_minor + COALESCE(?1, amount_minor - refunded_minor) <= amount_minor
         RETURNING refunded_minor, currency",
    )
    .bind(amount)
    .bind(account)
    .bind(charge_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((refunded_after, currency)) = updated else {
        // Nothing was updated: say why.
        let charge = get_charge(&mut *conn, account, charge_id).await?;
        return Ok(Err(match charge {
            None => RefundRefused::NotFound,
            Some(c) if c.status != "succeeded" => RefundRefused::NotRefundable(c.status),
            Some(c) => RefundRefused::ExceedsRefundable {
                refundable: c.amount_minor - c.refunded_minor,
            },
        }));
    };
    let amount_minor: i64 = match amount {
        Some(a) => a,
        None => {
            // Full refund: what was left, i.e. the new total minus the
            // refunds recorded before this one.
            let before: i64 = sqlx::query_scalar(
                "SELECT COALESCE(SUM(amount_minor), 0) FROM psp_refunds WHERE charge_id = ?",
            )
            .bind(charge_id)
            .fetch_one(&mut *conn)
            .await?;
            refunded_after - before
        }
    };
    assert!(
        amount_minor > 0,
        "the guarded update refunds a positive amount"
    );
    let refund = RefundRow {
        id: refund_id.to_owned(),
        charge_id: charge_id.to_owned(),
        amount_minor,
        currency,
        status: "succeeded".into(),
        created_at_ms: now_ms,
    };
    sqlx::query(
        "INSERT INTO psp_refunds (id, account, idempotency_key, charge_id, amount_minor,
             currency, status, created_at_ms)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&refund.id)
    .bind(account)
    .bind(key)
    .bind(&refund.charge_id)
    .bind(refund.amount_minor)
    .bind(&refund.currency)
    .bind(&refund.status)
    .bind(refund.created_at_ms)
    .execute(&mut *conn)
    .await?;
    let body = serde_json::to_string(&refund.json()).expect("refunds serialise");
    if let Some(plan) = webhook {
        let data = serde_json::to_value(refund.json()).expect("refunds serialise");
        enqueue_webhook(conn, account, plan, "refund.succeeded", data, now_ms).await?;
    }
    finish(conn, account, key, owner, 201, &body).await?;
    Ok(Ok(body))
}

/// Writes the delivery rows of one event.
async fn enqueue_webhook(
    conn: &mut SqliteConnection,
    account: &str,
    plan: &WebhookPlan,
    event_type: &str,
    data: serde_json::Value,
    sim_now_ms: i64,
) -> Result<(), sqlx::Error> {
    assert!(
        (1..=2).contains(&plan.copies),
        "one delivery, or a duplicate"
    );
    let event_id = format!("evt_{}", uuid::Uuid::now_v7().simple());
    let body = serde_json::json!({
        "id": event_id,
        "type": event_type,
        "created": sim_now_ms.div_euclid(1000),
        "data": data,
    })
    .to_string();
    for _ in 0..plan.copies {
        sqlx::query(
            "INSERT INTO psp_webhook_deliveries (event_id, account, url, body, next_attempt_at_ms)
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&event_id)
        .bind(account)
        .bind(&plan.url)
        .bind(&body)
        .bind(plan.first_attempt_at_ms)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Pending charges whose time has come (bounded batch).
pub(crate) async fn due_pending(
    pool: &SqlitePool,
    sim_now_ms: i64,
) -> Result<Vec<(String, String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, account, resolve_to FROM psp_charges
         WHERE status = 'pending' AND resolve_at_ms <= ?
         ORDER BY resolve_at_ms LIMIT 100",
    )
    .bind(sim_now_ms)
    .fetch_all(pool)
    .await
}

/// A pending charge's resolution.
#[derive(Debug)]
pub(crate) struct Resolve {
    pub id: String,
    pub succeed: bool,
    pub sim_now_ms: i64,
    pub webhook: Option<WebhookPlan>,
}

/// Resolves one pending charge and enqueues its webhook, atomically.
pub(crate) fn resolve_charge<'c>(
    conn: &'c mut SqliteConnection,
    r: &'c Resolve,
) -> BoxFuture<'c, Result<(), sqlx::Error>> {
    Box::pin(resolve_charge_in(conn, r))
}

async fn resolve_charge_in(conn: &mut SqliteConnection, r: &Resolve) -> Result<(), sqlx::Error> {
    let Resolve {
        id,
        succeed,
        sim_now_ms,
        webhook,
    } = r;
    let (succeed, sim_now_ms) = (*succeed, *sim_now_ms);
    let updated: Option<ChargeRow> = if succeed {
        sqlx::query_as(&format!(
            "UPDATE psp_charges SET status = 'succeeded', settled_at_ms = ?
             WHERE id = ? AND status = 'pending' RETURNING {CHARGE_COLUMNS}"
        ))
        .bind(sim_now_ms)
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
    } else {
        sqlx::query_as(&format!(
            "UPDATE psp_charges SET status = 'declined', fee_minor = 0,
                 decline_code = 'review_rejected'
             WHERE id = ? AND status = 'pending' RETURNING {CHARGE_COLUMNS}"
        ))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
    };
    if let (Some(charge), Some(plan)) = (updated, webhook) {
        let data = serde_json::to_value(charge.json()).expect("charges serialise");
        let kind = if succeed {
            "charge.succeeded"
        } else {
            "charge.failed"
        };
        enqueue_webhook(conn, &charge.account, plan, kind, data, sim_now_ms).await?;
    }
    Ok(())
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct Delivery {
    pub seq: i64,
    pub account: String,
    pub url: String,
    pub body: String,
    pub attempts: i64,
}

pub(crate) async fn due_deliveries(
    pool: &SqlitePool,
    wall_now_ms: i64,
    limit: i64,
) -> Result<Vec<Delivery>, sqlx::Error> {
    sqlx::query_as(
        "SELECT seq, account, url, body, attempts FROM psp_webhook_deliveries
         WHERE delivered_at_ms IS NULL AND next_attempt_at_ms <= ?
         ORDER BY next_attempt_at_ms, seq LIMIT ?",
    )
    .bind(wall_now_ms)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Wall-clock ms of the earliest undelivered attempt, if any.
pub(crate) async fn next_delivery_at(pool: &SqlitePool) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT MIN(next_attempt_at_ms) FROM psp_webhook_deliveries WHERE delivered_at_ms IS NULL",
    )
    .fetch_one(pool)
    .await
}

/// A delivery attempt's result: (seq, wall-clock ms now).
pub(crate) type Delivered = (i64, i64);

pub(crate) fn delivery_done<'c>(
    conn: &'c mut SqliteConnection,
    &(seq, wall_now_ms): &'c Delivered,
) -> BoxFuture<'c, Result<(), sqlx::Error>> {
    Box::pin(async move {
        sqlx::query(
            "UPDATE psp_webhook_deliveries SET delivered_at_ms = ?, attempts = attempts + 1,
                 last_error = NULL
             WHERE seq = ?",
        )
        .bind(wall_now_ms)
        .bind(seq)
        .execute(conn)
        .await?;
        Ok(())
    })
}

/// A failed attempt: (seq, wall-clock ms of the next attempt, error).
pub(crate) type DeliveryFailed = (i64, i64, String);

pub(crate) fn delivery_failed<'c>(
    conn: &'c mut SqliteConnection,
    (seq, next_attempt_at_ms, error): &'c DeliveryFailed,
) -> BoxFuture<'c, Result<(), sqlx::Error>> {
    Box::pin(async move {
        sqlx::query(
            "UPDATE psp_webhook_deliveries SET attempts = attempts + 1, next_attempt_at_ms = ?,
                 last_error = ?
             WHERE seq = ?",
        )
        .bind(next_attempt_at_ms)
        .bind(error)
        .bind(seq)
        .execute(conn)
        .await?;
        Ok(())
    })
}

/// One settlement-file row before rendering.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub(crate) struct SettlementRow {
    pub psp_reference: String,
    pub order_id: String,
    pub amount_minor: i64,
    pub currency: String,
    pub status: String,
    pub fee_minor: i64,
    pub settled_at_ms: i64,
}

/// Succeeded charges settled in `[from, to)` and refunds created then,
/// refunds as negative amounts.
pub(crate) async fn settlement_rows(
    pool: &SqlitePool,
    account: &str,
    from_ms: i64,
    to_ms: i64,
) -> Result<Vec<SettlementRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id AS psp_reference, reference AS order_id, amount_minor, currency,
                'succeeded' AS status, fee_minor, settled_at_ms
         FROM psp_charges
         WHERE account = ?1 AND status = 'succeeded' AND settled_at_ms >= ?2 AND settled_at_ms < ?3
         UNION ALL
         SELECT r.id, c.reference, -r.amount_minor, r.currency, 'refunded', 0, r.created_at_ms
         FROM psp_refunds r JOIN psp_charges c ON c.id = r.charge_id
         WHERE r.account = ?1 AND r.created_at_ms >= ?2 AND r.created_at_ms < ?3
         ORDER BY settled_at_ms, psp_reference",
    )
    .bind(account)
    .bind(from_ms)
    .bind(to_ms)
    .fetch_all(pool)
    .await
}
