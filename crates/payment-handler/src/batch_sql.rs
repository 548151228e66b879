//! The set-based statements of the group commit (`group`) and of the
//! payment-status projection (`store::apply_status`), one implementation
//! per backend behind one trait, called on the connection of an open
//! transaction:
//!
//! - PostgreSQL: one statement per step for the whole batch, the rows
//!   passed as arrays and expanded with `UNNEST` (one prepared statement
//!   whatever the batch size);
//! - SQLite: the same rows, one short statement each, inside the caller's
//!   single `BEGIN IMMEDIATE` transaction. SQLite runs in-process: a
//!   statement costs microseconds and no network round trip; what costs is
//!   the commit's fsync, and there is one per batch.
//!
//! These only store and guard (owner tokens, `state = 'in_flight'`, `ON
//! CONFLICT DO NOTHING`); every decision is made in memory by the caller.

use sqlx::{PgConnection, SqliteConnection};
use std::collections::HashSet;

/// (client id, idempotency key).
pub type KeyId = (String, String);

/// A claim of an idempotency key by one request.
#[derive(Debug, Clone)]
pub struct ClaimRow {
    pub client: String,
    pub key: String,
    pub fingerprint: String,
    pub owner: String,
}

/// Times of a batch's claims.
#[derive(Debug, Clone, Copy)]
pub struct ClaimTimes {
    pub now_ms: i64,
    pub lease_until_ms: i64,
    pub expires_ms: i64,
}

#[derive(Debug, Clone)]
pub struct VelocityRow {
    pub payment: String,
    pub client: String,
    pub buyer: String,
    pub currency: String,
    pub amount_minor: i64,
}

/// Decided events to store under an owned key (and the fingerprint to
/// keep for good, naming the payment).
#[derive(Debug, Clone)]
pub struct PendingRow {
    pub client: String,
    pub key: String,
    pub owner: String,
    pub events: String,
    pub payment: String,
}

/// A finished answer to store under an owned key.
#[derive(Debug, Clone)]
pub struct FinishRow {
    pub client: String,
    pub key: String,
    pub owner: String,
    pub status: i32,
    pub body: String,
}

/// A new payment's status-projection rows, already in the state after its
/// risk decision.
#[derive(Debug, Clone)]
pub struct PaymentRow {
    pub payment: String,
    pub client: String,
    pub buyer: String,
    pub status: &'static str,
    pub currency: String,
    pub total_minor: i64,
    pub rejection_rule: Option<String>,
    pub rejection_reason: Option<String>,
    pub created_us: i64,
    pub updated_us: i64,
    /// The velocity row the projection keeps (as the per-event path does).
    pub at_ms: i64,
}

#[derive(Debug, Clone)]
pub struct OrderRow {
    pub order: String,
    pub payment: String,
    pub position: i32,
    pub seller: String,
    pub amount_minor: i64,
    pub currency: String,
    pub status: &'static str,
}

/// A payment's columns the status fold reads.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LoadedPayment {
    pub payment: String,
    pub status: String,
    pub updated_us: i64,
}

/// An order's columns the status fold reads (the money columns are
/// written as deltas, never read).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LoadedOrder {
    pub order: String,
    pub payment: String,
    pub status: String,
    pub psp_reference: Option<String>,
    pub failure_reason: Option<String>,
}

/// A refund row, as read or to be inserted.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RefundRow {
    pub refund: String,
    pub order: String,
    pub payment: String,
    pub amount_minor: i64,
    pub currency: String,
    pub status: String,
    pub reason: String,
    pub failure: Option<String>,
    pub created_us: i64,
    pub updated_us: i64,
}

/// A payment's new status, if it still is `old_status`.
#[derive(Debug, Clone)]
pub struct PaymentWrite {
    pub payment: String,
    pub old_status: String,
    pub status: String,
    pub updated_us: i64,
}

/// An order's new status and references, if it still is `old_status`, and
/// what to add to its reserved and refunded sums.
#[derive(Debug, Clone)]
pub struct OrderWrite {
    pub order: String,
    pub old_status: String,
    pub status: String,
    pub psp_reference: Option<String>,
    pub failure_reason: Option<String>,
    pub add_reserved: i64,
    pub add_refunded: i64,
}

/// A refund's way out of `requested` (the only status it leaves).
#[derive(Debug, Clone)]
pub struct RefundWrite {
    pub refund: String,
    pub old_status: String,
    pub status: String,
    pub failure: Option<String>,
    pub updated_us: i64,
}

