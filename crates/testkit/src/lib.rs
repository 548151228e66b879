//! The test kit: what paystream's integration tests and benches share, in
//! one dev-only crate instead of a copy per crate and instead of `testing`
//! modules inside production crates.
//!
//! - fresh databases of either backend, one per test ([`db`]), and one way
//!   to run a test body on both ([`both!`]);
//! - fresh topics under a unique prefix on the test broker (`kafka`, with
//!   the `kafka` feature, which a crate that talks no Kafka leaves off so
//!   its tests do not link librdkafka);
//! - envelope builders ([`envelope`], [`eur`]);
//! - waiting for a positive condition with a deadline instead of sleeping
//!   ([`wait`]): [`wait_until`], [`wait_for`], `wait_caught_up` (a
//!   consumer group's commits, with the `kafka` feature).
//!
//! Helpers here panic on failure with a message saying what did not happen:
//! they only ever run inside tests and benches.

pub mod db;
pub mod envelope;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod wait;

pub use db::{
    FreshDb, TEST_DB_PREFIX, admin_url, count, exec, fresh_postgres, fresh_postgres_url,
    fresh_sqlite, strings,
};
pub use envelope::{envelope, envelope_now, eur, one_order_payment};
#[cfg(feature = "kafka")]
pub use kafka::{TestKafka, brokers, fresh_config, produce_all, read_all, read_topic, tail};
pub use storage::Backend;
#[cfg(feature = "kafka")]
pub use wait::wait_caught_up;
pub use wait::{wait_for, wait_until};

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// What the PSP simulator at `sim_url` saw for a reference (an order id):
/// (charges it made, charge-creation requests it got).
pub async fn sim_stats(http: &reqwest::Client, sim_url: &str, reference: &str) -> (i64, i64) {
    let v: serde_json::Value = http
        .get(format!("{sim_url}/_sim/stats"))
        .query(&[("reference", reference)])
        .send()
        .await
        .expect("simulator stats")
        .json()
        .await
        .expect("simulator stats JSON");
    (
        v["charges"].as_i64().expect("charges"),
        v["create_requests"].as_i64().expect("create_requests"),
    )
}

/// Runs an async test body once per backend, as two tests `name::postgres`
/// and `name::sqlite`:
///
/// - `both!(name, body)` calls `body(backend: storage::Backend)`, for a
///   body that makes its own database (e.g. with [`FreshDb::new`]);
/// - `both!(name, body, crate::migrate)` calls `body(db: storage::Db)` with
///   a fresh database of the backend, migrated by `migrate` first.
#[macro_export]
macro_rules! both {
    ($name:ident, $body:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$body($crate::Backend::Postgres).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$body($crate::Backend::Sqlite).await;
            }
        }
    };
    ($name:ident, $body:ident, $migrate:path) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let db = $crate::fresh_postgres().await.expect("fresh postgres");
                $migrate(&db).await.expect("migrate");
                super::$body(db).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let (db, _dir) = $crate::fresh_sqlite().await.expect("fresh sqlite");
                $migrate(&db).await.expect("migrate");
                super::$body(db).await;
            }
        }
    };
}

/// The error codes a document lists, with their statuses: the rows
/// `| status[/status...] | `code` | ... |` of the section that starts at the
/// line `heading`, up to the next heading. What the HTTP APIs' tests check
/// their `ErrorCode` enums against (the query API's and the simulator's
/// READMEs).
pub fn documented_codes(doc: &str, heading: &str) -> Vec<(Vec<u16>, String)> {
    let section = doc
        .split_once(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("the document has a {heading:?} section"))
        .1;
    let section = section.split("\n#").next().unwrap_or(section);
    section
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            // "", status[/status...], `code`, when, ""
            let statuses = cells
                .get(1)?
                .split('/')
                .map(|s| s.parse::<u16>().ok())
                .collect::<Option<Vec<u16>>>()?;
            let code = cells.get(2)?.strip_prefix('`')?.strip_suffix('`')?;
            Some((statuses, code.to_owned()))
        })
        .collect()
}

/// Asserts that a document lists exactly an API's error codes with their
/// statuses ([`documented_codes`] against the enum's `ALL`), each once.
pub fn assert_documented_codes(listed: &[(Vec<u16>, String)], ours: &[(Vec<u16>, String)]) {
    use std::collections::BTreeSet;
    assert_eq!(
        listed.iter().collect::<BTreeSet<_>>(),
        ours.iter().collect::<BTreeSet<_>>(),
        "the document's codes and statuses (left) differ from the enum's (right)"
    );
    assert_eq!(listed.len(), ours.len(), "a code listed twice");
}
