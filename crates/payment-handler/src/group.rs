//! Group commit of `POST /v1/payments`: concurrent requests are gathered
//! into batches (up to `--group-commit-max` requests, waiting at most
//! `--group-commit-wait-ms` for more once one arrived) and each batch does
//! its database and broker work together:
//!
//! 1. **Tx 1** (one commit): claim every key (`INSERT … ON CONFLICT DO
//!    NOTHING`), look up fingerprints kept for good and legacy payments of
//!    the claimed keys, and count the payments in their buyers' velocity
//!    windows.
//! 2. One read of every buyer's velocity window.
//! 3. Decisions in memory: the risk check and `domain::payment::decide`.
//! 4. **Tx 2** (one commit): the decided events under each key (and the
//!    fingerprints kept for good).
//! 5. One produce round: every event of the batch sent (both events of a
//!    payment share its key, hence partition and order; acks=all, the
//!    idempotent producer), then every ack awaited. Each event is Avro
//!    encoded once: the stored bytes are the sent bytes.
//! 6. **Tx 3** (one commit): the status projection rows (set-based) and the
//!    finished answers. The 201 body is built in memory from the decided
//!    events: the view `GET` reads back.
//! 7. Every request is answered.
//!
//! # The durability contract (unchanged from the per-request path)
//!
//! - **Claim before any effect**: Tx 1 commits the claims before anything
//!   is decided or appended. A key is owned by one request (primary key);
//!   a key that exists already leaves the batch for the per-request path
//!   (`store::idem_begin`: replay, mismatch, in flight, takeover).
//! - **Decided events stored before the first append**: Tx 2 commits
//!   before step 5 sends anything. A retry or the sweeper re-appends
//!   exactly those and never decides again.
//! - **Acks and the stored answer before the 201**: a request is answered
//!   201 only after all of its events were acknowledged (step 5) and its
//!   answer committed (Tx 3). Any failure answers 503 and releases the key
//!   (lease ended, decided events kept), as the per-request path does.
//! - **Velocity fails closed**: the velocity rows commit (Tx 1) before the
//!   window is read (step 2), so concurrent payments of one buyer, in other
//!   batches or processes, see each other. Within one batch, two payments
//!   of one buyer are never decided together: the later one waits for the
//!   next batch, so it sees the first exactly as a sequential request would.
//!
//! Batches run concurrently (at most `--group-commit-batches` at a time),
//! so one batch's produce round overlaps the next one's claims.

use crate::batch_sql::{BatchSql, ClaimRow, ClaimTimes, FinishRow, KeyId, PendingRow, VelocityRow};
use crate::request::{FieldError, PaymentRequest};
use crate::risk::RecentActivity;
use crate::service::{App, Reply, Unavailable};
use crate::store;
use events::{ClientId, Envelope, Money, PaymentId};
use runtime::metrics::events::{GroupCommitBatch, InternalEvent as _};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use storage::{BeginWrite, with_pool};
use tokio::sync::{Semaphore, mpsc, oneshot};

/// How a batched request ended.
#[derive(Debug)]
pub enum Admitted {
    /// Answered by the batch.
    Answered(Result<Reply, Unavailable>),
    /// Not for a batch (its key exists already, or was decided before, or
    /// appears twice in the batch): run the per-request path. Sent only
    /// after the batch's claims committed, so that path sees them.
    PerRequest,
}

/// One `POST /v1/payments`, authenticated, its body read and parsed.
#[derive(Debug)]
pub struct Admission {
    pub client: ClientId,
    pub key: String,
    pub fingerprint: String,
    pub parsed: Result<PaymentRequest, FieldError>,
    pub answer: oneshot::Sender<Admitted>,
}

/// Limits of the group commit.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max: usize,
    pub wait: Duration,
    pub batches: usize,
}

/// The handle requests submit to.
#[derive(Debug, Clone)]
pub struct GroupCommit {
    tx: mpsc::Sender<Admission>,
}

impl GroupCommit {
    /// Starts the batcher; it ends when every handle is dropped.
    pub fn spawn(app: App, limits: Limits) -> GroupCommit {
        let (tx, rx) = mpsc::channel(limits.max.max(1) * 4);
        tokio::spawn(run(app, rx, limits));
        GroupCommit { tx }
    }

