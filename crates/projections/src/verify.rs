//! `paystream ledger verify`: re-checks the money invariants from the
//! tables themselves, in one read transaction.

use crate::apply::{GENESIS_HASH, Projection, canonical_bytes, chain_hash};
use crate::booking::MERCHANT_PAYABLE_PREFIX;
use crate::sql::{Tx, Ty, V, in_clause};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use storage::Db;

/// SQL condition on `account` (of `ledger_entries`) selecting the
/// `merchant_payable:` accounts, exactly and case-sensitively.
const MERCHANT_PAYABLE_MATCH: &str = "substr(account, 1, 17) = 'merchant_payable:'";
const _: () = assert!(MERCHANT_PAYABLE_PREFIX.len() == 17);

pub use crate::limits::VIOLATIONS_LISTED_MAX;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub description: &'static str,
    pub violations: u64,
    /// The first violations, for people.
    pub examples: Vec<String>,
}

impl Check {
    fn new(name: &'static str, description: &'static str) -> Check {
        Check {
            name,
            description,
            violations: 0,
            examples: Vec::new(),
        }
    }
    fn fail(&mut self, what: String) {
        self.violations += 1;
        if self.examples.len() < VIOLATIONS_LISTED_MAX {
            self.examples.push(what);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub transactions: i64,
    pub entries: i64,
    pub checks: Vec<Check>,
    /// Set when the database could not be read; the report is then not ok.
    pub error: Option<String>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.error.is_none() && self.checks.iter().all(|c| c.violations == 0)
    }
}

impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "ledger verify: {} transactions, {} entries",
            self.transactions, self.entries
        )?;
        if let Some(e) = &self.error {
            writeln!(f, "  ERROR  cannot read the database: {e}")?;
        }
        for c in &self.checks {
            let status = if c.violations == 0 {
                "ok    "
            } else {
                "FAILED"
            };
            writeln!(f, "  {status} {:<24} {}", c.name, c.description)?;
            for e in &c.examples {
                writeln!(f, "           - {e}")?;
            }
            if c.violations > c.examples.len() as u64 {
                writeln!(
                    f,
                    "           ... and {} more",
                    c.violations - c.examples.len() as u64
                )?;
            }
        }
        writeln!(
            f,
            "result: {}",
            if self.is_ok() {
                "OK"
            } else {
                "VIOLATIONS FOUND"
            }
        )
    }
}

/// Checks every invariant; never fails, reports instead.
pub async fn verify(db: &Db) -> VerifyReport {
    match run(db).await {
        Ok(r) => r,
        Err(e) => VerifyReport {
            transactions: 0,
            entries: 0,
            checks: Vec::new(),
            error: Some(e.to_string()),
        },
    }
}

/// Opens the read transaction every check runs in: one snapshot.
async fn begin_snapshot(db: &Db) -> Result<Tx, sqlx::Error> {
    let mut tx = Tx::begin_read(db).await?;
    if tx.is_postgres() {
        // It must be the transaction's first statement. Under the default
        // READ COMMITTED each statement sees newer commits, so a running
        // projection would show up as false sum and hash-chain violations.
        // SQLite's read transaction is one snapshot already (WAL: from its
        // first read on).
        tx.exec(
            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
            &[],
        )
        .await?;
    }
    Ok(tx)
}

