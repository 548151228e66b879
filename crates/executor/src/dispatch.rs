//! The dispatcher: finds due work in SQL, leases it per payment, and runs at
//! most `max_in_flight` payments at once, in batches. The orders (then
//! refunds) of one payment run one after the other, so one payment's events
//! stay in order; the payments of a batch run side by side.
//!
//! Per batch round (the next due order of each payment of the batch):
//! (1) record the intents of all of them (attempt n, `OrderExecutionStarted`)
//! in one transaction; (2) only then call the PSP for each, concurrently,
//! with the order id as idempotency key; (3) record all outcomes with their
//! events in the outbox in one transaction; (4) append the batch's events
//! (all sent, then all acknowledged) and delete their outbox rows in one
//! statement. Every row keeps its own guard (attempt, state, lease owner),
//! so batching changes how many commits carry the decisions, never the
//! decisions (`domain::order`). A crash anywhere resumes from SQL: the PSP's
//! idempotency key makes the repeated call harmless, and the outbox
//! re-appends what was recorded but not appended.

use crate::limits::{OUTBOX_ROWS_PER_PASS_MAX, PAYMENTS_PER_BATCH_MAX};
use crate::psp::{Charge, PspError};
use crate::service::{App, PRODUCER};
use crate::store::{self, OrderRow, OrderUpdate, Outgoing, PaymentRow, RefundRow, RefundUpdate};
use domain::order::{
    self as rules, CallAnswer, Command, FailureKind, Lookup, Order, OrderEvent, Rejection,
    StateName, Status,
};
use events::{
    CorrelationId, Currency, Envelope, Event, EventId, Money, OrderId, PaymentId, RefundFailed,
    RefundId, RefundSucceeded, SCHEMA_VERSION, Timestamp,
};
use futures::StreamExt as _;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// How working off a payment fails. Database and broker failures (the
/// payment is retried shortly) are shown as themselves; the others are
/// refusals of the rules and broken invariants, named.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
    /// An outbox row that does not decode.
    #[error(transparent)]
    Decode(#[from] events::avro::DecodeError),
    // (A ProduceError is large: boxed, so every Result here stays small.)
    #[error(transparent)]
    Produce(Box<streaming::ProduceError>),
    /// The rules refused a command.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    #[error("lost the lease of payment {payment_id}")]
    LostLease { payment_id: String },
    #[error("refund {refund_id} refers to a missing order")]
    MissingOrder { refund_id: String },
    /// The rules decided other events than the step allows (a bug).
    #[error("{expected}: {events:?}")]
    UnexpectedEvents {
        expected: &'static str,
        events: Vec<OrderEvent>,
    },
    #[error("an attempt cannot leave an order {0}")]
    CannotLeave(StateName),
}

impl From<streaming::ProduceError> for DispatchError {
    fn from(e: streaming::ProduceError) -> DispatchError {
        DispatchError::Produce(Box::new(e))
    }
}

/// How often the dispatcher looks for due work when nobody woke it.
const IDLE_TICK: Duration = Duration::from_millis(100);
/// Outbox rows older than this are re-appended by the sweeper (younger ones
/// are being appended by the task that wrote them).
const OUTBOX_SWEEP_AGE_MS: i64 = 10_000;
const OUTBOX_SWEEP_EVERY: Duration = Duration::from_secs(5);
/// How soon a payment whose task hit an error (database, broker) is retried.
const ERROR_RETRY_MS: i64 = 1_000;
/// How soon a refund waiting for its order's outcome is looked at again.
const REFUND_WAIT_MS: i64 = 1_000;
/// How soon a failed status poll is tried again.
const POLL_RETRY_MS: i64 = 5_000;
/// How often the sweeper vacuums the executor's tables (PostgreSQL; see
/// `store::vacuum`).
const VACUUM_EVERY: Duration = Duration::from_secs(30);

