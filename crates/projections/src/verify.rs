//! `paystream ledger verify`: re-checks the money invariants from the
//! tables themselves, in one read transaction.

use crate::apply::{GENESIS_HASH, Projection, canonical_bytes, chain_hash};
use crate::booking::MERCHANT_PAYABLE_PREFIX;
use crate::sql::{Tx, Ty, V};
use serde::Serialize;
use std::collections::BTreeMap;
use storage::Db;

/// Most violations listed per check; the count is always complete.
pub const VIOLATIONS_LISTED_MAX: usize = 50;

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

async fn run(db: &Db) -> Result<VerifyReport, sqlx::Error> {
    let mut tx = Tx::begin(db).await?;
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
        "each wallet balance equals the credit balance of merchant_payable:<seller>",
    );
    let mut ledger: BTreeMap<(String, String), i64> = BTreeMap::new();
    let pattern = format!("{MERCHANT_PAYABLE_PREFIX}%");
    for r in tx
        .rows(
            "SELECT account, currency, CAST(SUM(amount_minor) AS BIGINT) FROM ledger_entries \
             WHERE account LIKE $1 GROUP BY account, currency",
            &[V::T(pattern)],
            &[Ty::T, Ty::T, Ty::I],
        )
        .await?
    {
        let seller = r[0]
            .text()
            .strip_prefix(MERCHANT_PAYABLE_PREFIX)
            .unwrap_or_default()
            .to_owned();
        ledger.insert((seller, r[1].text()), r[2].int().saturating_neg());
    }
    let mut wallet: BTreeMap<(String, String), i64> = BTreeMap::new();
    for r in tx
        .rows(
            "SELECT seller_id, currency, balance_minor FROM wallet_balances",
            &[],
            &[Ty::T, Ty::T, Ty::I],
        )
        .await?
    {
        wallet.insert((r[0].text(), r[1].text()), r[2].int());
    }
    let keys: std::collections::BTreeSet<_> = ledger.keys().chain(wallet.keys()).cloned().collect();
    for k in keys {
        let l = ledger.get(&k).copied().unwrap_or(0);
        let w = wallet.get(&k).copied().unwrap_or(0);
        if l != w {
            wallets.fail(format!("seller {} {}: wallet {w}, ledger {l}", k.0, k.1));
        }
    }

    let mut once = Check::new(
        "events_applied_once",
        "no event id applied twice: one applied_events row per projection and event, one transaction per event and kind, every transaction's event recorded",
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
             ON a.projection = $1 AND a.event_id = t.event_id WHERE a.event_id IS NULL",
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

    let mut chain = Check::new(
        "hash_chain",
        "each transaction's hash is SHA-256(previous hash, its contents), unbroken from genesis to the head",
    );
    verify_chain(&mut tx, &mut chain).await?;
    tx.commit().await?;

    Ok(VerifyReport {
        transactions,
        entries,
        checks: vec![balanced, zero, wallets, once, chain],
        error: None,
    })
}

/// Transactions read per round trip while walking the chain.
const CHAIN_PAGE: i64 = 5000;

async fn verify_chain(tx: &mut Tx, chain: &mut Check) -> Result<(), sqlx::Error> {
    let mut prev = GENESIS_HASH.to_owned();
    let mut expected_seq = 0i64;
    loop {
        let txns = tx
            .rows(
                "SELECT seq, id, event_id, payment_id, kind, occurred_at, booked_at, prev_hash, hash \
                 FROM ledger_transactions WHERE seq > $1 ORDER BY seq LIMIT $2",
                &[V::I(expected_seq), V::I(CHAIN_PAGE)],
                &[Ty::I, Ty::T, Ty::T, Ty::N, Ty::T, Ty::I, Ty::I, Ty::T, Ty::T],
            )
            .await?;
        if txns.is_empty() {
            break;
        }
        let first = txns[0][0].int();
        let last = txns[txns.len() - 1][0].int();
        let mut entries: BTreeMap<i64, Vec<(String, String, i64)>> = BTreeMap::new();
        for r in tx
            .rows(
                "SELECT seq, account, currency, amount_minor FROM ledger_entries \
                 WHERE seq >= $1 AND seq <= $2 ORDER BY seq, line",
                &[V::I(first), V::I(last)],
                &[Ty::I, Ty::T, Ty::T, Ty::I],
            )
            .await?
        {
            entries
                .entry(r[0].int())
                .or_default()
                .push((r[1].text(), r[2].text(), r[3].int()));
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
                entries.get(&seq).map(Vec::as_slice).unwrap_or_default(),
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
