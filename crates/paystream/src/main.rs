//! `paystream`: one binary, one subcommand per job. Thin: parsing and
//! wiring only; the work lives in the library crates.

mod bench;
mod demo;
mod pipeline;
mod schema_cmd;
mod up;

use clap::{CommandFactory, Parser, Subcommand};
use runtime::telemetry::{self, LogFormat};
use std::process::ExitCode;
use streaming::KafkaConfig;

/// Event-sourced payments on Kafka.
#[derive(Debug, Parser)]
#[command(name = "paystream", version, about, long_about = None)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, env = "PAYSTREAM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,

    /// Database of the projections and the components' state: a PostgreSQL
    /// URL in production, an SQLite file by default. Used by the
    /// components that keep state (handler, executor, projections).
    #[arg(
        long,
        env = "PAYSTREAM_DATABASE_URL",
        default_value = up::DEFAULT_DATABASE_URL,
        global = true
    )]
    database_url: String,

    /// Export traces (the spans of the logs: per message with event and
    /// payment ids, per HTTP request) to this OTLP/HTTP collector, e.g.
    /// `http://otel-collector:4318`. Off when unset.
    #[arg(long, env = "PAYSTREAM_OTLP_ENDPOINT", global = true)]
    otlp_endpoint: Option<String>,

    #[command(flatten)]
    kafka: KafkaConfig,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send one event of every type through the broker and back, and show
    /// that each arrives identical.
    Demo(demo::DemoArgs),
    /// Everything in one process on the embedded default (SQLite): PSP
    /// simulator, handler, executor, projections; then a demo load of
    /// payments with mixed outcomes and a summary.
    Up(up::UpArgs),
    /// Benchmark: the whole pipeline under load on your broker and
    /// database (its own topics and database), next to the raw limits of
    /// both measured in the same run.
    Bench(bench::BenchArgs),
    /// Kafka topics.
    #[command(subcommand)]
    Topics(TopicsCommand),
    /// The Avro schemas in schemas/.
    #[command(subcommand)]
    Schema(schema_cmd::SchemaCommand),
    /// Run one component (for deployment, one process per component).
    #[command(subcommand)]
    Serve(ServeCommand),
    /// API clients of the payment handler.
    #[command(subcommand)]
    Clients(ClientsCommand),
    /// Query and verify the ledger and wallets.
    #[command(subcommand)]
    Ledger(projections::LedgerCommand),
    /// Projections (ledger, wallet): status, reset, rebuild.
    #[command(subcommand)]
    Projection(ops::ProjectionCommand),
    /// Build the ledger and wallets as they stood at a past moment into a
    /// separate database (production projections untouched).
    Project(ops::ProjectArgs),
    /// Consumer-group offsets (in the spirit of kafka-consumer-groups).
    #[command(subcommand)]
    Offsets(ops::OffsetsCommand),
    /// Replay topics for analysis as JSON lines, CSV or Avro container files.
    Replay(replay::ReplayArgs),
    /// The dead-letter topic: list, show, redrive.
    #[command(subcommand)]
    Dlq(replay::DlqCommand),
    /// Reconcile a PSP settlement file against the ledger; resolve
    /// discrepancies.
    Reconcile(reconcile::ReconcileArgs),
    /// The fault suite: the whole system as separate processes under load
    /// while components, the broker and the database fail around it and
    /// the PSP misbehaves; then the money is checked from the outside.
    Chaos(chaos::ChaosArgs),
    /// Every environment variable paystream reads, with its flag, command
    /// and default (deploy/ is checked against this list).
    Env,
}

#[derive(Debug, Subcommand)]
enum ServeCommand {
    /// The payment handler: HTTP API, inbound-topic consumer, payment status.
    Handler(payment_handler::HandlerArgs),
    /// The payment executor: charges approved orders at the PSP exactly
    /// once; PSP webhooks; refunds.
    Executor(executor::ExecutorArgs),
    /// The PSP simulator: a stand-in for a real payment service provider,
    /// with its own state, webhooks and settlement files.
    PspSim(psp_sim::PspSimArgs),
    /// The ledger and wallet projections (one consumer group each) and their
    /// query API.
    Projections(projections::ProjectionsArgs),
    /// The reconciler: fetches the PSP's settlement file nightly and
    /// reconciles it against the ledger.
    Reconciler(reconcile::ReconcilerArgs),
}

#[derive(Debug, Subcommand)]
enum ClientsCommand {
    /// Register a client (if new) and print a new API key for it, once.
    Create {
        /// Client id: letters, digits and . _ : - (e.g. the order service's name).
        name: String,
        /// What the key may do: `client` (act for the client, read only its
        /// data) or `operator` (ledger-wide reads and `/v1/ledger/verify`).
        #[arg(long, default_value = "client", value_parser = ["client", "operator"])]
        role: String,
    },
    /// Revoke an API key (by key id: the part between `psk_` and the next
    /// `_`), or every key of a client (`--client NAME`). Revoked keys are
    /// refused at once by the handler and the projections' API.
    Revoke {
        /// Key id as `clients list` shows it.
        #[arg(required_unless_present = "client", conflicts_with = "client")]
        key_id: Option<String>,
        /// Revoke all keys of this client instead.
        #[arg(long)]
        client: Option<String>,
    },
    /// List API keys: key id, client, role, created, revoked (never secrets).
    List,
}

