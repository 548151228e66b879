//! The chart of accounts and what each event books: pure functions, no I/O.
//!
//! Both projections run the very same [`decide`] on the very same events,
//! so the wallet and the ledger cannot disagree about which refund was
//! accepted or which capture counted; the ledger writes the entries, the
//! wallet only the `merchant_payable` and buyer effects.
//!
//! Amounts are signed: debit positive, credit negative, so every
//! transaction sums to zero per currency and so does the whole ledger.

use events::{Currency, Envelope, Event, Money};
use std::collections::{BTreeMap, HashMap, HashSet};

/// What the PSP owes us: captured money not yet paid out (asset).
pub const PSP_RECEIVABLE: &str = "psp_receivable";
/// Fees the PSP charged on captures (expense).
pub const PSP_FEES: &str = "psp_fees";
/// What we owe a seller of a client (liability):
/// `merchant_payable:<client>/<seller>`. Sellers are scoped by client
/// (issue 12, M2): two clients' seller `s1` are two accounts.
pub const MERCHANT_PAYABLE_PREFIX: &str = "merchant_payable:";
/// Differences accepted in reconciliation (gain/loss).
pub const RECONCILIATION_ADJUSTMENTS: &str = "reconciliation_adjustments";

/// Separates client and seller in a merchant account. Ids never contain
/// it (`[A-Za-z0-9._:-]`), so the split is unambiguous.
pub const CLIENT_SEPARATOR: char = '/';

/// The seller's account. `client` is empty only for orders booked before
/// sellers were scoped by client (migration 3004): those keep their
/// unscoped account `merchant_payable:<seller>` until a rebuild.
pub fn merchant_payable(client: &str, seller: &str) -> String {
    if client.is_empty() {
        format!("{MERCHANT_PAYABLE_PREFIX}{seller}")
    } else {
        format!("{MERCHANT_PAYABLE_PREFIX}{client}{CLIENT_SEPARATOR}{seller}")
    }
}

/// (client, seller) of a `merchant_payable` account; the client is empty
/// for an unscoped (pre-3004) account. `None` for other accounts.
pub fn merchant_of(account: &str) -> Option<(&str, &str)> {
    let rest = account.strip_prefix(MERCHANT_PAYABLE_PREFIX)?;
    let (client, seller) = rest.split_once(CLIENT_SEPARATOR).unwrap_or(("", rest));
    (!seller.is_empty()
        && !seller.contains(CLIENT_SEPARATOR)
        && client.is_empty() != rest.contains(CLIENT_SEPARATOR))
    .then_some((client, seller))
}

/// True for the account names the chart defines.
pub fn is_known_account(account: &str) -> bool {
    matches!(
        account,
        PSP_RECEIVABLE | PSP_FEES | RECONCILIATION_ADJUSTMENTS
    ) || merchant_of(account).is_some()
}

/// Which business fact a ledger transaction records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BookingKind {
    Capture,
    Refund,
    Adjustment,
}

impl BookingKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            BookingKind::Capture => "capture",
            BookingKind::Refund => "refund",
            BookingKind::Adjustment => "adjustment",
        }
    }
}

/// One leg of a transaction: signed minor units (debit > 0, credit < 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub account: String,
    pub amount: Money,
}

/// One ledger transaction to be written, plus its wallet effects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Booking {
    /// Unique per business fact: `capture:<order>`, `refund:<refund>`,
    /// `adjustment:<discrepancy>`.
    pub key: String,
    pub kind: BookingKind,
    pub entries: Vec<Entry>,
    /// Buyer whose totals change.
    pub buyer: Option<BuyerDelta>,
}

/// What one booking changes in a buyer's totals (wallet projection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuyerDelta {
    /// The client whose buyer it is (empty for pre-3004 orders).
    pub client: String,
    pub buyer: String,
    pub paid: Money,
    pub refunded: Money,
}

impl Booking {
    /// Builds a booking and asserts it balances: an unbalanced booking from
    /// this module is a bug, never an input error (inputs are rejected
    /// before entries are built).
    fn new(
        key: String,
        kind: BookingKind,
        entries: Vec<Entry>,
        buyer: Option<BuyerDelta>,
    ) -> Booking {
        let b = Booking {
            key,
            kind,
            entries,
            buyer,
        };
        assert!(
            check_balanced(&b.entries).is_ok(),
            "built an unbalanced booking: {b:?}"
        );
        b
    }