    /// Submits a request and waits for its answer.
    pub async fn submit(
        &self,
        client: ClientId,
        key: String,
        fingerprint: String,
        parsed: Result<PaymentRequest, FieldError>,
    ) -> Admitted {
        let (answer, rx) = oneshot::channel();
        let adm = Admission {
            client,
            key,
            fingerprint,
            parsed,
            answer,
        };
        if self.tx.send(adm).await.is_err() {
            return Admitted::Answered(Err(Unavailable("the handler is stopping".into())));
        }
        rx.await
            .unwrap_or_else(|_| Admitted::Answered(Err(Unavailable("batch dropped".into()))))
    }
}

async fn run(app: App, mut rx: mpsc::Receiver<Admission>, limits: Limits) {
    let permits = Arc::new(Semaphore::new(limits.batches.max(1)));
    let mut carry: VecDeque<Admission> = VecDeque::new();
    let velocity = app.risk.velocity_window_ms().is_some();
    loop {
        let first = match carry.pop_front() {
            Some(a) => a,
            None => match rx.recv().await {
                Some(a) => a,
                None => return,
            },
        };
        let mut batch = vec![first];
        let mut deferred = VecDeque::new();
        let deadline = tokio::time::Instant::now() + limits.wait;
        // (client, buyer) already in this batch: a second payment of a
        // buyer waits for the next batch (see the module documentation).
        let mut buyers: HashSet<(String, String)> = HashSet::new();
        let mut admit =
            |a: Admission, batch: &mut Vec<Admission>, deferred: &mut VecDeque<Admission>| {
                if velocity
                    && let Ok(req) = &a.parsed
                    && !buyers.insert((
                        a.client.as_str().to_owned(),
                        req.buyer_id.as_str().to_owned(),
                    ))
                {
                    deferred.push_back(a);
                } else {
                    batch.push(a);
                }
            };
        let first = batch.pop().expect("one");
        admit(first, &mut batch, &mut deferred);
        while batch.len() < limits.max {
            if let Some(a) = carry.pop_front() {
                admit(a, &mut batch, &mut deferred);
                continue;
            }
            match rx.try_recv() {
                Ok(a) => admit(a, &mut batch, &mut deferred),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(a)) => admit(a, &mut batch, &mut deferred),
                        _ => break,
                    }
                }
            }
        }
        // Deferred requests go first into the next batch, in their order.
        while let Some(a) = deferred.pop_back() {
            carry.push_front(a);
        }
        let waited = std::time::Instant::now();
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        GroupCommitBatch {
            requests: batch.len(),
            waited: waited.elapsed(),
        }
        .emit();
        let app = app.clone();
        tokio::spawn(async move {
            run_batch(&app, batch).await;
            drop(permit);
        });
    }
}

/// Milliseconds spent in each phase of a batch, for debug logs.
struct PhaseClock {
    at: std::time::Instant,
    laps: Vec<(&'static str, u128)>,
}

impl PhaseClock {
    fn start() -> PhaseClock {
        PhaseClock {
            at: std::time::Instant::now(),
            laps: Vec::new(),
        }
    }
    fn lap(&mut self, phase: &'static str) {
        let now = std::time::Instant::now();
        self.laps.push((phase, (now - self.at).as_millis()));
        self.at = now;
    }
}

impl std::fmt::Display for PhaseClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (phase, ms)) in self.laps.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{phase}={ms}ms")?;
        }
        Ok(())
    }
}

/// One request of a batch and how far it got.
struct Item {
    adm: Admission,
    token: String,
    payment: PaymentId,
    /// `Some` once answered (or sent to the per-request path).
    done: Option<Admitted>,
    /// The decided events and their encoded bytes.
    events: Vec<(Envelope, Vec<u8>)>,
    /// The sticky answer to store (refusals, or the 201 once appended).
    reply: Option<Reply>,
}

impl Item {
    fn key_id(&self) -> KeyId {
        (self.adm.client.as_str().to_owned(), self.adm.key.clone())
    }
    fn open(&self) -> bool {
        self.done.is_none()
    }
}

