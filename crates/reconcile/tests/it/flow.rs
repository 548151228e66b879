//! End to end with the PSP simulator: real charges and refunds, a ledger
//! built from the matching events by the real projection code, the
//! settlement file fetched with injected discrepancies plus a handcrafted
//! currency mismatch and a pending order the PSP settled; every difference
//! found and classified, nothing else; re-runs publish nothing; resolutions
//! keep the ledger verified.

use crate::both;
use crate::harness::{apply, count, envelope, eur, reconciliation_events, request};
use events::{
    DiscrepancyClass, Event, OrderPending, OrderSucceeded, RefundId, RefundSucceeded,
    ResolutionAction, Timestamp,
};
use projections::Projection;
use reconcile::matching::Tolerance;
use reconcile::{PspSource, fetch_settlement, reconcile_bytes, resolve};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use storage::Db;

/// The simulator's API key: generated once per test run (there is no
/// built-in one).
static KEY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    runtime::secret::Secret::generate("sk_test_")
        .expose()
        .to_owned()
});

async fn post(http: &reqwest::Client, url: String, key: &str, body: Value) -> Value {
    let r = http
        .post(url)
        .bearer_auth(KEY.as_str())
        .header("Idempotency-Key", key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    r.json().await.unwrap()
}

async fn psp_receivable(db: &Db) -> i64 {
    count(
        db,
        "SELECT CAST(COALESCE(SUM(amount_minor), 0) AS BIGINT) FROM ledger_entries WHERE account = 'psp_receivable' AND currency = 'EUR'",
    )
    .await
}

async fn body(db: Db) {
    let k = testkit::TestKafka::new(1).await;
    let dir = tempfile::tempdir().unwrap();
    let sim = psp_sim::spawn(psp_sim::SimConfig {
        api_key: runtime::secret::Secret::new(KEY.as_str()),
        ..psp_sim::SimConfig::for_tests(format!("sqlite://{}", dir.path().join("sim.db").display()))
    })
    .await
    .unwrap();
    let http = reqwest::Client::new();
    let base = sim.base_url();

    // The settlement day, pinned before anything is charged: the test
    // never runs across UTC midnight (charges, file and ledger on one day).
    let now = time::OffsetDateTime::now_utc();
    let to_midnight =
        (now.date().next_day().unwrap().midnight().assume_utc() - now).whole_seconds();
    if to_midnight < 120 {
        tokio::time::sleep(std::time::Duration::from_secs(
            u64::try_from(to_midnight + 2).unwrap(),
        ))
        .await;
    }
    let date = time::OffsetDateTime::now_utc().date();

    // 12 charges (one our ledger only knows as pending) and 3 refunds.
    let mut ledger = Vec::new();
    let mut pending_ref = String::new();
    let mut charges = Vec::new();
    for i in 0..12 {
        let amount = 1_000 + i * 137;
        let (req, pay, order) = request(
            &format!("{}-{i}", k.unique),
            eur(amount),
            Timestamp::now().as_micros(),
        );
        let c = post(
            &http,
            format!("{base}/v1/charges"),
            &order.to_string(),
            json!({"amount_minor": amount, "currency": "EUR", "card_token": "tok_visa", "reference": order.to_string()}),
        )
        .await;
        assert_eq!(c["status"], "succeeded");
        let reference = c["id"].as_str().unwrap().to_owned();
        let fee = c["fee_minor"].as_i64().unwrap();
        ledger.push(req);
        let at = Timestamp::now().as_micros();
        let ev: Event = if i == 5 {
            pending_ref.clone_from(&reference);
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
        ledger.push(envelope(Some(pay), "outcome", at, ev));
        charges.push((pay, order, reference));
    }
    for (pay, order, reference) in charges.iter().take(3) {
        let r = post(
            &http,
            format!("{base}/v1/charges/{reference}/refunds"),
            &format!("refund-{order}"),
            json!({"amount_minor": 300}),
        )
        .await;
        ledger.push(envelope(
            Some(*pay),
            "refund",
            Timestamp::now().as_micros(),
            RefundSucceeded {
                refund_id: RefundId::from_uuid(uuid::Uuid::now_v7()),
                order_id: *order,
                psp_reference: r["id"].as_str().unwrap().to_owned(),
                amount: eur(300),
            }
            .into(),
        ));
    }
    apply(&db, &ledger, 7, &[Projection::Ledger, Projection::Wallet]).await;
    assert!(projections::verify(&db).await.is_ok());

    // The file, with injected discrepancies, and what was injected.
    let day = reconcile::settlement::format_date(date);
    let query = "inject=missing:2,extra:1,wrong_amount:1,wrong_fee:1&seed=42";
    let psp = PspSource {
        query: Some(query.into()),
        ..PspSource::simulator(&base, sim.api_key.clone())
    };
    let original = fetch_settlement(&psp, date).await.unwrap();
    let injected: Value = http
        .get(format!("{base}/v1/settlements/{day}/injected.json?{query}"))
        .bearer_auth(KEY.as_str())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let refs = |kind: &str| -> Vec<String> {
        injected[kind]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["psp_reference"].as_str().unwrap().to_owned())
            .collect()
    };
    let (missing, extra, wrong_amount, wrong_fee) = (
        refs("missing"),
        refs("extra"),
        refs("wrong_amount"),
        refs("wrong_fee"),
    );
    assert_eq!(
        (
            missing.len(),
            extra.len(),
            wrong_amount.len(),
            wrong_fee.len()
        ),
        (2, 1, 1, 1)
    );

    // Handcraft a currency mismatch on an untouched, settled charge row.
    let text = String::from_utf8(original.clone()).unwrap();
    let touched: BTreeSet<&String> = missing
        .iter()
        .chain(&wrong_amount)
        .chain(&wrong_fee)
        .chain(&extra)
        .collect();
    let mut currency_ref = String::new();
    let mut lines: Vec<String> = Vec::new();
    for l in text.lines() {
        let f: Vec<&str> = l.split(',').collect();
        if currency_ref.is_empty()
            && f[0].starts_with("ch_")
            && *f[0] != *pending_ref
            && !touched.contains(&f[0].to_owned())
            && f[4] == "succeeded"
        {
            currency_ref = f[0].to_owned();
            lines.push(l.replace(",EUR,", ",USD,"));
        } else {
            lines.push(l.to_owned());
        }
    }
    assert!(!currency_ref.is_empty());
    let file = format!("{}\n", lines.join("\n")).into_bytes();

    // What must be found: exactly this.
    let mut want: BTreeSet<(DiscrepancyClass, String)> = BTreeSet::new();
    for r in &missing {
        if *r != pending_ref {
            want.insert((DiscrepancyClass::MissingAtPsp, r.clone()));
        }
    }
    for r in &extra {
        want.insert((DiscrepancyClass::MissingInLedger, r.clone()));
    }
    for r in &wrong_amount {
        want.insert((DiscrepancyClass::AmountMismatch, r.clone()));
    }
    for r in &wrong_fee {
        if *r != pending_ref {
            want.insert((DiscrepancyClass::FeeMismatch, r.clone()));
        }
    }
    if !missing.contains(&pending_ref) {
        want.insert((DiscrepancyClass::StatusMismatch, pending_ref.clone()));
    }
    want.insert((DiscrepancyClass::CurrencyMismatch, currency_ref.clone()));

    let tol = Tolerance::default();
    let (report, _) = reconcile_bytes(&db, &k.producer, &file, "test-file", None, tol)
        .await
        .unwrap();
    let got: BTreeSet<(DiscrepancyClass, String)> = report
        .discrepancies
        .iter()
        .map(|d| {
            (
                DiscrepancyClass::parse(&d.class).unwrap(),
                d.psp_reference.clone(),
            )
        })
        .collect();
    assert_eq!(got, want, "{}", report.table());
    assert_eq!(report.discrepancies.len(), want.len());
    assert_eq!(report.settlement_date, day);
    assert_eq!(report.new_discrepancies, i64::try_from(want.len()).unwrap());
    assert_eq!(report.unresolved, i64::try_from(want.len()).unwrap());
    assert!(!report.already_recorded);
    let rows_with_diff: BTreeSet<&String> = report
        .discrepancies
        .iter()
        .filter(|d| d.line.is_some())
        .map(|d| &d.psp_reference)
        .collect();
    assert_eq!(
        report.matched,
        report.rows - i64::try_from(rows_with_diff.len()).unwrap()
    );
    let total: i64 = report.per_class.values().sum();
    assert_eq!(total, i64::try_from(want.len()).unwrap());

    // Events: one found per difference, then the run.
    let n = want.len() + 1;
    let evs = reconciliation_events(&k, n).await;
    let found: BTreeSet<(DiscrepancyClass, String)> = evs
        .iter()
        .filter_map(|e| match &e.event {
            Event::ReconciliationDiscrepancyFound(f) => {
                Some((f.class, f.psp_reference.clone().unwrap()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(found, want);
    let Event::ReconciliationRunCompleted(run) = &evs[n - 1].event else {
        panic!("last event is the run: {:?}", evs[n - 1]);
    };
    assert_eq!(run.run_id, report.run_id);
    assert_eq!(run.discrepancies, i64::try_from(want.len()).unwrap());

    // Same file again: the recorded report, nothing new anywhere.
    let (again, _) = reconcile_bytes(&db, &k.producer, &file, "test-file", None, tol)
        .await
        .unwrap();
    assert!(again.already_recorded);
    assert_eq!(again.run_id, report.run_id);
    assert_eq!(again.discrepancies.len(), report.discrepancies.len());
    reconciliation_events(&k, n).await;
    assert_eq!(count(&db, "SELECT COUNT(*) FROM reconcile_runs").await, 1);

    // Another file for the same day (the original, without the currency
    // change): a new run; the known differences are not counted again.
    let (other, _) = reconcile_bytes(&db, &k.producer, &original, "original", None, tol)
        .await
        .unwrap();
    assert_ne!(other.run_id, report.run_id);
    assert_eq!(other.new_discrepancies, 0);
    assert_eq!(
        other.discrepancies.len(),
        want.len() - 1,
        "no currency mismatch in the original"
    );
    assert!(
        other
            .discrepancies
            .iter()
            .all(|d| d.first_found_by == report.run_id)
    );
    let evs = reconciliation_events(&k, n + 1).await;
    assert!(matches!(evs[n].event, Event::ReconciliationRunCompleted(_)));

    // Resolve the amount mismatch: the PSP's amount, booked once.
    let amount = report
        .discrepancies
        .iter()
        .find(|d| d.class == "amount_mismatch")
        .unwrap();
    let adj =
        amount.theirs.as_ref().unwrap().amount_minor - amount.ours.as_ref().unwrap().amount_minor;
    let before = psp_receivable(&db).await;
    let r = resolve(
        &db,
        &k.producer,
        &amount.discrepancy_id,
        ResolutionAction::AcceptPspAmount,
        "PSP's amount is right",
        "tester",
    )
    .await
    .unwrap();
    assert_eq!(r.adjustment.as_ref().unwrap().amount_minor, adj);
    assert_eq!(r.state, "resolved");
    let again = resolve(
        &db,
        &k.producer,
        &amount.discrepancy_id,
        ResolutionAction::Escalate,
        "again",
        "tester",
    )
    .await;
    assert!(
        again
            .unwrap_err()
            .to_string()
            .contains("cannot be resolved twice")
    );
    let evs = reconciliation_events(&k, n + 2).await;
    let resolved = evs[n + 1].clone();
    assert!(matches!(
        resolved.event,
        Event::ReconciliationDiscrepancyResolved(_)
    ));
    // Delivered twice, booked once.
    apply(
        &db,
        &[resolved.clone(), resolved],
        1,
        &[Projection::Ledger, Projection::Wallet],
    )
    .await;
    assert_eq!(psp_receivable(&db).await - before, adj);
    let v = projections::verify(&db).await;
    assert!(v.is_ok(), "{v:?}");

    // Refusals: across currencies, without amounts, without a reason.
    let cur = report
        .discrepancies
        .iter()
        .find(|d| d.class == "currency_mismatch")
        .unwrap();
    let e = resolve(
        &db,
        &k.producer,
        &cur.discrepancy_id,
        ResolutionAction::AcceptPspAmount,
        "x",
        "t",
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("across currencies"), "{e}");
    let ext = report
        .discrepancies
        .iter()
        .find(|d| d.class == "missing_in_ledger")
        .unwrap();
    let e = resolve(
        &db,
        &k.producer,
        &ext.discrepancy_id,
        ResolutionAction::AcceptPspAmount,
        "x",
        "t",
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("no amount"), "{e}");
    let e = resolve(
        &db,
        &k.producer,
        &ext.discrepancy_id,
        ResolutionAction::Escalate,
        "  ",
        "t",
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("reason"), "{e}");
    // Escalate, then settle it; expect the rest.
    resolve(
        &db,
        &k.producer,
        &ext.discrepancy_id,
        ResolutionAction::Escalate,
        "ask the PSP",
        "t",
    )
    .await
    .unwrap();
    let r = resolve(
        &db,
        &k.producer,
        &ext.discrepancy_id,
        ResolutionAction::ExpectLateSettlement,
        "PSP confirmed",
        "t",
    )
    .await
    .unwrap();
    assert_eq!(r.state, "expected");
    let mut published = n + 4;
    for d in &report.discrepancies {
        if d.discrepancy_id == amount.discrepancy_id || d.discrepancy_id == ext.discrepancy_id {
            continue;
        }
        resolve(
            &db,
            &k.producer,
            &d.discrepancy_id,
            ResolutionAction::ExpectLateSettlement,
            "timing",
            "t",
        )
        .await
        .unwrap();
        published += 1;
    }
    let evs = reconciliation_events(&k, published).await;
    apply(&db, &evs, 50, &[Projection::Ledger, Projection::Wallet]).await;
    assert_eq!(
        psp_receivable(&db).await - before,
        adj,
        "only accept_psp_amount books"
    );
    assert!(projections::verify(&db).await.is_ok());
    // Nothing unresolved for the day now.
    let (last, _) = reconcile_bytes(&db, &k.producer, &file, "test-file", None, tol)
        .await
        .unwrap();
    assert_eq!(last.unresolved, 0);
    sim.stop().await.unwrap();
}
both!(simulator_discrepancies_are_found_and_resolved, body);