    /// A booking as given, without the balance assertion: for testing the
    /// write-side check.
    #[doc(hidden)]
    pub fn unchecked(key: String, kind: BookingKind, entries: Vec<Entry>) -> Booking {
        Booking {
            key,
            kind,
            entries,
            buyer: None,
        }
    }

    /// Changes to `merchant_payable:*` as wallet deltas ((client, seller),
    /// credit balance: what we owe the seller).
    pub fn wallet_deltas(&self) -> Vec<((String, String), Money)> {
        self.entries
            .iter()
            .filter_map(|e| {
                let (client, seller) = merchant_of(&e.account)?;
                // Credit balance = -(signed sum); amounts came from checked
                // arithmetic, and i64::MIN is rejected before building.
                let m = e.amount.checked_neg().ok()?;
                Some(((client.to_owned(), seller.to_owned()), m))
            })
            .collect()
    }

    /// Every running total this booking changes, with its delta: the
    /// seller's balance and the buyer's paid and refunded totals. Both
    /// projections keep these (`projection_totals`) and refuse an event
    /// that would take one beyond [`TOTAL_MINOR_MAX`], so the ledger and
    /// the wallet decide alike and a sum never overflows in the database.
    pub fn total_deltas(&self) -> Vec<(TotalKey, i64)> {
        let mut v: Vec<(TotalKey, i64)> = self
            .wallet_deltas()
            .into_iter()
            .map(|((client, seller), m)| {
                (
                    TotalKey {
                        kind: TotalKind::SellerBalance,
                        client,
                        party: seller,
                        currency: m.currency(),
                    },
                    m.amount_minor(),
                )
            })
            .collect();
        if let Some(b) = &self.buyer {
            for (kind, m) in [
                (TotalKind::BuyerPaid, b.paid),
                (TotalKind::BuyerRefunded, b.refunded),
            ] {
                if !m.is_zero() {
                    v.push((
                        TotalKey {
                            kind,
                            client: b.client.clone(),
                            party: b.buyer.clone(),
                            currency: m.currency(),
                        },
                        m.amount_minor(),
                    ));
                }
            }
        }
        v
    }
}

/// Checks that entries are non-empty, non-zero, of known accounts, and sum
/// to zero per currency. Run where bookings are built (as an assertion) and
/// again where they are written (as a rejection).
pub fn check_balanced(entries: &[Entry]) -> Result<(), String> {
    if entries.len() < 2 {
        return Err(format!(
            "a transaction needs at least two entries, got {}",
            entries.len()
        ));
    }
    let mut sums: BTreeMap<Currency, i128> = BTreeMap::new();
    for e in entries {
        if !is_known_account(&e.account) {
            return Err(format!("unknown account {:?}", e.account));
        }
        if e.amount.is_zero() {
            return Err(format!("zero entry on {}", e.account));
        }
        *sums.entry(e.amount.currency()).or_default() += i128::from(e.amount.amount_minor());
    }
    match sums.iter().find(|(_, s)| **s != 0) {
        Some((c, s)) => Err(format!(
            "entries do not balance: {c} sums to {s} minor units"
        )),
        None => Ok(()),
    }
}

/// Which running total a [`TotalKey`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TotalKind {
    /// What we owe the seller (= its wallet balance).
    SellerBalance,
    /// What the buyer paid (captures).
    BuyerPaid,
    /// What the buyer got back (refunds).
    BuyerRefunded,
}

impl TotalKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            TotalKind::SellerBalance => "seller_balance",
            TotalKind::BuyerPaid => "buyer_paid",
            TotalKind::BuyerRefunded => "buyer_refunded",
        }
    }

    pub fn parse(s: &str) -> Option<TotalKind> {
        [
            TotalKind::SellerBalance,
            TotalKind::BuyerPaid,
            TotalKind::BuyerRefunded,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// One running total: a seller's balance or a buyer's paid / refunded
/// total, per client and currency.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TotalKey {
    pub kind: TotalKind,
    pub client: String,
    /// Seller or buyer id.
    pub party: String,
    pub currency: Currency,
}

/// The old name of [`AMOUNT_MINOR_MAX`], which tests and reconcile use.
pub use crate::limits::AMOUNT_MINOR_MAX as MAX_AMOUNT_MINOR;
pub use crate::limits::{AMOUNT_MINOR_MAX, PSP_REFERENCE_LEN_MAX, TOTAL_MINOR_MAX};

/// An order as the projection knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderState {
    /// The client that requested the payment (empty for orders learnt
    /// before migration 3004).
    pub client_id: String,
    pub payment_id: String,
    pub buyer_id: String,
    pub seller_id: String,
    pub currency: Currency,
    pub amount_minor: i64,
    pub captured_minor: i64,
    pub refunded_minor: i64,
}