/// Runs until `shutdown`; waits for the batches in flight before returning.
pub async fn run(app: App, shutdown: CancellationToken) {
    // One permit per payment in flight; a batch holds one per payment.
    let permits = Arc::new(Semaphore::new(app.max_in_flight));
    let mut last_sweep = tokio::time::Instant::now();
    let mut last_vacuum = tokio::time::Instant::now();
    while !shutdown.is_cancelled() {
        if last_sweep.elapsed() >= OUTBOX_SWEEP_EVERY {
            last_sweep = tokio::time::Instant::now();
            let older = store::now_ms() - OUTBOX_SWEEP_AGE_MS;
            if let Err(e) = flush_outbox(&app, None, older).await {
                tracing::warn!(error = %e, "re-appending the outbox failed");
            }
            if last_vacuum.elapsed() >= VACUUM_EVERY {
                last_vacuum = tokio::time::Instant::now();
                if let Err(e) = store::vacuum(&app.db).await {
                    tracing::warn!(error = %e, "vacuuming the executor's tables failed");
                }
            }
        }
        let free = permits.available_permits().min(PAYMENTS_PER_BATCH_MAX);
        if free == 0 {
            // Wait for a batch to finish (or shutdown).
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
        // A fresh fencing token per lease: each payment leased here is worked
        // by exactly one batch below.
        let owner: Arc<str> = Arc::from(store::new_lease_owner());
        let leased =
            match store::lease_payments(&app.db, &due, now, app.policy.lease_ms, &owner).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "leasing payments failed");
                    Vec::new()
                }
            };
        if leased.is_empty() {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = app.work.notified() => {}
                _ = tokio::time::sleep(IDLE_TICK) => {}
            }
            continue;
        }
        let permit = permits
            .clone()
            .acquire_many_owned(u32::try_from(leased.len()).unwrap_or(u32::MAX))
            .await
            .expect("the semaphore is never closed");
        let app = app.clone();
        tokio::spawn(async move {
            let _permit = permit;
            process_batch(&app, leased, &owner).await;
        });
    }
    // Let the batches in flight finish their step (bounded by the PSP timeout).
    let all = u32::try_from(app.max_in_flight).unwrap_or(u32::MAX);
    let _ = permits.acquire_many(all).await;
}

/// Works off everything due for the payments leased under `owner`, then
/// releases them (one statement).
async fn process_batch(app: &App, ids: Vec<String>, owner: &str) {
    let started = std::time::Instant::now();
    let result = process_batch_inner(app, &ids, owner).await;
    tracing::debug!(
        payments = ids.len(),
        ms = started.elapsed().as_millis(),
        ok = result.is_ok(),
        "executor batch"
    );
    match result {
        Ok(()) => match store::release_payments(&app.db, &ids, owner).await {
            Ok(n) if n == u64::try_from(ids.len()).unwrap_or(u64::MAX) => {}
            Ok(n) => tracing::warn!(
                released = n,
                leased = ids.len(),
                "some leases were retaken before we released them"
            ),
            Err(e) => tracing::warn!(error = %e, "releasing payments failed"),
        },
        Err(e) => {
            tracing::warn!(error = %e, payments = ids.len(), "executing a batch failed; will retry");
            // Keep them leased briefly so a failing database or broker is
            // not hammered in a tight loop.
            let _ =
                store::renew_leases(&app.db, &ids, owner, store::now_ms(), ERROR_RETRY_MS).await;
        }
    }
}

