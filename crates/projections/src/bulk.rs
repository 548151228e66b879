//! A rebuild as a bulk load (issue 14 item 4): the same decisions as
//! [`crate::apply_batch`], taken in memory, written with as few round
//! trips as the backend allows.
//!
//! [`Replay`] keeps everything `apply_batch` would read back from the
//! database (which event ids were seen and how they ended, the orders, the
//! booking keys used, the running totals, the chain head, the PSP
//! references, the wallet sums) in memory, and applies batches with the
//! same rules in the same order: the first occurrence of an event id in a
//! batch counts; an id seen in an earlier batch is a duplicate, or, if it
//! was rejected, keeps its stored rejection unless delivered later in the
//! same partition (a dead-letter redrive), in which case it is decided
//! afresh; fresh events are decided by [`booking::decide`] in delivery
//! order, checked for balance and against the running totals exactly as
//! `apply_batch` does. The batch boundaries are the caller's, and matter
//! (a duplicate within one batch is a duplicate even of a rejected
//! event), so a rebuild that batches like the live path decides alike.
//! The test `bulk` proves it on the property sequences.
//!
//! Rows that never change once written (ledger transactions and entries,
//! booking keys, the dedup rows of applied events) are handed out as they are produced ([`Replay::take_appends`]),
//! so a writer can load them while the next events are read; the rest
//! (the final state of every row that later events may update) comes out
//! at the end ([`Replay::finish`]). [`load`] writes rows: COPY on
//! PostgreSQL, large multi-row INSERTs in one transaction on SQLite.

use crate::apply::{Incoming, Projection, link, within_totals};
use crate::booking::{self, BookState, Decision, TotalKey};
use crate::sql::{Tx, V, insert_many};
use std::collections::{BTreeMap, HashMap, HashSet};
use storage::Db;
use streaming::Outcome;

/// Rows of one table, all with the same columns.
#[derive(Debug, Clone)]
pub struct Rows {
    pub table: &'static str,
    pub columns: &'static [&'static str],
    pub(crate) rows: Vec<Vec<V>>,
}