/// What a projection knows that decides the next event: orders and the
/// booking keys already used.
#[derive(Debug, Default, Clone)]
pub struct BookState {
    pub orders: HashMap<String, OrderState>,
    pub bookings: HashSet<String>,
}

/// Changes one event makes, applied to the state only if it passes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effects {
    /// Orders created or updated (full new state).
    pub orders: Vec<(String, OrderState)>,
    pub bookings: Vec<Booking>,
}

/// What to do with one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Not booked by the projections (risk, execution, requests, ...), or
    /// a fact booked already (second capture of an order).
    Ignore,
    Apply(Effects),
    Reject {
        kind: &'static str,
        reason: String,
    },
}

/// Whether `m` is within [`AMOUNT_MINOR_MAX`] (in minor units, either
/// sign), the largest amount one event may book.
fn within_bound(m: Money) -> bool {
    m.amount_minor()
        .checked_abs()
        .is_some_and(|a| a <= AMOUNT_MINOR_MAX)
}

fn too_large(what: &str, m: Money) -> Decision {
    reject(
        "overflow",
        format!("{what} {m} is above the bound of {AMOUNT_MINOR_MAX} minor units"),
    )
}

fn reject(kind: &'static str, reason: impl Into<String>) -> Decision {
    Decision::Reject {
        kind,
        reason: reason.into(),
    }
}

/// Whether [`decide`] can do anything with an event of type `t` but
/// ignore it. For the types it returns false for, `decide` returns
/// [`Decision::Ignore`] whatever the event and the state (no order, no
/// booking key, no PSP reference to check), so the projections skip them
/// before claiming their id: no `applied_events` row, no round trip, and a
/// copy delivered again is simply ignored again (issue 14 item 2). Every
/// type is named, so a new one is a compile error here until decided.
pub fn books_by_type(t: events::EventType) -> bool {
    use events::EventType as T;
    match t {
        T::PaymentRequested
        | T::OrderSucceeded
        | T::OrderPending
        | T::OrderSettledByWebhook
        | T::RefundSucceeded
        | T::ReconciliationDiscrepancyResolved => true,
        T::RiskApproved
        | T::RiskRejected
        | T::OrderExecutionStarted
        | T::OrderFailed
        | T::RefundRequested
        | T::RefundFailed
        | T::ReconciliationDiscrepancyFound
        | T::ReconciliationRunCompleted => false,
    }
}

/// Order ids an event refers to, to load their state before deciding.
pub fn referenced_orders(env: &Envelope) -> Vec<String> {
    match &env.event {
        Event::PaymentRequested(p) => p.orders.iter().map(|o| o.order_id.to_string()).collect(),
        Event::OrderSucceeded(e) => vec![e.order_id.to_string()],
        Event::OrderSettledByWebhook(e) => vec![e.order_id.to_string()],
        Event::RefundSucceeded(e) => vec![e.order_id.to_string()],
        _ => Vec::new(),
    }
}

/// Booking key an event would use, to load whether it is taken.
pub fn booking_key(env: &Envelope) -> Option<String> {
    match &env.event {
        Event::OrderSucceeded(e) => Some(format!("capture:{}", e.order_id)),
        Event::OrderSettledByWebhook(e) if e.succeeded => Some(format!("capture:{}", e.order_id)),
        Event::RefundSucceeded(e) => Some(format!("refund:{}", e.refund_id)),
        Event::ReconciliationDiscrepancyResolved(e) => {
            Some(format!("adjustment:{}", e.discrepancy_id))
        }
        _ => None,
    }
}

