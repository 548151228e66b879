//! The dispatcher: finds due work in SQL, leases it per payment, and runs at
//! most `max_in_flight` payments at once. The orders (then refunds) of one
//! payment run one after the other in one task, so one payment's events stay
//! in order; different payments run concurrently.
//!
//! Per order: (1) record the intent (attempt n, `OrderExecutionStarted`),
//! (2) call the PSP with the order id as idempotency key, (3) record the
//! outcome with its events in the outbox, then append them. A crash anywhere
//! resumes from SQL: the PSP's idempotency key makes the repeated call
//! harmless, and the outbox re-appends what was recorded but not appended.

use crate::psp::{Charge, PspError};
use crate::service::{App, PRODUCER};
use crate::store::{self, OrderRow, OrderUpdate, Outgoing, PaymentRow, RefundRow, RefundUpdate};
use events::{
    CorrelationId, Currency, Envelope, Event, EventId, Money, OrderExecutionStarted, OrderFailed,
    OrderId, OrderPending, OrderSettledByWebhook, OrderSucceeded, PaymentId, RefundFailed,
    RefundId, RefundSucceeded, SCHEMA_VERSION, Timestamp,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// How often the dispatcher looks for due work when nobody woke it.
const IDLE_TICK: Duration = Duration::from_millis(100);
/// Outbox rows older than this are re-appended by the sweeper (younger ones
/// are being appended by the task that wrote them).
const OUTBOX_SWEEP_AGE_MS: i64 = 10_000;
const OUTBOX_SWEEP_EVERY: Duration = Duration::from_secs(5);
/// Most outbox rows re-appended per pass.
const OUTBOX_BATCH: i64 = 1_000;
/// How soon a payment whose task hit an error (database, broker) is retried.
const ERROR_RETRY_MS: i64 = 1_000;
/// How soon a refund waiting for its order's outcome is looked at again.
const REFUND_WAIT_MS: i64 = 1_000;
/// How soon a failed status poll is tried again.
const POLL_RETRY_MS: i64 = 5_000;

/// Runs until `shutdown`; waits for the tasks in flight before returning.
pub async fn run(app: App, shutdown: CancellationToken) {
    let permits = Arc::new(Semaphore::new(app.max_in_flight));
    let mut last_sweep = tokio::time::Instant::now();
    while !shutdown.is_cancelled() {
        if last_sweep.elapsed() >= OUTBOX_SWEEP_EVERY {
            last_sweep = tokio::time::Instant::now();
            let older = store::now_ms() - OUTBOX_SWEEP_AGE_MS;
            if let Err(e) = flush_outbox(&app, None, older).await {
                tracing::warn!(error = %e, "re-appending the outbox failed");
            }
        }
        let free = permits.available_permits();
        if free == 0 {
            // Wait for a task to finish (or shutdown).
            tokio::select! {
                _ = shutdown.cancelled() => break,
                p = permits.clone().acquire_owned() => drop(p),
            }
            continue;
        }
        let now = store::now_ms();
        let due = match store::due_payments(&app.db, now, i64::try_from(free).unwrap_or(1)).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "looking for due work failed");
                Vec::new()
            }
        };
        let mut started = 0usize;
        // A fresh fencing token per lease: each payment leased here is worked
        // by exactly one task below.
        let owner: Arc<str> = Arc::from(store::new_lease_owner());
        let leased =
            match store::lease_payments(&app.db, &due, now, app.policy.lease_ms, &owner).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "leasing payments failed");
                    Vec::new()
                }
            };
        for payment_id in leased {
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            started += 1;
            let app = app.clone();
            let owner = owner.clone();
            tokio::spawn(async move {
                let _permit = permit;
                process_payment(&app, &payment_id, &owner).await;
            });
        }
        if started == 0 {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = app.work.notified() => {}
                _ = tokio::time::sleep(IDLE_TICK) => {}
            }
        }
    }
    // Let the tasks in flight finish their step (bounded by the PSP timeout).
    let all = u32::try_from(app.max_in_flight).unwrap_or(u32::MAX);
    let _ = permits.acquire_many(all).await;
}

