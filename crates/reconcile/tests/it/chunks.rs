//! A file of several parser chunks (`settlement::PROGRESS_ROWS` rows
//! each): the claims written while the file is read (PostgreSQL copies
//! them as the rows arrive) and the discrepancies are exactly what the pure
//! matching of the whole file gives, with differences placed on the chunk
//! boundaries, references claimed by an earlier day and by an earlier file
//! of the same day, a reference of another day, a PSP batch row and an
//! identical copy of a row.

use crate::both;
use crate::harness::{count, exec, reconciliation_events};
use events::{Currency, DiscrepancyClass, Timestamp};
use reconcile::matching::{LedgerRef, Tolerance, match_rows};
use reconcile::settlement::PROGRESS_ROWS;
use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use storage::Db;

const HEADER: &str = "psp_reference,order_id,amount_minor,currency,status,fee_minor,settled_at\n";

fn charge(reference: &str, order: &str, amount: i64, fee: i64, at: i64) -> LedgerRef {
    LedgerRef {
        psp_reference: reference.into(),
        kind: "charge".into(),
        order_id: order.into(),
        status: "succeeded".into(),
        currency: Currency::EUR,
        amount_minor: amount,
        fee_minor: fee,
        occurred_at: at,
    }
}

async fn load(db: &Db, refs: &[LedgerRef]) {
    for chunk in refs.chunks(500) {
        let values =
            vec!["(?, 'charge', ?, NULL, 'succeeded', 'EUR', ?, ?, ?, 'test')"; chunk.len()]
                .join(",");
        let sql = format!(
            "INSERT INTO ledger_psp_references (psp_reference, kind, order_id, refund_id, status, currency, amount_minor, fee_minor, occurred_at, event_id) VALUES {values}"
        );
        match db {
            Db::Postgres(p) => {
                // `$n` placeholders on PostgreSQL.
                let mut n = 0;
                let sql = sql
                    .split('?')
                    .enumerate()
                    .fold(String::new(), |mut acc, (i, part)| {
                        if i > 0 {
                            n += 1;
                            write!(acc, "${n}").unwrap();
                        }
                        acc.push_str(part);
                        acc
                    });
                let mut q = sqlx::query(&sql);
                for r in chunk {
                    q = q
                        .bind(&r.psp_reference)
                        .bind(&r.order_id)
                        .bind(r.amount_minor)
                        .bind(r.fee_minor)
                        .bind(r.occurred_at);
                }
                q.execute(p).await.unwrap();
            }
            Db::Sqlite(p) => {
                let mut q = sqlx::query(&sql);
                for r in chunk {
                    q = q
                        .bind(&r.psp_reference)
                        .bind(&r.order_id)
                        .bind(r.amount_minor)
                        .bind(r.fee_minor)
                        .bind(r.occurred_at);
                }
                q.execute(p).await.unwrap();
            }
        }
    }
}

async fn claims_of(db: &Db, run_id: &str) -> BTreeSet<(String, String)> {
    let sql = format!(
        "SELECT psp_reference, row_reference FROM reconcile_matched_refs WHERE run_id = '{run_id}'"
    );
    let rows: Vec<(String, String)> = match db {
        Db::Postgres(p) => sqlx::query_as(&sql).fetch_all(p).await.unwrap(),
        Db::Sqlite(p) => sqlx::query_as(&sql).fetch_all(p).await.unwrap(),
    };
    rows.into_iter().collect()
}