/// Decides what `env` books, given the state so far. Does not change the
/// state: call [`BookState::absorb`] with the effects once they are
/// accepted.
pub fn decide(env: &Envelope, state: &BookState) -> Decision {
    // The ledger stores the PSP reference (`ledger_psp_references`), the
    // wallet does not: a reference the database would refuse (a NUL byte
    // on PostgreSQL) must be refused here, by the rules both projections
    // share, or the ledger would dead-let an event the wallet applies and
    // the two would disagree.
    if let Some(reference) = psp_reference_text(env)
        && let Err(why) = valid_psp_reference(reference)
    {
        return reject("invalid_psp_reference", why);
    }
    match &env.event {
        Event::PaymentRequested(p) => {
            let Some(payment) = env.payment_id else {
                return reject(
                    "missing_payment_id",
                    "PaymentRequested without a payment id",
                );
            };
            if p.orders.is_empty() {
                return reject("invalid_payment", "PaymentRequested without orders");
            }
            let mut fx = Effects::default();
            for o in &p.orders {
                if o.amount.amount_minor() <= 0 {
                    return reject(
                        "invalid_amount",
                        format!("order {} has non-positive amount {}", o.order_id, o.amount),
                    );
                }
                if !within_bound(o.amount) {
                    return too_large(&format!("order {} amount", o.order_id), o.amount);
                }
                let new = OrderState {
                    client_id: p.client_id.to_string(),
                    payment_id: payment.to_string(),
                    buyer_id: p.buyer_id.to_string(),
                    seller_id: o.seller_id.to_string(),
                    currency: o.amount.currency(),
                    amount_minor: o.amount.amount_minor(),
                    captured_minor: 0,
                    refunded_minor: 0,
                };
                let id = o.order_id.to_string();
                // The same order listed twice in one request: identical
                // details count once, different ones are a conflict.
                if let Some((_, earlier)) = fx.orders.iter().find(|(k, _)| *k == id) {
                    if *earlier == new {
                        continue;
                    }
                    return reject(
                        "conflicting_order",
                        format!("order {id} is listed twice with different details"),
                    );
                }
                match state.orders.get(&id) {
                    // A repeated request (new event id, same facts) changes nothing.
                    // An order learnt before orders recorded their client
                    // (empty) matches any client.
                    Some(old)
                        if (old.client_id == new.client_id || old.client_id.is_empty())
                            && old.payment_id == new.payment_id
                            && old.seller_id == new.seller_id
                            && old.buyer_id == new.buyer_id
                            && old.currency == new.currency
                            && old.amount_minor == new.amount_minor => {}
                    Some(_) => {
                        return reject(
                            "conflicting_order",
                            format!("order {id} is already known with different details"),
                        );
                    }
                    None => fx.orders.push((id, new)),
                }
            }
            if fx.orders.is_empty() {
                Decision::Ignore
            } else {
                Decision::Apply(fx)
            }
        }
        Event::OrderSucceeded(e) => capture(
            env,
            state,
            &e.order_id.to_string(),
            e.amount,
            e.fee,
            "OrderSucceeded",
        ),
        Event::OrderSettledByWebhook(e) if e.succeeded => {
            let fee = e.fee.unwrap_or_else(|| Money::zero(e.amount.currency()));
            capture(
                env,
                state,
                &e.order_id.to_string(),
                e.amount,
                fee,
                "OrderSettledByWebhook",
            )
        }
        Event::RefundSucceeded(e) => {
            let key = format!("refund:{}", e.refund_id);
            if state.bookings.contains(&key) {
                return Decision::Ignore;
            }
            if !within_bound(e.amount) {
                return too_large("refund amount", e.amount);
            }
            let id = e.order_id.to_string();
            let Some(order) = state.orders.get(&id) else {
                return reject(
                    "unknown_order",
                    format!("RefundSucceeded for order {id}, which no PaymentRequested announced"),
                );
            };
            if let Some(d) = payment_mismatch(env, order, &id, "RefundSucceeded") {
                return d;
            }
            if e.amount.currency() != order.currency {
                return reject(
                    "currency_mismatch",
                    format!(
                        "refund in {} for an order in {}",
                        e.amount.currency(),
                        order.currency
                    ),
                );
            }
            let r = e.amount.amount_minor();
            if r <= 0 {
                return reject(
                    "invalid_amount",
                    format!("refund amount {} is not positive", e.amount),
                );
            }
            let Some(refunded) = order.refunded_minor.checked_add(r) else {
                return reject("overflow", "refunded total overflows");
            };
            if refunded > order.captured_minor {
                return reject(
                    "refund_exceeds_capture",
                    format!(
                        "refund of {} would bring refunds of order {id} to {refunded} minor units, above the {} captured",
                        e.amount, order.captured_minor
                    ),
                );
            }
            let Ok(credit) = e.amount.checked_neg() else {
                return reject("overflow", "refund amount cannot be negated");
            };
            let mut updated = order.clone();
            updated.refunded_minor = refunded;
            let booking = Booking::new(
                key,
                BookingKind::Refund,
                vec![
                    Entry {
                        account: merchant_payable(&order.client_id, &order.seller_id),
                        amount: e.amount,
                    },
                    Entry {
                        account: PSP_RECEIVABLE.to_owned(),
                        amount: credit,
                    },
                ],
                Some(BuyerDelta {
                    client: order.client_id.clone(),
                    buyer: order.buyer_id.clone(),
                    paid: Money::zero(order.currency),
                    refunded: e.amount,
                }),
            );
            Decision::Apply(Effects {
                orders: vec![(id, updated)],
                bookings: vec![booking],
            })
        }
        Event::ReconciliationDiscrepancyResolved(e) => {
            let Some(x) = e.adjustment.filter(|a| !a.is_zero()) else {
                return Decision::Ignore;
            };
            let key = format!("adjustment:{}", e.discrepancy_id);
            if state.bookings.contains(&key) {
                return Decision::Ignore;
            }
            if !within_bound(x) {
                return too_large("adjustment", x);
            }
            let Ok(neg) = x.checked_neg() else {
                return reject("overflow", "adjustment cannot be negated");
            };
            let booking = Booking::new(
                key,
                BookingKind::Adjustment,
                vec![
                    Entry {
                        account: PSP_RECEIVABLE.to_owned(),
                        amount: x,
                    },
                    Entry {
                        account: RECONCILIATION_ADJUSTMENTS.to_owned(),
                        amount: neg,
                    },
                ],
                None,
            );
            Decision::Apply(Effects {
                orders: Vec::new(),
                bookings: vec![booking],
            })
        }
        _ => Decision::Ignore,
    }
}