/// Works off everything due for one payment leased under `owner`, then
/// releases it.
async fn process_payment(app: &App, payment_id: &str, owner: &str) {
    match process_payment_inner(app, payment_id, owner).await {
        Ok(()) => match store::release_payment(&app.db, payment_id, owner).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(
                    payment_id,
                    "the payment's lease was retaken before we released it"
                );
            }
            Err(e) => tracing::warn!(error = %e, payment_id, "releasing a payment failed"),
        },
        Err(e) => {
            tracing::warn!(error = %e, payment_id, "executing a payment failed; will retry");
            // Keep it leased briefly so a failing database or broker is not
            // hammered in a tight loop.
            let _ = store::renew_lease(&app.db, payment_id, owner, store::now_ms(), ERROR_RETRY_MS)
                .await;
        }
    }
}

/// Extends the lease, or stops working on the payment when it is no longer
/// ours.
async fn renew(app: &App, pay: &PaymentRow) -> anyhow::Result<()> {
    let now = store::now_ms();
    if !store::renew_lease(
        &app.db,
        &pay.payment_id,
        &pay.owner,
        now,
        app.policy.lease_ms,
    )
    .await?
    {
        anyhow::bail!("lost the lease of payment {}", pay.payment_id);
    }
    Ok(())
}

/// Runs `call` (a PSP call) while renewing the payment's lease, so a slow
/// call does not let another dispatcher take the payment over. A lost lease
/// is logged; recording the outcome will then be refused (fenced).
async fn holding_lease<T>(
    app: &App,
    pay: &PaymentRow,
    call: impl std::future::Future<Output = T>,
) -> T {
    let every = Duration::from_millis(u64::try_from(app.policy.lease_ms / 3).unwrap_or(1).max(1));
    tokio::pin!(call);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            r = &mut call => return r,
            _ = ticker.tick() => {
                if let Err(e) = renew(app, pay).await {
                    tracing::warn!(error = %e, payment_id = %pay.payment_id, "renewing a lease during a PSP call failed");
                }
            }
        }
    }
}

async fn process_payment_inner(app: &App, payment_id: &str, owner: &str) -> anyhow::Result<()> {
    let Some(mut pay) = store::payment(&app.db, payment_id).await? else {
        return Ok(());
    };
    owner.clone_into(&mut pay.owner);
    let pay = pay;
    flush_outbox(app, Some(payment_id), i64::MAX).await?;
    let mut first = true;
    for order in store::due_orders(&app.db, payment_id, store::now_ms()).await? {
        if !std::mem::take(&mut first) {
            renew(app, &pay).await?;
        }
        match order.state.as_str() {
            "retry_wait" if order.lookup_since_ms.is_some() => {
                look_up_charge(app, &pay, &order).await?;
            }
            "ready" | "retry_wait" | "executing" => execute_order(app, &pay, &order).await?,
            "pending" => poll_pending(app, &pay, &order).await?,
            _ => {}
        }
    }
    for refund in store::due_refunds(&app.db, payment_id, store::now_ms()).await? {
        renew(app, &pay).await?;
        execute_refund(app, &pay, &refund).await?;
    }
    Ok(())
}

// ------------------------------------------------------------------ events

fn envelope(pay: &PaymentRow, event_id: EventId, event: Event) -> Envelope {
    Envelope {
        event_id,
        occurred_at: Timestamp::now(),
        payment_id: Some(
            pay.payment_id
                .parse::<PaymentId>()
                .expect("stored payment ids are UUIDs"),
        ),
        correlation_id: pay
            .correlation_id
            .parse::<CorrelationId>()
            .expect("stored correlation ids are UUIDs"),
        causation_id: None,
        producer: PRODUCER.to_owned(),
        schema_version: SCHEMA_VERSION,
        event,
    }
}

