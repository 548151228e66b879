//! Malformed settlement files are rejected whole, with line numbers, and
//! nothing is written or published.

use crate::both;
use crate::harness::{count, reconciliation_events};
use reconcile::matching::Tolerance;
use reconcile::reconcile_bytes;
use storage::Db;

const HEADER: &str = "psp_reference,order_id,amount_minor,currency,status,fee_minor,settled_at\n";

fn good(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "ch_{i},o{i},{},EUR,succeeded,30,2026-11-20T10:00:0{i}Z\n",
                1000 + i
            )
        })
        .collect()
}

/// (what, file bytes, --date, substrings the error must contain)
type Case = (&'static str, Vec<u8>, Option<time::Date>, Vec<&'static str>);

async fn body(db: Db) {
    let k = testkit::TestKafka::new(1).await;
    let date = reconcile::settlement::parse_date("2026-11-20").unwrap();
    let cases: Vec<Case> = vec![
        (
            "unknown and missing columns",
            format!("psp_reference,order,amount_minor,currency,status,fee_minor,settled_at,extra\n{}", good(2)).into_bytes(),
            None,
            vec!["line 1", "unknown column(s): order, extra", "missing column(s): order_id"],
        ),
        (
            "wrong encoding",
            [HEADER.as_bytes(), good(2).as_bytes(), b"ch_9,o\xe99,100,EUR,succeeded,1,2026-11-20T10:00:00Z\n"].concat(),
            None,
            vec!["line 4", "not UTF-8"],
        ),
        (
            "bad CSV (field count)",
            format!("{HEADER}{}ch_7,o7,100,EUR\n", good(2)).into_bytes(),
            None,
            vec!["line 4", "4 fields, expected 7"],
        ),
        (
            "duplicate references",
            format!("{HEADER}{}ch_1,o9,100,EUR,succeeded,1,2026-11-20T11:00:00Z\n", good(3)).into_bytes(),
            None,
            vec!["line 5", "duplicate psp_reference \"ch_1\" with different fields: also on line 3"],
        ),
        (
            "not integers, unknown currency, bad status",
            format!("{HEADER}ch_1,o1,10.50,EUR,succeeded,1,2026-11-20T10:00:00Z\nch_2,o2,100,EUX,succeeded,1,2026-11-20T10:00:00Z\nch_3,o3,100,EUR,chargeback,1,2026-11-20T10:00:00Z\n").into_bytes(),
            None,
            vec!["line 2: amount_minor \"10.50\"", "line 3: currency \"EUX\"", "line 4: status \"chargeback\""],
        ),
        (
            "rows of another day",
            format!("{HEADER}{}ch_8,o8,100,EUR,succeeded,1,2026-11-21T00:00:00Z\n", good(2)).into_bytes(),
            Some(date),
            vec!["line 4", "not on the settlement day 2026-11-20"],
        ),
        ("empty", Vec::new(), None, vec!["empty file"]),
    ];
    for (what, bytes, d, needles) in cases {
        let e = reconcile_bytes(&db, &k.producer, &bytes, what, d, Tolerance::default())
            .await
            .expect_err(what);
        let msg = format!("{e:#}");
        for n in needles {
            assert!(msg.contains(n), "{what}: {n:?} not in {msg}");
        }
    }
    assert_eq!(count(&db, "SELECT COUNT(*) FROM reconcile_runs").await, 0);
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM reconcile_discrepancies").await,
        0
    );
    reconciliation_events(&k, 0).await;
}
both!(malformed_files_are_rejected_and_nothing_is_written, body);