async fn process_batch_inner(app: &App, ids: &[String], owner: &str) -> Result<(), DispatchError> {
    let mut pays: HashMap<String, PaymentRow> = HashMap::with_capacity(ids.len());
    for mut p in store::payments(&app.db, ids).await? {
        owner.clone_into(&mut p.owner);
        pays.insert(p.payment_id.clone(), p);
    }
    // Events recorded earlier but never acknowledged go out first.
    append_rows(app, store::unappended_of(&app.db, ids).await?).await?;
    // Each payment's due orders, in order; a round takes the next of each.
    let mut queues: HashMap<String, VecDeque<OrderRow>> = HashMap::new();
    for o in store::due_orders_of(&app.db, ids, store::now_ms()).await? {
        queues.entry(o.payment_id.clone()).or_default().push_back(o);
    }
    let mut first = true;
    loop {
        let mut live: Vec<String> = queues
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(p, _)| p.clone())
            .collect();
        if live.is_empty() {
            break;
        }
        if !std::mem::take(&mut first) {
            // Between orders: stop working on payments no longer ours.
            let kept =
                store::renew_leases(&app.db, &live, owner, store::now_ms(), app.policy.lease_ms)
                    .await?;
            for lost in live.iter().filter(|p| !kept.contains(p)) {
                tracing::warn!(payment_id = %lost, "lost the lease of a payment; giving it up");
                queues.remove(lost);
            }
            live = kept;
        }
        let step: Vec<(&PaymentRow, OrderRow)> = live
            .iter()
            .filter_map(|p| {
                let o = queues.get_mut(p)?.pop_front()?;
                Some((pays.get(p)?, o))
            })
            .collect();
        run_round(app, owner, &step).await?;
    }
    // Refunds after the orders: one payment's in request order, payments
    // side by side.
    let with_refunds = store::with_due_refunds(&app.db, ids, store::now_ms()).await?;
    let results = futures::future::join_all(with_refunds.iter().filter_map(|p| pays.get(p)).map(
        |pay| async move {
            for refund in store::due_refunds(&app.db, &pay.payment_id, store::now_ms()).await? {
                renew(app, pay).await?;
                execute_refund(app, pay, &refund).await?;
            }
            Ok::<(), DispatchError>(())
        },
    ))
    .await;
    results
        .into_iter()
        .collect::<Result<Vec<()>, DispatchError>>()?;
    Ok(())
}