/// Rejects an event about an order whose envelope names another payment
/// (or none) than the one that announced the order.
fn payment_mismatch(env: &Envelope, order: &OrderState, id: &str, what: &str) -> Option<Decision> {
    let payment = env.payment_id.map(|p| p.to_string());
    if payment.as_deref() == Some(order.payment_id.as_str()) {
        return None;
    }
    Some(reject(
        "payment_mismatch",
        format!(
            "{what} for order {id} names payment {}, but the order belongs to payment {}",
            payment.as_deref().unwrap_or("(none)"),
            order.payment_id
        ),
    ))
}

fn capture(
    env: &Envelope,
    state: &BookState,
    order_id: &str,
    amount: Money,
    fee: Money,
    what: &str,
) -> Decision {
    let key = format!("capture:{order_id}");
    if state.bookings.contains(&key) {
        // Captured already (e.g. OrderSucceeded, then the webhook): once only.
        return Decision::Ignore;
    }
    if !within_bound(amount) {
        return too_large("captured amount", amount);
    }
    if !within_bound(fee) {
        return too_large("fee", fee);
    }
    let Some(order) = state.orders.get(order_id) else {
        return reject(
            "unknown_order",
            format!("{what} for order {order_id}, which no PaymentRequested announced"),
        );
    };
    if let Some(d) = payment_mismatch(env, order, order_id, what) {
        return d;
    }
    if amount.currency() != order.currency {
        return reject(
            "currency_mismatch",
            format!(
                "capture in {} for an order in {}",
                amount.currency(),
                order.currency
            ),
        );
    }
    if fee.currency() != amount.currency() {
        return reject(
            "currency_mismatch",
            format!(
                "fee in {} for a capture in {}",
                fee.currency(),
                amount.currency()
            ),
        );
    }
    if amount.amount_minor() <= 0 {
        return reject(
            "invalid_amount",
            format!("captured amount {amount} is not positive"),
        );
    }
    if amount.amount_minor() != order.amount_minor {
        return reject(
            "amount_mismatch",
            format!(
                "{what} captured {amount} for order {order_id}, whose amount is {} minor units",
                order.amount_minor
            ),
        );
    }
    if fee.amount_minor() < 0 || fee.amount_minor() > amount.amount_minor() {
        return reject(
            "invalid_fee",
            format!("fee {fee} is negative or above the captured {amount}"),
        );
    }
    let (Ok(net), Ok(credit)) = (amount.checked_sub(fee), amount.checked_neg()) else {
        return reject("overflow", "capture amounts overflow");
    };
    let mut entries = vec![Entry {
        account: PSP_RECEIVABLE.to_owned(),
        amount: net,
    }];
    if !fee.is_zero() {
        entries.push(Entry {
            account: PSP_FEES.to_owned(),
            amount: fee,
        });
    }
    entries.push(Entry {
        account: merchant_payable(&order.client_id, &order.seller_id),
        amount: credit,
    });
    // A fee equal to the amount leaves a zero receivable leg: drop it.
    entries.retain(|e| !e.amount.is_zero());
    let mut updated = order.clone();
    updated.captured_minor = amount.amount_minor();
    let booking = Booking::new(
        key,
        BookingKind::Capture,
        entries,
        Some(BuyerDelta {
            client: order.client_id.clone(),
            buyer: order.buyer_id.clone(),
            paid: amount,
            refunded: Money::zero(amount.currency()),
        }),
    );
    Decision::Apply(Effects {
        orders: vec![(order_id.to_owned(), updated)],
        bookings: vec![booking],
    })
}

