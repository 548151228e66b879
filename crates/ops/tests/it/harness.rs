#![allow(dead_code)]

use testkit::eur;
pub use testkit::{Backend, count, envelope, exec, produce_all, strings};

use events::{
    BuyerId, ClientId, DiscrepancyId, Envelope, OrderId, OrderSettledByWebhook, OrderSucceeded,
    PaymentId, PaymentOrder, PaymentRequested, ReconciliationDiscrepancyResolved, RefundId,
    RefundSucceeded, ResolutionAction, RiskApproved, SellerId,
};
use projections::{Projection, ProjectionHandler};
use std::collections::BTreeMap;
use std::time::Duration;
use storage::Db;
use streaming::KafkaConfig;
use tokio_util::sync::CancellationToken;

/// A fresh, migrated database of either backend; the URL and the guard of
/// an SQLite file's directory.
pub async fn fresh_db(backend: Backend) -> (Db, String, Option<tempfile::TempDir>) {
    let fresh = testkit::FreshDb::new(backend).await;
    let db = fresh.connect().await;
    projections::migrate(&db).await.expect("migrate");
    let (url, dir) = fresh.into_parts();
    (db, url, dir)
}

/// A realistic history and what it should amount to.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// Every message to produce, duplicates included.
    pub envs: Vec<Envelope>,
    /// Distinct event ids of the types the projections book.
    pub distinct: usize,
    /// Messages of types the projections never book (a risk approval per
    /// payment, copies included): ignored each time, no dedup row.
    pub unbooked: usize,
    pub payments: usize,
    /// Orders captured (each booked once).
    pub captures: usize,
    pub refunds: usize,
    pub adjustments: usize,
    pub rejected: usize,
    /// Expected wallet balance per seller (EUR minor units).
    pub wallets: BTreeMap<String, i64>,
}

/// `n` payments (one order each): captured through `OrderSucceeded`, the
/// webhook, or both (the second is ignored), or left pending; a third of
/// the captured ones refunded in part; every fifth payment's events
/// produced twice; one refund of an unknown order (rejected); one
/// reconciliation adjustment. Event times start at `base_us`, one
/// millisecond apart per payment.
pub fn history(unique: &str, n: usize, base_us: i64) -> History {
    let client = ClientId::parse("ops-client").unwrap();
    let mut h = History::default();
    for i in 0..n {
        let i64i = i64::try_from(i).unwrap();
        let at = base_us + i64i * 1000;
        let key = format!("{unique}-{i}");
        let payment = PaymentId::derive(&client, &key);
        let order = OrderId::derive(payment, 0);
        let seller = format!("seller-{}", i % 5);
        let amount = 1000 + i64i;
        let fee = amount / 50;
        let mut envs = vec![envelope(
            Some(payment),
            "requested",
            at,
            PaymentRequested {
                client_id: client.clone(),
                idempotency_key: Some(key.clone()),
                buyer_id: BuyerId::parse(&format!("buyer-{}", i % 7)).unwrap(),
                orders: vec![PaymentOrder {
                    order_id: order,
                    seller_id: SellerId::parse(&seller).unwrap(),
                    amount: eur(amount),
                }],
                metadata: BTreeMap::new(),
            }
            .into(),
        )];
        envs.push(envelope(
            Some(payment),
            "approved",
            at + 50,
            RiskApproved {
                rule_set: "ops-test".into(),
            }
            .into(),
        ));
        let succeeded = envelope(
            Some(payment),
            "succeeded",
            at + 100,
            OrderSucceeded {
                order_id: order,
                psp_reference: format!("psp-{order}"),
                amount: eur(amount),
                fee: eur(fee),
            }
            .into(),
        );
        let webhook = envelope(
            Some(payment),
            "webhook",
            at + 200,
            OrderSettledByWebhook {
                order_id: order,
                psp_reference: format!("psp-{order}"),
                succeeded: true,
                amount: eur(amount),
                fee: Some(eur(fee)),
                failure_reason: None,
            }
            .into(),
        );
        let captured = match i % 4 {
            0 => {
                envs.push(succeeded);
                true
            }
            1 => {
                envs.push(webhook);
                true
            }
            2 => {
                envs.push(succeeded);
                envs.push(webhook);
                true
            }
            _ => false,
        };
        let mut wallet = 0;
        if captured {
            h.captures += 1;
            wallet += amount;
            if i.is_multiple_of(3) {
                let refund = amount / 2;
                envs.push(envelope(
                    Some(payment),
                    "refund",
                    at + 300,
                    RefundSucceeded {
                        refund_id: RefundId::derive(&client, &format!("{key}-refund")),
                        order_id: order,
                        psp_reference: format!("psp-refund-{order}"),
                        amount: eur(refund),
                    }
                    .into(),
                ));
                h.refunds += 1;
                wallet -= refund;
            }
        }
        if captured {
            *h.wallets.entry(seller).or_default() += wallet;
        }
        h.distinct += envs.len() - 1;
        h.unbooked += 1;
        if i.is_multiple_of(5) {
            let again = envs.clone();
            envs.extend(again);
            h.unbooked += 1;
        }
        h.payments += 1;
        h.envs.extend(envs);
    }
    // A refund of an order nobody announced: rejected (unknown_order).
    let stray = PaymentId::derive(&client, &format!("{unique}-stray"));
    h.envs.push(envelope(
        Some(stray),
        "refund",
        base_us + 500,
        RefundSucceeded {
            refund_id: RefundId::derive(&client, &format!("{unique}-stray-refund")),
            order_id: OrderId::derive(stray, 0),
            psp_reference: "psp-stray".into(),
            amount: eur(10),
        }
        .into(),
    ));
    h.rejected += 1;
    h.distinct += 1;
    // A reconciliation adjustment (the PSP paid 5 less).
    let d = PaymentId::derive(&client, &format!("{unique}-discrepancy"));
    h.envs.push(envelope(
        Some(d),
        "resolved",
        base_us + 700,
        ReconciliationDiscrepancyResolved {
            discrepancy_id: DiscrepancyId::from_uuid(d.as_uuid()),
            action: ResolutionAction::AcceptPspAmount,
            reason: "ops test".into(),
            adjustment: Some(eur(-5)),
            resolved_by: "ops-test".into(),
        }
        .into(),
    ));
    h.adjustments += 1;
    h.distinct += 1;
    h
}