/// One order per payment: intents of the executable ones in one
/// transaction, then their PSP calls concurrently (look-ups and polls of the
/// others alongside), then all outcomes in one transaction, then one append
/// of everything recorded.
async fn run_round(
    app: &App,
    owner: &str,
    step: &[(&PaymentRow, OrderRow)],
) -> Result<(), DispatchError> {
    let r = domain_rules(app);
    let now = store::now_ms();
    let mut intents = Vec::new();
    let mut begun = Vec::new();
    let mut others = Vec::new();
    for (pay, row) in step {
        let order = domain_order(row);
        match order.status {
            Status::Ready | Status::RetryWait { .. } | Status::Executing => {
                let Ok((events, after)) =
                    rules::execute(&order, &r, Command::BeginAttempt { now_ms: now })
                else {
                    continue;
                };
                let [
                    OrderEvent::AttemptStarted {
                        attempt,
                        idempotency_key,
                        deadline_ms,
                    },
                ] = events.as_slice()
                else {
                    return Err(DispatchError::UnexpectedEvents {
                        expected: "an attempt's intent is one AttemptStarted",
                        events,
                    });
                };
                // The PSP key is the stored order id, which the rules say
                // the key is (the same string as every earlier attempt's).
                assert_eq!(
                    idempotency_key.to_string(),
                    row.order_id,
                    "the PSP idempotency key is the order id"
                );
                intents.push(store::Intent {
                    order_id: row.order_id.clone(),
                    attempt: *attempt,
                    deadline_ms: *deadline_ms,
                    started: outgoing(pay, &order, &events[0]).expect("a started event"),
                });
                begun.push((*pay, row, after));
            }
            Status::Lookup { .. } | Status::Pending { .. } => others.push((*pay, row)),
            _ => {}
        }
    }
    let started = std::time::Instant::now();
    // The intents are durable (committed) before any call of the batch.
    let (recorded, mut rows) =
        store::begin_attempts(&app.db, owner, &intents, app.policy.lease_ms).await?;
    // Boxed, so the round's future is Send for every lifetime (a lazy
    // iterator of closures over references trips the compiler's check).
    type Work<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
    let calls: Vec<Work<'_, Result<store::Outcome, DispatchError>>> = begun
        .into_iter()
        .zip(recorded)
        .filter(|(_, ok)| *ok)
        .map(|((pay, row, after), _)| {
            Box::pin(call_and_decide(app, pay, row, after)) as Work<'_, _>
        })
        .collect();
    let slow: Vec<Work<'_, Result<(), DispatchError>>> = others
        .iter()
        .map(|(pay, row)| {
            let pay: &PaymentRow = pay;
            let row: &OrderRow = row;
            Box::pin(async move {
                match domain_order(row).status {
                    Status::Lookup { .. } => look_up_charge(app, pay, row).await,
                    _ => poll_pending(app, pay, row).await,
                }
            }) as Work<'_, _>
        })
        .collect();
    let limit = app.max_in_flight.max(1);
    let work = async {
        let outcomes: Vec<Result<store::Outcome, DispatchError>> = futures::stream::iter(calls)
            .buffer_unordered(limit)
            .collect()
            .await;
        let slow: Vec<Result<(), DispatchError>> = futures::stream::iter(slow)
            .buffer_unordered(limit)
            .collect()
            .await;
        (outcomes, slow)
    };
    let ids: Vec<String> = step.iter().map(|(p, _)| p.payment_id.clone()).collect();
    let intents_done = started.elapsed();
    let (outcomes, slow) = holding_leases(app, &ids, owner, work).await;
    let calls_done = started.elapsed();
    let outcomes = outcomes
        .into_iter()
        .collect::<Result<Vec<_>, DispatchError>>()?;
    let (_, more) = store::record_attempts(&app.db, owner, &outcomes).await?;
    let recorded_done = started.elapsed();
    rows.extend(more);
    append_rows(app, rows).await?;
    tracing::debug!(
        orders = step.len(),
        intents_ms = intents_done.as_millis(),
        calls_ms = (calls_done - intents_done).as_millis(),
        record_ms = (recorded_done - calls_done).as_millis(),
        append_ms = (started.elapsed() - recorded_done).as_millis(),
        "executor round"
    );
    slow.into_iter()
        .collect::<Result<Vec<()>, DispatchError>>()?;
    Ok(())
}

/// Runs `work` (PSP calls) while renewing the leases of `ids` in one
/// statement every third of the lease, so slow calls do not let another
/// dispatcher take the payments over. A lost lease is logged; recording
/// the outcome will then be refused (fenced).
async fn holding_leases<T>(
    app: &App,
    ids: &[String],
    owner: &str,
    work: impl std::future::Future<Output = T>,
) -> T {
    let every = Duration::from_millis(u64::try_from(app.policy.lease_ms / 3).unwrap_or(1).max(1));
    tokio::pin!(work);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            r = &mut work => return r,
            _ = ticker.tick() => {
                match store::renew_leases(&app.db, ids, owner, store::now_ms(), app.policy.lease_ms).await {
                    Ok(kept) if kept.len() < ids.len() => {
                        tracing::warn!(lost = ids.len() - kept.len(), "leases lost during PSP calls");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "renewing leases during PSP calls failed"),
                }
            }
        }
    }
}

/// Appends recorded events (their outbox rows' bytes) in seq order,
/// all sent before any acknowledgement is awaited, then deletes their rows
/// in one statement.
async fn append_rows(app: &App, mut rows: Vec<(i64, Vec<u8>)>) -> Result<(), DispatchError> {
    if rows.is_empty() {
        return Ok(());
    }
    rows.sort_unstable_by_key(|(seq, _)| *seq);
    let mut seqs = Vec::with_capacity(rows.len());
    let mut envs = Vec::with_capacity(rows.len());
    for (seq, body) in &rows {
        seqs.push(*seq);
        envs.push(events::avro::decode(body)?);
    }
    // The stored bytes are sent as they are (decoded only for the key,
    // headers and topic), in seq order (join_all polls in order, and the
    // idempotent producer keeps a partition's order), acknowledged together.
    let topology = app.producer.topology();
    let sends = envs.iter().zip(&rows).map(|(e, (_, body))| {
        let topic = topology.topic_for(e);
        async move { app.producer.append_encoded(&topic, e, body).await }
    });
    for r in futures::future::join_all(sends).await {
        r?;
    }
    store::delete_appended(&app.db, &seqs).await?;
    Ok(())
}

