//! The `paystream` binary, run as a user would.

mod bench;
mod clients;
mod crash;
mod deploy;
mod executor_crash;
mod key_reuse;
mod liveness;
mod otel;
mod support;
mod up;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_paystream"))
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn help_lists_the_subcommands() {
    let out = bin().arg("--help").output().unwrap();
    assert!(out.status.success());
    let t = text(&out);
    for cmd in ["demo", "topics", "schema"] {
        assert!(t.contains(cmd), "--help does not list {cmd}: {t}");
    }
}

#[test]
fn schema_check_passes_on_the_committed_schemas() {
    let out = bin()
        .args(["schema", "check", "--dir"])
        .arg(repo_root().join("schemas"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

fn git(dir: &Path, args: &[&str]) {
    let st = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
        .args(args)
        .current_dir(dir)
        .status()
        .unwrap();
    assert!(st.success(), "git {args:?}");
}

/// A throwaway git repository holding a copy of schemas/ with one commit.
fn schema_repo() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("schemas");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        repo_root().join("schemas/envelope.avsc"),
        dir.join("envelope.avsc"),
    )
    .unwrap();
    git(tmp.path(), &["init", "-q"]);
    git(tmp.path(), &["add", "."]);
    git(tmp.path(), &["commit", "-q", "-m", "v1"]);
    (tmp, dir)
}

fn edit_envelope(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("envelope.avsc");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn check(dir: &Path) -> Output {
    bin()
        .args(["schema", "check", "--dir"])
        .arg(dir)
        .output()
        .unwrap()
}

#[test]
fn schema_check_fails_on_a_breaking_change_against_the_previous_commit() {
    let (tmp, dir) = schema_repo();
    edit_envelope(&dir, |v| {
        v["fields"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"name": "tenant", "type": "string"}));
    });
    let out = check(&dir);
    assert!(
        !out.status.success(),
        "a required field without default must fail: {}",
        text(&out)
    );
    assert!(text(&out).contains("FAIL"), "{}", text(&out));
    // Committed, it is still compared with the version before it.
    git(tmp.path(), &["commit", "-q", "-am", "break"]);
    assert!(!check(&dir).status.success());
}

#[test]
fn schema_check_accepts_a_compatible_change() {
    let (tmp, dir) = schema_repo();
    edit_envelope(&dir, |v| {
        v["fields"].as_array_mut().unwrap().push(
            serde_json::json!({"name": "tenant", "type": ["null", "string"], "default": null}),
        );
    });
    let out = check(&dir);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("ok"), "{}", text(&out));
    drop(tmp);
}

#[test]
fn demo_round_trips_every_event_type_through_the_broker() {
    let brokers = testkit::brokers();
    let prefix = format!("t{}.", uuid::Uuid::now_v7().simple());
    let out = bin()
        .args(["demo", "--timeout-secs", "60", "--partitions", "2"])
        .env("PAYSTREAM_BROKERS", &brokers)
        .env("PAYSTREAM_TOPIC_PREFIX", &prefix)
        .output()
        .unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("14/14 events (14 event types) came back identical"),
        "{t}"
    );
}

#[test]
fn project_refuses_the_production_database_as_its_target() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("prod.db").display());
    let out = bin()
        .args(["--database-url", &url, "project", "--into", &url])
        .args(["--as-of", "2026-01-01T00:00:00Z"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains("is the production database"),
        "{}",
        text(&out)
    );
    assert!(!dir.path().join("prod.db").exists(), "nothing was created");
}