async fn body(db: Db) {
    let k = testkit::TestKafka::new(1).await;
    let u = &k.unique;
    let date = reconcile::settlement::parse_date("2026-07-08").unwrap();
    let day = reconcile::settlement::format_date(date);
    let day_us = reconcile::settlement::day_start_ms(date) * 1_000;
    let n = 2 * PROGRESS_ROWS + 500;
    let at = |i: usize| day_us + i64::try_from(i).unwrap() * 1_000_000;
    let reference = |i: usize| format!("ch_{u}_{i:06}");
    let order = |i: usize| format!("o_{u}_{i:06}");
    let amount = |i: usize| 500 + i64::try_from(i).unwrap() % 10_000;
    let mut ledger: Vec<LedgerRef> = (0..n)
        .map(|i| charge(&reference(i), &order(i), amount(i), 30, at(i)))
        .collect();
    // Claimed by the day before (settled again: missing_in_ledger), by an
    // earlier file of this day (matched, the first claim kept), of the day
    // before and unclaimed (matched by reference, claimed with the run),
    // and two charges settled by one PSP batch row.
    let prev = charge(&format!("ch_{u}_prev"), "o_prev", 700, 30, at(10));
    let same = charge(&format!("ch_{u}_same"), "o_same", 800, 30, at(11));
    let off = charge(
        &format!("ch_{u}_off"),
        "o_off",
        900,
        30,
        day_us - 3_600_000_000,
    );
    let b1 = charge(&format!("ch_{u}_b1"), &format!("ob1_{u}"), 100, 10, at(12));
    let b2 = charge(&format!("ch_{u}_b2"), &format!("ob2_{u}"), 200, 20, at(13));
    ledger.extend([
        prev.clone(),
        same.clone(),
        off.clone(),
        b1.clone(),
        b2.clone(),
    ]);
    load(&db, &ledger).await;
    exec(
        &db,
        &format!(
            "INSERT INTO reconcile_matched_refs (psp_reference, settlement_date, run_id, row_reference, created_at) VALUES \
             ('{}', '2026-07-07', 'an-earlier-day', '{}', 1), ('{}', '{day}', 'an-earlier-file', '{}', 1)",
            prev.psp_reference, prev.psp_reference, same.psp_reference, same.psp_reference
        ),
    )
    .await;

    // The file: every charge but two on a chunk boundary (missing_at_psp),
    // an amount difference opening the second chunk, a fee difference on
    // the last row, an identical copy of the first chunk's last row.
    let missing = [PROGRESS_ROWS - 1, PROGRESS_ROWS + 1];
    let mut file = String::from(HEADER);
    let settled = |i: usize| Timestamp::from_micros(at(i) + 1_000).to_string();
    for i in 0..n {
        if missing.contains(&i) {
            continue;
        }
        let a = amount(i) + i64::from(i == PROGRESS_ROWS + 2);
        let fee = 30 + i64::from(i == n - 1) * 5;
        let line = format!(
            "{},{},{a},EUR,succeeded,{fee},{}\n",
            reference(i),
            order(i),
            settled(i)
        );
        file.push_str(&line);
        if i == PROGRESS_ROWS - 2 {
            file.push_str(&line);
        }
    }
    for r in [&prev, &same, &off] {
        writeln!(
            file,
            "{},{},{},EUR,succeeded,30,{}",
            r.psp_reference,
            r.order_id,
            r.amount_minor,
            settled(20)
        )
        .unwrap();
    }
    writeln!(
        file,
        "bt_{u},{};{},300,EUR,succeeded,30,{}",
        b1.order_id,
        b2.order_id,
        settled(21)
    )
    .unwrap();

    // What the pure matching of the whole file says.
    let parsed = reconcile::settlement::parse(file.as_bytes(), Some(date)).unwrap();
    let by_ref: HashMap<&str, &LedgerRef> = ledger
        .iter()
        .map(|r| (r.psp_reference.as_str(), r))
        .collect();
    let by_order: HashMap<String, Vec<LedgerRef>> = [&b1, &b2]
        .into_iter()
        .map(|r| (r.order_id.clone(), vec![r.clone()]))
        .collect();
    let on_day: Vec<LedgerRef> = ledger
        .iter()
        .filter(|r| r.occurred_at >= day_us && r.occurred_at < day_us + 86_400_000_000)
        .cloned()
        .collect();
    let earlier: HashMap<String, String> =
        [(prev.psp_reference.clone(), "2026-07-07".to_owned())].into();
    let outcome = match_rows(
        &parsed.rows,
        &by_ref,
        &by_order,
        &on_day,
        &earlier,
        Tolerance::default(),
    );
    let mut expected: BTreeSet<(String, String)> = outcome
        .findings
        .iter()
        .map(|f| (f.class.as_str().to_owned(), f.psp_reference.clone()))
        .collect();
    expected.insert((
        DiscrepancyClass::MissingInLedger.as_str().to_owned(),
        reference(PROGRESS_ROWS - 2),
    ));
    // The oracle itself, spelled out.
    let by_class = |c: DiscrepancyClass| {
        expected
            .iter()
            .filter(|(class, _)| class == c.as_str())
            .map(|(_, r)| r.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        by_class(DiscrepancyClass::MissingAtPsp),
        [reference(PROGRESS_ROWS - 1), reference(PROGRESS_ROWS + 1)]
    );
    assert_eq!(
        by_class(DiscrepancyClass::AmountMismatch),
        [reference(PROGRESS_ROWS + 2)]
    );
    assert_eq!(by_class(DiscrepancyClass::FeeMismatch), [reference(n - 1)]);
    let mut twice = vec![prev.psp_reference.clone(), reference(PROGRESS_ROWS - 2)];
    twice.sort();
    assert_eq!(by_class(DiscrepancyClass::MissingInLedger), twice);
    assert_eq!(expected.len(), 6);

    let (r, _) = reconcile::reconcile_bytes(
        &db,
        &k.producer,
        file.as_bytes(),
        "chunks",
        None,
        Tolerance::default(),
    )
    .await
    .unwrap();
    let found: BTreeSet<(String, String)> = r
        .discrepancies
        .iter()
        .map(|d| (d.class.clone(), d.psp_reference.clone()))
        .collect();
    assert_eq!(found, expected, "{}", r.table());
    assert_eq!(r.matched, i64::try_from(outcome.matched).unwrap());
    assert_eq!(r.matched_by_order, 1);
    // Claims: the matching's, except the one an earlier file of the day
    // holds (the first claim is kept).
    let want: BTreeSet<(String, String)> = outcome
        .claimed
        .iter()
        .filter(|(ours, _)| *ours != same.psp_reference)
        .cloned()
        .collect();
    assert_eq!(want.len(), n - 2 + 1 + 2);
    assert!(want.contains(&(b1.psp_reference.clone(), format!("bt_{u}"))));
    assert!(want.contains(&(off.psp_reference.clone(), off.psp_reference.clone())));
    assert_eq!(claims_of(&db, &r.run_id).await, want);
    assert_eq!(
        claims_of(&db, "an-earlier-file").await,
        [(same.psp_reference.clone(), same.psp_reference.clone())].into()
    );
    let total = count(&db, "SELECT COUNT(*) FROM reconcile_matched_refs").await;
    assert_eq!(total, i64::try_from(want.len()).unwrap() + 2);
    // Six found events and the run event.
    let evs = reconciliation_events(&k, 7).await;
    assert_eq!(evs.len(), 7);

    // The same file again: nothing new, not a claim more.
    let (again, _) = reconcile::reconcile_bytes(
        &db,
        &k.producer,
        file.as_bytes(),
        "chunks",
        None,
        Tolerance::default(),
    )
    .await
    .unwrap();
    assert!(again.already_recorded);
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM reconcile_matched_refs").await,
        total
    );
    reconciliation_events(&k, 7).await;

    // A rejected file (a bad row in its last chunk) claims nothing, although
    // its first chunks were handed over while it was read.
    let bad = format!("{file}ch_bad,o_bad,1.5,EUR,succeeded,1,2026-07-08T10:00:00Z\n");
    exec(&db, "DELETE FROM reconcile_matched_refs").await;
    let e = reconcile::reconcile_bytes(
        &db,
        &k.producer,
        bad.as_bytes(),
        "chunks",
        None,
        Tolerance::default(),
    )
    .await
    .unwrap_err();
    assert!(format!("{e:#}").contains("not an integer"), "{e:#}");
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM reconcile_matched_refs").await,
        0
    );
    assert_eq!(count(&db, "SELECT COUNT(*) FROM reconcile_runs").await, 1);
}

both!(claims_and_discrepancies_across_parser_chunks, body);