/// Extends the lease, or stops working on the payment when it is no longer
/// ours.
async fn renew(app: &App, pay: &PaymentRow) -> Result<(), DispatchError> {
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
        return Err(DispatchError::LostLease {
            payment_id: pay.payment_id.clone(),
        });
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
) -> Result<(), DispatchError> {
    loop {
        let rows =
            store::unappended(&app.db, payment_id, older_than_ms, OUTBOX_ROWS_PER_PASS_MAX).await?;
        let n = rows.len();
        append_rows(app, rows).await?;
        if i64::try_from(n).unwrap_or(i64::MAX) < OUTBOX_ROWS_PER_PASS_MAX {
            return Ok(());
        }
    }
}

// ------------------------------------------------------------------ orders

/// The retry rules of `domain::order` from the executor's policy.
fn domain_rules(app: &App) -> rules::Rules {
    rules::Rules {
        max_attempts: app.policy.max_attempts,
        max_total_ms: app.policy.max_total_ms,
        pending_poll_ms: app.policy.pending_poll_ms,
        unknown_grace_ms: app.policy.unknown_grace_ms,
    }
}

/// A stored order as the state machine sees it. The table's CHECK
/// constraint admits only the states `StateName` knows.
pub(crate) fn domain_order(o: &OrderRow) -> Order {
    let name = StateName::parse(&o.state).expect("stored order states are known");
    let next = o.next_attempt_ms.unwrap_or(0);
    let status = match name {
        StateName::AwaitingRisk => Status::AwaitingRisk,
        StateName::Ready => Status::Ready,
        StateName::Executing => Status::Executing,
        StateName::RetryWait => match o.lookup_since_ms {
            Some(since_ms) => Status::Lookup {
                since_ms,
                at_ms: next,
            },
            None => Status::RetryWait { at_ms: next },
        },
        StateName::Pending => Status::Pending {
            charge_id: o.psp_charge_id.clone().unwrap_or_default(),
            since_ms: o.pending_since_ms.unwrap_or(0),
            poll_at_ms: next,
        },
        StateName::Succeeded => Status::Succeeded {
            charge_id: o.psp_charge_id.clone().unwrap_or_default(),
            fee_minor: o.fee_minor.unwrap_or(0),
        },
        StateName::Failed => Status::Failed {
            charge_id: o.psp_charge_id.clone(),
        },
        StateName::Cancelled => Status::Cancelled,
    };
    Order {
        id: order_id(o),
        amount: money(o.amount_minor, &o.currency),
        status,
        attempts: o.attempts,
        deadline_ms: o.deadline_ms,
        last_unknown_ms: o.last_unknown_ms,
        last_error: o.last_error.clone(),
    }
}

fn domain_charge(c: &Charge) -> rules::Charge {
    rules::Charge {
        id: c.id.clone(),
        status: rules::ChargeStatus::parse(&c.status),
        fee_minor: c.fee_minor,
        decline_code: c.decline_code.clone(),
    }
}

fn failure(e: &PspError) -> rules::Failure {
    rules::Failure {
        kind: match e {
            PspError::Transient {
                outcome_unknown, ..
            } => FailureKind::Transient {
                outcome_unknown: *outcome_unknown,
            },
            PspError::Final { .. } => FailureKind::Refused {
                validation: e.is_validation(),
            },
        },
        code: e.code().to_owned(),
        reason: e.reason().to_owned(),
        detail: e.to_string(),
    }
}