async fn run(db: &Db) -> Result<VerifyReport, sqlx::Error> {
    let mut tx = begin_snapshot(db).await?;
    let count = |r: Vec<Vec<V>>| r[0][0].int();
    let transactions = count(
        tx.rows("SELECT COUNT(*) FROM ledger_transactions", &[], &[Ty::I])
            .await?,
    );
    let entries = count(
        tx.rows("SELECT COUNT(*) FROM ledger_entries", &[], &[Ty::I])
            .await?,
    );

    let mut balanced = Check::new(
        "transactions_balance",
        "every transaction's entries sum to zero per currency",
    );
    for r in tx
        .rows(
            "SELECT transaction_id, currency, CAST(SUM(amount_minor) AS BIGINT) FROM ledger_entries \
             GROUP BY transaction_id, currency HAVING SUM(amount_minor) <> 0 ORDER BY transaction_id",
            &[],
            &[Ty::T, Ty::T, Ty::I],
        )
        .await?
    {
        balanced.fail(format!(
            "transaction {} sums to {} {}",
            r[0].text(),
            r[2].int(),
            r[1].text()
        ));
    }

    let mut zero = Check::new(
        "ledger_sums_to_zero",
        "all entries together sum to zero per currency",
    );
    for r in tx
        .rows(
            "SELECT currency, CAST(SUM(amount_minor) AS BIGINT) FROM ledger_entries \
             GROUP BY currency HAVING SUM(amount_minor) <> 0 ORDER BY currency",
            &[],
            &[Ty::T, Ty::I],
        )
        .await?
    {
        zero.fail(format!("{} sums to {}", r[0].text(), r[1].int()));
    }

    let mut wallets = Check::new(
        "wallets_match_ledger",
        "each wallet balance equals the credit balance of merchant_payable:<client>/<seller>",
    );
    let mut ledger: BTreeMap<(String, String), i64> = BTreeMap::new();
    // Not LIKE: it is case-insensitive on SQLite and `_` is a wildcard.
    for r in tx
        .rows(
            &format!(
                "SELECT account, currency, CAST(SUM(amount_minor) AS BIGINT) FROM ledger_entries \
                 WHERE {MERCHANT_PAYABLE_MATCH} GROUP BY account, currency"
            ),
            &[],
            &[Ty::T, Ty::T, Ty::I],
        )
        .await?
    {
        ledger.insert((r[0].text(), r[1].text()), r[2].int().saturating_neg());
    }
    let mut wallet: BTreeMap<(String, String), i64> = BTreeMap::new();
    for r in tx
        .rows(
            "SELECT client_id, seller_id, currency, balance_minor FROM wallet_balances",
            &[],
            &[Ty::T, Ty::T, Ty::T, Ty::I],
        )
        .await?
    {
        // Keyed by the account the wallet mirrors: client and seller.
        wallet.insert(
            (
                crate::booking::merchant_payable(&r[0].text(), &r[1].text()),
                r[2].text(),
            ),
            r[3].int(),
        );
    }
    let keys: std::collections::BTreeSet<_> = ledger.keys().chain(wallet.keys()).cloned().collect();
    for k in keys {
        let l = ledger.get(&k).copied().unwrap_or(0);
        let w = wallet.get(&k).copied().unwrap_or(0);
        if l != w {
            wallets.fail(format!("{} {}: wallet {w}, ledger {l}", k.0, k.1));
        }
    }

    // The running totals the overflow check relies on (projection_totals)
    // must equal what they stand for, per projection: the ledger's seller
    // totals its merchant accounts, the wallet's its wallets and buyer
    // totals. Each projection against its own tables, so lag between the
    // two groups is no violation.
    let mut totals = Check::new(
        "totals_match",
        "each projection's running totals equal its own sums: the ledger's seller totals its merchant_payable accounts, the wallet's seller totals its wallets and its buyer totals buyer_totals",
    );
    let mut stored: BTreeMap<(String, String, String), i64> = BTreeMap::new();
    for r in tx
        .rows(
            "SELECT projection, kind, client_id, party_id, currency, total_minor FROM projection_totals",
            &[],
            &[Ty::T, Ty::T, Ty::T, Ty::T, Ty::T, Ty::I],
        )
        .await?
    {
        let (projection, kind) = (r[0].text(), r[1].text());
        let seller = kind == crate::booking::TotalKind::SellerBalance.as_str();
        // The ledger keeps no buyer tables to compare its buyer totals with
        // (they are checked against the wallet's, which decide alike).
        if projection == Projection::Ledger.as_str() && !seller {
            continue;
        }
        let name = if seller {
            crate::booking::merchant_payable(&r[2].text(), &r[3].text())
        } else {
            format!("{kind} of {}/{}", r[2].text(), r[3].text())
        };
        stored.insert((projection, name, r[4].text()), r[5].int());
    }
    let mut sums: BTreeMap<(String, String, String), i64> = BTreeMap::new();
    for ((account, currency), v) in &ledger {
        sums.insert(("ledger".into(), account.clone(), currency.clone()), *v);
    }
    for ((account, currency), v) in &wallet {
        sums.insert(("wallet".into(), account.clone(), currency.clone()), *v);
    }
    for r in tx
        .rows(
            "SELECT client_id, buyer_id, currency, paid_minor, refunded_minor FROM buyer_totals",
            &[],
            &[Ty::T, Ty::T, Ty::T, Ty::I, Ty::I],
        )
        .await?
    {
        for (kind, v) in [("buyer_paid", r[3].int()), ("buyer_refunded", r[4].int())] {
            let name = format!("{kind} of {}/{}", r[0].text(), r[1].text());
            sums.insert(("wallet".into(), name, r[2].text()), v);
        }
    }
    let keys: std::collections::BTreeSet<_> = stored.keys().chain(sums.keys()).cloned().collect();
    for k in keys {
        let (t, v) = (
            stored.get(&k).copied().unwrap_or(0),
            sums.get(&k).copied().unwrap_or(0),
        );
        if t != v {
            totals.fail(format!("{} {} {}: total {t}, sum {v}", k.0, k.1, k.2));
        }
    }

    let mut once = Check::new(
        "events_applied_once",
        "no event id applied twice: one applied_events row per projection and event, one transaction per event and kind, every transaction's event recorded as applied, one capture booking per captured order matching it, refunds within captures",
    );
    for r in tx
        .rows(
            "SELECT projection, event_id, COUNT(*) FROM applied_events GROUP BY projection, event_id HAVING COUNT(*) > 1",
            &[],
            &[Ty::T, Ty::T, Ty::I],
        )
        .await?
    {
        once.fail(format!(
            "{} applied event {} {} times",
            r[0].text(),
            r[1].text(),
            r[2].int()
        ));
    }
    for r in tx
        .rows(
            "SELECT event_id, kind, COUNT(*) FROM ledger_transactions GROUP BY event_id, kind HAVING COUNT(*) > 1",
            &[],
            &[Ty::T, Ty::T, Ty::I],
        )
        .await?
    {
        once.fail(format!(
            "event {} booked {} {} times",
            r[0].text(),
            r[1].text(),
            r[2].int()
        ));
    }
    for r in tx
        .rows(
            "SELECT t.id, t.event_id FROM ledger_transactions t LEFT JOIN applied_events a \
             ON a.projection = $1 AND a.event_id = t.event_id AND a.outcome = 'applied' \
             WHERE a.event_id IS NULL",
            &[V::T(Projection::Ledger.as_str().to_owned())],
            &[Ty::T, Ty::T],
        )
        .await?
    {
        once.fail(format!(
            "transaction {} books event {} which the ledger never recorded as applied",
            r[0].text(),
            r[1].text()
        ));
    }

    // From the ledger's own entries: per payment and seller, refunds never
    // exceed captures.
    for r in tx
        .rows(
            "SELECT COALESCE(t.payment_id, '-'), e.account, e.currency, \
             CAST(SUM(CASE WHEN t.kind = 'capture' THEN e.amount_minor ELSE 0 END) AS BIGINT), \
             CAST(SUM(CASE WHEN t.kind = 'refund' THEN e.amount_minor ELSE 0 END) AS BIGINT) \
             FROM ledger_transactions t JOIN ledger_entries e ON e.transaction_id = t.id \
             WHERE substr(e.account, 1, 17) = 'merchant_payable:' \
             GROUP BY t.payment_id, e.account, e.currency",
            &[],
            &[Ty::T, Ty::T, Ty::T, Ty::I, Ty::I],
        )
        .await?
    {
        let (captured, refunded) = (r[3].int().saturating_neg(), r[4].int());
        if refunded > captured {
            once.fail(format!(
                "payment {} refunds {refunded} {} to {} but captured only {captured}",
                r[0].text(),
                r[2].text(),
                r[1].text()
            ));
        }
    }
    // Each order the ledger captured has exactly its capture booking, for
    // what the order records; refunds stay within the capture.
    for r in tx
        .rows(
            "SELECT o.order_id, o.captured_minor, o.refunded_minor, COUNT(DISTINCT t.id), \
             CAST(COALESCE(SUM(e.amount_minor), 0) AS BIGINT) \
             FROM projection_orders o \
             LEFT JOIN ledger_transactions t ON t.booking_key = 'capture:' || o.order_id \
             LEFT JOIN ledger_entries e ON e.transaction_id = t.id \
                 AND substr(e.account, 1, 17) = 'merchant_payable:' \
             WHERE o.projection = $1 \
             GROUP BY o.order_id, o.captured_minor, o.refunded_minor",
            &[V::T(Projection::Ledger.as_str().to_owned())],
            &[Ty::T, Ty::I, Ty::I, Ty::I, Ty::I],
        )
        .await?
    {
        let (order, captured, refunded) = (r[0].text(), r[1].int(), r[2].int());
        let (bookings, credit) = (r[3].int(), r[4].int().saturating_neg());
        let expected_bookings = i64::from(captured > 0);
        if bookings != expected_bookings || credit != captured {
            once.fail(format!(
                "order {order}: captured {captured}, but the ledger has {bookings} capture booking(s) crediting {credit}"
            ));
        }
        if refunded > captured {
            once.fail(format!(
                "order {order}: refunded {refunded} above the captured {captured}"
            ));
        }
    }

    let mut chain = Check::new(
        "hash_chain",
        "each transaction's hash is SHA-256(previous hash, its contents), unbroken from genesis to the head",
    );
    verify_chain(&mut tx, &mut chain, entries).await?;
    tx.commit().await?;

    Ok(VerifyReport {
        transactions,
        entries,
        checks: vec![balanced, zero, wallets, totals, once, chain],
        error: None,
    })
}

