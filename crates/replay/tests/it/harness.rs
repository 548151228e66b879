#![allow(dead_code)]

pub use testkit::{Backend, count, wait_caught_up};

use replay::{DlqCommand, ReplayArgs};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use streaming::KafkaConfig;

/// Replay args with nothing but the topics set.
pub fn args(topics: &[&str]) -> ReplayArgs {
    ReplayArgs {
        topics: topics.iter().map(|t| (*t).to_owned()).collect(),
        from: None,
        to: None,
        payments: vec![],
        types: vec![],
        seller: None,
        format: replay::Format::Jsonl,
        out: None,
        strict: false,
    }
}

/// Runs a replay into memory: (bytes written, summary).
pub async fn run(cfg: &KafkaConfig, a: &ReplayArgs) -> (Vec<u8>, replay::Summary) {
    let mut out = Vec::new();
    let summary = replay::replay_summary(cfg, a, &mut out)
        .await
        .expect("replay");
    (out, summary)
}

/// A JSON-lines replay, parsed.
pub async fn jsonl(cfg: &KafkaConfig, a: &ReplayArgs) -> (Vec<Value>, replay::Summary) {
    let (out, s) = run(cfg, a).await;
    let lines = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    (lines, s)
}

/// Runs a `dlq` command: (exit code, stdout).
pub async fn dlq(cfg: &KafkaConfig, db_url: &str, cmd: DlqCommand) -> (ExitCodeEq, String) {
    let mut out = Vec::new();
    let code = replay::dlq_to(cfg, db_url, &cmd, &mut out)
        .await
        .expect("dlq command");
    (ExitCodeEq(code), String::from_utf8(out).unwrap())
}

/// ExitCode has no PartialEq; compare through its Debug form.
#[derive(Debug)]
pub struct ExitCodeEq(pub std::process::ExitCode);

impl ExitCodeEq {
    pub fn success(&self) -> bool {
        format!("{:?}", self.0) == format!("{:?}", std::process::ExitCode::SUCCESS)
    }
}

/// A fresh database of the backend, as a URL (SQLite's directory is kept
/// alive by the returned guard).
pub async fn fresh_url(backend: Backend) -> (String, Option<tempfile::TempDir>) {
    testkit::FreshDb::new(backend).await.into_parts()
}

/// Sum of the high watermarks of a topic.
pub fn high_total(cfg: &KafkaConfig, topic: &str) -> i64 {
    streaming::reader::watermarks(cfg, topic)
        .unwrap()
        .iter()
        .map(|(_, _, hi)| hi)
        .sum()
}

/// Reads an Avro container file with fastavro: (header facts, records).
pub fn fastavro_read(path: &Path) -> (Value, Vec<Value>) {
    let python = std::env::var("PAYSTREAM_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/read_ocf.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    assert!(
        out.status.success(),
        "fastavro could not read the file (is fastavro installed? scripts/lib.sh ensure_python sets PAYSTREAM_PYTHON): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .collect::<Vec<_>>();
    let header = lines.remove(0);
    (header, lines)
}

/// Polls `sql` (one integer) until it returns `want`.
pub async fn wait_count(db: &storage::Db, sql: &str, want: i64) {
    testkit::wait_until(
        format!("{sql} to return {want}"),
        Duration::from_secs(60),
        async || count(db, sql).await == want,
    )
    .await;
}
