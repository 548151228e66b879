//! The README's first command, `paystream up`, end to end with a small load:
//! every payment final, the ledger verified.

use std::process::Command;

#[test]
fn up_runs_everything_and_the_demo_load_ends_verified() {
    let dir = tempfile::tempdir().unwrap();
    let brokers =
        std::env::var("PAYSTREAM_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let out = Command::new(env!("CARGO_BIN_EXE_paystream"))
        .args([
            "up",
            "--payments",
            "120",
            "--random-ports",
            "--timeout-secs",
            "180",
        ])
        .env("PAYSTREAM_BROKERS", brokers)
        .env(
            "PAYSTREAM_TOPIC_PREFIX",
            format!("t{}.", uuid::Uuid::now_v7().simple()),
        )
        .env("PAYSTREAM_PARTITIONS", "3")
        .env(
            "PAYSTREAM_DATABASE_URL",
            format!("sqlite://{}", dir.path().join("paystream.db").display()),
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let all = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{all}");
    assert!(stdout.contains("not final                   0"), "{stdout}");
    assert!(stdout.contains("ledger verify: ok"), "{stdout}");
    // The simulator's settlement file of the day matches the ledger.
    let recon: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("reconciliation "))
        .collect();
    assert!(!recon.is_empty(), "{stdout}");
    assert!(recon.iter().all(|l| l.ends_with("clean")), "{stdout}");
    assert!(
        !recon.iter().any(|l| l.contains(" 0 settlement rows")) || recon.len() > 1,
        "the settlement file was empty: {stdout}"
    );
    assert!(stdout.contains("succeeded"), "{stdout}");
    assert!(stdout.contains("stopped cleanly"), "{stdout}");
    // Per-component SQLite files next to the given one.
    for c in ["handler", "executor", "projections", "psp-sim"] {
        assert!(dir.path().join(format!("paystream-{c}.db")).exists(), "{c}");
    }
}
