//! A clean day of 100,000 orders: ledger built by the real projection code,
//! a settlement file of exactly those charges: zero differences.

use crate::harness::{apply, envelope, eur, request};
use events::{OrderSucceeded, Timestamp};
use projections::Projection;
use reconcile::matching::Tolerance;
use std::fmt::Write as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_day_of_100k_orders_has_no_differences() {
    let n: i64 = std::env::var("RECONCILE_CLEAN_DAY_ORDERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let (db, _dir) = testkit::fresh_sqlite().await.unwrap();
    reconcile::migrate(&db).await.unwrap();
    let k = testkit::TestKafka::new(1).await;
    let date = reconcile::settlement::parse_date("2026-03-14").unwrap();
    let day_us = reconcile::settlement::day_start_ms(date) * 1_000;
    let step = 86_400_000_000 / n;
    let mut evs = Vec::with_capacity(usize::try_from(n * 2).unwrap());
    let mut csv =
        String::from("psp_reference,order_id,amount_minor,currency,status,fee_minor,settled_at\n");
    for i in 0..n {
        let at = day_us + i * step;
        let amount = 500 + (i * 7919) % 100_000;
        let fee = amount * 29 / 1000 + 30;
        let (req, pay, order) = request(&format!("clean-{}-{i}", k.unique), eur(amount), at);
        let reference = format!("ch_clean_{i:08}");
        evs.push(req);
        evs.push(envelope(
            Some(pay),
            "ok",
            at,
            OrderSucceeded {
                order_id: order,
                psp_reference: reference.clone(),
                amount: eur(amount),
                fee: eur(fee),
            }
            .into(),
        ));
        let settled = Timestamp::from_micros(at + 1_000).to_string();
        writeln!(
            csv,
            "{reference},{order},{amount},EUR,succeeded,{fee},{settled}"
        )
        .unwrap();
    }
    apply(&db, &evs, 2_000, &[Projection::Ledger]).await;
    let (report, t) = reconcile::reconcile_bytes(
        &db,
        &k.producer,
        csv.as_bytes(),
        "clean",
        Some(date),
        Tolerance::default(),
    )
    .await
    .unwrap();
    eprintln!(
        "clean day: {n} rows, parse {:?}, total {:?}",
        t.parse, t.total
    );
    assert_eq!(report.rows, n);
    assert_eq!(report.matched, n);
    assert!(report.discrepancies.is_empty(), "{}", report.table());
    assert_eq!(report.unresolved, 0);
    // Break one row: exactly one difference.
    let broken = csv.replacen(",EUR,succeeded,", ",EUR,succeeded,9", 1);
    let (report, _) = reconcile::reconcile_bytes(
        &db,
        &k.producer,
        broken.as_bytes(),
        "broken",
        Some(date),
        Tolerance::default(),
    )
    .await
    .unwrap();
    assert_eq!(report.discrepancies.len(), 1, "{}", report.table());
    assert_eq!(report.discrepancies[0].class, "fee_mismatch");
}
