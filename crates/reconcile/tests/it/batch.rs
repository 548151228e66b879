//! One-to-many: a PSP batch row (`order_id` = our order ids joined by `;`,
//! amount and fee the sums) matches several of our charges.

use crate::both;
use crate::harness::{apply, envelope, eur, exec, reconciliation_events, request};
use events::{OrderSucceeded, Timestamp};
use projections::Projection;
use reconcile::matching::Tolerance;
use storage::Db;

async fn body(db: Db) {
    let k = testkit::TestKafka::new(1).await;
    let date = reconcile::settlement::parse_date("2026-05-06").unwrap();
    let day_us = reconcile::settlement::day_start_ms(date) * 1_000;
    let mut evs = Vec::new();
    let mut orders = Vec::new();
    for (i, (amount, fee)) in [(1_000, 59), (2_000, 88), (3_000, 117)]
        .into_iter()
        .enumerate()
    {
        let at = day_us + 3_600_000_000 * i64::try_from(i + 1).unwrap();
        let (req, pay, order) = request(&format!("{}-b{i}", k.unique), eur(amount), at);
        evs.push(req);
        evs.push(envelope(
            Some(pay),
            "ok",
            at,
            OrderSucceeded {
                order_id: order,
                psp_reference: format!("ch_{}_{i}", k.unique),
                amount: eur(amount),
                fee: eur(fee),
            }
            .into(),
        ));
        orders.push(order);
    }
    apply(&db, &evs, 10, &[Projection::Ledger]).await;
    let t = Timestamp::from_micros(day_us + 80_000_000_000).to_string();
    let header = "psp_reference,order_id,amount_minor,currency,status,fee_minor,settled_at\n";
    let file = |batch_amount: i64| {
        format!(
            "{header}bt_1,{};{},{batch_amount},EUR,succeeded,147,{t}\nch_{}_2,{},3000,EUR,succeeded,117,{t}\n",
            orders[0], orders[1], k.unique, orders[2]
        )
    };
    let (r, _) = reconcile::reconcile_bytes(
        &db,
        &k.producer,
        file(3_000).as_bytes(),
        "batch",
        None,
        Tolerance::default(),
    )
    .await
    .unwrap();
    assert!(r.discrepancies.is_empty(), "{}", r.table());
    assert_eq!((r.rows, r.matched, r.matched_by_order), (2, 2, 1));
    // The batch's sum is off by one: one amount_mismatch on the batch row;
    // its charges are not reported missing at the PSP.
    let (r, _) = reconcile::reconcile_bytes(
        &db,
        &k.producer,
        file(3_001).as_bytes(),
        "batch",
        None,
        Tolerance::default(),
    )
    .await
    .unwrap();
    assert_eq!(r.discrepancies.len(), 1, "{}", r.table());
    let d = &r.discrepancies[0];
    assert_eq!(
        (d.class.as_str(), d.psp_reference.as_str()),
        ("amount_mismatch", "bt_1")
    );
    assert_eq!(d.ours.as_ref().unwrap().amount_minor, 3_000);
    assert_eq!(d.theirs.as_ref().unwrap().amount_minor, 3_001);
    assert_eq!(d.order_ids, format!("{};{}", orders[0], orders[1]));
    // Two runs (one event each) and one discrepancy.
    let before = reconciliation_events(&k, 3).await;
    // A crash after recording, before the appends were acknowledged:
    // re-running the file appends the same events again, same ids.
    exec(
        &db,
        &format!(
            "UPDATE reconcile_runs SET state = 'recorded' WHERE run_id = '{}'",
            r.run_id
        ),
    )
    .await;
    exec(
        &db,
        "UPDATE reconcile_discrepancies SET found_published = 0",
    )
    .await;
    let (again, _) = reconciliation_bytes_again(&db, &k, &file(3_001)).await;
    assert!(again.already_recorded);
    let after = reconciliation_events(&k, 5).await;
    assert_eq!(
        after[3].event_id, before[1].event_id,
        "same discrepancy event id"
    );
    assert_eq!(after[4].event_id, before[2].event_id, "same run event id");
    // Now published: another re-run appends nothing.
    reconciliation_bytes_again(&db, &k, &file(3_001)).await;
    reconciliation_events(&k, 5).await;
}

async fn reconciliation_bytes_again(
    db: &Db,
    k: &testkit::TestKafka,
    file: &str,
) -> (reconcile::report::Report, reconcile::Timings) {
    reconcile::reconcile_bytes(
        db,
        &k.producer,
        file.as_bytes(),
        "batch",
        None,
        Tolerance::default(),
    )
    .await
    .unwrap()
}
both!(a_psp_batch_row_matches_several_orders, body);