impl BookState {
    /// Applies accepted effects, so later events of the same batch see them.
    pub fn absorb(&mut self, fx: &Effects) {
        for (id, o) in &fx.orders {
            self.orders.insert(id.clone(), o.clone());
        }
        for b in &fx.bookings {
            let fresh = self.bookings.insert(b.key.clone());
            assert!(fresh, "booking key {} used twice", b.key);
        }
    }
}

/// The PSP reference text an event carries, if any.
fn psp_reference_text(env: &Envelope) -> Option<&str> {
    match &env.event {
        Event::OrderPending(e) => Some(&e.psp_reference),
        Event::OrderSucceeded(e) => Some(&e.psp_reference),
        Event::OrderSettledByWebhook(e) => Some(&e.psp_reference),
        Event::RefundSucceeded(e) => Some(&e.psp_reference),
        _ => None,
    }
}

/// A PSP reference both backends store as it is: 1..=255 characters, no
/// control characters.
pub fn valid_psp_reference(r: &str) -> Result<(), String> {
    if r.is_empty() || r.chars().count() > PSP_REFERENCE_LEN_MAX {
        return Err(format!(
            "PSP reference of {} characters (1..={PSP_REFERENCE_LEN_MAX})",
            r.chars().count()
        ));
    }
    if r.chars().any(char::is_control) {
        return Err(format!(
            "PSP reference {:?} contains a control character",
            r.escape_debug().to_string()
        ));
    }
    Ok(())
}

/// What the ledger knows about one PSP reference (table
/// `ledger_psp_references`), for reconciliation against settlement files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PspReference {
    pub psp_reference: String,
    /// `charge` or `refund`.
    pub kind: &'static str,
    pub order_id: String,
    pub refund_id: Option<String>,
    /// `pending`, `succeeded`, `failed` (charges) or `refunded` (refunds).
    pub status: &'static str,
    /// Signed as in the settlement file: refunds negative.
    pub amount: Money,
    /// 0 while pending, for failed charges and for refunds.
    pub fee_minor: i64,
    /// When the event that set `status` happened (µs).
    pub occurred_at: i64,
    pub event_id: String,
}

