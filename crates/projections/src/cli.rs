//! What the `paystream` binary wires up: `serve projections` and the
//! `ledger` subcommands.

use crate::apply::{Projection, ProjectionHandler};
use anyhow::Context as _;
use clap::{Args, Subcommand};
use events::TopicKind;
use std::net::SocketAddr;
use std::process::ExitCode;
use storage::Db;
use streaming::{ConsumerSettings, EventProducer, KafkaConfig, run_consumer};
use tokio_util::sync::CancellationToken;

/// Flags of `paystream serve projections`.
#[derive(Debug, Clone, Args)]
pub struct ProjectionsArgs {
    /// Address of the query HTTP API.
    #[arg(
        long,
        env = "PAYSTREAM_PROJECTIONS_HTTP_ADDR",
        default_value = "127.0.0.1:8081"
    )]
    pub listen: SocketAddr,
    /// Consumer group of the ledger projection (reset it to rebuild the
    /// ledger). Default: `{topic prefix}ledger`, e.g. `paystream.ledger`.
    #[arg(long, env = "PAYSTREAM_LEDGER_GROUP")]
    pub ledger_group: Option<String>,
    /// Consumer group of the wallet projection. Default: `{topic prefix}wallet`.
    #[arg(long, env = "PAYSTREAM_WALLET_GROUP")]
    pub wallet_group: Option<String>,
    /// Most events applied per database transaction.
    #[arg(long, env = "PAYSTREAM_PROJECTIONS_BATCH", default_value_t = crate::limits::BATCH_EVENTS_DEFAULT,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::limits::BATCH_EVENTS_MAX)))]
    pub batch_size: u32,
}

/// Connects and applies the projections' migrations.
pub async fn open(db_url: &str) -> anyhow::Result<Db> {
    let db = Db::connect(db_url).await?;
    crate::migrate(&db).await?;
    Ok(db)
}

/// The old name of [`crate::limits::QUERY_CONNECTIONS_MAX`], which tests
/// use.
pub use crate::limits::QUERY_CONNECTIONS_MAX as QUERY_CONNECTIONS;

/// A small pool for the query API, separate from the consumers' pool.
/// On PostgreSQL its transactions are read-only (the API never writes).
pub async fn open_query_pool(db_url: &str) -> anyhow::Result<Db> {
    use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
    use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
    use std::str::FromStr as _;
    use std::time::Duration;
    let redacted = storage::redact(db_url);
    let db = if db_url.starts_with("postgres://") || db_url.starts_with("postgresql://") {
        let opts = PgConnectOptions::from_str(db_url)
            .with_context(|| format!("query pool for {redacted}"))?
            .options([("default_transaction_read_only", "on")]);
        Db::Postgres(
            PgPoolOptions::new()
                .max_connections(crate::limits::QUERY_CONNECTIONS_MAX)
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(opts)
                .await
                .with_context(|| format!("query pool for {redacted}"))?,
        )
    } else {
        // The consumers' pool created the file and set WAL mode (which
        // persists in the file), so readers never block the writer.
        let opts = SqliteConnectOptions::from_str(db_url)
            .with_context(|| format!("query pool for {redacted}"))?
            .busy_timeout(Duration::from_secs(10));
        Db::Sqlite(
            SqlitePoolOptions::new()
                .max_connections(crate::limits::QUERY_CONNECTIONS_MAX)
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(opts)
                .await
                .with_context(|| format!("query pool for {redacted}"))?,
        )
    };
    Ok(db)
}

/// Consumer settings of one projection's group.
pub fn consumer_settings(kafka: &KafkaConfig, group: &str, batch: u32) -> ConsumerSettings {
    let topology = kafka.topology();
    let mut s = ConsumerSettings::new(
        group,
        vec![
            topology.name(TopicKind::Payments),
            topology.name(TopicKind::Reconciliation),
        ],
    );
    s.batch_max = usize::try_from(batch).expect("u32 fits in usize");
    s
}

/// Runs the ledger and wallet consumer loops and the query HTTP server
/// until `shutdown` is cancelled (or one of them fails).
pub async fn serve(
    kafka: KafkaConfig,
    db_url: &str,
    args: ProjectionsArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let db = open(db_url).await?;
    streaming::admin::ensure_topics(&kafka, &kafka.topology().specs()).await?;
    let producer = EventProducer::new(&kafka, "paystream-projections")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "projections query API listening");

    // Any part stopping stops the others: a half-running service would
    // look healthy while one projection falls behind.
    let stop = shutdown.child_token();
    let mut tasks = tokio::task::JoinSet::new();
    for (projection, group) in [
        (
            Projection::Ledger,
            args.ledger_group
                .clone()
                .unwrap_or_else(|| kafka.topology().group("ledger")),
        ),
        (
            Projection::Wallet,
            args.wallet_group
                .clone()
                .unwrap_or_else(|| kafka.topology().group("wallet")),
        ),
    ] {
        let settings = consumer_settings(&kafka, &group, args.batch_size);
        let handler = ProjectionHandler::new(db.clone(), projection);
        let (k, p, s) = (kafka.clone(), producer.clone(), stop.clone());
        tasks.spawn(async move {
            let r = run_consumer(k, settings, p, handler, s.clone())
                .await
                .map(drop)
                .with_context(|| format!("{} consumer", projection.as_str()));
            s.cancel();
            r
        });
    }
    // The query API gets its own small pool (and a concurrency limit in
    // the router), so queries cannot starve the consumers.
    let query_db = open_query_pool(db_url).await?;
    let app = crate::router(query_db.clone());
    let s = stop.clone();
    tasks.spawn(async move {
        // Header/body read timeouts and a global concurrency limit (503 +
        // Retry-After when saturated), as for every paystream server.
        let limits = runtime::http::HttpLimits::default();
        let r = runtime::http::serve(listener, app, limits, s.clone())
            .await
            .context("query HTTP server");
        s.cancel();
        r
    });
    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %format!("{e:#}"), "projections component failed");
                stop.cancel();
                if result.is_ok() {
                    result = Err(e);
                }
            }
            Err(e) => {
                stop.cancel();
                if result.is_ok() {
                    result = Err(anyhow::anyhow!("projections task panicked: {e}"));
                }
            }
        }
    }
    query_db.close().await;
    db.close().await;
    result
}

