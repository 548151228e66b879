//! The rebuild's in-memory decisions (`projections::bulk::Replay`) equal
//! the live path's (`apply_batch`) on the property sequences: the same
//! outcome for every delivery, the same rows once loaded, through
//! duplicates, redeliveries at the same position, re-reads from earlier
//! positions and redrives (later copies in the same partition).

use crate::harness::*;
use crate::prop::{PaymentSpec, build, payment};
use events::Envelope;
use projections::bulk::{Replay, load, load_finished};
use projections::{Incoming, Projection, apply_batch};
use proptest::prelude::*;
use storage::Db;
use streaming::MessageMeta;

fn at(topic: &str, offset: usize) -> MessageMeta {
    MessageMeta {
        topic: topic.into(),
        partition: 0,
        offset: i64::try_from(offset).unwrap(),
        timestamp_ms: None,
    }
}

/// Deliveries in the order a log (re-)read gives them, with the batch
/// size of each stretch.
fn deliveries(
    evs: &[Envelope],
    batch: usize,
    dup_every: usize,
) -> Vec<(Vec<(Envelope, MessageMeta)>, usize)> {
    let mut first = Vec::new();
    for (i, e) in evs.iter().enumerate() {
        first.push(e.clone());
        if i % dup_every == 0 {
            first.push(evs[i / 2].clone());
        }
    }
    let n = first.len();
    let positioned = |v: &[Envelope], from: usize| -> Vec<(Envelope, MessageMeta)> {
        v.iter()
            .enumerate()
            .map(|(i, e)| (e.clone(), at("payments", from + i)))
            .collect()
    };
    vec![
        // The log as first delivered.
        (positioned(&first, 0), batch),
        // Redelivered at the same positions, batched differently.
        (positioned(&first, 0), batch + 3),
        // Re-read from earlier positions (an offset reset).
        (positioned(evs, 0), batch + 5),
        // Produced again after the end (a dead-letter redrive of all).
        (positioned(evs, n), batch + 1),
        // And on another topic: never a redrive.
        (
            evs.iter()
                .enumerate()
                .map(|(i, e)| (e.clone(), at("reconciliation", n * 2 + i)))
                .collect(),
            batch + 2,
        ),
    ]
}

async fn extra_snapshot(db: &Db) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for sql in [
        "SELECT projection || '|' || event_id || '|' || topic || '|' || CAST(kafka_partition AS TEXT) || '|' || CAST(kafka_offset AS TEXT) FROM applied_events",
        "SELECT projection || '|' || party_id || '|' || client_id || '|' || kind || '|' || currency || '|' || CAST(total_minor AS TEXT) FROM projection_totals",
        "SELECT psp_reference || '|' || kind || '|' || order_id || '|' || COALESCE(refund_id, '-') || '|' || status || '|' || currency || '|' || CAST(amount_minor AS TEXT) || '|' || CAST(fee_minor AS TEXT) || '|' || CAST(occurred_at AS TEXT) || '|' || event_id FROM ledger_psp_references",
        "SELECT client_id || '|' || seller_id || '|' || currency || '|' || CAST(balance_minor AS TEXT) FROM wallet_balances",
        "SELECT client_id || '|' || buyer_id || '|' || currency || '|' || CAST(paid_minor AS TEXT) || '|' || CAST(refunded_minor AS TEXT) FROM buyer_totals",
        "SELECT CAST(seq AS TEXT) FROM ledger_chain_head",
        "SELECT CAST(seq AS TEXT) || '|' || id FROM ledger_transactions",
        "SELECT projection || '|' || order_id || '|' || client_id FROM projection_orders",
    ] {
        out.push(strings(db, sql).await);
    }
    out
}

async fn check(live: Db, bulk: Db, specs: Vec<PaymentSpec>, batch: usize, dup: usize) {
    let evs = build(&specs);
    let stretches = deliveries(&evs, batch, dup);
    for p in [Projection::Ledger, Projection::Wallet] {
        let mut replay = Replay::new(p);
        for (stretch, size) in &stretches {
            for chunk in stretch.chunks(*size) {
                let inc: Vec<Incoming<'_>> = chunk
                    .iter()
                    .map(|(envelope, meta)| Incoming { envelope, meta })
                    .collect();
                let want = apply_batch(&live, p, &inc).await.expect("apply");
                let got = replay
                    .apply(&inc, events::Timestamp::now().as_micros())
                    .expect("replay");
                assert_eq!(got, want, "{} decides alike", p.as_str());
                // Loaded in pieces, as the rebuild's writer does.
                if replay.pending_appends() > 7 {
                    load(&bulk, &replay.take_appends()).await.expect("load");
                }
            }
        }
        load_finished(&bulk, &replay.finish())
            .await
            .expect("load final rows");
    }
    assert_eq!(snapshot(&bulk).await, snapshot(&live).await);
    assert_eq!(extra_snapshot(&bulk).await, extra_snapshot(&live).await);
    let report = projections::verify(&bulk).await;
    assert!(report.is_ok(), "{report}");
}

fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(cases(16))]
    #[test]
    fn replay_equals_live_sqlite(specs in prop::collection::vec(payment(), 1..8), batch in 1usize..20, dup in 1usize..6) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let (live, _d1) = testkit::fresh_sqlite().await.unwrap();
            let (bulk, _d2) = testkit::fresh_sqlite().await.unwrap();
            projections::migrate(&live).await.unwrap();
            projections::migrate(&bulk).await.unwrap();
            check(live, bulk, specs, batch, dup).await;
        });
    }
}

proptest! {
    #![proptest_config(cases(6))]
    #[test]
    fn replay_equals_live_postgres(specs in prop::collection::vec(payment(), 1..8), batch in 1usize..20, dup in 1usize..6) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let live = testkit::fresh_postgres().await.unwrap();
            let bulk = testkit::fresh_postgres().await.unwrap();
            projections::migrate(&live).await.unwrap();
            projections::migrate(&bulk).await.unwrap();
            check(live.clone(), bulk.clone(), specs, batch, dup).await;
            live.close().await;
            bulk.close().await;
        });
    }
}