/// The PSP reference an event tells the ledger about, if any:
/// `OrderPending`, `OrderSucceeded`, `OrderSettledByWebhook` (either
/// outcome) and `RefundSucceeded`. (`OrderFailed` carries no reference.)
pub fn psp_reference(env: &Envelope) -> Option<PspReference> {
    let row = |reference: &str,
               kind,
               order: String,
               refund: Option<String>,
               status,
               amount: Money,
               fee_minor| PspReference {
        psp_reference: reference.to_owned(),
        kind,
        order_id: order,
        refund_id: refund,
        status,
        amount,
        fee_minor,
        occurred_at: env.occurred_at.as_micros(),
        event_id: env.event_id.to_string(),
    };
    match &env.event {
        Event::OrderPending(e) => Some(row(
            &e.psp_reference,
            "charge",
            e.order_id.to_string(),
            None,
            "pending",
            e.amount,
            0,
        )),
        Event::OrderSucceeded(e) => Some(row(
            &e.psp_reference,
            "charge",
            e.order_id.to_string(),
            None,
            "succeeded",
            e.amount,
            e.fee.amount_minor(),
        )),
        Event::OrderSettledByWebhook(e) => Some(row(
            &e.psp_reference,
            "charge",
            e.order_id.to_string(),
            None,
            if e.succeeded { "succeeded" } else { "failed" },
            e.amount,
            if e.succeeded {
                e.fee.map_or(0, |f| f.amount_minor())
            } else {
                0
            },
        )),
        Event::RefundSucceeded(e) => Some(row(
            &e.psp_reference,
            "refund",
            e.order_id.to_string(),
            Some(e.refund_id.to_string()),
            "refunded",
            e.amount.checked_neg().ok()?,
            0,
        )),
        _ => None,
    }
}

/// Whether `r` comes from a capture (`succeeded` charge) the ledger
/// ignored, i.e. booked nothing for: such a reference must not be recorded
/// as succeeded (reconciliation would match the PSP's settlement of a
/// charge the ledger never booked).
pub fn ignored_capture(r: &PspReference, outcome: &streaming::Outcome) -> bool {
    matches!(outcome, streaming::Outcome::Ignored) && r.kind == "charge" && r.status == "succeeded"
}

/// Whether a reference's status may move from `old` to `new`: only forward
/// (`pending` to a final status), never back and never between final ones,
/// whatever order events are redelivered in.
pub fn psp_status_advances(old: &str, new: &str) -> bool {
    old == "pending" && new != "pending"
}

#[cfg(test)]
mod tests {
    use super::*;
    use events::{Timestamp, samples};

    #[test]
    fn sample_story_books_balanced_transactions() {
        let evs = samples::one_of_each("c1", "k1", Timestamp::from_micros(0));
        let mut st = BookState::default();
        let mut kinds = Vec::new();
        for e in &evs {
            match decide(e, &st) {
                Decision::Apply(fx) => {
                    for b in &fx.bookings {
                        assert!(check_balanced(&b.entries).is_ok());
                        kinds.push(b.kind);
                    }
                    st.absorb(&fx);
                }
                Decision::Ignore => {}
                Decision::Reject { kind, reason } => panic!("{kind}: {reason}"),
            }
        }
        assert_eq!(
            kinds,
            vec![
                BookingKind::Capture,
                BookingKind::Capture,
                BookingKind::Refund,
                BookingKind::Adjustment
            ]
        );
    }

    #[test]
    fn write_check_rejects_unbalanced_and_unknown_accounts() {
        let eur = |m| Money::new(m, Currency::EUR);
        let e = |a: &str, m| Entry {
            account: a.into(),
            amount: eur(m),
        };
        assert!(check_balanced(&[e(PSP_RECEIVABLE, 5), e("merchant_payable:s", -4)]).is_err());
        assert!(check_balanced(&[e(PSP_RECEIVABLE, 5), e("cash", -5)]).is_err());
        assert!(check_balanced(&[e(PSP_RECEIVABLE, 5)]).is_err());
        let mixed = [
            e(PSP_RECEIVABLE, 5),
            Entry {
                account: "merchant_payable:s".into(),
                amount: Money::new(-5, Currency::USD),
            },
        ];
        assert!(check_balanced(&mixed).is_err());
        assert!(check_balanced(&[e(PSP_RECEIVABLE, 5), e("merchant_payable:s", -5)]).is_ok());
        assert!(check_balanced(&[e(PSP_RECEIVABLE, 5), e("merchant_payable:c/s", -5)]).is_ok());
        assert!(check_balanced(&[e(PSP_RECEIVABLE, 5), e("merchant_payable:c/", -5)]).is_err());
        assert!(check_balanced(&[e(PSP_RECEIVABLE, 5), e("merchant_payable:/s", -5)]).is_err());
    }