fn fail_all<'a>(items: impl Iterator<Item = &'a mut Item>, e: &str) {
    for it in items {
        if it.open() {
            it.done = Some(Admitted::Answered(Err(Unavailable(e.to_owned()))));
        }
    }
}

async fn run_batch(app: &App, batch: Vec<Admission>) {
    let mut items: Vec<Item> = batch
        .into_iter()
        .map(|adm| Item {
            payment: PaymentId::derive(&adm.client, &adm.key),
            token: crate::instances::new_owner_token(),
            adm,
            done: None,
            events: Vec::new(),
            reply: None,
        })
        .collect();
    let claimed_ok = steps(app, &mut items).await;
    // Owned keys that did not get a stored answer are released: deleted if
    // nothing was decided, their lease ended if events were (a retry takes
    // over at once and re-appends them).
    if claimed_ok {
        for it in &items {
            if matches!(it.done, Some(Admitted::Answered(Err(_))))
                && let Err(e) =
                    store::idem_release(&app.db, &it.adm.client, &it.adm.key, &it.token).await
            {
                tracing::warn!(error = %e, "cannot release idempotency key; it frees itself when its lease expires");
            }
        }
    }
    for it in items {
        let answer = it
            .done
            .unwrap_or_else(|| Admitted::Answered(Err(Unavailable("not answered".into()))));
        let _ = it.adm.answer.send(answer);
    }
}