/// What a run of the status fold changed, one list per table.
#[derive(Debug, Clone, Default)]
pub struct StatusWrites {
    pub payments: Vec<PaymentWrite>,
    pub orders: Vec<OrderWrite>,
    pub new_refunds: Vec<RefundRow>,
    pub refunds: Vec<RefundWrite>,
}

impl StatusWrites {
    pub fn is_empty(&self) -> bool {
        self.payments.is_empty()
            && self.orders.is_empty()
            && self.new_refunds.is_empty()
            && self.refunds.is_empty()
    }
}

/// The rows the status fold starts from.
#[derive(Debug, Clone, Default)]
pub struct StatusRows {
    pub payments: Vec<LoadedPayment>,
    pub orders: Vec<LoadedOrder>,
    pub refunds: Vec<RefundRow>,
}

/// A compare-and-set of the status writes matched fewer rows than it was
/// decided on: a row changed between the read and the write. Transient:
/// the batch is rolled back and applied again from what is stored then.
fn changed_under_us(table: &str, wanted: usize, got: u64) -> Result<(), sqlx::Error> {
    if u64::try_from(wanted).unwrap_or(u64::MAX) == got {
        Ok(())
    } else {
        Err(sqlx::Error::Protocol(format!(
            "payment-status projection: {got} of {wanted} {table} rows still in the state the batch was decided on; retrying"
        )))
    }
}

/// The final statuses, as the SQL guards list them.
const FINAL: &str = "('succeeded','failed','rejected')";

/// The batch statements; see the module documentation.
pub(crate) trait BatchSql {
    /// Inserts the claims; returns the keys this batch now owns (the
    /// others existed: their requests take the per-request path).
    async fn claim(
        &mut self,
        rows: &[ClaimRow],
        t: ClaimTimes,
    ) -> Result<HashSet<KeyId>, sqlx::Error>;
    /// Of `keys`, those with a fingerprint kept for good (decided before,
    /// their idempotency row since reaped).
    async fn decided_before(&mut self, keys: &[KeyId]) -> Result<HashSet<KeyId>, sqlx::Error>;
    /// Of `payments`, those in the status projection.
    async fn existing_payments(
        &mut self,
        payments: &[String],
    ) -> Result<HashSet<String>, sqlx::Error>;
    async fn note_velocity(&mut self, rows: &[VelocityRow], at_ms: i64) -> Result<(), sqlx::Error>;
    /// (count, capped sum) of each row's buyer window since `since_ms`, not
    /// counting the row's own payment (`store::recent_activity`, per row).
    async fn recent_activity(
        &mut self,
        rows: &[VelocityRow],
        since_ms: i64,
    ) -> Result<Vec<(i64, i64)>, sqlx::Error>;
    /// Stores decided events and keeps fingerprints; returns the keys still
    /// owned (stored).
    async fn store_pending(
        &mut self,
        rows: &[PendingRow],
        now_ms: i64,
    ) -> Result<HashSet<KeyId>, sqlx::Error>;
    /// Records event ids as applied; returns those that were new.
    async fn fresh_events(
        &mut self,
        ids: &[String],
        now_ms: i64,
    ) -> Result<HashSet<String>, sqlx::Error>;
    async fn insert_payments(
        &mut self,
        payments: &[PaymentRow],
        orders: &[OrderRow],
    ) -> Result<(), sqlx::Error>;
    /// Stores answers; returns the keys still owned (finished).
    async fn finish(&mut self, rows: &[FinishRow]) -> Result<HashSet<KeyId>, sqlx::Error>;
    /// The status fold's rows: the payments in `payments` and all their
    /// orders, the orders in `orders`, the refunds in `refunds`.
    async fn load_status(
        &mut self,
        payments: &[String],
        orders: &[String],
        refunds: &[String],
    ) -> Result<StatusRows, sqlx::Error>;
    /// Writes the fold's changes, each guarded by the status it was
    /// decided on (and the projection's own guards); fails (transient) if
    /// any row is no longer in that status.
    async fn write_status(&mut self, w: &StatusWrites) -> Result<(), sqlx::Error>;
    /// `a + b` computed by SQL: fails as SQL fails on a sum beyond i64
    /// (deterministic: PostgreSQL 22003, SQLite "integer overflow").
    async fn checked_add(&mut self, a: i64, b: i64) -> Result<i64, sqlx::Error>;
}

/// `checked_add`'s statement, the same for both backends: SQLite's `SUM`
/// of integers fails on overflow (`+` would turn to a float), PostgreSQL's
/// cast of the numeric sum fails out of range.
const CHECKED_ADD: &str = "SELECT CAST(SUM(v) AS BIGINT) FROM (SELECT CAST($1 AS BIGINT) AS v UNION ALL SELECT CAST($2 AS BIGINT)) t";

