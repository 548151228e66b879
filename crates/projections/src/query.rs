//! Read side: balances (now and as of an instant), a payment's entries, an
//! account's history, wallets. As-of queries use the events' `occurred_at`.

use crate::sql::{Tx, Ty, V};
use serde::Serialize;
use storage::Db;

pub use crate::limits::HISTORY_LIMIT_MAX;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Balance {
    pub currency: String,
    /// Signed: debit balance positive, credit balance negative.
    pub balance_minor: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccountBalance {
    pub account: String,
    /// Microseconds since the epoch the balance is as of, if not "now".
    pub as_of_micros: Option<i64>,
    pub balances: Vec<Balance>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EntryRow {
    pub seq: i64,
    pub transaction_id: String,
    pub kind: String,
    pub event_id: String,
    pub payment_id: Option<String>,
    pub occurred_at: String,
    pub line: i64,
    pub account: String,
    pub currency: String,
    pub amount_minor: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryPage {
    pub account: String,
    pub entries: Vec<EntryRow>,
    /// Pass as `after` to get the next page; `None` when this is the last.
    pub next_after: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WalletBalance {
    pub currency: String,
    /// What we owe the seller, in minor units.
    pub balance_minor: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Wallet {
    /// The client whose seller it is (sellers are scoped by client).
    pub client_id: String,
    pub seller_id: String,
    pub balances: Vec<WalletBalance>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BuyerTotal {
    pub currency: String,
    pub paid_minor: i64,
    pub refunded_minor: i64,
}

fn rfc3339(micros: i64) -> String {
    events::Timestamp::from_micros(micros).to_string()
}

/// An account's balance per currency, over entries that occurred at or
/// before `as_of_micros` (all entries when `None`).
pub async fn account_balance(
    db: &Db,
    account: &str,
    as_of_micros: Option<i64>,
) -> Result<AccountBalance, sqlx::Error> {
    let mut tx = Tx::begin_read(db).await?;
    let rows = tx
        .rows(
            "SELECT currency, CAST(SUM(amount_minor) AS BIGINT) FROM ledger_entries \
             WHERE account = $1 AND occurred_at <= $2 GROUP BY currency ORDER BY currency",
            &[
                V::T(account.to_owned()),
                V::I(as_of_micros.unwrap_or(i64::MAX)),
            ],
            &[Ty::T, Ty::I],
        )
        .await?;
    tx.commit().await?;
    Ok(AccountBalance {
        account: account.to_owned(),
        as_of_micros,
        balances: rows
            .into_iter()
            .map(|r| Balance {
                currency: r[0].text(),
                balance_minor: r[1].int(),
            })
            .collect(),
    })
}

const ENTRY_COLUMNS: &str = "t.seq, t.id, t.kind, t.event_id, t.payment_id, t.occurred_at, e.line, e.account, e.currency, e.amount_minor";
const ENTRY_TYPES: [Ty; 10] = [
    Ty::I,
    Ty::T,
    Ty::T,
    Ty::T,
    Ty::N,
    Ty::I,
    Ty::I,
    Ty::T,
    Ty::T,
    Ty::I,
];

fn entry_row(r: &[V]) -> EntryRow {
    EntryRow {
        seq: r[0].int(),
        transaction_id: r[1].text(),
        kind: r[2].text(),
        event_id: r[3].text(),
        payment_id: r[4].opt_text(),
        occurred_at: rfc3339(r[5].int()),
        line: r[6].int(),
        account: r[7].text(),
        currency: r[8].text(),
        amount_minor: r[9].int(),
    }
}

/// Every entry booked for a payment, in booking order.
pub async fn payment_entries(db: &Db, payment_id: &str) -> Result<Vec<EntryRow>, sqlx::Error> {
    let mut tx = Tx::begin_read(db).await?;
    let sql = format!(
        "SELECT {ENTRY_COLUMNS} FROM ledger_transactions t JOIN ledger_entries e ON e.transaction_id = t.id \
         WHERE t.payment_id = $1 ORDER BY t.seq, e.line"
    );
    let rows = tx
        .rows(&sql, &[V::T(payment_id.to_owned())], &ENTRY_TYPES)
        .await?;
    tx.commit().await?;
    Ok(rows.iter().map(|r| entry_row(r)).collect())
}

/// One page of an account's entries in booking order, after chain
/// position `after` (exclusive).
pub async fn account_history(
    db: &Db,
    account: &str,
    after: Option<i64>,
    limit: i64,
) -> Result<HistoryPage, sqlx::Error> {
    let limit = limit.clamp(1, HISTORY_LIMIT_MAX);
    let mut tx = Tx::begin_read(db).await?;
    let sql = format!(
        "SELECT {ENTRY_COLUMNS} FROM ledger_entries e JOIN ledger_transactions t ON t.id = e.transaction_id \
         WHERE e.account = $1 AND e.seq > $2 ORDER BY e.seq, e.line LIMIT $3"
    );
    let rows = tx
        .rows(
            &sql,
            &[
                V::T(account.to_owned()),
                V::I(after.unwrap_or(0)),
                V::I(limit.saturating_add(1)),
            ],
            &ENTRY_TYPES,
        )
        .await?;
    tx.commit().await?;
    let mut entries: Vec<EntryRow> = rows.iter().map(|r| entry_row(r)).collect();
    let more = i64::try_from(entries.len()).unwrap_or(i64::MAX) > limit;
    entries.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let next_after = if more {
        entries.last().map(|e| e.seq)
    } else {
        None
    };
    Ok(HistoryPage {
        account: account.to_owned(),
        entries,
        next_after,
    })
}

/// A client's seller's wallet: balance per currency. Client `""` reads
/// what was booked before sellers were scoped by client (migration 3004).
pub async fn wallet(db: &Db, client_id: &str, seller_id: &str) -> Result<Wallet, sqlx::Error> {
    let mut tx = Tx::begin_read(db).await?;
    let rows = tx
        .rows(
            "SELECT currency, balance_minor FROM wallet_balances WHERE client_id = $1 AND seller_id = $2 ORDER BY currency",
            &[V::T(client_id.to_owned()), V::T(seller_id.to_owned())],
            &[Ty::T, Ty::I],
        )
        .await?;
    tx.commit().await?;
    Ok(Wallet {
        client_id: client_id.to_owned(),
        seller_id: seller_id.to_owned(),
        balances: rows
            .into_iter()
            .map(|r| WalletBalance {
                currency: r[0].text(),
                balance_minor: r[1].int(),
            })
            .collect(),
    })
}

/// What a client's buyer paid and got refunded, per currency.
pub async fn buyer_totals(
    db: &Db,
    client_id: &str,
    buyer_id: &str,
) -> Result<Vec<BuyerTotal>, sqlx::Error> {
    let mut tx = Tx::begin_read(db).await?;
    let rows = tx
        .rows(
            "SELECT currency, paid_minor, refunded_minor FROM buyer_totals WHERE client_id = $1 AND buyer_id = $2 ORDER BY currency",
            &[V::T(client_id.to_owned()), V::T(buyer_id.to_owned())],
            &[Ty::T, Ty::I, Ty::I],
        )
        .await?;
    tx.commit().await?;
    Ok(rows
        .into_iter()
        .map(|r| BuyerTotal {
            currency: r[0].text(),
            paid_minor: r[1].int(),
            refunded_minor: r[2].int(),
        })
        .collect())
}

/// The client that requested a payment, as the ledger projection learnt it
/// from its `PaymentRequested` (`None`: the ledger does not know the
/// payment; `Some("")`: learnt before orders recorded their client).
pub async fn payment_client(db: &Db, payment_id: &str) -> Result<Option<String>, sqlx::Error> {
    let mut tx = Tx::begin_read(db).await?;
    let rows = tx
        .rows(
            "SELECT client_id FROM projection_orders WHERE projection = 'ledger' AND payment_id = $1 LIMIT 1",
            &[V::T(payment_id.to_owned())],
            &[Ty::T],
        )
        .await?;
    tx.commit().await?;
    Ok(rows.first().map(|r| r[0].text()))
}