/// Runs the batch's steps; returns whether the claims committed (so keys
/// may need releasing).
async fn steps(app: &App, items: &mut [Item]) -> bool {
    let now = store::now_ms();
    let policy = app.policy;
    // A key twice in one batch: the first claims it, the others take the
    // per-request path once the claim committed (and get "in flight").
    let mut seen: HashSet<KeyId> = HashSet::new();
    let mut dup = vec![false; items.len()];
    for (i, it) in items.iter().enumerate() {
        dup[i] = !seen.insert(it.key_id());
    }
    let claims: Vec<ClaimRow> = items
        .iter()
        .zip(&dup)
        .filter(|(_, d)| !**d)
        .map(|(it, _)| ClaimRow {
            client: it.adm.client.as_str().to_owned(),
            key: it.adm.key.clone(),
            fingerprint: it.adm.fingerprint.clone(),
            owner: it.token.clone(),
        })
        .collect();
    let times = ClaimTimes {
        now_ms: now,
        lease_until_ms: now.saturating_add(policy.lease_ms),
        expires_ms: now.saturating_add(policy.retention_ms),
    };
    let window = app.risk.velocity_window_ms();
    // Phase timings for `RUST_LOG=payment_handler::group=debug`.
    let mut clock = PhaseClock::start();

    // ---- Tx 1: claims, kept fingerprints, legacy payments, velocity rows.
    let tx1 = async {
        with_pool!(&app.db, p => {
            let mut tx = p.begin_write().await?;
            let owned = tx.claim(&claims, times).await?;
            let owned_keys: Vec<KeyId> = owned.iter().cloned().collect();
            let decided = if owned_keys.is_empty() { HashSet::new() } else { tx.decided_before(&owned_keys).await? };
            // A key decided before (its row since reaped): give the fresh
            // row back; the per-request path answers from the fingerprint.
            for (it, d) in items.iter().zip(&dup) {
                if !*d && decided.contains(&it.key_id()) {
                    sqlx::query("DELETE FROM handler_idempotency_keys WHERE client_id = $1 AND idem_key = $2 AND owner = $3 AND state = 'in_flight' AND pending_events IS NULL")
                        .bind(it.adm.client.as_str()).bind(&it.adm.key).bind(&it.token).execute(&mut *tx).await?;
                }
            }
            let candidates: Vec<String> = items.iter().zip(&dup)
                .filter(|(it, d)| !**d && owned.contains(&it.key_id()) && !decided.contains(&it.key_id()) && it.adm.parsed.is_ok())
                .map(|(it, _)| it.payment.to_string()).collect();
            let existing = if candidates.is_empty() { HashSet::new() } else { tx.existing_payments(&candidates).await? };
            let velocity: Vec<VelocityRow> = if window.is_some() {
                items.iter().zip(&dup)
                    .filter(|(it, d)| !**d && candidates.contains(&it.payment.to_string()) && !existing.contains(&it.payment.to_string()))
                    .filter_map(|(it, _)| velocity_row(it)).collect()
            } else { Vec::new() };
            if !velocity.is_empty() {
                tx.note_velocity(&velocity, now).await?;
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>((owned, decided, existing, velocity))
        })
    };
    let (owned, decided, existing, velocity) = match tx1.await {
        Ok(r) => r,
        Err(e) => {
            fail_all(items.iter_mut(), &format!("database: {e}"));
            return false;
        }
    };
    for (it, d) in items.iter_mut().zip(&dup) {
        if *d || !owned.contains(&it.key_id()) || decided.contains(&it.key_id()) {
            it.done = Some(Admitted::PerRequest);
        }
    }
    // Sent now, not at the end: the per-request path runs meanwhile.
    for it in items.iter_mut() {
        if matches!(it.done, Some(Admitted::PerRequest)) {
            let (tx, _rx) = oneshot::channel();
            let answer = std::mem::replace(&mut it.adm.answer, tx);
            let _ = answer.send(Admitted::PerRequest);
        }
    }

    clock.lap("tx1");
    // ---- Window read, then decisions in memory.
    let activity: HashMap<String, (i64, i64)> = match window {
        Some(w) if !velocity.is_empty() => {
            let since = now.saturating_sub(w);
            let read = with_pool!(&app.db, p => async {
                let mut c = p.acquire().await?;
                c.recent_activity(&velocity, since).await
            }.await);
            match read {
                Ok(v) => velocity.iter().map(|r| r.payment.clone()).zip(v).collect(),
                Err(e) => {
                    fail_all(items.iter_mut(), &format!("database: {e}"));
                    return true;
                }
            }
        }
        _ => HashMap::new(),
    };
    let at = events::Timestamp::now();
    for it in items.iter_mut().filter(|it| it.open()) {
        let req = match &it.adm.parsed {
            Err(fe) => {
                it.reply = Some(Reply::refusal(
                    400,
                    fe.code,
                    fe.message.clone(),
                    Some(fe.field.as_str()).filter(|f| !f.is_empty()),
                ));
                continue;
            }
            Ok(r) => r,
        };
        if existing.contains(&it.payment.to_string()) {
            it.reply = Some(crate::service::key_already_used());
            continue;
        }
        let currency = req.currency();
        let recent = match activity.get(&it.payment.to_string()) {
            Some(&(count, sum)) => RecentActivity {
                count: u32::try_from(count).unwrap_or(u32::MAX),
                amount: Money::new(sum, currency),
            },
            None => RecentActivity {
                count: 0,
                amount: Money::zero(currency),
            },
        };
        match crate::service::decide_submission(
            app,
            &it.adm.client,
            it.payment,
            Some(&it.adm.key),
            req,
            &recent,
            at,
        ) {
            Ok(envs) => {
                let mut encoded = Vec::with_capacity(envs.len());
                for e in envs {
                    match events::avro::encode(&e) {
                        Ok(b) => encoded.push((e, b)),
                        Err(err) => {
                            it.done = Some(Admitted::Answered(Err(Unavailable(format!(
                                "encoding: {err}"
                            )))));
                            break;
                        }
                    }
                }
                if it.open() {
                    it.events = encoded;
                }
            }
            Err(e) => it.done = Some(Admitted::Answered(Err(e))),
        }
    }

    clock.lap("decide");
    // ---- Tx 2: the decided events under their keys.
    let pending: Vec<PendingRow> = items
        .iter()
        .filter(|it| it.open() && !it.events.is_empty())
        .map(|it| PendingRow {
            client: it.adm.client.as_str().to_owned(),
            key: it.adm.key.clone(),
            owner: it.token.clone(),
            events: it
                .events
                .iter()
                .map(|(_, b)| hex::encode(b))
                .collect::<Vec<_>>()
                .join("\n"),
            payment: it.payment.to_string(),
        })
        .collect();
    if !pending.is_empty() {
        let stored = with_pool!(&app.db, p => async {
            let mut tx = p.begin_write().await?;
            let owned = tx.store_pending(&pending, store::now_ms()).await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(owned)
        }.await);
        match stored {
            Ok(still) => {
                for it in items
                    .iter_mut()
                    .filter(|it| it.open() && !it.events.is_empty())
                {
                    if !still.contains(&it.key_id()) {
                        it.done = Some(Admitted::Answered(Err(Unavailable(
                            store::IdemError::NotOwner.to_string(),
                        ))));
                    }
                }
            }
            Err(e) => {
                fail_all(items.iter_mut(), &format!("database: {e}"));
                return true;
            }
        }
    }

    clock.lap("tx2");
    // ---- One produce round: send all, then await all.
    let sends: Vec<(usize, _)> = items
        .iter()
        .enumerate()
        .filter(|(_, it)| it.open())
        .flat_map(|(i, it)| {
            it.events
                .iter()
                .map(move |(e, b)| (i, crate::service::append_encoded(app, e, b)))
        })
        .collect();
    let (who, futs): (Vec<usize>, Vec<_>) = sends.into_iter().unzip();
    let acks = futures::future::join_all(futs).await;
    for (i, ack) in who.into_iter().zip(acks) {
        if let Err(e) = ack
            && items[i].open()
        {
            items[i].done = Some(Admitted::Answered(Err(e)));
        }
    }
    let appended = items.iter().any(|it| it.open() && !it.events.is_empty());
    if appended
        && let Err(e) = app.fault_after_append()
        && let Some(it) = items
            .iter_mut()
            .find(|it| it.open() && !it.events.is_empty())
    {
        it.done = Some(Admitted::Answered(Err(e)));
    }

    clock.lap("produce");
    // ---- Tx 3: status projection and the finished answers.
    for it in items
        .iter_mut()
        .filter(|it| it.open() && !it.events.is_empty())
    {
        let envs: Vec<Envelope> = it.events.iter().map(|(e, _)| e.clone()).collect();
        match crate::service::view_of_decided(&envs) {
            Some(view) => {
                it.reply = Some(Reply::sticky(
                    201,
                    serde_json::to_string(&view).expect("views serialise"),
                ))
            }
            None => {
                it.done = Some(Admitted::Answered(Err(Unavailable(
                    "decided events make no payment view".into(),
                ))))
            }
        }
    }
    let envs: Vec<&Envelope> = items
        .iter()
        .filter(|it| it.open())
        .flat_map(|it| it.events.iter().map(|(e, _)| e))
        .collect();
    let finishes: Vec<FinishRow> = items
        .iter()
        .filter(|it| it.open())
        .filter_map(|it| {
            it.reply.as_ref().map(|r| FinishRow {
                client: it.adm.client.as_str().to_owned(),
                key: it.adm.key.clone(),
                owner: it.token.clone(),
                status: i32::from(r.status),
                body: r.body.clone(),
            })
        })
        .collect();
    match store::apply_status_and_finish(&app.db, &envs, &finishes).await {
        Ok((_, finished)) => {
            for it in items.iter_mut().filter(|it| it.open()) {
                if !finished.contains(&it.key_id()) {
                    // Another request took the key over; it re-appends the
                    // same events and stores the same kind of answer.
                    tracing::warn!("finished after losing the idempotency key");
                }
                let reply = it.reply.take();
                it.done = Some(Admitted::Answered(
                    reply.ok_or_else(|| Unavailable("no answer decided".into())),
                ));
            }
        }
        Err(e) => fail_all(items.iter_mut(), &format!("database: {e}")),
    }
    clock.lap("tx3");
    tracing::debug!(requests = items.len(), phases = %clock, "group commit batch");
    true
}

fn velocity_row(it: &Item) -> Option<VelocityRow> {
    let req = it.adm.parsed.as_ref().ok()?;
    let total = req.total().ok()?;
    Some(VelocityRow {
        payment: it.payment.to_string(),
        client: it.adm.client.as_str().to_owned(),
        buyer: req.buyer_id.as_str().to_owned(),
        currency: req.currency().code().to_owned(),
        amount_minor: total.amount_minor(),
    })
}
