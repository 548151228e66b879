//! Applying a batch of events to a projection in one database transaction,
//! exactly once per event id.
//!
//! 1. Record the batch's new event ids in `applied_events`
//!    (`ON CONFLICT DO NOTHING RETURNING`), except those of types the
//!    booking rules never book ([`booking::books_by_type`]: risk verdicts,
//!    execution starts, failures, requests), which are ignored without a
//!    row: the ids that come back are new,
//!    the rest were applied before (or are being applied by another member
//!    during a rebalance, whose row lock makes us wait and then see them).
//! 2. Load the orders and booking keys the new events refer to.
//!    An event seen before that was rejected, delivered again at the same
//!    (topic, partition, offset), gets its stored rejection back (so it is
//!    dead-lettered again, harmlessly); a redelivery is never decided
//!    afresh, because newer state could decide it differently in the
//!    ledger and the wallet. Delivered at another position (produced again
//!    by a dead-letter redrive, which both projections read), it is
//!    decided afresh like a new event.
//! 3. Decide every new event in memory, in order; an event that is
//!    rejected (or whose booking fails the write-side balance check) writes
//!    nothing but its decision (`outcome = 'rejected'`, kind, reason) on its
//!    `applied_events` row, and the state later events see does not
//!    include it.
//! 4. Write the effects of the accepted events and commit.
//!
//! The caller commits the Kafka offset only after this returns.

use crate::booking::{self, BookState, Booking, Decision, OrderState, TotalKey, TotalKind};
use crate::sql::{Tx, Ty, V, in_clause, insert_many};
use events::{Currency, Envelope};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use storage::Db;
use streaming::{BatchHandler, Delivered, HandlerError, MessageMeta, Outcome};

/// Which projection a handler maintains; also its key in shared tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Projection {
    Ledger,
    Wallet,
}

impl Projection {
    pub fn as_str(&self) -> &'static str {
        match self {
            Projection::Ledger => "ledger",
            Projection::Wallet => "wallet",
        }
    }
}

/// Hash that precedes the first ledger transaction.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One event to apply and where it came from.
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    pub envelope: &'a Envelope,
    pub meta: &'a MessageMeta,
}

// The batch lookups: `$1` is the projection, `clause` selects by the key
// column (`key = ANY($2)` on PostgreSQL). Every key they use puts the key
// column first (migration 3005), so the index condition is on the key in
// every plan, generic or custom, with statistics or without; the test
// `plans` checks the generic plan of each.
fn seen_before_sql(clause: &str) -> String {
    format!(
        "SELECT event_id, COALESCE(error_kind, ''), COALESCE(reason, ''), topic, kafka_partition, kafka_offset \
         FROM applied_events WHERE projection = $1 AND outcome = 'rejected' AND {clause}"
    )
}

fn load_orders_sql(clause: &str) -> String {
    format!(
        "SELECT order_id, payment_id, buyer_id, seller_id, currency, amount_minor, captured_minor, \
         refunded_minor, client_id FROM projection_orders WHERE projection = $1 AND {clause}"
    )
}

fn load_bookings_sql(clause: &str) -> String {
    format!("SELECT booking_key FROM projection_bookings WHERE projection = $1 AND {clause}")
}

/// The ledger's booking keys are its transactions' (`booking_key UNIQUE`):
/// it keeps no copy in `projection_bookings` (migration 3007). `clause`
/// numbers its parameters from `$1`.
fn ledger_bookings_sql(clause: &str) -> String {
    format!("SELECT booking_key FROM ledger_transactions WHERE {clause}")
}

fn load_totals_sql(clause: &str) -> String {
    format!(
        "SELECT kind, client_id, party_id, currency, total_minor FROM projection_totals \
         WHERE projection = $1 AND {clause}"
    )
}

/// The PostgreSQL text of every batch lookup `apply_batch` runs, with the
/// table and the key column its index condition must use: (table, key
/// column, SQL with `$1` TEXT projection and `$2` TEXT[] keys, or only
/// `$1` TEXT[] keys). For the generic-plan test.
#[doc(hidden)]
pub fn postgres_lookups() -> Vec<(&'static str, &'static str, String)> {
    vec![
        (
            "ledger_transactions",
            "booking_key",
            ledger_bookings_sql("booking_key = ANY($1)"),
        ),
        (
            "applied_events",
            "event_id",
            seen_before_sql("event_id = ANY($2)"),
        ),
        (
            "projection_orders",
            "order_id",
            load_orders_sql("order_id = ANY($2)"),
        ),
        (
            "projection_bookings",
            "booking_key",
            load_bookings_sql("booking_key = ANY($2)"),
        ),
        (
            "projection_totals",
            "party_id",
            load_totals_sql("party_id = ANY($2)"),
        ),
    ]
}