fn order_id(o: &OrderRow) -> OrderId {
    o.order_id.parse().expect("stored order ids are UUIDs")
}

fn money(minor: i64, currency: &str) -> Money {
    Money::new(
        minor,
        Currency::from_code(currency).expect("stored currencies are valid"),
    )
}

fn out(pay: &PaymentRow, parent: uuid::Uuid, discriminator: &str, event: Event) -> Outgoing {
    Outgoing::new(&envelope(
        pay,
        EventId::derive(parent, discriminator),
        event,
    ))
}

/// Appends recorded events not yet acknowledged (of one payment, or all
/// older than `older_than_ms`), in the order they were recorded.
pub async fn flush_outbox(
    app: &App,
    payment_id: Option<&str>,
    older_than_ms: i64,
) -> anyhow::Result<()> {
    loop {
        let rows = store::unappended(&app.db, payment_id, older_than_ms, OUTBOX_BATCH).await?;
        let n = rows.len();
        let mut seqs = Vec::with_capacity(n);
        let mut envs = Vec::with_capacity(n);
        for (seq, body) in rows {
            seqs.push(seq);
            envs.push(events::avro::decode(&body)?);
        }
        // Sent in seq order (join_all polls in order, and the idempotent
        // producer keeps a partition's order), acknowledged together.
        for r in futures::future::join_all(envs.iter().map(|e| app.producer.append(e))).await {
            r?;
        }
        store::mark_appended(&app.db, &seqs).await?;
        if i64::try_from(n).unwrap_or(i64::MAX) < OUTBOX_BATCH {
            return Ok(());
        }
    }
}

// ------------------------------------------------------------------ orders

async fn execute_order(app: &App, pay: &PaymentRow, order: &OrderRow) -> anyhow::Result<()> {
    let p = &app.policy;
    let oid = order_id(order);
    let n = order.attempts + 1;
    let started = out(
        pay,
        oid.as_uuid(),
        &format!("attempt-{n}-started"),
        OrderExecutionStarted {
            order_id: oid,
            attempt: n,
        }
        .into(),
    );
    let began = store::now_ms();
    if !store::begin_attempt(
        &app.db,
        &pay.owner,
        &order.order_id,
        n,
        p.lease_ms,
        p.max_total_ms,
        &started,
    )
    .await?
    {
        return Ok(()); // moved meanwhile (e.g. resolved by a webhook)
    }
    // The started event is durable in the outbox; it goes out together with
    // the outcome (in that order), which saves a broker round trip.
    let deadline = order
        .deadline_ms
        .unwrap_or_else(|| began.saturating_add(p.max_total_ms));

    let answer = holding_lease(
        app,
        pay,
        app.psp.charge(
            &order.order_id,
            order.amount_minor,
            &order.currency,
            &pay.card_token,
        ),
    )
    .await;
    let answer = match answer {
        // A replay says what the first answer said; a pending charge may
        // have resolved since: ask for its current state.
        Ok(a) if a.replayed && a.charge.status == "pending" => {
            Ok(app.psp.get_charge(&a.charge.id).await.unwrap_or(a.charge))
        }
        Ok(a) => Ok(a.charge),
        Err(e) => Err(e),
    };
    let (update, events) = match answer {
        Ok(charge) => match charge_outcome(app, pay, order, n, &charge) {
            Some(r) => r,
            None => {
                transient(
                    app,
                    pay,
                    order,
                    n,
                    deadline,
                    &PspError::Transient {
                        code: "psp_bad_answer".into(),
                        reason: format!("unknown charge status {:?}", charge.status),
                        retry_after: None,
                        outcome_unknown: true,
                    },
                )
                .await
            }
        },
        Err(e @ PspError::Final { .. }) => refused(app, pay, order, n, &e).await,
        Err(e) => transient(app, pay, order, n, deadline, &e).await,
    };
    if store::record_attempt(&app.db, &pay.owner, &order.order_id, n, &update, &events).await? {
        flush_outbox(app, Some(&pay.payment_id), i64::MAX).await?;
    }
    Ok(())
}