/// The outbox row of a fact that is published.
fn outgoing(pay: &PaymentRow, order: &Order, ev: &OrderEvent) -> Option<Outgoing> {
    ev.published(order)
        .map(|(disc, event)| out(pay, order.id.as_uuid(), &disc, event))
}

/// How the facts leave the stored row.
fn update_of(events: &[OrderEvent], after: &Order) -> Result<OrderUpdate, DispatchError> {
    let unknown = events.iter().any(|e| {
        matches!(
            e,
            OrderEvent::RetryScheduled {
                outcome_unknown: true,
                ..
            } | OrderEvent::LookupScheduled {
                outcome_unknown: true,
                ..
            }
        )
    });
    let reason = || after.last_error.clone().unwrap_or_default();
    Ok(match &after.status {
        Status::Succeeded {
            charge_id,
            fee_minor,
        } => OrderUpdate::Succeeded {
            charge_id: charge_id.clone(),
            fee_minor: *fee_minor,
        },
        Status::Failed { charge_id } => OrderUpdate::Failed {
            reason: reason(),
            charge_id: charge_id.clone(),
        },
        Status::Pending {
            charge_id,
            poll_at_ms,
            ..
        } => OrderUpdate::Pending {
            charge_id: charge_id.clone(),
            poll_at_ms: *poll_at_ms,
        },
        Status::RetryWait { at_ms } => OrderUpdate::RetryWait {
            at_ms: *at_ms,
            reason: reason(),
            outcome_unknown: unknown,
        },
        Status::Lookup { at_ms, .. } => OrderUpdate::Lookup {
            at_ms: *at_ms,
            reason: reason(),
            outcome_unknown: unknown,
        },
        other => return Err(DispatchError::CannotLeave(other.name())),
    })
}

/// The PSP's charges for an order, as the rules read them.
async fn lookup(app: &App, order_id: &str) -> Lookup {
    match app.psp.charges_for(order_id).await {
        Ok(charges) => match charges.last() {
            Some(c) => Lookup::Found(domain_charge(c)),
            None => Lookup::NoCharge,
        },
        Err(e) => {
            tracing::warn!(error = %e, order_id, "looking up charges failed; will look again");
            Lookup::Failed
        }
    }
}