/// The tables `projection` writes.
pub fn tables_of(projection: Projection) -> &'static [&'static str] {
    match projection {
        Projection::Ledger => &[
            "applied_events",
            "projection_orders",
            "projection_bookings",
            "projection_totals",
            "ledger_transactions",
            "ledger_entries",
            "ledger_psp_references",
        ],
        Projection::Wallet => &[
            "applied_events",
            "projection_orders",
            "projection_bookings",
            "projection_totals",
            "wallet_balances",
            "buyer_totals",
        ],
    }
}

/// Takes statistics of the tables `projection` writes (`ANALYZE`), so the
/// planner knows their sizes: nothing else may (autovacuum can be off).
/// Cheap: ANALYZE samples a fixed number of rows whatever the size.
pub async fn analyze(db: &Db, projection: Projection) -> Result<(), sqlx::Error> {
    let tables = tables_of(projection);
    match db {
        Db::Postgres(p) => {
            sqlx::query(&format!("ANALYZE {}", tables.join(", ")))
                .execute(p)
                .await?;
        }
        Db::Sqlite(p) => {
            for t in tables {
                sqlx::query(&format!("ANALYZE {t}")).execute(p).await?;
            }
        }
    }
    Ok(())
}

/// When to take statistics while a table fills: first after
/// `ANALYZE_FIRST` events, then each time the count has doubled (ANALYZE
/// on an empty table stores nothing useful; a fixed interval would cost
/// ever more as tables grow, doubling keeps the total cost linear).
#[derive(Debug, Clone)]
pub struct AnalyzeSchedule {
    seen: u64,
    next: u64,
}

/// Events after which [`AnalyzeSchedule`] first asks for statistics.
pub const ANALYZE_FIRST: u64 = 5_000;

impl Default for AnalyzeSchedule {
    fn default() -> Self {
        AnalyzeSchedule {
            seen: 0,
            next: ANALYZE_FIRST,
        }
    }
}

impl AnalyzeSchedule {
    /// Counts `n` more events; true when statistics are due.
    pub fn count(&mut self, n: u64) -> bool {
        self.seen = self.seen.saturating_add(n);
        if self.seen < self.next {
            return false;
        }
        while self.next <= self.seen {
            self.next = self.next.saturating_mul(2);
        }
        true
    }
}