/// The PSP refused the charge for good. Only a validation error (400)
/// proves no charge exists; for anything else (e.g. 422
/// `idempotency_key_reused`: a charge was made under our key) the PSP's
/// charges for the order are looked up first, and a charge found decides.
async fn refused(
    app: &App,
    pay: &PaymentRow,
    order: &OrderRow,
    n: i32,
    e: &PspError,
) -> (OrderUpdate, Vec<Outgoing>) {
    let oid = order_id(order);
    let fail = || {
        let ev = out(
            pay,
            oid.as_uuid(),
            "failed-final",
            OrderFailed {
                order_id: oid,
                retryable: false,
                code: e.code().to_owned(),
                reason: e.reason().to_owned(),
                attempt: n,
            }
            .into(),
        );
        (
            OrderUpdate::Failed {
                reason: e.to_string(),
                charge_id: None,
            },
            vec![ev],
        )
    };
    if e.is_validation() {
        return fail();
    }
    // The key was used before: a charge under it exists (or is being made).
    let charge_exists = e.code() == "idempotency_key_reused";
    let lookup = || {
        (
            OrderUpdate::Lookup {
                at_ms: store::now_ms().saturating_add(lookup_wait(app, n)),
                reason: format!("refused, looking the charge up: {e}"),
                outcome_unknown: charge_exists,
            },
            Vec::new(),
        )
    };
    match app.psp.charges_for(&order.order_id).await {
        Ok(charges) => match charges.last() {
            Some(charge) => charge_outcome(app, pay, order, n, charge).unwrap_or_else(lookup),
            None if charge_exists => lookup(),
            None => fail(),
        },
        Err(le) => {
            tracing::warn!(error = %le, order_id = %order.order_id, "looking up charges failed; will look again");
            lookup()
        }
    }
}

/// The update and events for a charge the PSP reported; None for a status
/// we do not know.
fn charge_outcome(
    app: &App,
    pay: &PaymentRow,
    order: &OrderRow,
    n: i32,
    charge: &Charge,
) -> Option<(OrderUpdate, Vec<Outgoing>)> {
    let oid = order_id(order);
    let amount = money(order.amount_minor, &order.currency);
    match charge.status.as_str() {
        "succeeded" => Some((
            OrderUpdate::Succeeded {
                charge_id: charge.id.clone(),
                fee_minor: charge.fee_minor,
            },
            vec![out(
                pay,
                oid.as_uuid(),
                "succeeded",
                OrderSucceeded {
                    order_id: oid,
                    psp_reference: charge.id.clone(),
                    amount,
                    fee: money(charge.fee_minor, &order.currency),
                }
                .into(),
            )],
        )),
        "declined" => {
            let code = charge
                .decline_code
                .clone()
                .unwrap_or_else(|| "declined".into());
            Some((
                OrderUpdate::Failed {
                    reason: format!("declined: {code}"),
                    charge_id: Some(charge.id.clone()),
                },
                vec![out(
                    pay,
                    oid.as_uuid(),
                    "failed-final",
                    OrderFailed {
                        order_id: oid,
                        retryable: false,
                        reason: format!("the PSP declined the charge ({code})"),
                        code,
                        attempt: n,
                    }
                    .into(),
                )],
            ))
        }
        "pending" => Some((
            OrderUpdate::Pending {
                charge_id: charge.id.clone(),
                poll_at_ms: store::now_ms().saturating_add(app.policy.pending_poll_ms),
            },
            vec![out(
                pay,
                oid.as_uuid(),
                "pending",
                OrderPending {
                    order_id: oid,
                    psp_reference: charge.id.clone(),
                    amount,
                }
                .into(),
            )],
        )),
        _ => None,
    }
}

