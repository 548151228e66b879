//! Review fixes: no match by order id for a single-order row (a second
//! charge is missing_in_ledger), refund rows never match charges, no
//! second match of a reference across days and no false missing_at_psp
//! across midnight, identical duplicate rows, corrected files update open
//! figures, status mismatches closed when the ledger catches up, and
//! accept_psp_amount leaves psp_receivable at what the PSP owes.

use crate::both;
use crate::harness::{apply, count, envelope, eur, reconciliation_events, request};
use events::{
    Event, OrderPending, OrderSucceeded, RefundId, RefundSucceeded, ResolutionAction, Timestamp,
};
use projections::Projection;
use reconcile::matching::Tolerance;
use reconcile::{reconcile_bytes, resolve};
use storage::Db;

const HEADER: &str = "psp_reference,order_id,amount_minor,currency,status,fee_minor,settled_at\n";

async fn receivable_of(db: &Db, payment: &str) -> i64 {
    count(
        db,
        &format!(
            "SELECT CAST(COALESCE(SUM(e.amount_minor), 0) AS BIGINT) FROM ledger_entries e \
             JOIN ledger_transactions t ON t.id = e.transaction_id \
             WHERE e.account = 'psp_receivable' AND e.currency = 'EUR' AND t.payment_id = '{payment}'"
        ),
    )
    .await
}