impl Rows {
    fn new(table: &'static str, columns: &'static [&'static str]) -> Rows {
        Rows {
            table,
            columns,
            rows: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

const BOOKING_COLS: &[&str] = &["projection", "booking_key", "event_id"];
const TXN_COLS: &[&str] = &[
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
];
const ENTRY_COLS: &[&str] = &[
    "transaction_id",
    "line",
    "account",
    "currency",
    "amount_minor",
    "occurred_at",
    "seq",
];
const APPLIED_COLS: &[&str] = &[
    "projection",
    "event_id",
    "applied_at",
    "topic",
    "kafka_partition",
    "kafka_offset",
    "outcome",
    "error_kind",
    "reason",
];
const ORDER_COLS: &[&str] = &[
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
];
const TOTAL_COLS: &[&str] = &[
    "projection",
    "party_id",
    "client_id",
    "kind",
    "currency",
    "total_minor",
];
const PSP_COLS: &[&str] = &[
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
];
const WALLET_COLS: &[&str] = &["client_id", "seller_id", "currency", "balance_minor"];
const BUYER_COLS: &[&str] = &[
    "client_id",
    "buyer_id",
    "currency",
    "paid_minor",
    "refunded_minor",
];

/// How an event id's `applied_events` row stands.
#[derive(Debug, Clone)]
struct Seen {
    applied_at: i64,
    topic: u32,
    partition: i32,
    offset: i64,
    /// `None`: applied; else the stored rejection (kind, reason).
    /// Boxed: rejections are rare, and an entry per event stays small.
    rejected: Option<Box<(String, String)>>,
    /// Its row was handed out already: an applied event's row never
    /// changes again (a later copy is a duplicate), so it is written as it
    /// is decided; a rejected one's may (a redrive moves it), so it waits
    /// for [`Replay::finish`].
    written: bool,
}

fn applied_row(p: &str, id: &uuid::Uuid, s: &Seen, topics: &[String]) -> Vec<V> {
    let (outcome, kind, reason) = match &s.rejected {
        None => ("applied", None, None),
        Some(b) => ("rejected", Some(b.0.clone()), Some(b.1.clone())),
    };
    vec![
        V::T(p.to_owned()),
        V::T(id.to_string()),
        V::I(s.applied_at),
        V::T(topics[s.topic as usize].clone()),
        V::I(i64::from(s.partition)),
        V::I(s.offset),
        V::T(outcome.to_owned()),
        V::N(kind),
        V::N(reason),
    ]
}

/// The in-memory projection a rebuild decides with. See the module docs.
#[derive(Debug)]
pub struct Replay {
    projection: Projection,
    seen: HashMap<uuid::Uuid, Seen>,
    /// Topic names, interned (`Seen::topic` indexes it).
    topics: Vec<String>,
    state: BookState,
    /// Running totals: stored values plus every accepted delta.
    totals: HashMap<TotalKey, i64>,
    /// The keys that have a `projection_totals` row.
    total_rows: HashSet<TotalKey>,
    seq: i64,
    head: String,
    psp: HashMap<String, booking::PspReference>,
    wallets: HashMap<(String, String, String), i64>,
    buyers: HashMap<(String, String, String), (i64, i64)>,
    bookings: Rows,
    /// `applied_events` rows of applied events (see [`Seen::written`]).
    applied: Rows,
    txns: Rows,
    entries: Rows,
}

/// Where [`Replay::apply`] stops: an overflow the totals check should have
/// made impossible (the live path fails the batch in the database then).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ReplayError(String);

impl Replay {
    pub fn new(projection: Projection) -> Replay {
        Replay::with_capacity(projection, 0)
    }

    /// A replay sized for about `events` events (capped at
    /// [`crate::limits::REPLAY_PRESIZED_EVENTS_MAX`]): its maps are
    /// allocated once instead of doubling, and rehashing everything,
    /// whenever they fill (each doubling stalled a rebuild's slice).
    pub fn with_capacity(projection: Projection, events: u64) -> Replay {
        let events = usize::try_from(events)
            .unwrap_or(usize::MAX)
            .min(crate::limits::REPLAY_PRESIZED_EVENTS_MAX);
        // At most one dedup row per event; an order, a booking and a PSP
        // reference take at least two events each (a request, then a
        // capture or a refund).
        let per_payment = events / 2;
        let psp = match projection {
            Projection::Ledger => per_payment,
            Projection::Wallet => 0,
        };
        Replay {
            projection,
            seen: HashMap::with_capacity(events),
            topics: Vec::new(),
            state: BookState {
                orders: HashMap::with_capacity(per_payment),
                bookings: HashSet::with_capacity(per_payment),
            },
            totals: HashMap::new(),
            total_rows: HashSet::new(),
            seq: 0,
            head: crate::apply::GENESIS_HASH.to_owned(),
            psp: HashMap::with_capacity(psp),
            wallets: HashMap::new(),
            buyers: HashMap::new(),
            bookings: Rows::new("projection_bookings", BOOKING_COLS),
            applied: Rows::new("applied_events", APPLIED_COLS),
            txns: Rows::new("ledger_transactions", TXN_COLS),
            entries: Rows::new("ledger_entries", ENTRY_COLS),
        }
    }

    fn topic(&mut self, name: &str) -> u32 {
        match self.topics.iter().position(|t| t == name) {
            Some(i) => u32::try_from(i).expect("few topics"),
            None => {
                self.topics.push(name.to_owned());
                u32::try_from(self.topics.len() - 1).expect("few topics")
            }
        }
    }

    /// Applies one batch as `apply_batch` would at time `now` (µs): one
    /// outcome per event, in order.
    pub fn apply(&mut self, batch: &[Incoming<'_>], now: i64) -> Result<Vec<Outcome>, ReplayError> {
        let mut outcomes = vec![Outcome::Duplicate; batch.len()];
        // 1. First occurrences; new ids are claimed, in any order (the
        //    live path sorts them only for lock order).
        let mut first_seen = HashSet::new();
        let mut fresh: Vec<usize> = Vec::new();
        let mut before: Vec<usize> = Vec::new();
        for (i, inc) in batch.iter().enumerate() {
            // Types never booked: ignored without a row, as apply_batch.
            if !booking::books_by_type(inc.envelope.event_type()) {
                outcomes[i] = Outcome::Ignored;
                continue;
            }
            let id = inc.envelope.event_id.as_uuid();
            if !first_seen.insert(id) {
                continue;
            }
            if self.seen.contains_key(&id) {
                before.push(i);
            } else {
                let topic = self.topic(&inc.meta.topic);
                self.seen.insert(
                    id,
                    Seen {
                        applied_at: now,
                        topic,
                        partition: inc.meta.partition,
                        offset: inc.meta.offset,
                        rejected: None,
                        written: false,
                    },
                );
                fresh.push(i);
            }
        }
        // Seen in an earlier batch: applied stays Duplicate; rejected gets
        // its stored rejection, unless delivered LATER in the same
        // partition (a redrive), which is decided afresh from here.
        for i in before {
            let m = batch[i].meta;
            let topic = self.topic(&m.topic);
            let row = self
                .seen
                .get_mut(&batch[i].envelope.event_id.as_uuid())
                .expect("seen before");
            let Some(rejection) = &row.rejected else {
                continue;
            };
            let (kind, reason) = &**rejection;
            let later = topic == row.topic && m.partition == row.partition && m.offset > row.offset;
            if !later {
                outcomes[i] = Outcome::rejected(kind.clone(), reason.clone());
                continue;
            }
            row.topic = topic;
            row.partition = m.partition;
            row.offset = m.offset;
            row.applied_at = now;
            fresh.push(i);
        }
        fresh.sort_unstable();
        if fresh.is_empty() {
            return Ok(outcomes);
        }

        // 3. Decide in memory, as apply_batch does.
        let mut total_deltas: BTreeMap<TotalKey, i64> = BTreeMap::new();
        let mut booked: Vec<(usize, booking::Booking)> = Vec::new();
        for &i in &fresh {
            let env = batch[i].envelope;
            let outcome = match booking::decide(env, &self.state) {
                Decision::Ignore => Outcome::Ignored,
                Decision::Reject { kind, reason } => Outcome::rejected(kind, reason),
                Decision::Apply(fx) => match fx
                    .bookings
                    .iter()
                    .find_map(|b| booking::check_balanced(&b.entries).err())
                {
                    Some(reason) => Outcome::rejected("unbalanced", reason),
                    None => match within_totals(&fx, &mut self.totals, &mut total_deltas) {
                        Err(reason) => Outcome::rejected("total_overflow", reason),
                        Ok(()) => {
                            self.state.absorb(&fx);
                            booked.extend(fx.bookings.into_iter().map(|b| (i, b)));
                            Outcome::Applied
                        }
                    },
                },
            };
            let id = env.event_id.as_uuid();
            let row = self.seen.get_mut(&id).expect("claimed");
            match &outcome {
                Outcome::Rejected { kind, reason } => {
                    row.rejected = Some(Box::new((kind.clone(), reason.clone())));
                }
                _ => {
                    row.rejected = None;
                    row.written = true;
                    let r = applied_row(self.projection.as_str(), &id, row, &self.topics);
                    self.applied.rows.push(r);
                }
            }
            outcomes[i] = outcome;
        }
        // `within_totals` already folded the accepted deltas into
        // `self.totals` (it is the whole table here); what it does not
        // tell is which rows exist: the live path writes a row for each
        // key whose delta over the batch is not zero.
        for (key, d) in total_deltas {
            if d != 0 {
                self.total_rows.insert(key);
            }
        }

        // 4. Effects.
        let p = self.projection.as_str();
        // The ledger's booking keys live in ledger_transactions (UNIQUE).
        if self.projection == Projection::Wallet {
            for (i, b) in &booked {
                self.bookings.rows.push(vec![
                    V::T(p.to_owned()),
                    V::T(b.key.clone()),
                    V::T(batch[*i].envelope.event_id.to_string()),
                ]);
            }
        }
        match self.projection {
            Projection::Ledger => {
                self.ledger(batch, &booked, now);
                self.psp_references(batch, &fresh, &outcomes);
            }
            Projection::Wallet => self.wallet(&booked)?,
        }
        Ok(outcomes)
    }

    fn ledger(&mut self, batch: &[Incoming<'_>], booked: &[(usize, booking::Booking)], now: i64) {
        for (i, b) in booked {
            self.seq += 1;
            link(
                self.seq,
                &mut self.head,
                batch[*i].envelope,
                b,
                now,
                &mut self.txns.rows,
                &mut self.entries.rows,
            );
        }
    }

    /// `write_psp_references`, one event at a time: within a batch and
    /// against the table a status only moves forward, which is the same
    /// as applying the batch's references in order.
    fn psp_references(&mut self, batch: &[Incoming<'_>], fresh: &[usize], outcomes: &[Outcome]) {
        for &i in fresh {
            if matches!(outcomes[i], Outcome::Rejected { .. }) {
                continue;
            }
            let Some(r) = booking::psp_reference(batch[i].envelope) else {
                continue;
            };
            if booking::ignored_capture(&r, &outcomes[i]) {
                continue;
            }
            match self.psp.get(&r.psp_reference) {
                Some(old) if !booking::psp_status_advances(old.status, r.status) => {}
                _ => {
                    self.psp.insert(r.psp_reference.clone(), r);
                }
            }
        }
    }

    fn wallet(&mut self, booked: &[(usize, booking::Booking)]) -> Result<(), ReplayError> {
        let overflow = || ReplayError("wallet delta overflows i64".into());
        for (_, b) in booked {
            for ((client, seller), m) in b.wallet_deltas() {
                let e = self
                    .wallets
                    .entry((client, seller, m.currency().code().to_owned()))
                    .or_default();
                *e = e.checked_add(m.amount_minor()).ok_or_else(overflow)?;
            }
            if let Some(d) = &b.buyer {
                let e = self
                    .buyers
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
        Ok(())
    }

    /// How many rows [`Replay::take_appends`] would return now.
    pub fn pending_appends(&self) -> usize {
        self.bookings.len() + self.applied.len() + self.txns.len() + self.entries.len()
    }

    /// The rows produced so far that no later event changes (booking keys,
    /// dedup rows of applied events, ledger transactions and entries).
    pub fn take_appends(&mut self) -> Vec<Rows> {
        [
            &mut self.bookings,
            &mut self.applied,
            &mut self.txns,
            &mut self.entries,
        ]
        .into_iter()
        .filter(|r| !r.is_empty())
        .map(|r| Rows {
            table: r.table,
            columns: r.columns,
            rows: std::mem::take(&mut r.rows),
        })
        .collect()
    }

    /// The ledger's chain head (seq, hash) after everything applied.
    pub fn chain_head(&self) -> (i64, &str) {
        (self.seq, &self.head)
    }

    /// Every remaining row: the appends not taken yet, then the final
    /// state of the tables later events update.
    pub fn finish(mut self) -> Finished {
        let mut rows = self.take_appends();
        let p = self.projection.as_str();
        let mut applied = Rows::new("applied_events", APPLIED_COLS);
        for (id, s) in self.seen.iter().filter(|(_, s)| !s.written) {
            applied.rows.push(applied_row(p, id, s, &self.topics));
        }
        rows.push(applied);
        let mut orders = Rows::new("projection_orders", ORDER_COLS);
        for (id, o) in &self.state.orders {
            orders.rows.push(vec![
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
            ]);
        }
        rows.push(orders);
        let mut totals = Rows::new("projection_totals", TOTAL_COLS);
        for k in &self.total_rows {
            totals.rows.push(vec![
                V::T(p.to_owned()),
                V::T(k.party.clone()),
                V::T(k.client.clone()),
                V::T(k.kind.as_str().to_owned()),
                V::T(k.currency.code().to_owned()),
                V::I(self.totals.get(k).copied().unwrap_or(0)),
            ]);
        }
        rows.push(totals);
        let mut psp = Rows::new("ledger_psp_references", PSP_COLS);
        for r in self.psp.into_values() {
            psp.rows.push(vec![
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
            ]);
        }
        let mut wallets = Rows::new("wallet_balances", WALLET_COLS);
        for ((cl, s, c), d) in self.wallets {
            wallets.rows.push(vec![V::T(cl), V::T(s), V::T(c), V::I(d)]);
        }
        let mut buyers = Rows::new("buyer_totals", BUYER_COLS);
        for ((cl, b, c), (paid, refunded)) in self.buyers {
            buyers
                .rows
                .push(vec![V::T(cl), V::T(b), V::T(c), V::I(paid), V::I(refunded)]);
        }
        match self.projection {
            Projection::Ledger => rows.push(psp),
            Projection::Wallet => rows.extend([wallets, buyers]),
        }
        rows.retain(|r| !r.is_empty());
        Finished {
            rows,
            projection: self.projection,
            seq: self.seq,
            head: self.head,
        }
    }
}

/// What [`Replay::finish`] leaves to write.
#[derive(Debug)]
pub struct Finished {
    pub rows: Vec<Rows>,
    projection: Projection,
    seq: i64,
    head: String,
}

/// Writes `rows` into `db` (tables as `projections::migrate` makes them,
/// without the rows): COPY on PostgreSQL, multi-row INSERTs in one
/// transaction on SQLite. Appends only: the tables must not hold rows
/// with the same keys.
pub async fn load(db: &Db, rows: &[Rows]) -> Result<(), sqlx::Error> {
    match db {
        Db::Postgres(p) => {
            let mut conn = p.acquire().await?;
            for r in rows {
                copy_in(&mut conn, r).await?;
            }
            Ok(())
        }
        Db::Sqlite(_) => {
            let mut tx = Tx::begin(db).await?;
            for r in rows {
                insert_many(&mut tx, r.table, r.columns, &r.rows, "", &[]).await?;
            }
            tx.commit().await
        }
    }
}

/// Writes the final rows and the chain head.
pub async fn load_finished(db: &Db, fin: &Finished) -> Result<(), sqlx::Error> {
    load(db, &fin.rows).await?;
    if fin.projection == Projection::Ledger {
        let mut tx = Tx::begin(db).await?;
        tx.exec(
            "UPDATE ledger_chain_head SET seq = $1, hash = $2 WHERE id = 1",
            &[V::I(fin.seq), V::T(fin.head.clone())],
        )
        .await?;
        tx.commit().await?;
    }
    Ok(())
}

async fn copy_in(conn: &mut sqlx::PgConnection, r: &Rows) -> Result<(), sqlx::Error> {
    if r.rows.is_empty() {
        return Ok(());
    }
    let sql = format!("COPY {} ({}) FROM STDIN", r.table, r.columns.join(", "));
    let mut copy = conn.copy_in_raw(&sql).await?;
    let mut buf = String::with_capacity(crate::limits::COPY_MESSAGE_BYTES_MAX + 4096);
    for row in &r.rows {
        for (c, v) in row.iter().enumerate() {
            if c > 0 {
                buf.push('\t');
            }
            match v {
                V::I(i) => buf.push_str(&i.to_string()),
                V::T(s) => escape_copy(&mut buf, s),
                V::N(Some(s)) => escape_copy(&mut buf, s),
                V::N(None) => buf.push_str("\\N"),
                other => panic!("not a column value: {other:?}"),
            }
        }
        buf.push('\n');
        if buf.len() >= crate::limits::COPY_MESSAGE_BYTES_MAX {
            copy.send(buf.as_bytes()).await?;
            buf.clear();
        }
    }
    if !buf.is_empty() {
        copy.send(buf.as_bytes()).await?;
    }
    copy.finish().await?;
    Ok(())
}

/// COPY's text format: backslash, tab, newline and carriage return are
/// escaped; everything else is literal.
fn escape_copy(buf: &mut String, s: &str) {
    for ch in s.chars() {
        match ch {
            '\\' => buf.push_str("\\\\"),
            '\t' => buf.push_str("\\t"),
            '\n' => buf.push_str("\\n"),
            '\r' => buf.push_str("\\r"),
            c => buf.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_escapes_what_its_text_format_needs() {
        let mut b = String::new();
        escape_copy(&mut b, "a\\b\tc\nd\re");
        assert_eq!(b, "a\\\\b\\tc\\nd\\re");
    }
}