/// A transient failure of attempt `n`: retry later, or give up when the
/// attempts or the time are used up. Before giving up, the PSP is asked
/// whether a charge exists after all (a timeout may have hidden one).
async fn transient(
    app: &App,
    pay: &PaymentRow,
    order: &OrderRow,
    n: i32,
    deadline_ms: i64,
    e: &PspError,
) -> (OrderUpdate, Vec<Outgoing>) {
    metrics::counter!(streaming::metrics::PSP_RETRIES).increment(1);
    let oid = order_id(order);
    let retry_after = match e {
        PspError::Transient { retry_after, .. } => *retry_after,
        PspError::Final { .. } => None,
    };
    let attempt_failed = out(
        pay,
        oid.as_uuid(),
        &format!("attempt-{n}-failed"),
        OrderFailed {
            order_id: oid,
            retryable: true,
            code: e.code().to_owned(),
            reason: e.reason().to_owned(),
            attempt: n,
        }
        .into(),
    );
    let now = store::now_ms();
    let wait = app.policy.backoff_ms(n, retry_after);
    let exhausted = n >= app.policy.max_attempts || now.saturating_add(wait) > deadline_ms;
    if !exhausted {
        return (
            OrderUpdate::RetryWait {
                at_ms: now.saturating_add(wait),
                reason: e.to_string(),
                outcome_unknown: e.outcome_unknown(),
            },
            vec![attempt_failed],
        );
    }
    // Attempts are used up. Only a definite "no charge" from the PSP lets
    // the order fail; if any attempt may have made a charge, the order waits
    // in the lookup state until the PSP gives a definite answer.
    let unknown = e.outcome_unknown() || order.last_unknown_ms.is_some();
    let to_lookup = |attempt_failed: Outgoing| {
        (
            OrderUpdate::Lookup {
                at_ms: now.saturating_add(lookup_wait(app, n)),
                reason: format!("retries exhausted, looking the charge up: {e}"),
                outcome_unknown: e.outcome_unknown(),
            },
            vec![attempt_failed],
        )
    };
    match app.psp.charges_for(&order.order_id).await {
        Ok(charges) => {
            if let Some(charge) = charges.last() {
                if let Some((update, mut events)) = charge_outcome(app, pay, order, n, charge) {
                    events.insert(0, attempt_failed);
                    return (update, events);
                }
                return to_lookup(attempt_failed);
            }
            if unknown {
                return to_lookup(attempt_failed);
            }
        }
        Err(le) => {
            tracing::warn!(error = %le, order_id = %order.order_id, "looking up charges failed; will look again");
            return to_lookup(attempt_failed);
        }
    }
    let final_failed = exhausted_event(pay, order, n, &e.to_string());
    (
        OrderUpdate::Failed {
            reason: format!("retries exhausted: {e}"),
            charge_id: None,
        },
        vec![attempt_failed, final_failed],
    )
}

/// How long to wait before the next charge look-up: back-off on the
/// attempt count, but never a tight loop.
fn lookup_wait(app: &App, n: i32) -> i64 {
    app.policy
        .backoff_ms(n, None)
        .max(app.policy.backoff_base_ms)
        .max(1)
}

fn exhausted_event(pay: &PaymentRow, order: &OrderRow, n: i32, last_error: &str) -> Outgoing {
    let oid = order_id(order);
    out(
        pay,
        oid.as_uuid(),
        "failed-final",
        OrderFailed {
            order_id: oid,
            retryable: false,
            code: "retries_exhausted".into(),
            reason: format!("gave up after {n} attempts; last error: {last_error}"),
            attempt: n,
        }
        .into(),
    )
}