    /// Sets the event's PSP reference; false if it carries none.
    fn set_reference(env: &mut Envelope, r: &str) -> bool {
        let slot = match &mut env.event {
            Event::OrderPending(x) => &mut x.psp_reference,
            Event::OrderSucceeded(x) => &mut x.psp_reference,
            Event::OrderSettledByWebhook(x) => &mut x.psp_reference,
            Event::RefundSucceeded(x) => &mut x.psp_reference,
            _ => return false,
        };
        *slot = r.to_owned();
        true
    }

    #[test]
    fn a_psp_reference_the_database_would_refuse_is_refused_by_the_shared_rules() {
        // Both projections call `decide`: a NUL byte in a capture's PSP
        // reference (which PostgreSQL cannot store in the ledger's
        // ledger_psp_references) is rejected for both, never applied by
        // the wallet while the ledger dead-letters it.
        let evs = samples::one_of_each("c1", "k1", Timestamp::from_micros(0));
        let mut st = BookState::default();
        let mut checked = 0;
        for e in &evs {
            for poison in ["ch\u{0}1".to_owned(), String::new(), "x".repeat(256)] {
                let mut bad = e.clone();
                if !set_reference(&mut bad, &poison) {
                    break;
                }
                checked += 1;
                match decide(&bad, &st) {
                    Decision::Reject { kind, .. } => assert_eq!(kind, "invalid_psp_reference"),
                    other => panic!("{:?} accepted a bad reference: {other:?}", e.event_type()),
                }
            }
            if let Decision::Apply(fx) = decide(e, &st) {
                st.absorb(&fx);
            }
        }
        assert!(checked >= 9, "the sample story carries PSP references");
    }

    #[test]
    fn types_not_booked_are_ignored_whatever_the_state() {
        // Every type once, decided against every state the sample story
        // passes through (empty first): a type `books_by_type` skips must
        // never be anything but ignored, carry no order, booking key or
        // PSP reference; the others are each booked or checked somewhere.
        let evs = samples::one_of_each("c1", "k1", Timestamp::from_micros(0));
        let types: HashSet<events::EventType> = evs.iter().map(|e| e.event_type()).collect();
        assert_eq!(types.len(), events::EventType::ALL.len(), "one of each");
        let mut states = vec![BookState::default()];
        for e in &evs {
            let mut st = states.last().cloned().expect("one state");
            if let Decision::Apply(fx) = decide(e, &st) {
                st.absorb(&fx);
            }
            states.push(st);
        }
        let mut booked_somewhere = HashSet::new();
        for e in &evs {
            let t = e.event_type();
            for st in &states {
                let d = decide(e, st);
                if books_by_type(t) {
                    if !matches!(d, Decision::Ignore) || psp_reference_text(e).is_some() {
                        booked_somewhere.insert(t);
                    }
                } else {
                    assert_eq!(d, Decision::Ignore, "{t:?} against some state");
                }
            }
            if !books_by_type(t) {
                assert!(psp_reference_text(e).is_none(), "{t:?}");
                assert!(referenced_orders(e).is_empty(), "{t:?}");
                assert!(booking_key(e).is_none(), "{t:?}");
            }
        }
        let kept: HashSet<_> = events::EventType::ALL
            .iter()
            .copied()
            .filter(|t| books_by_type(*t))
            .collect();
        assert_eq!(booked_somewhere, kept, "a type kept for nothing");
    }

    #[test]
    fn merchant_accounts_are_scoped_by_client_unambiguously() {
        // Ids may contain ':' but never '/': "a:b"/"c" and "a"/"b:c" differ.
        let x = merchant_payable("a:b", "c");
        let y = merchant_payable("a", "b:c");
        assert_ne!(x, y);
        assert_eq!(merchant_of(&x), Some(("a:b", "c")));
        assert_eq!(merchant_of(&y), Some(("a", "b:c")));
        assert_eq!(merchant_of("merchant_payable:s1"), Some(("", "s1")));
        assert_eq!(merchant_of("merchant_payable:a/b/c"), None);
        assert_eq!(merchant_of(PSP_FEES), None);
    }
}
