//! `ledger_psp_references` (migration 3003): written by the ledger
//! projection with its bookings; status moves forward only.

use crate::both;
use crate::harness::{apply, envelope, eur, request, strings, succeeded};
use events::{OrderPending, OrderSettledByWebhook, RefundId, RefundSucceeded};
use projections::Projection;
use storage::Db;

async fn refs(db: &Db) -> Vec<String> {
    strings(
        db,
        "SELECT psp_reference || '|' || kind || '|' || status || '|' || currency || '|' || \
         CAST(amount_minor AS TEXT) || '|' || CAST(fee_minor AS TEXT) || '|' || \
         CAST(occurred_at AS TEXT) || '|' || COALESCE(refund_id, '-') FROM ledger_psp_references",
    )
    .await
}

async fn forward_only(db: Db) {
    let t0 = 1_764_000_000_000_000;
    let (req_a, pay_a, ord_a) = request("pref-a", "b1", "s1", eur(1_000), t0);
    let (req_b, pay_b, ord_b) = request("pref-b", "b1", "s1", eur(2_000), t0);
    let pending = |tag: &str, at| {
        envelope(
            Some(pay_b),
            tag,
            at,
            OrderPending {
                order_id: ord_b,
                psp_reference: "ch_b".into(),
                amount: eur(2_000),
            }
            .into(),
        )
    };
    let settled = envelope(
        Some(pay_b),
        "settled",
        t0 + 3,
        OrderSettledByWebhook {
            order_id: ord_b,
            psp_reference: "ch_b".into(),
            succeeded: true,
            amount: eur(2_000),
            fee: Some(eur(88)),
            failure_reason: None,
        }
        .into(),
    );
    let refund = RefundId::from_uuid(uuid::Uuid::now_v7());
    let refunded = envelope(
        Some(pay_a),
        "refunded",
        t0 + 4,
        RefundSucceeded {
            refund_id: refund,
            order_id: ord_a,
            psp_reference: "re_a".into(),
            amount: eur(300),
        }
        .into(),
    );
    // Unknown order: rejected by the ledger, so no reference either.
    let (_, pay_x, ord_x) = request("pref-x", "b1", "s1", eur(5), t0);
    let rejected = succeeded(pay_x, ord_x, "x-ok", eur(5), eur(1), t0);

    // pending then settled in one batch; a pending (other event id)
    // arriving afterwards must not move the status back.
    let mut evs = vec![
        req_a,
        req_b,
        succeeded(pay_a, ord_a, "a-ok", eur(1_000), eur(59), t0 + 1),
        pending("pending-1", t0 + 2),
        settled,
        rejected,
    ];
    let out = apply(&db, Projection::Ledger, &evs, 100).await;
    assert!(matches!(out[5], streaming::Outcome::Rejected { .. }));
    evs.clear();
    evs.push(pending("pending-2", t0 + 9));
    evs.push(refunded);
    apply(&db, Projection::Ledger, &evs, 1).await;
    let want = vec![
        format!("ch_b|charge|succeeded|EUR|2000|88|{}|-", t0 + 3),
        format!("psp-{ord_a}|charge|succeeded|EUR|1000|59|{}|-", t0 + 1),
        format!("re_a|refund|refunded|EUR|-300|0|{}|{refund}", t0 + 4),
    ];
    let mut want = want;
    want.sort();
    assert_eq!(refs(&db).await, want);
    // The wallet projection does not write references.
    let (req_c, pay_c, ord_c) = request("pref-c", "b1", "s1", eur(700), t0);
    apply(
        &db,
        Projection::Wallet,
        &[
            req_c,
            succeeded(pay_c, ord_c, "c-ok", eur(700), eur(50), t0),
        ],
        10,
    )
    .await;
    assert_eq!(refs(&db).await.len(), 3);
}
both!(psp_references_move_forward_only, forward_only);

/// A second capture of an already captured order under another reference
/// is ignored by the ledger (nothing booked): its reference must not be
/// recorded as succeeded; the booked capture's reference stays as it was.
async fn ignored_capture(db: Db) {
    let t0 = 1_764_100_000_000_000;
    let (req, pay, ord) = request("pref-ign", "b1", "s1", eur(1_000), t0);
    let second = envelope(
        Some(pay),
        "second-charge",
        t0 + 2,
        events::OrderSucceeded {
            order_id: ord,
            psp_reference: "ch_second".into(),
            amount: eur(1_000),
            fee: eur(59),
        }
        .into(),
    );
    let webhook_same = envelope(
        Some(pay),
        "webhook-same",
        t0 + 3,
        OrderSettledByWebhook {
            order_id: ord,
            psp_reference: format!("psp-{ord}"),
            succeeded: true,
            amount: eur(1_000),
            fee: Some(eur(59)),
            failure_reason: None,
        }
        .into(),
    );
    let out = apply(
        &db,
        Projection::Ledger,
        &[
            req,
            succeeded(pay, ord, "first", eur(1_000), eur(59), t0 + 1),
            second,
            webhook_same,
        ],
        100,
    )
    .await;
    assert!(matches!(out[2], streaming::Outcome::Ignored), "{out:?}");
    assert!(matches!(out[3], streaming::Outcome::Ignored), "{out:?}");
    assert_eq!(
        refs(&db).await,
        [format!(
            "psp-{ord}|charge|succeeded|EUR|1000|59|{}|-",
            t0 + 1
        )]
    );
}
both!(
    an_ignored_second_capture_records_no_reference,
    ignored_capture
);
