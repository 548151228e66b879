//! `paystream clients create|list|revoke` (issue 12, L7 and operator keys),
//! run as an operator would, on both backends; the keys are checked as the
//! handler and the projections' query API check them.

use crate::{bin, text};
use projections::auth::{self, Role};
use storage::Db;

fn run(url: &str, args: &[&str]) -> std::process::Output {
    bin()
        .args(["--database-url", url, "clients"])
        .args(args)
        .output()
        .unwrap()
}

fn create(url: &str, args: &[&str]) -> String {
    let out = run(url, &[&["create"], args].concat());
    assert!(out.status.success(), "{}", text(&out));
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(key.starts_with("psk_"), "{key}");
    key
}

async fn role_of(db: &Db, key: &str) -> Option<(String, Role)> {
    let (id, secret) = auth::parse_key(key).expect("well-formed key");
    auth::authenticate(db, id, secret)
        .await
        .unwrap()
        .map(|c| (c.client_id, c.role))
}

async fn clients_create_list_revoke(url: &str) {
    let shop = create(url, &["shop-1"]);
    let ops = create(url, &["ops", "--role", "operator"]);
    let shop2 = create(url, &["shop-1"]);
    let bad = run(url, &["create", "x", "--role", "admin"]);
    assert!(!bad.status.success(), "{}", text(&bad));

    let db = Db::connect(url).await.unwrap();
    assert_eq!(
        role_of(&db, &shop).await,
        Some(("shop-1".into(), Role::Client))
    );
    assert_eq!(
        role_of(&db, &ops).await,
        Some(("ops".into(), Role::Operator))
    );
    let id = |k: &str| k.split('_').nth(1).unwrap().to_owned();

    let out = run(url, &["list"]);
    assert!(out.status.success(), "{}", text(&out));
    let list = String::from_utf8(out.stdout).unwrap();
    for (k, role) in [(&shop, "client"), (&ops, "operator"), (&shop2, "client")] {
        let line = list
            .lines()
            .find(|l| l.starts_with(&id(k)))
            .unwrap_or_else(|| panic!("{} not listed: {list}", id(k)));
        assert!(
            line.contains(role) && line.trim_end().ends_with('-'),
            "{line}"
        );
    }
    assert!(
        !list.contains(shop.split('_').nth(2).unwrap()),
        "a secret was listed"
    );

    // Revoke one key by id (a whole pasted key works too): refused by the
    // handler and the query API, the client's other key still works.
    let out = run(url, &["revoke", &shop]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(role_of(&db, &shop).await, None);
    assert_eq!(
        payment_handler::store::authenticate(&db, &shop)
            .await
            .unwrap(),
        None
    );
    assert!(role_of(&db, &shop2).await.is_some());
    // Revoking it again, or an unknown key, fails.
    assert!(!run(url, &["revoke", &id(&shop)]).status.success());
    assert!(!run(url, &["revoke", "0123456789abcdef"]).status.success());
    // By client: every key of it.
    let out = run(url, &["revoke", "--client", "ops"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(role_of(&db, &ops).await, None);
    let list = String::from_utf8(run(url, &["list"]).stdout).unwrap();
    let line = list.lines().find(|l| l.starts_with(&id(&ops))).unwrap();
    assert!(
        !line.trim_end().ends_with('-'),
        "revocation time listed: {line}"
    );
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_cli_postgres() {
    let url = testkit::fresh_postgres_url().await.unwrap();
    clients_create_list_revoke(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_cli_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("keys.db").display());
    clients_create_list_revoke(&url).await;
}