/// Calls the PSP for an order whose intent is recorded (`order` is the
/// order after it) and decides the outcome with the rules; looks the
/// order's charges up when the rules ask for them.
async fn call_and_decide(
    app: &App,
    pay: &PaymentRow,
    row: &OrderRow,
    order: Order,
) -> Result<store::Outcome, DispatchError> {
    let n = order.attempts;
    let answer = app
        .psp
        .charge(
            &row.order_id,
            row.amount_minor,
            &row.currency,
            &pay.card_token,
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
    let (call, retry_after) = match &answer {
        Ok(c) => (CallAnswer::Charge(domain_charge(c)), None),
        Err(e) => (
            CallAnswer::Failure(failure(e)),
            match e {
                PspError::Transient { retry_after, .. } => *retry_after,
                PspError::Final { .. } => None,
            },
        ),
    };
    let transient = match &answer {
        Err(PspError::Transient { .. }) => true,
        Ok(c) => matches!(
            rules::ChargeStatus::parse(&c.status),
            rules::ChargeStatus::Other(_)
        ),
        Err(PspError::Final { .. }) => false,
    };
    if transient {
        use runtime::metrics::events::{InternalEvent as _, PspRetryParked};
        PspRetryParked {
            order: &row.order_id,
            attempt: n,
        }
        .emit();
    }
    let r = domain_rules(app);
    let now = store::now_ms();
    let command = |lookup| Command::RecordCall {
        attempt: n,
        now_ms: now,
        answer: call.clone(),
        retry_wait_ms: app.policy.backoff_ms(n, retry_after),
        lookup_wait_ms: lookup_wait(app, n),
        lookup,
    };
    let decided = match rules::execute(&order, &r, command(None)) {
        Err(Rejection::LookupNeeded) => {
            let found = lookup(app, &row.order_id).await;
            rules::execute(&order, &r, command(Some(found)))
        }
        other => other,
    };
    let (events, after) = decided?;
    Ok(store::Outcome {
        order_id: row.order_id.clone(),
        attempt: n,
        update: update_of(&events, &after)?,
        events: events
            .iter()
            .filter_map(|e| outgoing(pay, &order, e))
            .collect(),
    })
}

/// How long to wait before the next charge look-up: back-off on the
/// attempt count, but never a tight loop.
fn lookup_wait(app: &App, n: i32) -> i64 {
    app.policy
        .backoff_ms(n, None)
        .max(app.policy.backoff_base_ms)
        .max(1)
}

/// An order whose attempts are used up while a charge may exist: ask the
/// PSP (`GET /v1/charges?reference=`); the rules decide from the answer (a
/// charge found resolves the order; no charge fails it only once the grace
/// period since the last unknown-outcome attempt has passed; a failed
/// look-up is simply repeated).
async fn look_up_charge(app: &App, pay: &PaymentRow, row: &OrderRow) -> Result<(), DispatchError> {
    let order = domain_order(row);
    let n = order.attempts;
    let answer = lookup(app, &row.order_id).await;
    let (events, after) = rules::execute(
        &order,
        &domain_rules(app),
        Command::LookUp {
            now_ms: store::now_ms(),
            lookup_wait_ms: lookup_wait(app, n),
            answer,
        },
    )?;
    if let [OrderEvent::LookupRepeated { at_ms }] = events.as_slice() {
        store::lookup_later(&app.db, &row.order_id, *at_ms).await?;
        return Ok(());
    }
    let out: Vec<Outgoing> = events
        .iter()
        .filter_map(|e| outgoing(pay, &order, e))
        .collect();
    let update = update_of(&events, &after)?;
    if store::record_attempt(&app.db, &pay.owner, &row.order_id, n, &update, &out).await? {
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

/// Resolves a pending order from a final charge state (webhook or poll);
/// returns whether this call resolved it.
pub(crate) async fn settle(
    app: &App,
    pay: &PaymentRow,
    row: &OrderRow,
    charge: &Charge,
) -> Result<bool, DispatchError> {
    let order = domain_order(row);
    let Ok(events) = rules::decide(
        &order,
        &domain_rules(app),
        Command::Settle {
            charge: domain_charge(charge),
        },
    ) else {
        return Ok(false);
    };
    let [
        settled @ OrderEvent::Settled {
            succeeded,
            fee_minor,
            decline_code,
            ..
        },
    ] = events.as_slice()
    else {
        return Err(DispatchError::UnexpectedEvents {
            expected: "a settlement is one Settled",
            events,
        });
    };
    let ev = outgoing(pay, &order, settled).expect("a settled event");
    let done = store::resolve_pending(
        &app.db,
        &row.order_id,
        *succeeded,
        succeeded.then_some(*fee_minor),
        decline_code.as_deref(),
        &ev,
    )
    .await?;
    if done {
        flush_outbox(app, Some(&pay.payment_id), i64::MAX).await?;
    }
    Ok(done)
}

/// A pending order no webhook resolved in time: ask the PSP.
async fn poll_pending(app: &App, pay: &PaymentRow, order: &OrderRow) -> Result<(), DispatchError> {
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

async fn execute_refund(
    app: &App,
    pay: &PaymentRow,
    refund: &RefundRow,
) -> Result<(), DispatchError> {
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
        return Err(DispatchError::MissingOrder {
            refund_id: refund.refund_id.clone(),
        });
    };
    let reject = match StateName::parse(&order.state) {
        Some(StateName::Succeeded) => None,
        Some(StateName::Failed | StateName::Cancelled) => Some(failed(
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
            let (u, e) = match holding_leases(
                app,
                std::slice::from_ref(&pay.payment_id),
                &pay.owner,
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