/// An order whose attempts are used up while a charge may exist: ask the
/// PSP (`GET /v1/charges?reference=`). A charge found resolves the order; no
/// charge fails it only once the grace period since the last attempt with
/// an unknown outcome has passed (the PSP finishes requests whose caller
/// hung up); a failed look-up is simply repeated.
async fn look_up_charge(app: &App, pay: &PaymentRow, order: &OrderRow) -> anyhow::Result<()> {
    assert!(
        order.lookup_since_ms.is_some(),
        "only orders in the lookup state are looked up"
    );
    let n = order.attempts;
    let now = store::now_ms();
    let next = now.saturating_add(lookup_wait(app, n));
    let charges = match app.psp.charges_for(&order.order_id).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, order_id = %order.order_id, "looking up charges failed; will look again");
            store::lookup_later(&app.db, &order.order_id, next).await?;
            return Ok(());
        }
    };
    let (update, events) = match charges.last() {
        Some(charge) => match charge_outcome(app, pay, order, n, charge) {
            Some(r) => r,
            None => {
                store::lookup_later(&app.db, &order.order_id, next).await?;
                return Ok(());
            }
        },
        None => {
            let grace_end = order
                .last_unknown_ms
                .map_or(0, |t| t.saturating_add(app.policy.unknown_grace_ms));
            if now < grace_end {
                store::lookup_later(&app.db, &order.order_id, next.min(grace_end)).await?;
                return Ok(());
            }
            let last = order.last_error.clone().unwrap_or_default();
            (
                OrderUpdate::Failed {
                    reason: format!("retries exhausted, the PSP has no charge: {last}"),
                    charge_id: None,
                },
                vec![exhausted_event(pay, order, n, &last)],
            )
        }
    };
    if store::record_attempt(&app.db, &pay.owner, &order.order_id, n, &update, &events).await? {
        flush_outbox(app, Some(&pay.payment_id), i64::MAX).await?;
    }
    Ok(())
}

/// Builds a refund's final failure (update and event) from code and reason.
type RefundFailure<'a> = dyn Fn(&str, String) -> (RefundUpdate, Vec<Outgoing>) + Sync + 'a;

/// A refund attempt without a final answer: retry later, or — attempts or
/// time used up — give it up, but only when nothing says it may have been
/// made: no attempt had an unknown outcome within the grace period, and
/// the PSP's charge shows no refunded amount beyond our succeeded refunds.
/// Otherwise it keeps being retried with the same key (the PSP replays a
/// refund it made) and keeps counting as taken.
async fn refund_retry_or_give_up(
    app: &App,
    refund: &RefundRow,
    charge_id: &str,
    n: i32,
    deadline_ms: i64,
    e: &PspError,
    failed: &RefundFailure<'_>,
) -> (RefundUpdate, Vec<Outgoing>) {
    let p = &app.policy;
    let retry_after = match e {
        PspError::Transient { retry_after, .. } => *retry_after,
        PspError::Final { .. } => None,
    };
    let now = store::now_ms();
    let wait = p.backoff_ms(n, retry_after).max(p.backoff_base_ms).max(1);
    let retry = || RefundUpdate::RetryWait {
        at_ms: now.saturating_add(wait),
        reason: e.to_string(),
        outcome_unknown: e.outcome_unknown(),
    };
    if n < p.max_attempts && now.saturating_add(wait) <= deadline_ms {
        return (retry(), Vec::new());
    }
    let last_unknown = if e.outcome_unknown() {
        Some(now)
    } else {
        refund.last_unknown_ms
    };
    if last_unknown.is_some_and(|t| now < t.saturating_add(p.unknown_grace_ms)) {
        return (retry(), Vec::new());
    }
    let unaccounted = match (
        app.psp.get_charge(charge_id).await,
        store::refunds_succeeded(&app.db, &refund.order_id).await,
    ) {
        (Ok(charge), Ok(confirmed)) => charge.refunded_minor > confirmed,
        (Err(le), _) => {
            tracing::warn!(error = %le, refund_id = %refund.refund_id, "checking a refund at the PSP failed; will retry");
            true
        }
        (_, Err(de)) => {
            tracing::warn!(error = %de, refund_id = %refund.refund_id, "summing refunds failed; will retry");
            true
        }
    };
    if unaccounted {
        tracing::warn!(
            refund_id = %refund.refund_id,
            "a refund may have been made at the PSP; retrying instead of giving up"
        );
        return (retry(), Vec::new());
    }
    failed(
        "retries_exhausted",
        format!("gave up after {n} attempts; last error: {e}"),
    )
}

