//! `paystream`: one binary, one subcommand per job. Thin: parsing and
//! wiring only; the work lives in the library crates.

mod demo;
mod schema_cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use streaming::KafkaConfig;
use streaming::telemetry::{self, LogFormat};

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
        default_value = "sqlite://paystream.db",
        global = true
    )]
    database_url: String,

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
    /// Kafka topics.
    #[command(subcommand)]
    Topics(TopicsCommand),
    /// The Avro schemas in schemas/.
    #[command(subcommand)]
    Schema(schema_cmd::SchemaCommand),
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
    telemetry::init(cli.log_format);
    tracing::debug!(database_url = %cli.database_url, "configuration loaded");
    let result = match cli.command {
        Command::Demo(args) => demo::run(&cli.kafka, args).await,
        Command::Topics(TopicsCommand::Create) => topics_create(&cli.kafka).await,
        Command::Topics(TopicsCommand::List) => {
            topics_list(&cli.kafka);
            Ok(ExitCode::SUCCESS)
        }
        Command::Schema(cmd) => schema_cmd::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
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
            events::TopicKind::Reconciliation => "payment id, else discrepancy id",
            _ => "payment id",
        };
        println!("{:<40} {:>3} partitions  key: {key}", s.name, s.partitions);
    }
}
