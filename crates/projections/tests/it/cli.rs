use crate::harness::*;
use events::{Timestamp, samples};
use projections::{LedgerCommand, run_ledger_command};
use std::process::ExitCode;

async fn ledger_commands(backend: Backend) {
    let (url, _dir) = testkit::FreshDb::new(backend).await.into_parts();
    let db = projections::cli::open(&url).await.unwrap();
    let evs = samples::one_of_each("c1", "cli", Timestamp::from_micros(1_700_000_000_000_000));
    apply_both(&db, &evs, 100).await;
    let ok = |c: ExitCode| c == ExitCode::SUCCESS;
    assert!(ok(run_ledger_command(
        &url,
        LedgerCommand::Verify { json: true }
    )
    .await
    .unwrap()));
    for cmd in [
        LedgerCommand::Balance {
            account: "psp_fees".into(),
            as_of: Some("2023-11-14T22:13:20Z".into()),
        },
        LedgerCommand::Entries {
            payment: evs[0].payment_id.unwrap(),
        },
        LedgerCommand::History {
            account: "psp_receivable".into(),
            limit: 2,
            after: None,
        },
        LedgerCommand::Wallet {
            seller: "seller-a".into(),
            client: "c1".into(),
        },
        LedgerCommand::Buyer {
            buyer: "buyer-7".into(),
            client: "c1".into(),
        },
    ] {
        assert!(ok(run_ledger_command(&url, cmd).await.unwrap()));
    }
    assert!(
        run_ledger_command(
            &url,
            LedgerCommand::Balance {
                account: "cash".into(),
                as_of: None
            }
        )
        .await
        .is_err()
    );
    assert!(
        run_ledger_command(
            &url,
            LedgerCommand::Balance {
                account: "psp_fees".into(),
                as_of: Some("noon".into())
            }
        )
        .await
        .is_err()
    );
    // A wallet that disagrees with the ledger makes verify exit non-zero.
    exec(
        &db,
        "UPDATE wallet_balances SET balance_minor = balance_minor + 1",
    )
    .await
    .unwrap();
    let code = run_ledger_command(&url, LedgerCommand::Verify { json: false })
        .await
        .unwrap();
    assert!(code == ExitCode::FAILURE);
}

testkit::both!(ledger_commands, ledger_commands);