/// The settlement event of a pending order the PSP resolved.
pub(crate) fn settled_event(pay: &PaymentRow, order: &OrderRow, charge: &Charge) -> Outgoing {
    let oid = order_id(order);
    let succeeded = charge.status == "succeeded";
    out(
        pay,
        oid.as_uuid(),
        "settled",
        OrderSettledByWebhook {
            order_id: oid,
            psp_reference: charge.id.clone(),
            succeeded,
            amount: money(order.amount_minor, &order.currency),
            fee: succeeded.then(|| money(charge.fee_minor, &order.currency)),
            failure_reason: (!succeeded).then(|| {
                charge
                    .decline_code
                    .clone()
                    .unwrap_or_else(|| "declined".into())
            }),
        }
        .into(),
    )
}

/// Resolves a pending order from a final charge state (webhook or poll);
/// returns whether this call resolved it.
pub(crate) async fn settle(
    app: &App,
    pay: &PaymentRow,
    order: &OrderRow,
    charge: &Charge,
) -> anyhow::Result<bool> {
    let succeeded = match charge.status.as_str() {
        "succeeded" => true,
        "declined" => false,
        _ => return Ok(false),
    };
    let ev = settled_event(pay, order, charge);
    let done = store::resolve_pending(
        &app.db,
        &order.order_id,
        succeeded,
        succeeded.then_some(charge.fee_minor),
        charge.decline_code.as_deref(),
        &ev,
    )
    .await?;
    if done {
        flush_outbox(app, Some(&pay.payment_id), i64::MAX).await?;
    }
    Ok(done)
}

/// A pending order no webhook resolved in time: ask the PSP.
async fn poll_pending(app: &App, pay: &PaymentRow, order: &OrderRow) -> anyhow::Result<()> {
    let now = store::now_ms();
    match app.psp.charges_for(&order.order_id).await {
        Ok(charges) => {
            let charge = charges
                .iter()
                .find(|c| Some(&c.id) == order.psp_charge_id.as_ref())
                .or(charges.last());
            let resolved = match charge {
                Some(c) => settle(app, pay, order, c).await?,
                None => false,
            };
            if !resolved {
                store::repoll_later(
                    &app.db,
                    &order.order_id,
                    now.saturating_add(app.policy.pending_poll_ms),
                )
                .await?;
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, order_id = %order.order_id, "polling a pending charge failed");
            store::repoll_later(&app.db, &order.order_id, now.saturating_add(POLL_RETRY_MS))
                .await?;
        }
    }
    Ok(())
}

// ----------------------------------------------------------------- refunds