/// A running live projection consumer.
pub struct Live {
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

impl Live {
    pub async fn stop(self) {
        self.stop.cancel();
        self.task.await.expect("consumer task");
    }
}

/// Starts the live consumer of `projection` in `group` (as `serve
/// projections` runs it).
pub fn start_live(kafka: &KafkaConfig, db: &Db, projection: Projection, group: &str) -> Live {
    let settings = projections::cli::consumer_settings(kafka, group, 200);
    let producer = streaming::EventProducer::new(kafka, "ops-test-live").expect("producer");
    let handler = ProjectionHandler::new(db.clone(), projection);
    let stop = CancellationToken::new();
    let task = tokio::spawn(streaming::run_consumer(
        kafka.clone(),
        settings,
        producer,
        handler,
        stop.clone(),
    ));
    Live {
        stop,
        task: tokio::spawn(async move {
            task.await.expect("join").expect("consumer loop");
        }),
    }
}

/// Waits until `group` has committed the high watermark of every
/// partition of the projection topics.
pub async fn wait_caught_up(kafka: &KafkaConfig, group: &str) {
    testkit::wait_caught_up(kafka, group, &ops::projection::projection_topics(kafka)).await;
}

/// Waits until the broker reports `group` as active.
pub async fn wait_active(kafka: &KafkaConfig, group: &str) -> ops::groups::GroupState {
    testkit::wait_for(
        format!("group {group} to become stable"),
        Duration::from_secs(60),
        async || {
            let g = ops::groups::describe(kafka, group).await.expect("describe");
            (g.state == "Stable").then_some(g)
        },
    )
    .await
}

/// Waits until the broker reports `group` as inactive (after its members left).
pub async fn wait_inactive(kafka: &KafkaConfig, group: &str) {
    testkit::wait_until(
        format!("group {group} to become inactive"),
        Duration::from_secs(60),
        async || {
            !ops::groups::describe(kafka, group)
                .await
                .expect("describe")
                .is_active()
        },
    )
    .await;
}

/// One projection's content as sets (no wall-clock columns, no chain
/// positions or hashes, which depend on how partitions interleave).
pub async fn snapshot(db: &Db, p: Projection) -> BTreeMap<&'static str, Vec<String>> {
    let name = p.as_str();
    let shared = [
        (
            "applied_events",
            format!(
                "SELECT event_id || '|' || outcome || '|' || COALESCE(error_kind, '-') || '|' || COALESCE(reason, '-') || '|' || topic || '|' || CAST(kafka_partition AS TEXT) || '|' || CAST(kafka_offset AS TEXT) FROM applied_events WHERE projection = '{name}'"
            ),
        ),
        (
            "projection_orders",
            format!(
                "SELECT order_id || '|' || payment_id || '|' || buyer_id || '|' || seller_id || '|' || currency || '|' || CAST(amount_minor AS TEXT) || '|' || CAST(captured_minor AS TEXT) || '|' || CAST(refunded_minor AS TEXT) FROM projection_orders WHERE projection = '{name}'"
            ),
        ),
        (
            "projection_bookings",
            format!(
                "SELECT booking_key || '|' || event_id FROM projection_bookings WHERE projection = '{name}'"
            ),
        ),
    ];
    let own: Vec<(&str, String)> = match p {
        Projection::Ledger => vec![
            (
                "ledger_transactions",
                "SELECT id || '|' || booking_key || '|' || event_id || '|' || COALESCE(payment_id, '-') || '|' || kind || '|' || CAST(occurred_at AS TEXT) FROM ledger_transactions".into(),
            ),
            (
                "ledger_entries",
                "SELECT transaction_id || '|' || CAST(line AS TEXT) || '|' || account || '|' || currency || '|' || CAST(amount_minor AS TEXT) || '|' || CAST(occurred_at AS TEXT) FROM ledger_entries".into(),
            ),
            (
                "ledger_psp_references",
                "SELECT psp_reference || '|' || kind || '|' || order_id || '|' || COALESCE(refund_id, '-') || '|' || status || '|' || currency || '|' || CAST(amount_minor AS TEXT) || '|' || CAST(fee_minor AS TEXT) || '|' || CAST(occurred_at AS TEXT) || '|' || event_id FROM ledger_psp_references".into(),
            ),
        ],
        Projection::Wallet => vec![
            (
                "wallet_balances",
                "SELECT seller_id || '|' || currency || '|' || CAST(balance_minor AS TEXT) FROM wallet_balances".into(),
            ),
            (
                "buyer_totals",
                "SELECT buyer_id || '|' || currency || '|' || CAST(paid_minor AS TEXT) || '|' || CAST(refunded_minor AS TEXT) FROM buyer_totals".into(),
            ),
        ],
    };
    let mut m = BTreeMap::new();
    for (t, sql) in shared.into_iter().chain(own) {
        m.insert(t, strings(db, &sql).await);
    }
    m
}

