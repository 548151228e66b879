//! The checks, made from the outside once the system has settled: the PSP
//! simulator's own records, the API's answers, the operator's tools
//! (`ledger verify`, `reconcile`), the topics and the groups' offsets.

use crate::System;
use crate::load::{self, Client, FINAL, Seen};
use anyhow::Context;
use events::TopicKind;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use streaming::dlq;
use streaming::reader::{End, Start, TopicReader};

/// One check's verdict, printed with its numbers.
#[derive(Debug)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

fn check(name: &'static str, ok: bool, detail: impl Into<String>) -> Check {
    Check {
        name,
        ok,
        detail: detail.into(),
    }
}

/// Every (group, topics) pair of the system.
fn groups(sys: &System) -> Vec<(String, Vec<String>)> {
    let t = sys.kafka.topology();
    let payments = t.name(TopicKind::Payments);
    let recon = t.name(TopicKind::Reconciliation);
    vec![
        (t.group("handler-inbound"), vec![t.name(TopicKind::Inbound)]),
        (t.group("payment-status"), vec![payments.clone()]),
        (t.group("executor"), vec![payments.clone()]),
        (t.group("ledger"), vec![payments.clone(), recon.clone()]),
        (t.group("wallet"), vec![payments, recon]),
    ]
}

/// Total lag of every group (None while a group has not committed yet on
/// a non-empty partition).
async fn total_lag(sys: &System) -> anyhow::Result<i64> {
    let mut lag = 0;
    for (group, topics) in groups(sys) {
        for p in ops::groups::offsets(&sys.kafka, &group, &topics).await? {
            lag += p.high - p.committed.unwrap_or(p.low).max(p.low);
        }
    }
    Ok(lag)
}

/// The PSP simulator's records (its own SQLite file, read-only).
#[derive(Debug, Default)]
struct Psp {
    /// reference (our order id) → charges (id, status, amount).
    charges: BTreeMap<String, Vec<(String, String, i64)>>,
    /// charge id → refunded amounts.
    refunds: BTreeMap<String, i64>,
    refund_count: i64,
}

async fn psp(sys: &System) -> anyhow::Result<Psp> {
    let url = format!("sqlite://{}?mode=ro", sys.work.join("psp-sim.db").display());
    let db = storage::Db::connect(&url).await?;
    let storage::Db::Sqlite(p) = &db else {
        anyhow::bail!("the simulator's state is SQLite");
    };
    let mut out = Psp::default();
    let rows: Vec<(String, String, String, i64)> =
        sqlx::query_as("SELECT id, reference, status, amount_minor FROM psp_charges")
            .fetch_all(p)
            .await?;
    for (id, reference, status, amount) in rows {
        out.charges
            .entry(reference)
            .or_default()
            .push((id, status, amount));
    }
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT charge_id, amount_minor FROM psp_refunds")
            .fetch_all(p)
            .await?;
    for (charge, amount) in rows {
        *out.refunds.entry(charge).or_default() += amount;
        out.refund_count += 1;
    }
    db.close().await;
    Ok(out)
}

async fn applied_count(sys: &System) -> i64 {
    let Ok(db) = storage::Db::connect(&sys.db_url).await else {
        return -1;
    };
    let n = storage::with_pool!(&db, p => sqlx::query_scalar::<_, i64>("SELECT count(*) FROM applied_events")
        .fetch_one(p)
        .await
        .unwrap_or(-1));
    db.close().await;
    n
}

