//! The README's first command, `paystream up`, end to end with a small load:
//! every payment final, the ledger verified.

use std::process::Command;

#[test]
fn up_runs_everything_and_the_demo_load_ends_verified() {
    let dir = tempfile::tempdir().unwrap();
    let brokers = testkit::brokers();
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
    // One database for our components (what the README's commands read
    // afterwards), the simulated PSP's own file next to it, nothing else.
    assert!(dir.path().join("paystream.db").exists());
    assert!(dir.path().join("paystream-psp-sim.db").exists());
    for c in ["handler", "executor", "projections"] {
        assert!(
            !dir.path().join(format!("paystream-{c}.db")).exists(),
            "{c}"
        );
    }
    // Reads cleanly: contention is waited out, not logged as an error.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.lines().any(|l| l.contains(" ERROR ")),
        "ERROR lines in the output: {stderr}"
    );
    // The summary ends with what to try next, with the demo client's key.
    let next = stdout
        .split("what to try next:")
        .nth(1)
        .unwrap_or_else(|| panic!("no next steps: {stdout}"));
    assert!(next.contains("Authorization: Bearer psk_"), "{next}");
    for cmd in [
        "paystream projection status",
        "paystream ledger verify",
        "paystream replay",
    ] {
        assert!(next.contains(cmd), "{cmd} missing: {next}");
    }
    // The commands find the demo's data with the printed settings.
    let verify = Command::new(env!("CARGO_BIN_EXE_paystream"))
        .args(["ledger", "verify"])
        .env(
            "PAYSTREAM_DATABASE_URL",
            format!("sqlite://{}", dir.path().join("paystream.db").display()),
        )
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
}

/// A read-only command pointed at a database without the projection says
/// so in words, suggests the database that has it, and creates nothing.
#[test]
fn read_commands_name_a_missing_projection_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing-here.db");
    let out = Command::new(env!("CARGO_BIN_EXE_paystream"))
        .args(["ledger", "verify"])
        .env(
            "PAYSTREAM_DATABASE_URL",
            format!("sqlite://{}", missing.display()),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no ledger projection in sqlite://"),
        "{stderr}"
    );
    assert!(stderr.contains("does not exist"), "{stderr}");
    assert!(
        !missing.exists(),
        "the command created {}",
        missing.display()
    );

    // A database with other tables only, and one next to it with the ledger:
    // the message names the one that has it.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let other = dir.path().join("other.db");
    let ledger = dir.path().join("ledger.db");
    rt.block_on(async {
        let db = storage::Db::connect(&format!("sqlite://{}", other.display()))
            .await
            .unwrap();
        if let storage::Db::Sqlite(p) = &db {
            sqlx::query("CREATE TABLE unrelated (x INTEGER)")
                .execute(p)
                .await
                .unwrap();
        }
        db.close().await;
        let db = storage::Db::connect(&format!("sqlite://{}", ledger.display()))
            .await
            .unwrap();
        projections::migrate(&db).await.unwrap();
        db.close().await;
    });
    for cmd in [&["ledger", "verify"][..], &["projection", "status"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_paystream"))
            .args(cmd)
            .env(
                "PAYSTREAM_DATABASE_URL",
                format!("sqlite://{}", other.display()),
            )
            .env("PAYSTREAM_BROKERS", "127.0.0.1:1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd:?}");
        assert!(
            stderr.contains("projection in sqlite://"),
            "{cmd:?}: {stderr}"
        );
        assert!(stderr.contains("has no table"), "{cmd:?}: {stderr}");
        assert!(
            stderr.contains(&format!("Did you mean sqlite://{}", ledger.display())),
            "{cmd:?}: {stderr}"
        );
        assert!(
            !stderr.contains("SQLITE") && !stderr.contains("no such table"),
            "{stderr}"
        );
    }
    // Nothing was added to the other database.
    let tables = rt.block_on(async {
        let db = storage::Db::connect(&format!("sqlite://{}", other.display()))
            .await
            .unwrap();
        let n = db.has_table("applied_events").await.unwrap()
            || db.has_table("ledger_entries").await.unwrap();
        db.close().await;
        n
    });
    assert!(!tables, "a read-only command created projection tables");
}