/// Applies `batch` to `projection` in one transaction; one outcome per
/// event, in order. A database error leaves nothing written.
pub async fn apply_batch(
    db: &Db,
    projection: Projection,
    batch: &[Incoming<'_>],
) -> Result<Vec<Outcome>, sqlx::Error> {
    let mut outcomes = vec![Outcome::Duplicate; batch.len()];

    // 1. Claim the event ids; the first occurrence in the batch counts.
    // Types the booking rules never book are ignored here, unclaimed: a
    // batch of nothing else (or an empty one) opens no transaction.
    let mut seen = HashSet::new();
    let mut first: Vec<usize> = Vec::new();
    for (i, inc) in batch.iter().enumerate() {
        if !booking::books_by_type(inc.envelope.event_type()) {
            outcomes[i] = Outcome::Ignored;
        } else if seen.insert(inc.envelope.event_id) {
            first.push(i);
        }
    }
    if first.is_empty() {
        return Ok(outcomes);
    }
    let p = projection.as_str();
    let now = events::Timestamp::now().as_micros();
    let mut tx = Tx::begin(db).await?;
    // Sorted, so two members claiming overlapping batches lock rows in the
    // same order and cannot deadlock.
    first.sort_by_key(|&i| batch[i].envelope.event_id);
    let claim_rows: Vec<Vec<V>> = first
        .iter()
        .map(|&i| {
            let inc = &batch[i];
            vec![
                V::T(p.to_owned()),
                V::T(inc.envelope.event_id.to_string()),
                V::I(now),
                V::T(inc.meta.topic.clone()),
                V::I(i64::from(inc.meta.partition)),
                V::I(inc.meta.offset),
            ]
        })
        .collect();
    let new_ids: HashSet<String> = insert_many(
        &mut tx,
        "applied_events",
        &[
            "projection",
            "event_id",
            "applied_at",
            "topic",
            "kafka_partition",
            "kafka_offset",
        ],
        &claim_rows,
        "ON CONFLICT DO NOTHING RETURNING event_id",
        &[Ty::T],
    )
    .await?
    .into_iter()
    .map(|r| r[0].text())
    .collect();
    let mut fresh: Vec<usize> = first
        .iter()
        .copied()
        .filter(|&i| new_ids.contains(&batch[i].envelope.event_id.to_string()))
        .collect();
    fresh.sort_unstable(); // back to delivery order

    // Seen before. A rejected event delivered again at the same (topic,
    // partition, offset) is a redelivery (a crash before the offset
    // commit): it gets its stored rejection back (dead-lettered again,
    // harmlessly), never a fresh decision against newer state. Delivered at
    // another position it was produced again (a dead-letter redrive after
    // a fix): it is decided afresh below, and its row takes the new
    // position. An applied event stays Duplicate forever.
    let seen_before: Vec<String> = first
        .iter()
        .map(|&i| batch[i].envelope.event_id.to_string())
        .filter(|id| !new_ids.contains(id))
        .collect();
    // event id -> (stored rejection, stored position)
    let mut stored: HashMap<String, (Outcome, (String, i64, i64))> = HashMap::new();
    for chunk in seen_before.chunks(crate::limits::ROWS_PER_STATEMENT_MAX) {
        let (clause, ids) = in_clause(&tx, "event_id", chunk, 2);
        let sql = seen_before_sql(&clause);
        let mut vals = vec![V::T(p.to_owned())];
        vals.extend(ids);
        let cols = [Ty::T, Ty::T, Ty::T, Ty::T, Ty::I, Ty::I];
        for r in tx.rows(&sql, &vals, &cols).await? {
            stored.insert(
                r[0].text(),
                (
                    Outcome::rejected(r[1].text(), r[2].text()),
                    (r[3].text(), r[4].int(), r[5].int()),
                ),
            );
        }
    }
    // Event ids of rejected events decided afresh in this batch.
    let mut redriven: HashSet<String> = HashSet::new();
    if !stored.is_empty() {
        for &i in &first {
            let id = batch[i].envelope.event_id.to_string();
            let Some((rejection, at)) = stored.remove(&id) else {
                continue;
            };
            let m = batch[i].meta;
            let here = (m.topic.clone(), i64::from(m.partition), m.offset);
            // Only a LATER copy in the same partition (a redrive, or a
            // re-append) is decided afresh. The same position (a
            // redelivery) or an earlier one (re-reading after one group's
            // offsets were reset) gets the stored decision, so the ledger
            // and the wallet never decide the same message differently.
            let later = here.0 == at.0 && here.1 == at.1 && here.2 > at.2;
            if !later {
                outcomes[i] = rejection;
                continue;
            }
            // Claim the re-decision: the row moves to this position only if
            // it is still rejected at an earlier one (a concurrent member
            // waits on the row lock, then finds it moved or applied).
            let claimed = tx
                .exec(
                    "UPDATE applied_events SET topic = $1, kafka_partition = $2, kafka_offset = $3, applied_at = $4 \
                     WHERE projection = $5 AND event_id = $6 AND outcome = 'rejected' \
                     AND topic = $1 AND kafka_partition = $2 AND kafka_offset < $3",
                    &[
                        V::T(here.0),
                        V::I(here.1),
                        V::I(here.2),
                        V::I(now),
                        V::T(p.to_owned()),
                        V::T(id.clone()),
                    ],
                )
                .await?;
            if claimed > 0 {
                redriven.insert(id);
                fresh.push(i);
                continue;
            }
            // Lost the race: the row changed meanwhile; take what it says now.
            let now_rows = tx
                .rows(
                    "SELECT COALESCE(error_kind, ''), COALESCE(reason, '') FROM applied_events \
                     WHERE projection = $1 AND event_id = $2 AND outcome = 'rejected'",
                    &[V::T(p.to_owned()), V::T(id)],
                    &[Ty::T, Ty::T],
                )
                .await?;
            if let Some(r) = now_rows.first() {
                outcomes[i] = Outcome::rejected(r[0].text(), r[1].text());
            }
        }
        fresh.sort_unstable(); // back to delivery order
    }
    if fresh.is_empty() {
        tx.commit().await?;
        return Ok(outcomes);
    }

    // 2. Load what the new events refer to.
    let mut order_ids: Vec<String> = fresh
        .iter()
        .flat_map(|&i| booking::referenced_orders(batch[i].envelope))
        .collect();
    order_ids.sort();
    order_ids.dedup();
    let mut keys: Vec<String> = fresh
        .iter()
        .filter_map(|&i| booking::booking_key(batch[i].envelope))
        .collect();
    keys.sort();
    keys.dedup();
    let mut state = BookState::default();
    load_orders(&mut tx, p, &order_ids, &mut state).await?;
    load_bookings(&mut tx, projection, &keys, &mut state).await?;
    // Running totals of every seller and buyer the new events may touch:
    // of the orders known, and of the orders announced in this batch.
    let mut parties: Vec<String> = state
        .orders
        .values()
        .flat_map(|o| [o.seller_id.clone(), o.buyer_id.clone()])
        .collect();
    for &i in &fresh {
        if let events::Event::PaymentRequested(r) = &batch[i].envelope.event {
            parties.push(r.buyer_id.to_string());
            parties.extend(r.orders.iter().map(|o| o.seller_id.to_string()));
        }
    }
    parties.sort();
    parties.dedup();
    let mut totals = load_totals(&mut tx, p, &parties).await?;
    // Deltas of the accepted events, written in step 4.
    let mut total_deltas: BTreeMap<TotalKey, i64> = BTreeMap::new();

    // 3. Decide in memory.
    let mut dirty_orders: BTreeMap<String, OrderState> = BTreeMap::new();
    let mut bookings: Vec<(usize, Booking)> = Vec::new();
    // (event id, kind, reason) of the events rejected in this batch.
    let mut rejected: Vec<(String, String, String)> = Vec::new();
    for &i in &fresh {
        let env = batch[i].envelope;
        outcomes[i] = match booking::decide(env, &state) {
            Decision::Ignore => Outcome::Ignored,
            Decision::Reject { kind, reason } => {
                rejected.push((env.event_id.to_string(), kind.to_owned(), reason.clone()));
                Outcome::rejected(kind, reason)
            }
            Decision::Apply(fx) => {
                // The write-side check: never write an unbalanced transaction.
                match fx
                    .bookings
                    .iter()
                    .find_map(|b| booking::check_balanced(&b.entries).err())
                {
                    Some(reason) => {
                        rejected.push((
                            env.event_id.to_string(),
                            "unbalanced".to_owned(),
                            reason.clone(),
                        ));
                        Outcome::rejected("unbalanced", reason)
                    }
                    None => match within_totals(&fx, &mut totals, &mut total_deltas) {
                        Err(reason) => {
                            rejected.push((
                                env.event_id.to_string(),
                                "total_overflow".to_owned(),
                                reason.clone(),
                            ));
                            Outcome::rejected("total_overflow", reason)
                        }
                        Ok(()) => {
                            state.absorb(&fx);
                            for (id, o) in fx.orders {
                                dirty_orders.insert(id, o);
                            }
                            bookings.extend(fx.bookings.into_iter().map(|b| (i, b)));
                            Outcome::Applied
                        }
                    },
                }
            }
        };
    }

    // 4. Write.
    // Rejections are rare: one statement each is cheap enough.
    for (id, kind, reason) in rejected {
        tx.exec(
            "UPDATE applied_events SET outcome = 'rejected', error_kind = $1, reason = $2 \
             WHERE projection = $3 AND event_id = $4",
            &[V::T(kind), V::T(reason), V::T(p.to_owned()), V::T(id)],
        )
        .await?;
    }
    // Redriven events accepted now: their rows say applied from here on.
    for &i in &fresh {
        let id = batch[i].envelope.event_id.to_string();
        if redriven.contains(&id) && !matches!(outcomes[i], Outcome::Rejected { .. }) {
            tx.exec(
                "UPDATE applied_events SET outcome = 'applied', error_kind = NULL, reason = NULL \
                 WHERE projection = $1 AND event_id = $2",
                &[V::T(p.to_owned()), V::T(id)],
            )
            .await?;
        }
    }
    write_orders(&mut tx, p, &dirty_orders).await?;
    write_totals(&mut tx, p, &total_deltas).await?;
    let booking_rows: Vec<Vec<V>> = bookings
        .iter()
        .map(|(i, b)| {
            vec![
                V::T(p.to_owned()),
                V::T(b.key.clone()),
                V::T(batch[*i].envelope.event_id.to_string()),
            ]
        })
        .collect();
    // The ledger's booking keys live in ledger_transactions (UNIQUE).
    if projection == Projection::Wallet {
        insert_many(
            &mut tx,
            "projection_bookings",
            &["projection", "booking_key", "event_id"],
            &booking_rows,
            "",
            &[],
        )
        .await?;
    }
    match projection {
        Projection::Ledger => write_ledger(&mut tx, batch, &bookings, now).await?,
        Projection::Wallet => write_wallet(&mut tx, &bookings).await?,
    }
    if projection == Projection::Ledger {
        write_psp_references(&mut tx, batch, &fresh, &outcomes).await?;
    }
    tx.commit().await?;
    Ok(outcomes)
}

/// Records the PSP references of the batch's new, not rejected events in
/// `ledger_psp_references` (see migration 3003): status only ever moves
/// forward, within the batch and against the table. Ignored captures
/// (nothing booked) record nothing.
async fn write_psp_references(
    tx: &mut Tx,
    batch: &[Incoming<'_>],
    fresh: &[usize],
    outcomes: &[Outcome],
) -> Result<(), sqlx::Error> {
    let mut refs: BTreeMap<String, booking::PspReference> = BTreeMap::new();
    for &i in fresh {
        if matches!(outcomes[i], Outcome::Rejected { .. }) {
            continue;
        }
        let Some(r) = booking::psp_reference(batch[i].envelope) else {
            continue;
        };
        // A capture the ledger ignored (the order was captured already,
        // e.g. a second charge under another reference) booked nothing: its
        // reference is not recorded as succeeded, so reconciliation reports
        // the PSP's settlement of it (missing_in_ledger, or status_mismatch
        // against a pending row). The same reference as the booked capture
        // is already recorded by that capture.
        if booking::ignored_capture(&r, &outcomes[i]) {
            continue;
        }
        match refs.get(&r.psp_reference) {
            Some(old) if !booking::psp_status_advances(old.status, r.status) => {}
            _ => {
                refs.insert(r.psp_reference.clone(), r);
            }
        }
    }
    let rows: Vec<Vec<V>> = refs
        .into_values()
        .map(|r| {
            vec![
                V::T(r.psp_reference),
                V::T(r.kind.to_owned()),
                V::T(r.order_id),
                V::N(r.refund_id),
                V::T(r.status.to_owned()),
                V::T(r.amount.currency().code().to_owned()),
                V::I(r.amount.amount_minor()),
                V::I(r.fee_minor),
                V::I(r.occurred_at),
                V::T(r.event_id),
            ]
        })
        .collect();
    insert_many(
        tx,
        "ledger_psp_references",
        &[
            "psp_reference",
            "kind",
            "order_id",
            "refund_id",
            "status",
            "currency",
            "amount_minor",
            "fee_minor",
            "occurred_at",
            "event_id",
        ],
        &rows,
        "ON CONFLICT (psp_reference) DO UPDATE SET status = excluded.status, \
         currency = excluded.currency, amount_minor = excluded.amount_minor, \
         fee_minor = excluded.fee_minor, occurred_at = excluded.occurred_at, \
         event_id = excluded.event_id \
         WHERE ledger_psp_references.status = 'pending' AND excluded.status <> 'pending'",
        &[],
    )
    .await?;
    Ok(())
}

async fn load_orders(
    tx: &mut Tx,
    p: &str,
    ids: &[String],
    state: &mut BookState,
) -> Result<(), sqlx::Error> {
    for chunk in ids.chunks(crate::limits::ROWS_PER_STATEMENT_MAX) {
        let (clause, list) = in_clause(tx, "order_id", chunk, 2);
        let sql = load_orders_sql(&clause);
        let mut vals = vec![V::T(p.to_owned())];
        vals.extend(list);
        let cols = [
            Ty::T,
            Ty::T,
            Ty::T,
            Ty::T,
            Ty::T,
            Ty::I,
            Ty::I,
            Ty::I,
            Ty::T,
        ];
        for r in tx.rows(&sql, &vals, &cols).await? {
            let currency =
                Currency::from_code(&r[4].text()).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
            state.orders.insert(
                r[0].text(),
                OrderState {
                    client_id: r[8].text(),
                    payment_id: r[1].text(),
                    buyer_id: r[2].text(),
                    seller_id: r[3].text(),
                    currency,
                    amount_minor: r[5].int(),
                    captured_minor: r[6].int(),
                    refunded_minor: r[7].int(),
                },
            );
        }
    }
    Ok(())
}

async fn load_bookings(
    tx: &mut Tx,
    projection: Projection,
    keys: &[String],
    state: &mut BookState,
) -> Result<(), sqlx::Error> {
    for chunk in keys.chunks(crate::limits::ROWS_PER_STATEMENT_MAX) {
        let (sql, vals) = if projection == Projection::Ledger {
            let (clause, list) = in_clause(tx, "booking_key", chunk, 1);
            (ledger_bookings_sql(&clause), list)
        } else {
            let (clause, list) = in_clause(tx, "booking_key", chunk, 2);
            let mut vals = vec![V::T(projection.as_str().to_owned())];
            vals.extend(list);
            (load_bookings_sql(&clause), vals)
        };
        for r in tx.rows(&sql, &vals, &[Ty::T]).await? {
            state.bookings.insert(r[0].text());
        }
    }
    Ok(())
}

async fn write_orders(
    tx: &mut Tx,
    p: &str,
    orders: &BTreeMap<String, OrderState>,
) -> Result<(), sqlx::Error> {
    let rows: Vec<Vec<V>> = orders
        .iter()
        .map(|(id, o)| {
            vec![
                V::T(p.to_owned()),
                V::T(id.clone()),
                V::T(o.payment_id.clone()),
                V::T(o.buyer_id.clone()),
                V::T(o.seller_id.clone()),
                V::T(o.currency.code().to_owned()),
                V::I(o.amount_minor),
                V::I(o.captured_minor),
                V::I(o.refunded_minor),
                V::T(o.client_id.clone()),
            ]
        })
        .collect();
    insert_many(
        tx,
        "projection_orders",
        &[
            "projection",
            "order_id",
            "payment_id",
            "buyer_id",
            "seller_id",
            "currency",
            "amount_minor",
            "captured_minor",
            "refunded_minor",
            "client_id",
        ],
        &rows,
        "ON CONFLICT (projection, order_id) DO UPDATE SET captured_minor = excluded.captured_minor, refunded_minor = excluded.refunded_minor",
        &[],
    )
    .await?;
    Ok(())
}

/// The bytes a ledger transaction's hash covers, besides the previous hash.
// Every argument is a stored column the hash must cover; a struct would
// only rename them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn canonical_bytes(
    seq: i64,
    id: &str,
    event_id: &str,
    payment_id: Option<&str>,
    kind: &str,
    occurred_at: i64,
    booked_at: i64,
    entries: &[(String, String, i64)],
) -> Vec<u8> {
    let mut s = format!(
        "v1\n{seq}\n{id}\n{event_id}\n{}\n{kind}\n{occurred_at}\n{booked_at}\n",
        payment_id.unwrap_or("-")
    );
    for (account, currency, amount) in entries {
        s.push_str(&format!("{account}\t{currency}\t{amount}\n"));
    }
    s.into_bytes()
}

/// SHA-256 of the previous hash (hex) followed by the canonical bytes.
pub(crate) fn chain_hash(prev_hash: &str, canonical: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(canonical);
    hex::encode(h.finalize())
}

/// Ledger transaction id: derived from the event id and the booking kind,
/// so re-applying an event can only ever produce the same id.
pub fn transaction_id(event_id: &events::EventId, kind: booking::BookingKind) -> String {
    uuid::Uuid::new_v5(
        &event_id.as_uuid(),
        format!("ledger:{}", kind.as_str()).as_bytes(),
    )
    .to_string()
}

/// One booking as the next link of the hash chain: its transaction row
/// (`ledger_transactions` columns) and entry rows (`ledger_entries`
/// columns); `prev` becomes the new head. The live apply and the rebuild's
/// bulk replay both build the chain with this, so their hashes agree.
pub(crate) fn link(
    seq: i64,
    prev: &mut String,
    env: &events::Envelope,
    b: &Booking,
    now: i64,
    txn_rows: &mut Vec<Vec<V>>,
    entry_rows: &mut Vec<Vec<V>>,
) {
    let id = transaction_id(&env.event_id, b.kind);
    let event_id = env.event_id.to_string();
    let payment = env.payment_id.map(|p| p.to_string());
    let occurred = env.occurred_at.as_micros();
    let entries: Vec<(String, String, i64)> = b
        .entries
        .iter()
        .map(|e| {
            (
                e.account.clone(),
                e.amount.currency().code().to_owned(),
                e.amount.amount_minor(),
            )
        })
        .collect();
    let bytes = canonical_bytes(
        seq,
        &id,
        &event_id,
        payment.as_deref(),
        b.kind.as_str(),
        occurred,
        now,
        &entries,
    );
    let hash = chain_hash(prev, &bytes);
    for (line, (account, currency, amount)) in entries.into_iter().enumerate() {
        entry_rows.push(vec![
            V::T(id.clone()),
            V::I(i64::try_from(line).expect("few entries per transaction")),
            V::T(account),
            V::T(currency),
            V::I(amount),
            V::I(occurred),
            V::I(seq),
        ]);
    }
    txn_rows.push(vec![
        V::I(seq),
        V::T(id),
        V::T(b.key.clone()),
        V::T(event_id),
        V::N(payment),
        V::T(b.kind.as_str().to_owned()),
        V::I(occurred),
        V::I(now),
        V::T(std::mem::replace(prev, hash.clone())),
        V::T(hash),
    ]);
}

async fn write_ledger(
    tx: &mut Tx,
    batch: &[Incoming<'_>],
    bookings: &[(usize, Booking)],
    now: i64,
) -> Result<(), sqlx::Error> {
    if bookings.is_empty() {
        return Ok(());
    }
    // The chain head's row lock orders concurrent ledger writers.
    let head_sql = if tx.is_postgres() {
        "SELECT seq, hash FROM ledger_chain_head WHERE id = 1 FOR UPDATE"
    } else {
        "SELECT seq, hash FROM ledger_chain_head WHERE id = 1"
    };
    let head = tx.rows(head_sql, &[], &[Ty::I, Ty::T]).await?;
    assert_eq!(head.len(), 1, "the migration creates the chain head row");
    let (mut seq, mut prev) = (head[0][0].int(), head[0][1].text());
    let mut txn_rows = Vec::with_capacity(bookings.len());
    let mut entry_rows = Vec::with_capacity(bookings.len() * 3);
    for (i, b) in bookings {
        seq += 1;
        link(
            seq,
            &mut prev,
            batch[*i].envelope,
            b,
            now,
            &mut txn_rows,
            &mut entry_rows,
        );
    }
    insert_many(
        tx,
        "ledger_transactions",
        &[
            "seq",
            "id",
            "booking_key",
            "event_id",
            "payment_id",
            "kind",
            "occurred_at",
            "booked_at",
            "prev_hash",
            "hash",
        ],
        &txn_rows,
        "",
        &[],
    )
    .await?;
    insert_many(
        tx,
        "ledger_entries",
        &[
            "transaction_id",
            "line",
            "account",
            "currency",
            "amount_minor",
            "occurred_at",
            "seq",
        ],
        &entry_rows,
        "",
        &[],
    )
    .await?;
    tx.exec(
        "UPDATE ledger_chain_head SET seq = $1, hash = $2 WHERE id = 1",
        &[V::I(seq), V::T(prev)],
    )
    .await?;
    Ok(())
}

/// Checks that the accepted effects `fx` keep every running total they
/// change within `[-TOTAL_MINOR_MAX, TOTAL_MINOR_MAX]` (`totals` holds the
/// stored values plus this batch's accepted deltas); if so, adds their
/// deltas to `totals` and `deltas`, else changes nothing and says why.
pub(crate) fn within_totals(
    fx: &booking::Effects,
    totals: &mut HashMap<TotalKey, i64>,
    deltas: &mut BTreeMap<TotalKey, i64>,
) -> Result<(), String> {
    let mut next: HashMap<TotalKey, i64> = HashMap::new();
    let mut own: Vec<(TotalKey, i64)> = Vec::new();
    for b in &fx.bookings {
        for (key, d) in b.total_deltas() {
            let cur = next
                .get(&key)
                .or_else(|| totals.get(&key))
                .copied()
                .unwrap_or(0);
            // Within ±TOTAL_MINOR_MAX (= i64::MAX): no overflow, not i64::MIN.
            let new = cur.checked_add(d).filter(|n| n.checked_abs().is_some());
            let Some(new) = new else {
                return Err(format!(
                    "the {} of {} {:?} (client {:?}) would leave the range of \
                     ±{} minor units: stored {cur}, change {d}",
                    key.kind.as_str(),
                    key.currency,
                    key.party,
                    key.client,
                    crate::limits::TOTAL_MINOR_MAX
                ));
            };
            next.insert(key.clone(), new);
            own.push((key, d));
        }
    }
    totals.extend(next);
    for (key, d) in own {
        // Cannot overflow: the running total it is part of did not.
        let e = deltas.entry(key).or_default();
        *e = e.saturating_add(d);
    }
    Ok(())
}

/// The stored running totals (`projection_totals`) of these sellers and
/// buyers (all clients, kinds and currencies).
async fn load_totals(
    tx: &mut Tx,
    p: &str,
    parties: &[String],
) -> Result<HashMap<TotalKey, i64>, sqlx::Error> {
    let mut out = HashMap::new();
    for chunk in parties.chunks(crate::limits::ROWS_PER_STATEMENT_MAX) {
        let (clause, list) = in_clause(tx, "party_id", chunk, 2);
        let sql = load_totals_sql(&clause);
        let mut vals = vec![V::T(p.to_owned())];
        vals.extend(list);
        let cols = [Ty::T, Ty::T, Ty::T, Ty::T, Ty::I];
        for r in tx.rows(&sql, &vals, &cols).await? {
            let bad = |what: String| sqlx::Error::Decode(what.into());
            let kind = TotalKind::parse(&r[0].text())
                .ok_or_else(|| bad(format!("unknown total kind {:?}", r[0].text())))?;
            let currency =
                Currency::from_code(&r[3].text()).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
            out.insert(
                TotalKey {
                    kind,
                    client: r[1].text(),
                    party: r[2].text(),
                    currency,
                },
                r[4].int(),
            );
        }
    }
    Ok(out)
}

async fn write_totals(
    tx: &mut Tx,
    p: &str,
    deltas: &BTreeMap<TotalKey, i64>,
) -> Result<(), sqlx::Error> {
    let rows: Vec<Vec<V>> = deltas
        .iter()
        .filter(|(_, d)| **d != 0)
        .map(|(k, d)| {
            vec![
                V::T(p.to_owned()),
                V::T(k.party.clone()),
                V::T(k.client.clone()),
                V::T(k.kind.as_str().to_owned()),
                V::T(k.currency.code().to_owned()),
                V::I(*d),
            ]
        })
        .collect();
    insert_many(
        tx,
        "projection_totals",
        &[
            "projection",
            "party_id",
            "client_id",
            "kind",
            "currency",
            "total_minor",
        ],
        &rows,
        "ON CONFLICT (projection, party_id, client_id, kind, currency) DO UPDATE \
         SET total_minor = projection_totals.total_minor + excluded.total_minor",
        &[],
    )
    .await?;
    Ok(())
}

async fn write_wallet(tx: &mut Tx, bookings: &[(usize, Booking)]) -> Result<(), sqlx::Error> {
    // (client, seller, currency) -> delta; (client, buyer, currency) ->
    // (paid, refunded). The sums were checked against the stored totals
    // (`within_totals`), so neither these nor the stored sums overflow.
    let mut sellers: BTreeMap<(String, String, String), i64> = BTreeMap::new();
    let mut buyers: BTreeMap<(String, String, String), (i64, i64)> = BTreeMap::new();
    let overflow = || sqlx::Error::Protocol("wallet delta overflows i64".into());
    for (_, b) in bookings {
        for ((client, seller), m) in b.wallet_deltas() {
            let e = sellers
                .entry((client, seller, m.currency().code().to_owned()))
                .or_default();
            *e = e.checked_add(m.amount_minor()).ok_or_else(overflow)?;
        }
        if let Some(d) = &b.buyer {
            let e = buyers
                .entry((
                    d.client.clone(),
                    d.buyer.clone(),
                    d.paid.currency().code().to_owned(),
                ))
                .or_default();
            e.0 =
                e.0.checked_add(d.paid.amount_minor())
                    .ok_or_else(overflow)?;
            e.1 =
                e.1.checked_add(d.refunded.amount_minor())
                    .ok_or_else(overflow)?;
        }
    }
    let rows: Vec<Vec<V>> = sellers
        .into_iter()
        .map(|((cl, s, c), d)| vec![V::T(cl), V::T(s), V::T(c), V::I(d)])
        .collect();
    insert_many(
        tx,
        "wallet_balances",
        &["client_id", "seller_id", "currency", "balance_minor"],
        &rows,
        "ON CONFLICT (client_id, seller_id, currency) DO UPDATE SET balance_minor = wallet_balances.balance_minor + excluded.balance_minor",
        &[],
    )
    .await?;
    let rows: Vec<Vec<V>> = buyers
        .into_iter()
        .map(|((cl, b, c), (paid, refunded))| {
            vec![V::T(cl), V::T(b), V::T(c), V::I(paid), V::I(refunded)]
        })
        .collect();
    insert_many(
        tx,
        "buyer_totals",
        &["client_id", "buyer_id", "currency", "paid_minor", "refunded_minor"],
        &rows,
        "ON CONFLICT (client_id, buyer_id, currency) DO UPDATE SET paid_minor = buyer_totals.paid_minor + excluded.paid_minor, refunded_minor = buyer_totals.refunded_minor + excluded.refunded_minor",
        &[],
    )
    .await?;
    Ok(())
}

/// The [`BatchHandler`] of one projection's consumer group.
#[derive(Debug, Clone)]
pub struct ProjectionHandler {
    db: Db,
    projection: Projection,
    analyze: AnalyzeSchedule,
}

impl ProjectionHandler {
    pub fn new(db: Db, projection: Projection) -> ProjectionHandler {
        ProjectionHandler {
            db,
            projection,
            analyze: AnalyzeSchedule::default(),
        }
    }
}

impl BatchHandler for ProjectionHandler {
    async fn handle(&mut self, batch: &[Delivered]) -> Result<Vec<Outcome>, HandlerError> {
        let incoming: Vec<Incoming<'_>> = batch
            .iter()
            .map(|d| Incoming {
                envelope: &d.envelope,
                meta: &d.meta,
            })
            .collect();
        let outcomes = apply_batch(&self.db, self.projection, &incoming)
            .await
            .map_err(|e| {
                HandlerError::classified(
                    storage::deterministic_kind(&e),
                    format!("{} projection: {e}", self.projection.as_str()),
                )
            })?;
        // Statistics as the tables grow (from empty after a reset, or
        // after a restart on tables that grew since): the batch is
        // committed, so a failure here is only logged.
        if self
            .analyze
            .count(u64::try_from(batch.len()).unwrap_or(u64::MAX))
            && let Err(e) = analyze(&self.db, self.projection).await
        {
            tracing::warn!(projection = self.projection.as_str(), error = %e, "ANALYZE failed");
        }
        Ok(outcomes)
    }
}

/// Counts per outcome, for logs and the benchmark.
pub fn tally(outcomes: &[Outcome]) -> HashMap<&'static str, usize> {
    let mut m = HashMap::new();
    for o in outcomes {
        let k = match o {
            Outcome::Applied => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::Ignored => "ignored",
            Outcome::Rejected { .. } => "rejected",
        };
        *m.entry(k).or_default() += 1;
    }
    m
}

#[cfg(test)]
mod analyze_tests {
    use super::*;

    #[test]
    fn statistics_first_after_a_few_thousand_then_on_doubling() {
        let mut s = AnalyzeSchedule::default();
        let due: Vec<u64> = (1..=50u64)
            .filter(|_| s.count(1000))
            .map(|i| i * 1000)
            .collect();
        assert_eq!(due, vec![5_000, 10_000, 20_000, 40_000]);
        // One huge batch asks once, not once per doubling it jumped over.
        let mut s = AnalyzeSchedule::default();
        assert!(s.count(1_000_000));
        assert!(!s.count(1));
    }
}