async fn verify_chain(
    tx: &mut Tx,
    chain: &mut Check,
    entries_total: i64,
) -> Result<(), sqlx::Error> {
    let mut prev = GENESIS_HASH.to_owned();
    let mut expected_seq = 0i64;
    // Entries of the transactions the chain covers; every entry must be one.
    let mut covered = 0i64;
    loop {
        let txns = tx
            .rows(
                "SELECT seq, id, event_id, payment_id, kind, occurred_at, booked_at, prev_hash, hash \
                 FROM ledger_transactions WHERE seq > $1 ORDER BY seq LIMIT $2",
                &[V::I(expected_seq), V::I(crate::limits::CHAIN_PAGE_ROWS_MAX)],
                &[Ty::I, Ty::T, Ty::T, Ty::N, Ty::T, Ty::I, Ty::I, Ty::T, Ty::T],
            )
            .await?;
        if txns.is_empty() {
            break;
        }
        // By transaction id, not by seq range: an entry inserted with a seq
        // no transaction has would otherwise escape the hashes.
        let ids: Vec<String> = txns.iter().map(|t| t[1].text()).collect();
        let mut entries: HashMap<String, Vec<(String, String, i64)>> = HashMap::new();
        for chunk in ids.chunks(crate::limits::ROWS_PER_STATEMENT_MAX) {
            let (clause, list) = in_clause(tx, "e.transaction_id", chunk, 1);
            let sql = format!(
                "SELECT e.transaction_id, e.seq, t.seq, e.line, e.account, e.currency, e.amount_minor \
                 FROM ledger_entries e JOIN ledger_transactions t ON t.id = e.transaction_id \
                 WHERE {clause} ORDER BY e.transaction_id, e.line"
            );
            for r in tx
                .rows(
                    &sql,
                    &list,
                    &[Ty::T, Ty::I, Ty::I, Ty::I, Ty::T, Ty::T, Ty::I],
                )
                .await?
            {
                covered += 1;
                if r[1].int() != r[2].int() {
                    chain.fail(format!(
                        "entry {} line {} has seq {}, but its transaction is #{}",
                        r[0].text(),
                        r[3].int(),
                        r[1].int(),
                        r[2].int()
                    ));
                }
                entries.entry(r[0].text()).or_default().push((
                    r[4].text(),
                    r[5].text(),
                    r[6].int(),
                ));
            }
        }
        for t in &txns {
            let seq = t[0].int();
            expected_seq += 1;
            if seq != expected_seq {
                chain.fail(format!(
                    "chain position {expected_seq} is missing (next is {seq})"
                ));
                expected_seq = seq;
            }
            let id = t[1].text();
            let stored_prev = t[7].text();
            if stored_prev != prev {
                chain.fail(format!(
                    "transaction {id} (#{seq}) does not link to its predecessor"
                ));
            }
            let bytes = canonical_bytes(
                seq,
                &id,
                &t[2].text(),
                t[3].opt_text().as_deref(),
                &t[4].text(),
                t[5].int(),
                t[6].int(),
                entries.get(&id).map(Vec::as_slice).unwrap_or_default(),
            );
            let hash = chain_hash(&stored_prev, &bytes);
            if hash != t[8].text() {
                chain.fail(format!(
                    "transaction {id} (#{seq}) was altered: its hash does not match its contents"
                ));
            }
            prev = t[8].text();
        }
    }
    if covered != entries_total {
        chain.fail(format!(
            "{} entries belong to no hashed transaction ({entries_total} entries, {covered} covered by the chain)",
            entries_total - covered
        ));
    }
    let head = tx
        .rows(
            "SELECT seq, hash FROM ledger_chain_head WHERE id = 1",
            &[],
            &[Ty::I, Ty::T],
        )
        .await?;
    match head.first() {
        Some(h) if h[0].int() == expected_seq && h[1].text() == prev => {}
        _ => chain.fail(format!(
            "the chain head does not point at the last transaction (#{expected_seq})"
        )),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::{Incoming, apply_batch};

    /// Commits made while verify reads must stay invisible to it.
    async fn sees_one_snapshot(db: Db) {
        crate::migrate(&db).await.unwrap();
        let evs = events::samples::one_of_each(
            "c1",
            "snapshot",
            events::Timestamp::from_micros(1_700_000_000_000_000),
        );
        let meta = streaming::MessageMeta {
            topic: "test".into(),
            partition: 0,
            offset: 0,
            timestamp_ms: None,
        };
        let count = "SELECT COUNT(*) FROM ledger_entries";
        let mut tx = begin_snapshot(&db).await.unwrap();
        let before = tx.rows(count, &[], &[Ty::I]).await.unwrap()[0][0].int();
        assert_eq!(before, 0);
        // A projection commits meanwhile (through the pool, another
        // connection).
        let inc: Vec<Incoming<'_>> = evs
            .iter()
            .map(|envelope| Incoming {
                envelope,
                meta: &meta,
            })
            .collect();
        apply_batch(&db, crate::Projection::Ledger, &inc)
            .await
            .unwrap();
        let after = tx.rows(count, &[], &[Ty::I]).await.unwrap()[0][0].int();
        assert_eq!(after, before, "verify saw a commit made after it began");
        tx.commit().await.unwrap();
        let mut fresh = begin_snapshot(&db).await.unwrap();
        assert!(fresh.rows(count, &[], &[Ty::I]).await.unwrap()[0][0].int() > 0);
        fresh.commit().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_snapshot_postgres() {
        sees_one_snapshot(testkit::fresh_postgres().await.unwrap()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_snapshot_sqlite() {
        let (db, _dir) = testkit::fresh_sqlite().await.unwrap();
        sees_one_snapshot(db).await;
    }
}