#[derive(Debug, Subcommand)]
enum TopicsCommand {
    /// Create paystream's topics where missing (idempotent).
    Create,
    /// Print the topic names, partition counts and keys of this deployment.
    List,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // Interactive commands print their own output; services log at info.
    let default_filter = match cli.command {
        Command::Up(_)
        | Command::Bench(_)
        | Command::Demo(_)
        | Command::Projection(_)
        | Command::Project(_)
        | Command::Offsets(_)
        | Command::Replay(_)
        | Command::Dlq(_)
        | Command::Reconcile(_)
        | Command::Chaos(_) => "warn",
        _ => "info",
    };
    let service = match &cli.command {
        Command::Serve(ServeCommand::Handler(_)) => "paystream-handler",
        Command::Serve(ServeCommand::Executor(_)) => "paystream-executor",
        Command::Serve(ServeCommand::Projections(_)) => "paystream-projections",
        Command::Serve(ServeCommand::PspSim(_)) => "paystream-psp-sim",
        Command::Serve(ServeCommand::Reconciler(_)) => "paystream-reconciler",
        _ => "paystream",
    };
    let otlp = telemetry::Otlp {
        endpoint: cli.otlp_endpoint.clone(),
        service_name: service.to_owned(),
    };
    let _telemetry = telemetry::init(cli.log_format, default_filter, &otlp);
    tracing::debug!(database_url = %cli.database_url, "configuration loaded");
    let result = match cli.command {
        Command::Demo(args) => demo::run(&cli.kafka, args).await,
        Command::Up(args) => up::run(cli.kafka, &cli.database_url, args).await,
        Command::Bench(args) => bench::run(cli.kafka, &cli.database_url, args).await,
        Command::Env => {
            print_env(&Cli::command(), "paystream");
            Ok(ExitCode::SUCCESS)
        }
        Command::Topics(TopicsCommand::Create) => topics_create(&cli.kafka).await,
        Command::Topics(TopicsCommand::List) => {
            topics_list(&cli.kafka);
            Ok(ExitCode::SUCCESS)
        }
        Command::Schema(cmd) => schema_cmd::run(cmd),
        Command::Serve(ServeCommand::Handler(args)) => {
            let shutdown = runtime::shutdown::on_signals();
            payment_handler::serve(cli.kafka, &cli.database_url, args, shutdown)
                .await
                .map(|()| ExitCode::SUCCESS)
        }
        Command::Serve(ServeCommand::Executor(args)) => {
            let shutdown = runtime::shutdown::on_signals();
            executor::serve(cli.kafka, &cli.database_url, args, shutdown)
                .await
                .map(|()| ExitCode::SUCCESS)
        }
        Command::Serve(ServeCommand::PspSim(args)) => {
            psp_sim::serve(args, runtime::shutdown::on_signals())
                .await
                .map(|()| ExitCode::SUCCESS)
        }
        Command::Serve(ServeCommand::Projections(args)) => {
            let shutdown = runtime::shutdown::on_signals();
            projections::serve(cli.kafka, &cli.database_url, args, shutdown)
                .await
                .map(|()| ExitCode::SUCCESS)
        }
        Command::Serve(ServeCommand::Reconciler(args)) => {
            let shutdown = runtime::shutdown::on_signals();
            reconcile::serve(cli.kafka, &cli.database_url, args, shutdown)
                .await
                .map(|()| ExitCode::SUCCESS)
                .map_err(anyhow::Error::from)
        }
        Command::Projection(cmd) => ops::projection(cli.kafka, &cli.database_url, cmd).await,
        Command::Project(args) => ops::project(cli.kafka, &cli.database_url, args).await,
        Command::Offsets(cmd) => ops::offsets(cli.kafka, cmd).await,
        Command::Replay(args) => replay::replay(cli.kafka, args)
            .await
            .map_err(anyhow::Error::from),
        Command::Dlq(cmd) => replay::dlq(cli.kafka, &cli.database_url, cmd)
            .await
            .map_err(anyhow::Error::from),
        Command::Reconcile(args) => reconcile::run(cli.kafka, &cli.database_url, args)
            .await
            .map_err(anyhow::Error::from),
        Command::Chaos(args) => chaos::run(args).await,
        Command::Ledger(cmd) => projections::run_ledger_command(&cli.database_url, cmd).await,
        Command::Clients(ClientsCommand::Create { name, role }) => {
            clients_create(&cli.database_url, &name, &role).await
        }
        Command::Clients(ClientsCommand::Revoke { key_id, client }) => {
            clients_revoke(&cli.database_url, key_id, client).await
        }
        Command::Clients(ClientsCommand::List) => clients_list(&cli.database_url).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints `ENV_VAR  command --flag  default` for every argument with an
/// environment variable, once per variable (global flags at the top level).
fn print_env(cmd: &clap::Command, path: &str) {
    fn walk(cmd: &clap::Command, path: &str, seen: &mut std::collections::BTreeSet<String>) {
        for arg in cmd.get_arguments() {
            let Some(env) = arg.get_env().filter(|_| !arg.is_hide_set()) else {
                continue;
            };
            let env = env.to_string_lossy().into_owned();
            if !seen.insert(env.clone()) {
                continue;
            }
            let flag = arg.get_long().map(|l| format!("--{l}")).unwrap_or_default();
            let default: Vec<String> = arg
                .get_default_values()
                .iter()
                .map(|v| v.to_string_lossy().into_owned())
                .collect();
            println!(
                "{env:<44} {path} {flag}  [default: {}]",
                if default.is_empty() {
                    "none".into()
                } else {
                    default.join(",")
                }
            );
        }
        for sub in cmd.get_subcommands() {
            walk(sub, &format!("{path} {}", sub.get_name()), seen);
        }
    }
    walk(cmd, path, &mut std::collections::BTreeSet::new());
    // Read by every consumer loop (not flags: they tune all components).
    for (env, default) in [
        (streaming::consumer::ENV_BATCH_MAX, "500"),
        (streaming::consumer::ENV_BATCH_LINGER_MS, "20"),
        (streaming::consumer::ENV_PIPELINE_DEPTH, "1"),
    ] {
        println!("{env:<44} {path} (every consumer loop)  [default: {default}]");
    }
}

async fn clients_create(database_url: &str, name: &str, role: &str) -> anyhow::Result<ExitCode> {
    use payment_handler::store::{self, KeyRole};
    let client = events::ClientId::parse(name)?;
    let role = KeyRole::parse(role)
        .ok_or_else(|| anyhow::anyhow!("--role must be client or operator, got {role:?}"))?;
    let db = storage::Db::connect(database_url).await?;
    store::migrate(&db).await?;
    let key = store::create_client_with_role(&db, &client, role).await?;
    eprintln!(
        "created a {} API key for client {client}; it is shown only now:",
        role.as_str()
    );
    println!("{key}");
    Ok(ExitCode::SUCCESS)
}

async fn clients_revoke(
    database_url: &str,
    key_id: Option<String>,
    client: Option<String>,
) -> anyhow::Result<ExitCode> {
    use payment_handler::store;
    let db = storage::Db::connect(database_url).await?;
    store::migrate(&db).await?;
    match (key_id, client) {
        (Some(key_id), _) => {
            // Accept a whole key too, so a leaked key can be pasted as is.
            let id = key_id
                .strip_prefix("psk_")
                .map_or(key_id.as_str(), |r| r.split('_').next().unwrap_or(r));
            if store::revoke_key(&db, id).await? {
                println!("revoked key {id}");
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("error: no active key with id {id} (see `paystream clients list`)");
                Ok(ExitCode::FAILURE)
            }
        }
        (None, Some(name)) => {
            let client = events::ClientId::parse(&name)?;
            let n = store::revoke_client_keys(&db, &client).await?;
            println!("revoked {n} key(s) of client {client}");
            Ok(if n > 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        (None, None) => anyhow::bail!("give a key id or --client NAME"),
    }
}

async fn clients_list(database_url: &str) -> anyhow::Result<ExitCode> {
    use payment_handler::store;
    let db = storage::Db::connect(database_url).await?;
    store::migrate(&db).await?;
    let ms = |v: i64| events::Timestamp::from_micros(v.saturating_mul(1000)).to_string();
    println!(
        "{:<18} {:<24} {:<9} {:<32} revoked",
        "key_id", "client", "role", "created"
    );
    for k in store::list_keys(&db).await? {
        println!(
            "{:<18} {:<24} {:<9} {:<32} {}",
            k.key_id,
            k.client_id,
            k.role,
            ms(k.created_ms),
            k.revoked_ms.map(ms).unwrap_or_else(|| "-".into())
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn topics_create(kafka: &KafkaConfig) -> anyhow::Result<ExitCode> {
    let specs = kafka.topology().specs();
    let created = streaming::admin::ensure_topics(kafka, &specs).await?;
    for s in &specs {
        let state = if created.contains(&s.name) {
            "created"
        } else {
            "exists"
        };
        println!("{:<40} {:>3} partitions  {state}", s.name, s.partitions);
    }
    Ok(ExitCode::SUCCESS)
}

fn topics_list(kafka: &KafkaConfig) {
    for s in kafka.topology().specs() {
        let key = match s.kind {
            events::TopicKind::DeadLetter => "original message key",
            events::TopicKind::Reconciliation => {
                "payment id, else discrepancy id (run id for runs)"
            }
            _ => "payment id",
        };
        println!("{:<40} {:>3} partitions  key: {key}", s.name, s.partitions);
    }
}