fn col<T, U>(rows: &[T], f: impl Fn(&T) -> U) -> Vec<U> {
    rows.iter().map(f).collect()
}

impl BatchSql for PgConnection {
    async fn claim(
        &mut self,
        rows: &[ClaimRow],
        t: ClaimTimes,
    ) -> Result<HashSet<KeyId>, sqlx::Error> {
        // Rows in key order: two batches (or a batch and the per-request
        // path) touching the same keys take their locks in the same order
        // and wait for each other instead of deadlocking.
        let mut rows = rows.to_vec();
        rows.sort_by(|a, b| (&a.client, &a.key).cmp(&(&b.client, &b.key)));
        let rows = &rows[..];
        let got: Vec<KeyId> = sqlx::query_as(
            "INSERT INTO handler_idempotency_keys (client_id, idem_key, request_sha256, state, lease_until_ms, created_ms, expires_ms, owner) \
             SELECT u.c, u.k, u.f, 'in_flight', $5, $6, $7, u.o FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[]) AS u(c, k, f, o) \
             ON CONFLICT DO NOTHING RETURNING client_id, idem_key",
        )
        .bind(col(rows, |r| r.client.clone()))
        .bind(col(rows, |r| r.key.clone()))
        .bind(col(rows, |r| r.fingerprint.clone()))
        .bind(col(rows, |r| r.owner.clone()))
        .bind(t.lease_until_ms)
        .bind(t.now_ms)
        .bind(t.expires_ms)
        .fetch_all(&mut *self)
        .await?;
        Ok(got.into_iter().collect())
    }

    async fn decided_before(&mut self, keys: &[KeyId]) -> Result<HashSet<KeyId>, sqlx::Error> {
        let got: Vec<KeyId> = sqlx::query_as(
            "SELECT f.client_id, f.idem_key FROM handler_request_fingerprints f \
             JOIN UNNEST($1::text[], $2::text[]) AS u(c, k) ON f.client_id = u.c AND f.idem_key = u.k",
        )
        .bind(col(keys, |k| k.0.clone()))
        .bind(col(keys, |k| k.1.clone()))
        .fetch_all(&mut *self)
        .await?;
        Ok(got.into_iter().collect())
    }

    async fn existing_payments(
        &mut self,
        payments: &[String],
    ) -> Result<HashSet<String>, sqlx::Error> {
        let got: Vec<String> = sqlx::query_scalar(
            "SELECT payment_id FROM handler_payments WHERE payment_id = ANY($1)",
        )
        .bind(payments)
        .fetch_all(&mut *self)
        .await?;
        Ok(got.into_iter().collect())
    }