async fn body(db: Db) {
    let k = testkit::TestKafka::new(1).await;
    let u = &k.unique;
    let d1 = reconcile::settlement::parse_date("2026-03-10").unwrap();
    let day1 = reconcile::settlement::day_start_ms(d1) * 1_000;
    let day2 = day1 + 86_400_000_000;
    let t1 = Timestamp::from_micros(day1 + 86_399_900_000).to_string(); // D 23:59:59.9
    let t2 = Timestamp::from_micros(day2 + 3_600_000_000).to_string();
    // Orders: a (captured on D+1 00:00:00.1, settled in D's file), b (for
    // amount), c (for fee), p (pending in our ledger).
    let mut evs = Vec::new();
    let mut ids = Vec::new();
    for (i, (amount, fee)) in [(1_000, 59), (2_000, 88), (3_000, 117), (4_000, 150)]
        .into_iter()
        .enumerate()
    {
        let at = day2 + 100_000 + i64::try_from(i).unwrap();
        let (req, pay, order) = request(&format!("{u}-r{i}"), eur(amount), at);
        evs.push(req);
        let reference = format!("ch_{u}_{i}");
        let ev: Event = if i == 3 {
            OrderPending {
                order_id: order,
                psp_reference: reference.clone(),
                amount: eur(amount),
            }
            .into()
        } else {
            OrderSucceeded {
                order_id: order,
                psp_reference: reference.clone(),
                amount: eur(amount),
                fee: eur(fee),
            }
            .into()
        };
        evs.push(envelope(Some(pay), "outcome", at, ev));
        ids.push((pay, order, reference));
    }
    // A second capture of order a under another reference: the ledger
    // ignores it (nothing booked) and records no reference for it.
    let (pa0, oa0, _) = ids[0].clone();
    evs.push(envelope(
        Some(pa0),
        "second-capture",
        day2 + 200_000,
        OrderSucceeded {
            order_id: oa0,
            psp_reference: format!("ch_{u}_dup"),
            amount: eur(1_000),
            fee: eur(59),
        }
        .into(),
    ));
    apply(&db, &evs, 10, &[Projection::Ledger, Projection::Wallet]).await;
    let (pa, oa, ra) = ids[0].clone();
    let tol = Tolerance::default();

    // D: a settled just before midnight (we booked it just after).
    let file_d = format!("{HEADER}{ra},{oa},1000,EUR,succeeded,59,{t1}\n");
    let (r, _) = reconcile_bytes(&db, &k.producer, file_d.as_bytes(), "d", None, tol)
        .await
        .unwrap();
    assert!(r.discrepancies.is_empty(), "{}", r.table());

    // D+1: a second PSP charge for order a (unknown reference), a refund
    // of a we never booked, a settled again, an identical duplicate row,
    // b with a different amount, c with a different fee, p pending here.
    let (pb, ob, rb) = ids[1].clone();
    let (pc, oc, rc) = ids[2].clone();
    let (_, op, rp) = ids[3].clone();
    let rows = |b_amount: i64| {
        format!(
            "{HEADER}ch_{u}_dup,{oa},1000,EUR,succeeded,59,{t2}\nre_{u}_x,{oa},-1000,EUR,refunded,0,{t2}\n\
             {rb},{ob},{b_amount},EUR,succeeded,88,{t2}\n{rc},{oc},3000,EUR,succeeded,120,{t2}\n\
             {rp},{op},4000,EUR,succeeded,150,{t2}\n{rp},{op},4000,EUR,succeeded,150,{t2}\n"
        )
    };
    let (r, _) = reconcile_bytes(&db, &k.producer, rows(2_050).as_bytes(), "d1", None, tol)
        .await
        .unwrap();
    let got: Vec<(String, String)> = r
        .discrepancies
        .iter()
        .map(|d| (d.class.clone(), d.psp_reference.clone()))
        .collect();
    let mut want = vec![
        ("missing_in_ledger".to_owned(), format!("ch_{u}_dup")),
        ("missing_in_ledger".to_owned(), format!("re_{u}_x")),
        ("amount_mismatch".to_owned(), rb.clone()),
        ("fee_mismatch".to_owned(), rc.clone()),
        ("status_mismatch".to_owned(), rp.clone()),
        ("missing_in_ledger".to_owned(), rp.clone()),
    ];
    let mut got_sorted = got.clone();
    got_sorted.sort();
    want.sort();
    assert_eq!(got_sorted, want, "{}", r.table());
    // No missing_at_psp for a (matched in D's file) although it occurred
    // on D+1; the second charge names the order's booked reference.
    let dup = r
        .discrepancies
        .iter()
        .find(|d| d.psp_reference == format!("ch_{u}_dup"))
        .unwrap();
    assert!(dup.detail.contains(&ra), "{}", dup.detail);
    let twice = r
        .discrepancies
        .iter()
        .find(|d| d.class == "missing_in_ledger" && d.psp_reference == rp)
        .unwrap();
    assert!(twice.detail.contains("listed twice"), "{}", twice.detail);
    assert_eq!(r.rows, 6);
    // a settled again on D+1 is a second settlement, not a match.
    let again = format!("{HEADER}{ra},{oa},1000,EUR,succeeded,59,{t2}\n");
    let (r2, _) = reconcile_bytes(&db, &k.producer, again.as_bytes(), "d1-again", None, tol)
        .await
        .unwrap();
    let a2 = r2
        .discrepancies
        .iter()
        .find(|d| d.psp_reference == ra)
        .expect("a second settlement of a");
    assert_eq!(a2.class, "missing_in_ledger");
    assert!(a2.detail.contains("again"), "{}", a2.detail);

    // A corrected file for D+1: b's amount now 2_060: the open discrepancy
    // takes the new figures and the report says so.
    let amount_id = r
        .discrepancies
        .iter()
        .find(|d| d.class == "amount_mismatch")
        .unwrap()
        .discrepancy_id
        .clone();
    let (r3, _) = reconcile_bytes(
        &db,
        &k.producer,
        rows(2_060).as_bytes(),
        "d1-fix",
        None,
        tol,
    )
    .await
    .unwrap();
    assert_eq!(
        r3.updated_discrepancies,
        std::slice::from_ref(&amount_id),
        "{}",
        r3.table()
    );
    let stored = count(
        &db,
        &format!(
            "SELECT theirs_minor FROM reconcile_discrepancies WHERE discrepancy_id = '{amount_id}'"
        ),
    )
    .await;
    assert_eq!(stored, 2_060);

    // Refund rows never match a charge; accept is refused for its status
    // mismatch siblings and across signs (nothing to accept here: it is
    // missing_in_ledger without our amount).
    let refund = r
        .discrepancies
        .iter()
        .find(|d| d.psp_reference == format!("re_{u}_x"))
        .unwrap();
    assert!(refund.ours.is_none());

    // Accept amount (b) and fee (c): psp_receivable of each order equals
    // what the PSP owes per its row: amount − fee.
    let fee_id = r
        .discrepancies
        .iter()
        .find(|d| d.class == "fee_mismatch")
        .unwrap()
        .discrepancy_id
        .clone();
    for id in [&amount_id, &fee_id] {
        resolve(
            &db,
            &k.producer,
            id,
            ResolutionAction::AcceptPspAmount,
            "PSP right",
            "t",
        )
        .await
        .unwrap();
    }
    let evs = read_all(&k).await;
    apply(&db, &evs, 50, &[Projection::Ledger, Projection::Wallet]).await;
    assert_eq!(receivable_of(&db, &pb.to_string()).await, 2_060 - 88);
    assert_eq!(receivable_of(&db, &pc.to_string()).await, 3_000 - 120);
    assert_eq!(receivable_of(&db, &pa.to_string()).await, 1_000 - 59);
    let v = projections::verify(&db).await;
    assert!(v.is_ok(), "{v:?}");

    // The pending order p: its status_mismatch is closed once the ledger
    // has it succeeded with the same amount and fee (next run).
    let status_id = r
        .discrepancies
        .iter()
        .find(|d| d.class == "status_mismatch")
        .unwrap()
        .discrepancy_id
        .clone();
    let (pp, _, _) = ids[3].clone();
    apply(
        &db,
        &[envelope(
            Some(pp),
            "late",
            day2 + 7_200_000_000,
            OrderSucceeded {
                order_id: op,
                psp_reference: rp.clone(),
                amount: eur(4_000),
                fee: eur(150),
            }
            .into(),
        )],
        1,
        &[Projection::Ledger, Projection::Wallet],
    )
    .await;
    let (r4, _) = reconcile_bytes(&db, &k.producer, file_d.as_bytes(), "d", None, tol)
        .await
        .unwrap();
    assert_eq!(r4.auto_resolved, std::slice::from_ref(&status_id));
    let state = count(
        &db,
        &format!("SELECT COUNT(*) FROM reconcile_discrepancies WHERE discrepancy_id = '{status_id}' AND state = 'resolved' AND action = 'expect_late_settlement' AND reason = 'ledger caught up' AND adjustment_minor IS NULL"),
    )
    .await;
    assert_eq!(state, 1);
    let evs = read_all(&k).await;
    assert!(evs.iter().any(|e| matches!(&e.event, Event::ReconciliationDiscrepancyResolved(x) if x.discrepancy_id.to_string() == status_id && x.reason == "ledger caught up")));
}