/// Wallet balances (EUR) per seller as the wallet table has them.
pub async fn wallets(db: &Db) -> BTreeMap<String, i64> {
    strings(
        db,
        "SELECT seller_id || '|' || CAST(balance_minor AS TEXT) FROM wallet_balances WHERE currency = 'EUR'",
    )
    .await
    .into_iter()
    .map(|s| {
        let (a, b) = s.split_once('|').unwrap();
        (a.to_owned(), b.parse().unwrap())
    })
    .collect()
}

/// Runs both live projections over everything produced so far, then stops them.
pub async fn run_live_to_end(kafka: &KafkaConfig, db: &Db) {
    let lg = kafka.topology().group("ledger");
    let wg = kafka.topology().group("wallet");
    let l = start_live(kafka, db, Projection::Ledger, &lg);
    let w = start_live(kafka, db, Projection::Wallet, &wg);
    wait_caught_up(kafka, &lg).await;
    wait_caught_up(kafka, &wg).await;
    l.stop().await;
    w.stop().await;
    wait_inactive(kafka, &lg).await;
    wait_inactive(kafka, &wg).await;
}

/// Rows a rebuild must remove: a bogus applied event of `p` and, for the
/// wallet, a bogus balance.
pub async fn tamper(db: &Db, p: Projection) {
    exec(
        db,
        &format!(
            "INSERT INTO applied_events (projection, event_id, applied_at, topic, kafka_partition, kafka_offset) \
             VALUES ('{}', 'bogus-event', 1, 'bogus', 0, 0)",
            p.as_str()
        ),
    )
    .await
    .expect("tamper applied_events");
    if p == Projection::Wallet {
        exec(
            db,
            "INSERT INTO wallet_balances (seller_id, currency, balance_minor) VALUES ('bogus-seller', 'EUR', 12345)",
        )
        .await
        .expect("tamper wallet_balances");
    }
}

/// The ledger's immutability triggers refuse UPDATE and DELETE of its
/// (non-empty) tables.
pub async fn assert_ledger_immutable(db: &Db) {
    assert!(count(db, "SELECT COUNT(*) FROM ledger_entries").await > 0);
    assert!(count(db, "SELECT COUNT(*) FROM ledger_transactions").await > 0);
    for sql in [
        "DELETE FROM ledger_entries",
        "UPDATE ledger_entries SET amount_minor = amount_minor + 1",
        "DELETE FROM ledger_transactions",
        "UPDATE ledger_transactions SET kind = kind",
    ] {
        assert!(exec(db, sql).await.is_err(), "{sql} must be refused");
    }
}
