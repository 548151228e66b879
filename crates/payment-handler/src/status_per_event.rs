//! The payment-status projection applied one event at a time: the
//! per-event statements `store::apply_status` used before it became
//! set-based (issue #13): those of executor outcomes and refunds kept
//! verbatim as the baseline the equality test (`tests/it/status_batch.rs`)
//! and the bench (`benches/status_apply.rs`) compare the set-based path
//! with; those of a request or risk decision, which did not change, are the
//! live path's own (`store::apply_request_or_decision!`). Not used by the
//! running handler.

use events::{Envelope, Event, PaymentId};
use storage::BeginWrite;
use storage::{Db, with_pool};
use streaming::Outcome;

use crate::store::{decided_rows, now_ms};

/// [`crate::store::apply_status`] as it was: every executor outcome and
/// refund event applied with its own statements, in order, in one
/// transaction (payments decided in the batch are inserted set-based, as
/// they were already).
pub async fn apply_status_per_event(
    db: &Db,
    events: &[&Envelope],
) -> Result<Vec<Outcome>, sqlx::Error> {
    use crate::batch_sql::BatchSql;
    use domain::payment::{OrderStatus, PaymentStatus};
    use domain::refund::RefundStatus;
    use std::collections::{HashMap, HashSet};
    let now = now_ms();
    let relevant = |env: &Envelope| {
        !matches!(
            env.event,
            Event::ReconciliationDiscrepancyFound(_)
                | Event::ReconciliationDiscrepancyResolved(_)
                | Event::ReconciliationRunCompleted(_)
        )
    };
    let ids: Vec<String> = events
        .iter()
        .filter(|e| relevant(e))
        .map(|e| e.event_id.to_string())
        .collect();
    let final_list = OrderStatus::final_sql_list();
    let mut outcomes = Vec::with_capacity(events.len());
    with_pool!(db, p => {
        let mut tx = p.begin_write().await?;
        let mut fresh = if ids.is_empty() { HashSet::new() } else { tx.fresh_events(&ids, now).await? };
        // Payments decided in this batch: (requested, risk) both fresh.
        let mut requested_at: HashMap<PaymentId, usize> = HashMap::new();
        let mut pairs: HashMap<usize, usize> = HashMap::new();
        for (i, env) in events.iter().enumerate() {
            let Some(pay) = env.payment_id else { continue };
            match &env.event {
                Event::PaymentRequested(_) if fresh.contains(&env.event_id.to_string()) => {
                    requested_at.entry(pay).or_insert(i);
                }
                Event::RiskApproved(_) | Event::RiskRejected(_) if fresh.contains(&env.event_id.to_string()) => {
                    if let Some(&r) = requested_at.get(&pay) && !pairs.values().any(|&v| v == i) && !pairs.contains_key(&r) {
                        pairs.insert(r, i);
                    }
                }
                _ => {}
            }
        }
        let mut set_based: HashSet<usize> = HashSet::new();
        let (mut pay_rows, mut order_rows) = (Vec::new(), Vec::new());
        for (&r, &k) in &pairs {
            if let Some((row, orders)) = decided_rows(events[r], events[k]) {
                pay_rows.push(row);
                order_rows.extend(orders);
                set_based.insert(r);
                set_based.insert(k);
            }
        }
        tx.insert_payments(&pay_rows, &order_rows).await?;
        for (i, env) in events.iter().enumerate() {
            if !relevant(env) {
                outcomes.push(Outcome::Ignored);
                continue;
            }
            // The first occurrence of a fresh id applies; repeats are duplicates.
            if !fresh.remove(&env.event_id.to_string()) {
                outcomes.push(Outcome::Duplicate);
                continue;
            }
            if set_based.contains(&i) {
                outcomes.push(Outcome::Applied);
                continue;
            }
            let Some(payment) = env.payment_id else {
                outcomes.push(Outcome::rejected("missing_payment_id", format!("{} without a payment id", env.event_type())));
                continue;
            };
            let pid = payment.to_string();
            let at = env.occurred_at.as_micros();
            match &env.event {
                Event::PaymentRequested(_) | Event::RiskApproved(_) | Event::RiskRejected(_) => {
                    if let Some(refused) = crate::store::apply_request_or_decision!(tx, env, pid, at) {
                        outcomes.push(refused);
                        continue;
                    }
                }
                Event::RefundRequested(e) => {
                    // Rows the API already inserted (with their reservation)
                    // are left alone; rows seen first here (a rebuild, or
                    // another producer) reserve now.
                    let n = sqlx::query("INSERT INTO handler_refunds (refund_id, order_id, payment_id, amount_minor, currency, status, reason, created_us, updated_us) \
                                 SELECT $1, order_id, payment_id, $2, $3, $8, $4, $5, $5 FROM handler_payment_orders WHERE order_id = $6 AND payment_id = $7 \
                                 ON CONFLICT DO NOTHING")
                        .bind(e.refund_id.to_string()).bind(e.amount.amount_minor()).bind(e.amount.currency().code()).bind(&e.reason).bind(at)
                        .bind(e.order_id.to_string()).bind(&pid).bind(RefundStatus::Requested.as_str()).execute(&mut *tx).await?.rows_affected();
                    if n == 1 {
                        sqlx::query("UPDATE handler_payment_orders SET reserved_minor = reserved_minor + $2 WHERE order_id = $1")
                            .bind(e.order_id.to_string()).bind(e.amount.amount_minor()).execute(&mut *tx).await?;
                    } else {
                        let known: i64 = sqlx::query_scalar("SELECT count(*) FROM handler_refunds WHERE refund_id = $1")
                            .bind(e.refund_id.to_string()).fetch_one(&mut *tx).await?;
                        if known == 0 {
                            outcomes.push(Outcome::rejected("unknown_order", format!("refund of order {} of payment {pid}, never requested", e.order_id)));
                            continue;
                        }
                    }
                }
                Event::RefundSucceeded(e) => {
                    // Count the money once, on the transition to succeeded
                    // (`refund::apply`: only a requested refund succeeds; a
                    // failed one stays failed, its reservation released).
                    let n = sqlx::query("UPDATE handler_refunds SET status = $3, updated_us = $2 WHERE refund_id = $1 AND status = $4")
                        .bind(e.refund_id.to_string()).bind(at).bind(RefundStatus::Succeeded.as_str()).bind(RefundStatus::Requested.as_str())
                        .execute(&mut *tx).await?.rows_affected();
                    if n == 1 {
                        sqlx::query("UPDATE handler_payment_orders SET refunded_minor = refunded_minor + $2 WHERE order_id = $1")
                            .bind(e.order_id.to_string()).bind(e.amount.amount_minor()).execute(&mut *tx).await?;
                    }
                }
                Event::RefundFailed(e) => {
                    let amount: Option<i64> = sqlx::query_scalar("UPDATE handler_refunds SET status = $4, failure = $2, updated_us = $3 WHERE refund_id = $1 AND status = $5 RETURNING amount_minor")
                        .bind(e.refund_id.to_string()).bind(format!("{}: {}", e.code, e.reason)).bind(at)
                        .bind(RefundStatus::Failed.as_str()).bind(RefundStatus::Requested.as_str()).fetch_optional(&mut *tx).await?;
                    if let Some(amount) = amount {
                        // A failed refund gives its reservation back.
                        sqlx::query("UPDATE handler_payment_orders SET reserved_minor = reserved_minor - $2 WHERE order_id = $1")
                            .bind(e.order_id.to_string()).bind(amount).execute(&mut *tx).await?;
                    }
                }
                other => {
                    if let Some(change) = domain::payment::order_change(other) {
                        let order = change.order_id.to_string();
                        // Final states never regress (a late "started" after "succeeded").
                        let n = sqlx::query(&format!(
                            "UPDATE handler_payment_orders SET status = $2, psp_reference = COALESCE($3, psp_reference), failure_reason = COALESCE($4, failure_reason) \
                             WHERE order_id = $1 AND payment_id = $5 AND status NOT IN ({final_list})"
                        ))
                        .bind(&order).bind(change.status.as_str()).bind(change.psp_reference).bind(change.failure).bind(&pid).execute(&mut *tx).await?.rows_affected();
                        // The payment's orders, to roll it up in pure code.
                        let statuses: Vec<String> = sqlx::query_scalar("SELECT status FROM handler_payment_orders WHERE payment_id = $1")
                            .bind(&pid).fetch_all(&mut *tx).await?;
                        if n == 0 {
                            let known: i64 = sqlx::query_scalar("SELECT count(*) FROM handler_payment_orders WHERE order_id = $1 AND payment_id = $2")
                                .bind(&order).bind(&pid).fetch_one(&mut *tx).await?;
                            if known == 0 {
                                outcomes.push(Outcome::rejected("unknown_order", format!("order {order} of payment {pid} was never requested")));
                                continue;
                            }
                        }
                        // Roll the payment up once every order is final
                        // (an unknown status counts as open).
                        let rolled = domain::payment::rollup(
                            statuses.iter().map(|s| OrderStatus::parse(s).unwrap_or(OrderStatus::Executing)),
                        );
                        if let Some(status) = rolled {
                            sqlx::query("UPDATE handler_payments SET status = $2, updated_us = $3 WHERE payment_id = $1 AND status <> $4")
                                .bind(&pid).bind(status.as_str()).bind(at).bind(PaymentStatus::Rejected.as_str()).execute(&mut *tx).await?;
                        }
                    }
                }
            }
            outcomes.push(Outcome::Applied);
        }
        tx.commit().await?;
    });
    Ok(outcomes)
}