async fn execute_refund(app: &App, pay: &PaymentRow, refund: &RefundRow) -> anyhow::Result<()> {
    let p = &app.policy;
    let rid: RefundId = refund
        .refund_id
        .parse()
        .expect("stored refund ids are UUIDs");
    let oid: OrderId = refund.order_id.parse().expect("stored order ids are UUIDs");
    let amount = money(refund.amount_minor, &refund.currency);
    let failed = |code: &str, reason: String| {
        (
            RefundUpdate::Failed {
                reason: format!("{code}: {reason}"),
            },
            vec![out(
                pay,
                rid.as_uuid(),
                "failed",
                RefundFailed {
                    refund_id: rid,
                    order_id: oid,
                    code: code.to_owned(),
                    reason,
                }
                .into(),
            )],
        )
    };
    let Some(order) = store::order(&app.db, &refund.order_id).await? else {
        anyhow::bail!("refund {} refers to a missing order", refund.refund_id);
    };
    let reject = match order.state.as_str() {
        "succeeded" => None,
        "failed" | "cancelled" => Some(failed(
            "charge_not_refundable",
            format!(
                "the order {} was not charged ({})",
                order.order_id, order.state
            ),
        )),
        _ => {
            // Not final yet: wait for its outcome.
            store::refund_later(
                &app.db,
                &refund.refund_id,
                store::now_ms().saturating_add(REFUND_WAIT_MS),
            )
            .await?;
            return Ok(());
        }
    };
    let reject = reject.or_else(|| {
        (order.currency != refund.currency).then(|| {
            failed(
                "currency_mismatch",
                format!(
                    "the order was charged in {}, not {}",
                    order.currency, refund.currency
                ),
            )
        })
    });
    let reject = match reject {
        Some(r) => Some(r),
        None => {
            let taken = store::refunds_taken(&app.db, &refund.order_id, &refund.refund_id).await?;
            let total = taken.checked_add(refund.amount_minor);
            match total {
                Some(t) if t <= order.amount_minor => None,
                _ => Some(failed(
                    "amount_exceeds_refundable",
                    format!(
                        "refunding {} would exceed what was captured ({} minor units, {} already refunded or in flight)",
                        amount, order.amount_minor, taken
                    ),
                )),
            }
        }
    };
    let charge_id = order.psp_charge_id.clone().unwrap_or_default();
    let (update, events, attempt) = match reject {
        Some((u, e)) => (u, e, refund.attempts),
        None => {
            let n = refund.attempts + 1;
            let began = store::now_ms();
            if !store::begin_refund_attempt(
                &app.db,
                &pay.owner,
                &refund.refund_id,
                n,
                p.lease_ms,
                p.max_total_ms,
            )
            .await?
            {
                return Ok(());
            }
            let deadline = refund
                .deadline_ms
                .unwrap_or_else(|| began.saturating_add(p.max_total_ms));
            let (u, e) = match holding_lease(
                app,
                pay,
                app.psp
                    .refund(&charge_id, &refund.refund_id, refund.amount_minor),
            )
            .await
            {
                Ok(r) if r.status == "succeeded" => (
                    RefundUpdate::Succeeded {
                        psp_refund_id: r.id.clone(),
                    },
                    vec![out(
                        pay,
                        rid.as_uuid(),
                        "succeeded",
                        RefundSucceeded {
                            refund_id: rid,
                            order_id: oid,
                            psp_reference: r.id,
                            amount,
                        }
                        .into(),
                    )],
                ),
                Ok(r) if matches!(r.status.as_str(), "failed" | "canceled" | "cancelled") => {
                    failed(
                        "refund_failed",
                        format!("the PSP reports the refund {}", r.status),
                    )
                }
                // Not final yet (e.g. pending): ask again later with the same
                // key; it stays counted as taken meanwhile.
                Ok(r) => {
                    let e = PspError::Transient {
                        code: "refund_not_final".into(),
                        reason: format!("the PSP reports the refund {}", r.status),
                        retry_after: None,
                        outcome_unknown: true,
                    };
                    refund_retry_or_give_up(app, refund, &charge_id, n, deadline, &e, &failed).await
                }
                Err(e @ PspError::Final { .. }) => failed(e.code(), e.reason().to_owned()),
                Err(e) => {
                    refund_retry_or_give_up(app, refund, &charge_id, n, deadline, &e, &failed).await
                }
            };
            (u, e, n)
        }
    };
    if store::record_refund(
        &app.db,
        &pay.owner,
        &refund.refund_id,
        attempt,
        &update,
        &events,
    )
    .await?
    {
        flush_outbox(app, Some(&pay.payment_id), i64::MAX).await?;
    }
    Ok(())
}