/// `paystream ledger ...`
#[derive(Debug, Clone, Subcommand)]
pub enum LedgerCommand {
    /// Check the invariants (balanced transactions, ledger sums to zero,
    /// wallets equal the ledger, no event applied twice, hash chain);
    /// exits 1 on any violation.
    Verify {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// An account's balance per currency, now or as of an instant.
    Balance {
        /// e.g. psp_receivable, psp_fees, reconciliation_adjustments, merchant_payable:<client>/<seller>
        account: String,
        /// RFC 3339 instant; entries that occurred after it are left out.
        #[arg(long)]
        as_of: Option<String>,
    },
    /// All entries booked for a payment.
    Entries {
        #[arg(long)]
        payment: events::PaymentId,
    },
    /// An account's entries in booking order, one page at a time.
    History {
        account: String,
        #[arg(long, default_value_t = crate::limits::HISTORY_LIMIT_DEFAULT)]
        limit: i64,
        /// Chain position to continue after (`next_after` of the previous page).
        #[arg(long)]
        after: Option<i64>,
    },
    /// A client's seller's wallet balances.
    Wallet {
        seller: String,
        /// The client whose seller it is (sellers are scoped by client;
        /// `""` for what was booked before that, migration 3004).
        #[arg(long)]
        client: String,
    },
    /// What a client's buyer paid and got refunded, per currency.
    Buyer {
        buyer: String,
        /// The client whose buyer it is.
        #[arg(long)]
        client: String,
    },
}

/// What the read-only `ledger` commands need to find in the database.
pub const LEDGER_NEEDS: storage::Needs = storage::Needs {
    what: "ledger projection",
    table: "ledger_entries",
};

/// Runs a `ledger` subcommand, printing JSON (or the verify report) to stdout.
pub async fn run_ledger_command(db_url: &str, cmd: LedgerCommand) -> anyhow::Result<ExitCode> {
    // Read-only: a database without the ledger is named as such, and
    // nothing is created in it.
    let db = Db::open_existing(db_url, LEDGER_NEEDS).await?;
    crate::migrate(&db).await?;
    let print = |v: serde_json::Value| -> anyhow::Result<()> {
        println!("{}", serde_json::to_string_pretty(&v)?);
        Ok(())
    };
    let code = match cmd {
        LedgerCommand::Verify { json } => {
            let report = crate::verify(&db).await;
            if json {
                print(serde_json::to_value(&report)?)?;
            } else {
                print!("{report}");
            }
            if report.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        LedgerCommand::Balance { account, as_of } => {
            anyhow::ensure!(
                crate::booking::is_known_account(&account),
                "unknown account {account:?}"
            );
            let as_of = as_of
                .as_deref()
                .map(crate::http::parse_as_of)
                .transpose()
                .map_err(anyhow::Error::msg)?;
            print(serde_json::to_value(
                crate::query::account_balance(&db, &account, as_of).await?,
            )?)?;
            ExitCode::SUCCESS
        }
        LedgerCommand::Entries { payment } => {
            let entries = crate::query::payment_entries(&db, &payment.to_string()).await?;
            print(serde_json::json!({"payment_id": payment.to_string(), "entries": entries}))?;
            ExitCode::SUCCESS
        }
        LedgerCommand::History {
            account,
            limit,
            after,
        } => {
            anyhow::ensure!(
                (1..=crate::limits::HISTORY_LIMIT_MAX).contains(&limit),
                "--limit must be between 1 and {}",
                crate::limits::HISTORY_LIMIT_MAX
            );
            print(serde_json::to_value(
                crate::query::account_history(&db, &account, after, limit).await?,
            )?)?;
            ExitCode::SUCCESS
        }
        LedgerCommand::Wallet { seller, client } => {
            print(serde_json::to_value(
                crate::query::wallet(&db, &client, &seller).await?,
            )?)?;
            ExitCode::SUCCESS
        }
        LedgerCommand::Buyer { buyer, client } => {
            let totals = crate::query::buyer_totals(&db, &client, &buyer).await?;
            print(serde_json::json!({"client_id": client, "buyer_id": buyer, "totals": totals}))?;
            ExitCode::SUCCESS
        }
    };
    db.close().await;
    Ok(code)
}