/// Every event of the test's reconciliation topic so far.
async fn read_all(k: &testkit::TestKafka) -> Vec<events::Envelope> {
    let topic = k.topic(events::TopicKind::Reconciliation);
    let high: i64 = streaming::reader::watermarks(&k.cfg, &topic)
        .expect("watermarks")
        .iter()
        .map(|(_, lo, hi)| hi - lo)
        .sum();
    reconciliation_events(k, usize::try_from(high).unwrap()).await
}

both!(review_fixes_hold, body);

/// A refund row with an unknown reference for an order with a succeeded
/// charge of the same amount: never matched to the charge; and
/// accept_psp_amount is refused when the row also has a status mismatch
/// or the two amounts differ in sign.
async fn refund_body(db: Db) {
    let k = testkit::TestKafka::new(1).await;
    let u = &k.unique;
    let d = reconcile::settlement::parse_date("2026-03-12").unwrap();
    let day = reconcile::settlement::day_start_ms(d) * 1_000;
    let t = Timestamp::from_micros(day + 3_600_000_000).to_string();
    let (req, pay, order) = request(&format!("{u}-rf"), eur(5_000), day + 1);
    let reference = format!("ch_{u}_rf");
    apply(
        &db,
        &[
            req,
            envelope(
                Some(pay),
                "ok",
                day + 2,
                OrderSucceeded {
                    order_id: order,
                    psp_reference: reference.clone(),
                    amount: eur(5_000),
                    fee: eur(200),
                }
                .into(),
            ),
            envelope(
                Some(pay),
                "refund",
                day + 3,
                RefundSucceeded {
                    refund_id: RefundId::from_uuid(uuid::Uuid::now_v7()),
                    order_id: order,
                    psp_reference: format!("re_{u}_ok"),
                    amount: eur(300),
                }
                .into(),
            ),
        ],
        10,
        &[Projection::Ledger, Projection::Wallet],
    )
    .await;
    // The PSP lists our charge's reference as a refund of -5_000: matched
    // by reference (same reference), status and amount both differ.
    let file = format!(
        "{HEADER}{reference},{order},-5000,EUR,refunded,0,{t}\nre_{u}_new,{order},-300,EUR,refunded,0,{t}\nre_{u}_ok,{order},-250,EUR,refunded,0,{t}\n"
    );
    let (r, _) = reconcile_bytes(
        &db,
        &k.producer,
        file.as_bytes(),
        "rf",
        None,
        Tolerance::default(),
    )
    .await
    .unwrap();
    let classes: Vec<(&str, &str)> = r
        .discrepancies
        .iter()
        .map(|d| (d.class.as_str(), d.psp_reference.as_str()))
        .collect();
    assert!(
        classes.contains(&("status_mismatch", reference.as_str())),
        "{}",
        r.table()
    );
    assert!(
        classes.contains(&("missing_in_ledger", format!("re_{u}_new").as_str())),
        "{}",
        r.table()
    );
    let amount = r
        .discrepancies
        .iter()
        .find(|d| d.class == "amount_mismatch")
        .expect("amount_mismatch");
    let e = resolve(
        &db,
        &k.producer,
        &amount.discrepancy_id,
        ResolutionAction::AcceptPspAmount,
        "x",
        "t",
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("differ in sign"), "{e}");
    // An adjustment above the bound is refused.
    reconcile_test_exec(
        &db,
        &format!(
            "UPDATE reconcile_discrepancies SET theirs_minor = 3000000000000000 WHERE discrepancy_id = '{}'",
            amount.discrepancy_id
        ),
    )
    .await;
    let e = resolve(
        &db,
        &k.producer,
        &amount.discrepancy_id,
        ResolutionAction::AcceptPspAmount,
        "x",
        "t",
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("above the bound"), "{e}");
    // Even with the same sign, a status mismatch of the row refuses it.
    reconcile_test_exec(
        &db,
        &format!(
            "UPDATE reconcile_discrepancies SET theirs_minor = 5100 WHERE discrepancy_id = '{}'",
            amount.discrepancy_id
        ),
    )
    .await;
    let e = resolve(
        &db,
        &k.producer,
        &amount.discrepancy_id,
        ResolutionAction::AcceptPspAmount,
        "x",
        "t",
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("status_mismatch"), "{e}");
    // Nothing was booked.
    assert_eq!(
        receivable_of(&db, &pay.to_string()).await,
        5_000 - 200 - 300
    );
    // The refund row's amount accepted: psp_receivable of the order is
    // what the PSP owes per its rows: the charge less fee, less -250.
    let refund = r
        .discrepancies
        .iter()
        .find(|d| d.class == "amount_mismatch" && d.psp_reference == format!("re_{u}_ok"))
        .expect("refund amount_mismatch");
    let res = resolve(
        &db,
        &k.producer,
        &refund.discrepancy_id,
        ResolutionAction::AcceptPspAmount,
        "PSP right",
        "t",
    )
    .await
    .unwrap();
    assert_eq!(res.adjustment.unwrap().amount_minor, 50);
    let evs = read_all(&k).await;
    apply(&db, &evs, 50, &[Projection::Ledger, Projection::Wallet]).await;
    assert_eq!(
        receivable_of(&db, &pay.to_string()).await,
        5_000 - 200 - 250
    );
    let v = projections::verify(&db).await;
    assert!(v.is_ok(), "{v:?}");
}

async fn reconcile_test_exec(db: &Db, sql: &str) {
    crate::harness::exec(db, sql).await;
}

both!(refund_rows_never_match_charges, refund_body);
