//! The generic-plan trap (issue 14, perf memo §2): a batch lookup
//! `... WHERE projection = $1 AND key = ANY($2)` on a table without
//! statistics, once PostgreSQL's plan cache switches to the generic plan
//! (after 5 executions), must still find rows by the key column, not
//! filter every row of the projection against the array.

use projections::apply::postgres_lookups;
use sqlx::Row as _;
use storage::Db;

/// The plan PostgreSQL uses for `sql` as a generic plan (what a prepared
/// statement falls back to after five executions), as text. PostgreSQL
/// 15 has no `EXPLAIN (GENERIC_PLAN)`: PREPARE + force_generic_plan +
/// EXPLAIN EXECUTE, on one connection.
async fn generic_plan(conn: &mut sqlx::PgConnection, sql: &str, keys: &[String]) -> String {
    sqlx::query("SET plan_cache_mode = force_generic_plan")
        .execute(&mut *conn)
        .await
        .expect("set");
    // A name of our own: sqlx's cached statements on this connection stay.
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let name = format!(
        "plans_lookup_{}",
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    );
    // With `$1` the projection, or (the ledger's booking keys) only keys.
    let by_projection = sql.contains("$2");
    let params = if by_projection {
        "TEXT, TEXT[]"
    } else {
        "TEXT[]"
    };
    sqlx::query(&format!("PREPARE {name}({params}) AS {sql}"))
        .execute(&mut *conn)
        .await
        .expect("prepare");
    let list = keys
        .iter()
        .map(|k| format!("\"{k}\""))
        .collect::<Vec<_>>()
        .join(",");
    let args = if by_projection {
        format!("'ledger', '{{{list}}}'")
    } else {
        format!("'{{{list}}}'")
    };
    let rows = sqlx::query(&format!("EXPLAIN EXECUTE {name}({args})"))
        .fetch_all(&mut *conn)
        .await
        .expect("explain");
    rows.iter()
        .map(|r| r.get::<String, _>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The index condition lines of a plan.
fn index_conds(plan: &str) -> Vec<&str> {
    plan.lines().filter(|l| l.contains("Index Cond")).collect()
}

/// Fills `table` with `n` rows of the ledger projection (and `n / 10` of
/// the wallet) straight in SQL, WITHOUT statistics afterwards.
async fn fill(conn: &mut sqlx::PgConnection, table: &str, n: i64) {
    let sql = match table {
        "applied_events" => {
            "INSERT INTO applied_events (projection, event_id, applied_at, topic, kafka_partition, kafka_offset, outcome) \
             SELECT CASE WHEN i % 10 = 0 THEN 'wallet' ELSE 'ledger' END, md5(i::TEXT), 0, 't', 0, i, \
             CASE WHEN i % 100 = 0 THEN 'rejected' ELSE 'applied' END FROM generate_series(1, $1) i"
        }
        "projection_orders" => {
            "INSERT INTO projection_orders (projection, order_id, payment_id, buyer_id, seller_id, currency, amount_minor, captured_minor, refunded_minor) \
             SELECT CASE WHEN i % 10 = 0 THEN 'wallet' ELSE 'ledger' END, md5(i::TEXT), md5(i::TEXT), 'b', 's', 'EUR', 1, 0, 0 \
             FROM generate_series(1, $1) i"
        }
        "projection_bookings" => {
            "INSERT INTO projection_bookings (projection, booking_key, event_id) \
             SELECT CASE WHEN i % 10 = 0 THEN 'wallet' ELSE 'ledger' END, md5(i::TEXT), md5(i::TEXT) \
             FROM generate_series(1, $1) i"
        }
        "projection_totals" => {
            "INSERT INTO projection_totals (projection, party_id, client_id, kind, currency, total_minor) \
             SELECT CASE WHEN i % 10 = 0 THEN 'wallet' ELSE 'ledger' END, md5(i::TEXT), 'c', 'seller_balance', 'EUR', 1 \
             FROM generate_series(1, $1) i"
        }
        "ledger_transactions" => {
            "INSERT INTO ledger_transactions (seq, id, booking_key, event_id, payment_id, kind, occurred_at, booked_at, prev_hash, hash) \
             SELECT i, md5(i::TEXT), 'capture:' || md5(i::TEXT), md5(i::TEXT), NULL, 'capture', 0, 0, '', '' \
             FROM generate_series(1, $1) i"
        }
        other => panic!("no filler for {other}"),
    };
    sqlx::query(sql)
        .bind(n)
        .execute(&mut *conn)
        .await
        .expect("fill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_lookups_use_the_key_in_the_generic_plan_without_statistics() {
    let url = testkit::fresh_postgres_url().await.expect("postgres");
    let db = Db::connect(&url).await.expect("connect");
    projections::migrate(&db).await.expect("migrate");
    let Db::Postgres(pool) = &db else {
        unreachable!()
    };
    let mut conn = pool.acquire().await.expect("connection");
    let keys: Vec<String> = (0..1000).map(|i| format!("{i:032x}")).collect();
    for (table, key, sql) in postgres_lookups() {
        fill(&mut conn, table, 100_000).await;
        let plan = generic_plan(&mut conn, &sql, &keys).await;
        let conds = index_conds(&plan);
        assert!(
            conds.iter().any(|c| c.contains(&format!("{key} = ANY ($"))),
            "{table}: the generic plan must look rows up by {key}:\n{plan}"
        );
        assert!(
            !plan.contains("Seq Scan"),
            "{table}: the generic plan scans the table:\n{plan}"
        );
        // And it is fast, on the real statement after more than five
        // executions through sqlx's own prepared statement.
        for _ in 0..8 {
            let started = std::time::Instant::now();
            let q = sqlx::query(&sql);
            let q = if sql.contains("$2") {
                q.bind("ledger")
            } else {
                q
            };
            q.bind(&keys).fetch_all(pool).await.expect("lookup");
            assert!(
                started.elapsed() < std::time::Duration::from_secs(2),
                "{table}: lookup took {:?}",
                started.elapsed()
            );
        }
    }
}