    async fn note_velocity(&mut self, rows: &[VelocityRow], at_ms: i64) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO handler_risk_velocity (payment_id, client_id, buyer_id, currency, amount_minor, at_ms) \
             SELECT u.p, u.c, u.b, u.cur, u.a, $6 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[]) AS u(p, c, b, cur, a) \
             ON CONFLICT DO NOTHING",
        )
        .bind(col(rows, |r| r.payment.clone()))
        .bind(col(rows, |r| r.client.clone()))
        .bind(col(rows, |r| r.buyer.clone()))
        .bind(col(rows, |r| r.currency.clone()))
        .bind(col(rows, |r| r.amount_minor))
        .bind(at_ms)
        .execute(&mut *self)
        .await?;
        Ok(())
    }

    async fn recent_activity(
        &mut self,
        rows: &[VelocityRow],
        since_ms: i64,
    ) -> Result<Vec<(i64, i64)>, sqlx::Error> {
        let idx: Vec<i64> = (0..rows.len() as i64).collect();
        let got: Vec<(i64, i64, i64)> = sqlx::query_as(
            "SELECT u.i, \
               (SELECT count(*) FROM handler_risk_velocity v \
                 WHERE v.client_id = u.c AND v.buyer_id = u.b AND v.at_ms >= $6 AND v.payment_id <> u.p), \
               (SELECT CAST(COALESCE(SUM(a), 0) AS BIGINT) FROM ( \
                  SELECT CASE WHEN v.amount_minor > $7 THEN $7 ELSE v.amount_minor END AS a FROM handler_risk_velocity v \
                  WHERE v.client_id = u.c AND v.buyer_id = u.b AND v.currency = u.cur AND v.at_ms >= $6 AND v.payment_id <> u.p LIMIT $8) w) \
             FROM UNNEST($1::int8[], $2::text[], $3::text[], $4::text[], $5::text[]) AS u(i, c, b, cur, p) ORDER BY u.i",
        )
        .bind(idx)
        .bind(col(rows, |r| r.client.clone()))
        .bind(col(rows, |r| r.buyer.clone()))
        .bind(col(rows, |r| r.currency.clone()))
        .bind(col(rows, |r| r.payment.clone()))
        .bind(since_ms)
        .bind(events::Money::MAX_MINOR)
        .bind(i64::from(crate::limits::VELOCITY_COUNT_MAX))
        .fetch_all(&mut *self)
        .await?;
        Ok(got.into_iter().map(|(_, n, s)| (n, s)).collect())
    }

    async fn store_pending(
        &mut self,
        rows: &[PendingRow],
        now_ms: i64,
    ) -> Result<HashSet<KeyId>, sqlx::Error> {
        let (c, k, o) = (
            col(rows, |r| r.client.clone()),
            col(rows, |r| r.key.clone()),
            col(rows, |r| r.owner.clone()),
        );
        let got: Vec<KeyId> = sqlx::query_as(
            "UPDATE handler_idempotency_keys k SET pending_events = u.ev \
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[]) AS u(c, ky, o, ev) \
             WHERE k.client_id = u.c AND k.idem_key = u.ky AND k.owner = u.o AND k.state = 'in_flight' \
             RETURNING k.client_id, k.idem_key",
        )
        .bind(&c)
        .bind(&k)
        .bind(&o)
        .bind(col(rows, |r| r.events.clone()))
        .fetch_all(&mut *self)
        .await?;
        sqlx::query(
            "INSERT INTO handler_request_fingerprints (client_id, idem_key, request_sha256, kind, resource_id, created_ms) \
             SELECT k.client_id, k.idem_key, k.request_sha256, 'payment', u.r, $5 FROM handler_idempotency_keys k \
             JOIN UNNEST($1::text[], $2::text[], $3::text[], $4::text[]) AS u(c, ky, o, r) \
               ON k.client_id = u.c AND k.idem_key = u.ky AND k.owner = u.o AND k.state = 'in_flight' \
             ON CONFLICT DO NOTHING",
        )
        .bind(&c)
        .bind(&k)
        .bind(&o)
        .bind(col(rows, |r| r.payment.clone()))
        .bind(now_ms)
        .execute(&mut *self)
        .await?;
        Ok(got.into_iter().collect())
    }

    async fn fresh_events(
        &mut self,
        ids: &[String],
        now_ms: i64,
    ) -> Result<HashSet<String>, sqlx::Error> {
        // In id order: the status consumer applies the same events as the
        // group commit's last step, concurrently; one lock order for both.
        let mut ids = ids.to_vec();
        ids.sort();
        let got: Vec<String> = sqlx::query_scalar(
            "INSERT INTO handler_applied_events (event_id, applied_ms) SELECT u.e, $2 FROM UNNEST($1::text[]) WITH ORDINALITY AS u(e, n) \
             ORDER BY u.n ON CONFLICT DO NOTHING RETURNING event_id",
        )
        .bind(&ids)
        .bind(now_ms)
        .fetch_all(&mut *self)
        .await?;
        Ok(got.into_iter().collect())
    }

    async fn insert_payments(
        &mut self,
        payments: &[PaymentRow],
        orders: &[OrderRow],
    ) -> Result<(), sqlx::Error> {
        if payments.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO handler_payments (payment_id, client_id, buyer_id, status, currency, total_minor, rejection_rule, rejection_reason, created_us, updated_us) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[], $7::text[], $8::text[], $9::int8[], $10::int8[]) \
             ON CONFLICT DO NOTHING",
        )
        .bind(col(payments, |r| r.payment.clone()))
        .bind(col(payments, |r| r.client.clone()))
        .bind(col(payments, |r| r.buyer.clone()))
        .bind(col(payments, |r| r.status.to_owned()))
        .bind(col(payments, |r| r.currency.clone()))
        .bind(col(payments, |r| r.total_minor))
        .bind(col(payments, |r| r.rejection_rule.clone()))
        .bind(col(payments, |r| r.rejection_reason.clone()))
        .bind(col(payments, |r| r.created_us))
        .bind(col(payments, |r| r.updated_us))
        .execute(&mut *self)
        .await?;
        sqlx::query(
            "INSERT INTO handler_payment_orders (order_id, payment_id, position, seller_id, amount_minor, currency, status) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::int4[], $4::text[], $5::int8[], $6::text[], $7::text[]) \
             ON CONFLICT DO NOTHING",
        )
        .bind(col(orders, |r| r.order.clone()))
        .bind(col(orders, |r| r.payment.clone()))
        .bind(col(orders, |r| r.position))
        .bind(col(orders, |r| r.seller.clone()))
        .bind(col(orders, |r| r.amount_minor))
        .bind(col(orders, |r| r.currency.clone()))
        .bind(col(orders, |r| r.status.to_owned()))
        .execute(&mut *self)
        .await?;
        sqlx::query(
            "INSERT INTO handler_risk_velocity (payment_id, buyer_id, currency, amount_minor, at_ms) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[]) ON CONFLICT DO NOTHING",
        )
        .bind(col(payments, |r| r.payment.clone()))
        .bind(col(payments, |r| r.buyer.clone()))
        .bind(col(payments, |r| r.currency.clone()))
        .bind(col(payments, |r| r.total_minor))
        .bind(col(payments, |r| r.at_ms))
        .execute(&mut *self)
        .await?;
        Ok(())
    }

    async fn finish(&mut self, rows: &[FinishRow]) -> Result<HashSet<KeyId>, sqlx::Error> {
        let got: Vec<KeyId> = sqlx::query_as(
            "UPDATE handler_idempotency_keys k SET state = 'done', response_status = u.s, response_body = u.b \
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int4[], $5::text[]) AS u(c, ky, o, s, b) \
             WHERE k.client_id = u.c AND k.idem_key = u.ky AND k.owner = u.o AND k.state = 'in_flight' \
             RETURNING k.client_id, k.idem_key",
        )
        .bind(col(rows, |r| r.client.clone()))
        .bind(col(rows, |r| r.key.clone()))
        .bind(col(rows, |r| r.owner.clone()))
        .bind(col(rows, |r| r.status))
        .bind(col(rows, |r| r.body.clone()))
        .fetch_all(&mut *self)
        .await?;
        Ok(got.into_iter().collect())
    }

    async fn load_status(
        &mut self,
        payments: &[String],
        orders: &[String],
        refunds: &[String],
    ) -> Result<StatusRows, sqlx::Error> {
        let mut rows = StatusRows::default();
        if !payments.is_empty() {
            rows.payments = sqlx::query_as(
                "SELECT payment_id AS payment, status, updated_us FROM handler_payments WHERE payment_id = ANY($1)",
            )
            .bind(payments)
            .fetch_all(&mut *self)
            .await?;
        }
        if !payments.is_empty() || !orders.is_empty() {
            rows.orders = sqlx::query_as(
                "SELECT order_id AS \"order\", payment_id AS payment, status, psp_reference, failure_reason \
                 FROM handler_payment_orders WHERE payment_id = ANY($1) \
                 UNION SELECT order_id, payment_id, status, psp_reference, failure_reason \
                 FROM handler_payment_orders WHERE order_id = ANY($2)",
            )
            .bind(payments)
            .bind(orders)
            .fetch_all(&mut *self)
            .await?;
        }
        if !refunds.is_empty() {
            rows.refunds = sqlx::query_as(
                "SELECT refund_id AS refund, order_id AS \"order\", payment_id AS payment, amount_minor, currency, status, reason, failure, created_us, updated_us \
                 FROM handler_refunds WHERE refund_id = ANY($1)",
            )
            .bind(refunds)
            .fetch_all(&mut *self)
            .await?;
        }
        Ok(rows)
    }

    async fn write_status(&mut self, w: &StatusWrites) -> Result<(), sqlx::Error> {
        if !w.payments.is_empty() {
            let rows = &w.payments;
            let n = sqlx::query(
                "UPDATE handler_payments p SET status = u.s, updated_us = u.t \
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[]) AS u(id, old, s, t) \
                 WHERE p.payment_id = u.id AND p.status = u.old AND p.status <> 'rejected'",
            )
            .bind(col(rows, |r| r.payment.clone()))
            .bind(col(rows, |r| r.old_status.clone()))
            .bind(col(rows, |r| r.status.clone()))
            .bind(col(rows, |r| r.updated_us))
            .execute(&mut *self)
            .await?
            .rows_affected();
            changed_under_us("payment", rows.len(), n)?;
        }
        if !w.orders.is_empty() {
            let rows = &w.orders;
            let n = sqlx::query(&format!(
                "UPDATE handler_payment_orders o SET status = u.s, psp_reference = u.psp, failure_reason = u.f, \
                   reserved_minor = o.reserved_minor + u.dr, refunded_minor = o.refunded_minor + u.df \
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[], $7::int8[]) AS u(id, old, s, psp, f, dr, df) \
                 WHERE o.order_id = u.id AND o.status = u.old AND (u.s = u.old OR o.status NOT IN {FINAL})"
            ))
            .bind(col(rows, |r| r.order.clone()))
            .bind(col(rows, |r| r.old_status.clone()))
            .bind(col(rows, |r| r.status.clone()))
            .bind(col(rows, |r| r.psp_reference.clone()))
            .bind(col(rows, |r| r.failure_reason.clone()))
            .bind(col(rows, |r| r.add_reserved))
            .bind(col(rows, |r| r.add_refunded))
            .execute(&mut *self)
            .await?
            .rows_affected();
            changed_under_us("order", rows.len(), n)?;
        }
        if !w.new_refunds.is_empty() {
            let rows = &w.new_refunds;
            let n = sqlx::query(
                "INSERT INTO handler_refunds (refund_id, order_id, payment_id, amount_minor, currency, status, reason, failure, created_us, updated_us) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::text[], $7::text[], $8::text[], $9::int8[], $10::int8[]) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(col(rows, |r| r.refund.clone()))
            .bind(col(rows, |r| r.order.clone()))
            .bind(col(rows, |r| r.payment.clone()))
            .bind(col(rows, |r| r.amount_minor))
            .bind(col(rows, |r| r.currency.clone()))
            .bind(col(rows, |r| r.status.clone()))
            .bind(col(rows, |r| r.reason.clone()))
            .bind(col(rows, |r| r.failure.clone()))
            .bind(col(rows, |r| r.created_us))
            .bind(col(rows, |r| r.updated_us))
            .execute(&mut *self)
            .await?
            .rows_affected();
            changed_under_us("new refund", rows.len(), n)?;
        }
        if !w.refunds.is_empty() {
            let rows = &w.refunds;
            let n = sqlx::query(
                "UPDATE handler_refunds r SET status = u.s, failure = u.f, updated_us = u.t \
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[]) AS u(id, old, s, f, t) \
                 WHERE r.refund_id = u.id AND r.status = u.old AND r.status = 'requested'",
            )
            .bind(col(rows, |r| r.refund.clone()))
            .bind(col(rows, |r| r.old_status.clone()))
            .bind(col(rows, |r| r.status.clone()))
            .bind(col(rows, |r| r.failure.clone()))
            .bind(col(rows, |r| r.updated_us))
            .execute(&mut *self)
            .await?
            .rows_affected();
            changed_under_us("refund", rows.len(), n)?;
        }
        Ok(())
    }

    async fn checked_add(&mut self, a: i64, b: i64) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(CHECKED_ADD)
            .bind(a)
            .bind(b)
            .fetch_one(&mut *self)
            .await
    }
}

