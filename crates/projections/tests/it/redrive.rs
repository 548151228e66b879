//! A stored rejection vs. a dead-letter redrive: the same event delivered
//! again at the same (topic, partition, offset) is a redelivery and keeps
//! its stored rejection; delivered at a new position (produced again by
//! `paystream dlq redrive`) it is decided afresh, once.

use crate::both;
use crate::harness::*;
use events::Envelope;
use projections::{Incoming, Projection, apply_batch, verify};
use storage::Db;
use streaming::{MessageMeta, Outcome};

fn at(offset: i64) -> MessageMeta {
    MessageMeta {
        topic: "payments".into(),
        partition: 2,
        offset,
        timestamp_ms: None,
    }
}

/// Applies one event at `offset` to both projections; both must agree.
async fn deliver(db: &Db, env: &Envelope, offset: i64) -> Outcome {
    let meta = at(offset);
    let mut out = Vec::new();
    for p in [Projection::Ledger, Projection::Wallet] {
        let inc = [Incoming {
            envelope: env,
            meta: &meta,
        }];
        out.push(apply_batch(db, p, &inc).await.expect("apply").remove(0));
    }
    assert_eq!(out[0], out[1], "ledger and wallet must decide alike");
    out.remove(0)
}

async fn captures(db: &Db, env: &Envelope) -> Vec<String> {
    strings(
        db,
        &format!(
            "SELECT booking_key || '|' || event_id FROM ledger_transactions WHERE event_id = '{}'",
            env.event_id
        ),
    )
    .await
}

async fn stored(db: &Db, env: &Envelope) -> Vec<String> {
    strings(
        db,
        &format!(
            "SELECT projection || '|' || outcome || '|' || CAST(kafka_offset AS TEXT) FROM applied_events WHERE event_id = '{}'",
            env.event_id
        ),
    )
    .await
}

async fn redrive_after_fix_is_decided_afresh_once(db: Db) {
    let (req, p, o) = request("redrive", "buyer-9", "seller-9", eur(5000), 10);
    let capture = succeeded(p, o, "redrive-capture", eur(5000), eur(50), 20);

    // The capture arrives before its PaymentRequested: rejected.
    let first = deliver(&db, &capture, 7).await;
    assert!(
        matches!(&first, Outcome::Rejected { kind, .. } if kind == "unknown_order"),
        "{first:?}"
    );
    assert_eq!(
        stored(&db, &capture).await,
        vec!["ledger|rejected|7", "wallet|rejected|7"]
    );

    // The fix: the PaymentRequested is applied.
    assert_eq!(deliver(&db, &req, 3).await, Outcome::Applied);

    // A redelivery at the same position keeps the stored rejection, even
    // though deciding afresh would now apply it.
    assert_eq!(deliver(&db, &capture, 7).await, first);
    assert!(captures(&db, &capture).await.is_empty());
    assert_eq!(
        stored(&db, &capture).await,
        vec!["ledger|rejected|7", "wallet|rejected|7"]
    );

    // The redrive: the same event at a new offset is decided afresh.
    assert_eq!(deliver(&db, &capture, 40).await, Outcome::Applied);
    assert_eq!(
        captures(&db, &capture).await,
        vec![format!("capture:{o}|{}", capture.event_id)]
    );
    assert_eq!(
        stored(&db, &capture).await,
        vec!["ledger|applied|40", "wallet|applied|40"]
    );
    let snap = snapshot(&db).await;

    // A second redrive, and a redelivery of the first: Duplicate, booked once.
    assert_eq!(deliver(&db, &capture, 41).await, Outcome::Duplicate);
    assert_eq!(deliver(&db, &capture, 40).await, Outcome::Duplicate);
    assert_eq!(deliver(&db, &capture, 7).await, Outcome::Duplicate);
    assert_eq!(snapshot(&db).await, snap);
    assert_eq!(captures(&db, &capture).await.len(), 1);
    let wallet = strings(
        &db,
        "SELECT seller_id || '|' || currency || '|' || CAST(balance_minor AS TEXT) FROM wallet_balances",
    )
    .await;
    assert_eq!(wallet, vec!["seller-9|EUR|5000"]);
    let report = verify(&db).await;
    assert!(report.is_ok(), "{report}");
}
both!(redrive_after_fix, redrive_after_fix_is_decided_afresh_once);

/// Redriven while the cause is not fixed yet: rejected again, and the row
/// takes the new position, so a redelivery of the redrive keeps its
/// rejection too.
async fn redrive_before_fix_is_rejected_again(db: Db) {
    let (req, p, o) = request("early", "buyer-8", "seller-8", eur(700), 10);
    let capture = succeeded(p, o, "early-capture", eur(700), eur(7), 20);
    let first = deliver(&db, &capture, 1).await;
    assert!(matches!(&first, Outcome::Rejected { .. }), "{first:?}");
    assert_eq!(deliver(&db, &capture, 5).await, first, "re-decided, same");
    assert_eq!(
        stored(&db, &capture).await,
        vec!["ledger|rejected|5", "wallet|rejected|5"]
    );
    assert_eq!(deliver(&db, &req, 2).await, Outcome::Applied);
    // Redelivery of the redrive at 5: stored rejection, not re-decided.
    assert_eq!(deliver(&db, &capture, 5).await, first);
    assert!(captures(&db, &capture).await.is_empty());
    // Re-read from an earlier position (as after one group's offset
    // reset): the stored rejection, so that group cannot decide it
    // differently from the other.
    assert_eq!(deliver(&db, &capture, 1).await, first);
    assert!(captures(&db, &capture).await.is_empty());
    // A redrive after the fix applies it.
    assert_eq!(deliver(&db, &capture, 9).await, Outcome::Applied);
    assert_eq!(captures(&db, &capture).await.len(), 1);
    let report = verify(&db).await;
    assert!(report.is_ok(), "{report}");
}
both!(redrive_before_fix, redrive_before_fix_is_rejected_again);