/// Waits until every accepted payment is final and the groups, the
/// projections and the PSP have been still for a few seconds.
async fn settle(
    sys: &System,
    client: &Client,
    seen: &Seen,
    limit: Duration,
) -> anyhow::Result<(BTreeMap<String, Value>, bool)> {
    let deadline = Instant::now() + limit;
    let ids: Vec<String> = seen
        .keys
        .iter()
        .filter(|k| k.route == "/v1/payments")
        .filter_map(|k| {
            k.first()
                .and_then(|(s, id, _)| (*s == 201).then(|| id.clone()).flatten())
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut views = BTreeMap::new();
    for chunk in ids.chunks(32) {
        let mut tasks = Vec::new();
        for id in chunk {
            let (c, id) = (client.clone(), id.clone());
            tasks.push(tokio::spawn(async move {
                let v = load::wait_final(&c, &id, deadline).await;
                (id, v)
            }));
        }
        for t in tasks {
            let (id, v) = t.await?;
            if let Some(v) = v {
                views.insert(id, v);
            }
        }
    }
    let mut still = 0;
    let mut last = (i64::MIN, i64::MIN, usize::MAX);
    while Instant::now() < deadline {
        let lag = total_lag(sys).await.unwrap_or(i64::MAX);
        let psp = psp(sys).await.unwrap_or_default();
        let now = (
            applied_count(sys).await,
            psp.refund_count,
            psp.charges.len(),
        );
        if lag == 0 && now == last {
            still += 1;
            if still >= 5 {
                return Ok((views, true));
            }
        } else {
            still = 0;
        }
        last = now;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok((views, false))
}

/// Runs the checks; see the crate docs for what each one proves.
pub async fn run(
    sys: &mut System,
    client: &Client,
    seen: &Seen,
    handler_restarts: &[Instant],
    settle_limit: Duration,
) -> anyhow::Result<Vec<Check>> {
    let mut out = Vec::new();
    let (views, settled) = settle(sys, client, seen, settle_limit).await?;
    // Refresh the views once settled (refunds land after "final").
    let mut views = views;
    for (id, v) in views.iter_mut() {
        if let Some(fresh) =
            load::get_payment(client, id, Instant::now() + Duration::from_secs(30)).await
        {
            *v = fresh;
        }
    }
    out.push(check(
        "system settled",
        settled,
        if settled {
            "groups caught up, nothing moving for 5 s"
        } else {
            "still moving at the settle timeout"
        },
    ));
    out.push(check(
        "no component died on its own",
        sys.unexpected_exits.is_empty(),
        if sys.unexpected_exits.is_empty() {
            "0 unexpected exits".to_owned()
        } else {
            sys.unexpected_exits.join("\n")
        },
    ));

    // Keys: a definite answer for each, the same on every retry.
    let mut keys = seen.keys.clone();
    let deadline = Instant::now() + Duration::from_secs(120);
    for k in keys.iter_mut() {
        load::resend(client, k, &Default::default(), deadline).await;
    }
    let unanswered = keys.iter().filter(|k| k.answers.is_empty()).count();
    let mut differing = Vec::new();
    for k in &keys {
        let norm = |(s, id, code): &(u16, Option<String>, Option<String>)| {
            // A replay of a 201 is a 201 with the same id; 200 only for GET.
            (if *s == 200 { 201 } else { *s }, id.clone(), code.clone())
        };
        let first = k.answers.first().map(norm);
        if k.answers.iter().map(norm).any(|a| Some(a) != first) {
            differing.push(format!("{}: {:?}", k.key, k.answers));
        }
    }
    let payment_keys: Vec<_> = keys.iter().filter(|k| k.route == "/v1/payments").collect();
    let created: BTreeSet<&str> = payment_keys
        .iter()
        .filter_map(|k| {
            k.first()
                .and_then(|(s, id, _)| (*s == 201).then_some(id.as_deref()).flatten())
        })
        .collect();
    let created_keys = payment_keys
        .iter()
        .filter(|k| k.first().is_some_and(|a| a.0 == 201))
        .count();
    out.push(check(
        "one payment per key, same answer on retry",
        unanswered == 0 && differing.is_empty() && created.len() == created_keys,
        format!(
            "{} keys, {unanswered} without a definite answer, {} with differing answers, {} payments for {created_keys} accepted keys{}",
            keys.len(),
            differing.len(),
            created.len(),
            differing.first().map(|d| format!("; e.g. {d}")).unwrap_or_default()
        ),
    ));

    // Nothing left non-final.
    let non_final: Vec<(&str, String)> = created
        .iter()
        .filter_map(|id| {
            let status = views
                .get(*id)
                .and_then(|v| v["status"].as_str())
                .unwrap_or("unknown");
            (!FINAL.contains(&status)).then(|| (*id, status.to_owned()))
        })
        .collect();
    out.push(check(
        "nothing left non-final",
        non_final.is_empty(),
        format!(
            "{} payments, {} not final{}",
            created.len(),
            non_final.len(),
            non_final
                .first()
                .map(|(id, s)| format!(" (e.g. {id}: {s})"))
                .unwrap_or_default()
        ),
    ));

    // The PSP's records against ours.
    let psp = psp(sys).await?;
    let doubles: Vec<&String> = psp
        .charges
        .iter()
        .filter(|(_, cs)| cs.len() > 1)
        .map(|(r, _)| r)
        .collect();
    let charges: usize = psp.charges.values().map(Vec::len).sum();
    out.push(check(
        "no order charged twice at the PSP",
        doubles.is_empty(),
        format!(
            "{charges} charges for {} references, {} references charged more than once",
            psp.charges.len(),
            doubles.len()
        ),
    ));
    let mut ours_ok: BTreeMap<String, (String, i64)> = BTreeMap::new(); // order → (seller, amount)
    let mut all_orders: BTreeMap<String, String> = BTreeMap::new(); // order → status
    for v in views.values() {
        for o in v["orders"].as_array().into_iter().flatten() {
            let (Some(id), Some(status)) = (o["order_id"].as_str(), o["status"].as_str()) else {
                continue;
            };
            all_orders.insert(id.to_owned(), status.to_owned());
            if status == "succeeded" {
                ours_ok.insert(
                    id.to_owned(),
                    (
                        o["seller_id"].as_str().unwrap_or("").to_owned(),
                        o["amount_minor"].as_i64().unwrap_or(0),
                    ),
                );
            }
        }
    }
    let psp_ok: BTreeMap<&String, (&String, i64)> = psp
        .charges
        .iter()
        .filter_map(|(r, cs)| {
            cs.iter()
                .find(|c| c.1 == "succeeded")
                .map(|c| (r, (&c.0, c.2)))
        })
        .collect();
    let only_psp: Vec<&&String> = psp_ok
        .keys()
        .filter(|r| !ours_ok.contains_key(r.as_str()))
        .collect();
    let only_ours: Vec<&String> = ours_ok.keys().filter(|o| !psp_ok.contains_key(o)).collect();
    let amount_differs = ours_ok
        .iter()
        .filter(|(o, (_, a))| psp_ok.get(o).is_some_and(|(_, pa)| pa != a))
        .count();
    out.push(check(
        "PSP charges = our succeeded orders",
        only_psp.is_empty() && only_ours.is_empty() && amount_differs == 0,
        format!(
            "{} succeeded at the PSP, {} succeeded orders here; {} only at the PSP{}, {} only here, {amount_differs} amounts differ",
            psp_ok.len(),
            ours_ok.len(),
            only_psp.len(),
            only_psp.first().map(|r| format!(" (e.g. {r}: ours {})", all_orders.get(r.as_str()).map_or("unknown", String::as_str))).unwrap_or_default(),
            only_ours.len()
        ),
    ));

    // Wallets: each seller's balance = the PSP's captures minus refunds.
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    for (order, (seller, amount)) in &ours_ok {
        let refunded = psp_ok
            .get(order)
            .and_then(|(charge, _)| psp.refunds.get(*charge))
            .copied()
            .unwrap_or(0);
        *expected.entry(seller.clone()).or_default() += amount - refunded;
    }
    let projections = format!(
        "http://127.0.0.1:{}",
        sys.proc("projections")?.port.unwrap_or(0)
    );
    let mut wrong = Vec::new();
    for (seller, want) in &expected {
        let got = client
            .http
            .get(format!("{projections}/v1/wallets/{seller}"))
            .bearer_auth(&client.api_key)
            .send()
            .await
            .ok();
        let v: Value = match got {
            Some(r) => r.json().await.unwrap_or(Value::Null),
            None => Value::Null,
        };
        let have = v["balances"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|b| b["currency"] == "EUR")
            .and_then(|b| b["balance_minor"].as_i64())
            .unwrap_or(0);
        if have != *want {
            wrong.push(format!("{seller}: wallet {have}, PSP {want}"));
        }
    }
    out.push(check(
        "wallets = PSP captures - refunds",
        wrong.is_empty(),
        format!(
            "{} sellers, {} refunds at the PSP, {} wrong{}",
            expected.len(),
            psp.refund_count,
            wrong.len(),
            wrong
                .first()
                .map(|w| format!(" (e.g. {w})"))
                .unwrap_or_default()
        ),
    ));

    // The operator's tools.
    let (code, text) = sys.paystream(&["ledger", "verify"]).await?;
    let summary = text
        .lines()
        .find(|l| l.contains("transactions,"))
        .unwrap_or("")
        .trim()
        .to_owned();
    out.push(check(
        "ledger verify (balanced, chained, once)",
        code == 0,
        if code == 0 {
            summary
        } else {
            format!("exit {code}: {text}")
        },
    ));
    out.push(reconcile(sys).await?);

    // Poison: dead-lettered by every group that reads its topic.
    out.extend(dead_letters(sys).await?);
    out.push(check(
        "forged webhooks refused",
        !sys.forged_answers.is_empty() && sys.forged_answers.iter().all(|s| *s == 401),
        format!("answers {:?}", sys.forged_answers),
    ));

    // OpenAPI: every answer the clients saw is documented.
    out.push(openapi(client, seen).await);

    // Availability: keys a killed handler held are answered soon after its
    // restart (the lease guards live holders only).
    let mut worst = Duration::ZERO;
    let mut held = 0;
    for k in &seen.keys {
        if k.in_use == 0 {
            continue;
        }
        let (Some(done), Some(restart)) = (
            k.definite_at,
            handler_restarts
                .iter()
                .filter(|r| **r <= k.definite_at.unwrap_or(k.first_sent))
                .max(),
        ) else {
            continue;
        };
        if *restart >= k.first_sent {
            held += 1;
            worst = worst.max(done.saturating_duration_since(*restart));
        }
    }
    out.push(check(
        "keys of a killed handler answered within 10 s",
        worst <= Duration::from_secs(10),
        format!("{held} keys held across a handler kill; the slowest answered {:.1} s after the restart", worst.as_secs_f64()),
    ));
    Ok(out)
}

/// Reconciliation of every day of the run against the PSP's settlement
/// files, as an operator would run it by hand.
async fn reconcile(sys: &mut System) -> anyhow::Result<Check> {
    let today = time::OffsetDateTime::now_utc().date();
    let mut days = vec![today.previous_day().context("date")?, today];
    days.dedup();
    let mut lines = Vec::new();
    let mut ok = true;
    for day in days {
        let date = day.to_string();
        let (code, text) = sys
            .paystream(&["serve", "reconciler", "--once", "--date", &date])
            .await?;
        let summary = text
            .lines()
            .find(|l| l.contains("matched"))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default();
        if code != 0 {
            ok = false;
            lines.push(format!(
                "{date}: exit {code}: {}",
                text.lines().rev().take(15).collect::<Vec<_>>().join(" | ")
            ));
        } else {
            lines.push(format!("{date}: {summary}"));
        }
    }
    Ok(check(
        "reconciliation of the run's days clean",
        ok,
        lines.join("; "),
    ))
}

/// Every planted message is in the dead-letter topic, once per group that
/// reads its topic, with a reason; and no group is behind.
async fn dead_letters(sys: &System) -> anyhow::Result<Vec<Check>> {
    let t = sys.kafka.topology();
    let dlq_topic = t.name(TopicKind::DeadLetter);
    let mut reader = TopicReader::open(
        &sys.kafka,
        &[dlq_topic],
        Start::Beginning,
        End::Latest,
        None,
    )
    .await?;
    let mut found: BTreeMap<(String, i32, i64, String), String> = BTreeMap::new();
    while let Some(batch) = reader.next_batch(500).await? {
        for r in batch {
            let get = |h: &str| r.header(h).unwrap_or("").to_owned();
            found.insert(
                (
                    get(dlq::H_ORIGINAL_TOPIC),
                    get(dlq::H_ORIGINAL_PARTITION).parse().unwrap_or(-1),
                    get(dlq::H_ORIGINAL_OFFSET).parse().unwrap_or(-1),
                    get(dlq::H_CONSUMER_GROUP),
                ),
                get(dlq::H_REASON),
            );
        }
    }
    let readers: BTreeMap<String, Vec<String>> = {
        let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (group, topics) in groups(sys) {
            for topic in topics {
                m.entry(topic).or_default().push(group.clone());
            }
        }
        m
    };
    let mut missing = Vec::new();
    let mut expected = 0;
    for p in &sys.planted {
        for group in readers.get(&p.topic).into_iter().flatten() {
            expected += 1;
            match found.get(&(p.topic.clone(), p.partition, p.offset, group.clone())) {
                Some(reason) if !reason.is_empty() => {}
                _ => missing.push(format!(
                    "{} {}:{}:{} by {group}",
                    p.what, p.topic, p.partition, p.offset
                )),
            }
        }
    }
    let mut checks = vec![check(
        "poison and oversized messages dead-lettered",
        missing.is_empty() && !sys.planted.is_empty(),
        format!(
            "{} planted, {expected} dead letters expected (one per reading group), {} missing{}",
            sys.planted.len(),
            missing.len(),
            missing
                .first()
                .map(|m| format!(" (e.g. {m})"))
                .unwrap_or_default()
        ),
    )];

    // No event lost: every group consumed every partition to its end, and
    // the ledger and wallet projections applied (or dead-lettered) every
    // event of the payments and reconciliation topics.
    let mut behind = Vec::new();
    for (group, topics) in groups(sys) {
        for p in ops::groups::offsets(&sys.kafka, &group, &topics).await? {
            let at = p.committed.unwrap_or(p.low).max(p.low);
            if at < p.high {
                behind.push(format!(
                    "{group} {}:{} at {at} of {}",
                    p.topic, p.partition, p.high
                ));
            }
        }
    }
    let db = storage::Db::connect(&sys.db_url).await?;
    let applied: Vec<(String, String)> = storage::with_pool!(&db, p => sqlx::query_as("SELECT projection, event_id FROM applied_events").fetch_all(p).await?);
    db.close().await;
    let applied: BTreeSet<(String, String)> = applied.into_iter().collect();
    let mut reader = TopicReader::open(
        &sys.kafka,
        &[
            t.name(TopicKind::Payments),
            t.name(TopicKind::Reconciliation),
        ],
        Start::Beginning,
        End::Latest,
        None,
    )
    .await?;
    let (mut events, mut lost) = (0u64, Vec::new());
    while let Some(batch) = reader.next_batch(1000).await? {
        for r in batch {
            let Ok(env) = events::avro::decode(&r.payload) else {
                continue; // planted: checked above
            };
            events += 1;
            // Types the projections never book leave no row: the groups
            // at the end (above) are what shows they were consumed.
            if !projections::booking::books_by_type(env.event_type()) {
                continue;
            }
            for projection in ["ledger", "wallet"] {
                let group = t.group(projection);
                let done = applied.contains(&(projection.to_owned(), env.event_id.to_string()))
                    || found.contains_key(&(r.topic.clone(), r.partition, r.offset, group.clone()));
                if !done {
                    lost.push(format!(
                        "{} {} at {}:{}:{} not applied by {projection}",
                        env.event_type().as_str(),
                        env.event_id,
                        r.topic,
                        r.partition,
                        r.offset
                    ));
                }
            }
        }
    }
    checks.push(check(
        "no event lost (every group at the end, every event applied or dead-lettered)",
        behind.is_empty() && lost.is_empty(),
        format!(
            "{events} events read back; {} partitions behind; {} events not applied{}",
            behind.len(),
            lost.len(),
            behind
                .first()
                .or(lost.first())
                .map(|x| format!(" (e.g. {x})"))
                .unwrap_or_default()
        ),
    ));
    Ok(checks)
}

/// Every (route, status) the clients got is described in the handler's
/// OpenAPI document, and so is every payment status seen in a 201.
async fn openapi(client: &Client, seen: &Seen) -> Check {
    let doc: Value = match client
        .http
        .get(format!("{}/openapi.json", client.base))
        .send()
        .await
    {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    };
    let mut undocumented = Vec::new();
    for (route, status) in &seen.statuses {
        if doc["paths"][*route]["post"]["responses"][status.to_string()].is_null() {
            undocumented.push(format!("POST {route} {status}"));
        }
    }
    let described = doc["paths"]["/v1/payments"]["post"]["responses"]["201"]["description"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    for s in &seen.created_statuses {
        if !described.contains(s.as_str()) {
            undocumented.push(format!("201 with status {s}"));
        }
    }
    check(
        "every answer seen is in the OpenAPI document",
        undocumented.is_empty() && !doc.is_null(),
        format!(
            "{} (route, status) pairs and {} payment statuses in 201s seen; undocumented: {}",
            seen.statuses.len(),
            seen.created_statuses.len(),
            if undocumented.is_empty() {
                "none".to_owned()
            } else {
                undocumented.join(", ")
            }
        ),
    )
}