impl BatchSql for SqliteConnection {
    async fn claim(
        &mut self,
        rows: &[ClaimRow],
        t: ClaimTimes,
    ) -> Result<HashSet<KeyId>, sqlx::Error> {
        let mut owned = HashSet::new();
        for r in rows {
            let n = sqlx::query(
                "INSERT INTO handler_idempotency_keys (client_id, idem_key, request_sha256, state, lease_until_ms, created_ms, expires_ms, owner) \
                 VALUES ($1, $2, $3, 'in_flight', $4, $5, $6, $7) ON CONFLICT DO NOTHING",
            )
            .bind(&r.client).bind(&r.key).bind(&r.fingerprint).bind(t.lease_until_ms).bind(t.now_ms).bind(t.expires_ms).bind(&r.owner)
            .execute(&mut *self).await?.rows_affected();
            if n == 1 {
                owned.insert((r.client.clone(), r.key.clone()));
            }
        }
        Ok(owned)
    }

    async fn decided_before(&mut self, keys: &[KeyId]) -> Result<HashSet<KeyId>, sqlx::Error> {
        let mut found = HashSet::new();
        for (c, k) in keys {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM handler_request_fingerprints WHERE client_id = $1 AND idem_key = $2",
            )
            .bind(c)
            .bind(k)
            .fetch_one(&mut *self)
            .await?;
            if n > 0 {
                found.insert((c.clone(), k.clone()));
            }
        }
        Ok(found)
    }

    async fn existing_payments(
        &mut self,
        payments: &[String],
    ) -> Result<HashSet<String>, sqlx::Error> {
        let mut found = HashSet::new();
        for p in payments {
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM handler_payments WHERE payment_id = $1")
                    .bind(p)
                    .fetch_one(&mut *self)
                    .await?;
            if n > 0 {
                found.insert(p.clone());
            }
        }
        Ok(found)
    }

    async fn note_velocity(&mut self, rows: &[VelocityRow], at_ms: i64) -> Result<(), sqlx::Error> {
        for r in rows {
            sqlx::query(
                "INSERT INTO handler_risk_velocity (payment_id, client_id, buyer_id, currency, amount_minor, at_ms) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            )
            .bind(&r.payment).bind(&r.client).bind(&r.buyer).bind(&r.currency).bind(r.amount_minor).bind(at_ms)
            .execute(&mut *self).await?;
        }
        Ok(())
    }

    async fn recent_activity(
        &mut self,
        rows: &[VelocityRow],
        since_ms: i64,
    ) -> Result<Vec<(i64, i64)>, sqlx::Error> {
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push(
                sqlx::query_as(crate::store::RECENT_ACTIVITY)
                    .bind(&r.client)
                    .bind(&r.buyer)
                    .bind(&r.currency)
                    .bind(since_ms)
                    .bind(&r.payment)
                    .bind(events::Money::MAX_MINOR)
                    .bind(i64::from(crate::limits::VELOCITY_COUNT_MAX))
                    .fetch_one(&mut *self)
                    .await?,
            );
        }
        Ok(out)
    }

    async fn store_pending(
        &mut self,
        rows: &[PendingRow],
        now_ms: i64,
    ) -> Result<HashSet<KeyId>, sqlx::Error> {
        let mut owned = HashSet::new();
        for r in rows {
            let n = sqlx::query(
                "UPDATE handler_idempotency_keys SET pending_events = $1 \
                 WHERE client_id = $2 AND idem_key = $3 AND owner = $4 AND state = 'in_flight'",
            )
            .bind(&r.events)
            .bind(&r.client)
            .bind(&r.key)
            .bind(&r.owner)
            .execute(&mut *self)
            .await?
            .rows_affected();
            if n == 1 {
                sqlx::query(crate::store::KEEP_FINGERPRINT)
                    .bind("payment")
                    .bind(&r.payment)
                    .bind(now_ms)
                    .bind(&r.client)
                    .bind(&r.key)
                    .bind(&r.owner)
                    .execute(&mut *self)
                    .await?;
                owned.insert((r.client.clone(), r.key.clone()));
            }
        }
        Ok(owned)
    }

    async fn fresh_events(
        &mut self,
        ids: &[String],
        now_ms: i64,
    ) -> Result<HashSet<String>, sqlx::Error> {
        let mut fresh = HashSet::new();
        for id in ids {
            let n = sqlx::query("INSERT INTO handler_applied_events (event_id, applied_ms) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(id).bind(now_ms).execute(&mut *self).await?.rows_affected();
            if n == 1 {
                fresh.insert(id.clone());
            }
        }
        Ok(fresh)
    }

    async fn insert_payments(
        &mut self,
        payments: &[PaymentRow],
        orders: &[OrderRow],
    ) -> Result<(), sqlx::Error> {
        for r in payments {
            sqlx::query("INSERT INTO handler_payments (payment_id, client_id, buyer_id, status, currency, total_minor, rejection_rule, rejection_reason, created_us, updated_us) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING")
                .bind(&r.payment).bind(&r.client).bind(&r.buyer).bind(r.status).bind(&r.currency).bind(r.total_minor)
                .bind(&r.rejection_rule).bind(&r.rejection_reason).bind(r.created_us).bind(r.updated_us)
                .execute(&mut *self).await?;
            sqlx::query("INSERT INTO handler_risk_velocity (payment_id, buyer_id, currency, amount_minor, at_ms) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING")
                .bind(&r.payment).bind(&r.buyer).bind(&r.currency).bind(r.total_minor).bind(r.at_ms)
                .execute(&mut *self).await?;
        }
        for o in orders {
            sqlx::query("INSERT INTO handler_payment_orders (order_id, payment_id, position, seller_id, amount_minor, currency, status) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING")
                .bind(&o.order).bind(&o.payment).bind(o.position).bind(&o.seller).bind(o.amount_minor).bind(&o.currency).bind(o.status)
                .execute(&mut *self).await?;
        }
        Ok(())
    }

    async fn finish(&mut self, rows: &[FinishRow]) -> Result<HashSet<KeyId>, sqlx::Error> {
        let mut owned = HashSet::new();
        for r in rows {
            let n = sqlx::query(
                "UPDATE handler_idempotency_keys SET state = 'done', response_status = $1, response_body = $2 \
                 WHERE client_id = $3 AND idem_key = $4 AND owner = $5 AND state = 'in_flight'",
            )
            .bind(r.status).bind(&r.body).bind(&r.client).bind(&r.key).bind(&r.owner)
            .execute(&mut *self).await?.rows_affected();
            if n == 1 {
                owned.insert((r.client.clone(), r.key.clone()));
            }
        }
        Ok(owned)
    }

    async fn load_status(
        &mut self,
        payments: &[String],
        orders: &[String],
        refunds: &[String],
    ) -> Result<StatusRows, sqlx::Error> {
        let mut rows = StatusRows::default();
        for p in payments {
            rows.payments.extend(
                sqlx::query_as::<_, LoadedPayment>(
                    "SELECT payment_id AS payment, status, updated_us FROM handler_payments WHERE payment_id = $1",
                )
                .bind(p)
                .fetch_optional(&mut *self)
                .await?,
            );
            rows.orders.extend(
                sqlx::query_as::<_, LoadedOrder>(
                    "SELECT order_id AS \"order\", payment_id AS payment, status, psp_reference, failure_reason \
                     FROM handler_payment_orders WHERE payment_id = $1",
                )
                .bind(p)
                .fetch_all(&mut *self)
                .await?,
            );
        }
        for o in orders {
            rows.orders.extend(
                sqlx::query_as::<_, LoadedOrder>(
                    "SELECT order_id AS \"order\", payment_id AS payment, status, psp_reference, failure_reason \
                     FROM handler_payment_orders WHERE order_id = $1",
                )
                .bind(o)
                .fetch_optional(&mut *self)
                .await?,
            );
        }
        for r in refunds {
            rows.refunds.extend(
                sqlx::query_as::<_, RefundRow>(
                    "SELECT refund_id AS refund, order_id AS \"order\", payment_id AS payment, amount_minor, currency, status, reason, failure, created_us, updated_us \
                     FROM handler_refunds WHERE refund_id = $1",
                )
                .bind(r)
                .fetch_optional(&mut *self)
                .await?,
            );
        }
        Ok(rows)
    }

    async fn write_status(&mut self, w: &StatusWrites) -> Result<(), sqlx::Error> {
        let mut n = 0;
        for r in &w.payments {
            n += sqlx::query(
                "UPDATE handler_payments SET status = $1, updated_us = $2 WHERE payment_id = $3 AND status = $4 AND status <> 'rejected'",
            )
            .bind(&r.status).bind(r.updated_us).bind(&r.payment).bind(&r.old_status)
            .execute(&mut *self).await?.rows_affected();
        }
        changed_under_us("payment", w.payments.len(), n)?;
        let mut n = 0;
        let orders = format!(
            "UPDATE handler_payment_orders SET status = $1, psp_reference = $2, failure_reason = $3, \
               reserved_minor = reserved_minor + $4, refunded_minor = refunded_minor + $5 \
             WHERE order_id = $6 AND status = $7 AND ($1 = $7 OR status NOT IN {FINAL})"
        );
        for r in &w.orders {
            n += sqlx::query(&orders)
                .bind(&r.status)
                .bind(&r.psp_reference)
                .bind(&r.failure_reason)
                .bind(r.add_reserved)
                .bind(r.add_refunded)
                .bind(&r.order)
                .bind(&r.old_status)
                .execute(&mut *self)
                .await?
                .rows_affected();
        }
        changed_under_us("order", w.orders.len(), n)?;
        let mut n = 0;
        for r in &w.new_refunds {
            n += sqlx::query(
                "INSERT INTO handler_refunds (refund_id, order_id, payment_id, amount_minor, currency, status, reason, failure, created_us, updated_us) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING",
            )
            .bind(&r.refund).bind(&r.order).bind(&r.payment).bind(r.amount_minor).bind(&r.currency)
            .bind(&r.status).bind(&r.reason).bind(&r.failure).bind(r.created_us).bind(r.updated_us)
            .execute(&mut *self).await?.rows_affected();
        }
        changed_under_us("new refund", w.new_refunds.len(), n)?;
        let mut n = 0;
        for r in &w.refunds {
            n += sqlx::query(
                "UPDATE handler_refunds SET status = $1, failure = $2, updated_us = $3 WHERE refund_id = $4 AND status = $5 AND status = 'requested'",
            )
            .bind(&r.status).bind(&r.failure).bind(r.updated_us).bind(&r.refund).bind(&r.old_status)
            .execute(&mut *self).await?.rows_affected();
        }
        changed_under_us("refund", w.refunds.len(), n)?;
        Ok(())
    }

    async fn checked_add(&mut self, a: i64, b: i64) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(CHECKED_ADD)
            .bind(a)
            .bind(b)
            .fetch_one(&mut *self)
            .await
    }
}
