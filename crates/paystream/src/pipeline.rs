//! The whole pipeline in one process: PSP simulator, executor, payment
//! handler and projections on one database. `paystream up` (the demo) and
//! `paystream bench` (the benchmark) both start it; deployments run each
//! component alone with `paystream serve ...`.

use anyhow::Context;
use runtime::secret::Secret;
use serde_json::{Value, json};
use std::net::SocketAddr;
use streaming::KafkaConfig;
use tokio_util::sync::CancellationToken;

/// What differs between the demo and the benchmark.
#[derive(Debug, Clone)]
pub struct Options {
    pub handler: SocketAddr,
    pub projections: SocketAddr,
    pub executor: SocketAddr,
    pub psp: SocketAddr,
    /// Where the PSP simulator, an outside party, keeps its own state.
    pub psp_db_url: String,
    /// Extra simulator rules (evaluated before its built-in card tokens).
    pub psp_rules: Vec<Value>,
    /// The simulator's fsyncs: `full` (as a PSP would), `relaxed`
    /// (benchmarks: commits share the checkpoint's fsync; same answers) or
    /// `batched` (benchmarks: as `relaxed`, and concurrent requests' writes
    /// share one commit; same answers).
    pub psp_durability: &'static str,
    /// Share of webhooks the simulator sends twice.
    pub webhook_duplicate_percent: u32,
    /// When the executor polls a pending order whose webhook is late.
    pub pending_poll_after_secs: Option<u64>,
    /// Events per projection batch.
    pub projection_batch: u32,
}

/// The running pipeline.
#[derive(Debug)]
pub struct Pipeline {
    pub handler_url: String,
    pub projections_url: String,
    pub executor_url: String,
    pub psp_url: String,
    pub psp_key: Secret,
    handler: payment_handler::service::Running,
    executor: executor::service::Running,
    projections: tokio::task::JoinHandle<anyhow::Result<()>>,
    psp: psp_sim::RunningSim,
    stop: CancellationToken,
}

/// Random free local port (or the fixed one).
pub fn port(random: bool, fixed: u16) -> anyhow::Result<SocketAddr> {
    if !random {
        return Ok(SocketAddr::from(([127, 0, 0, 1], fixed)));
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?)
}

/// Starts every component; `stop` cancels them all.
pub async fn start(
    kafka: &KafkaConfig,
    database_url: &str,
    opts: Options,
    stop: CancellationToken,
) -> anyhow::Result<Pipeline> {
    let psp_url = format!("http://{}", opts.psp);
    // No built-in secrets: fresh ones for this run's simulator and executor.
    let psp_key = Secret::generate("sk_test_");
    let webhook_secret = Secret::generate("whsec_");
    let mut ex_args =
        executor::ExecutorArgs::for_tests(&psp_url, psp_key.clone(), webhook_secret.clone());
    ex_args.listen = opts.executor;
    if let Some(secs) = opts.pending_poll_after_secs {
        ex_args.pending_poll_after_secs = secs;
    }
    let executor = executor::start(kafka.clone(), database_url, ex_args, stop.clone())
        .await
        .context("starting the executor")?;
    let behaviour: psp_sim::config::Behaviour = serde_json::from_value(json!({
        "rules": opts.psp_rules,
        "accounts": [{"id": "acct_default", "api_key": psp_key.expose(), "webhook_secret": webhook_secret.expose(),
                      "webhook_url": format!("http://{}/v1/psp/webhooks", executor.addr)}],
        "webhooks": {"duplicate_percent": opts.webhook_duplicate_percent},
        "durability": opts.psp_durability
    }))
    .context("PSP simulator behaviour")?;
    let psp = psp_sim::spawn(psp_sim::SimConfig {
        listen: opts.psp,
        db_url: opts.psp_db_url.clone(),
        behaviour,
        api_key: psp_key.clone(),
        webhook_secret,
    })
    .await
    .context("starting the PSP simulator")?;
    let mut h_args = payment_handler::HandlerArgs::for_tests();
    h_args.listen = opts.handler;
    let handler = payment_handler::start(kafka.clone(), database_url, h_args, stop.clone())
        .await
        .context("starting the payment handler")?;
    let projections = {
        let p_args = projections::ProjectionsArgs {
            listen: opts.projections,
            ledger_group: None,
            wallet_group: None,
            batch_size: opts.projection_batch,
        };
        let (kafka, url, stop) = (kafka.clone(), database_url.to_owned(), stop.clone());
        tokio::spawn(async move { projections::serve(kafka, &url, p_args, stop).await })
    };
    Ok(Pipeline {
        handler_url: format!("http://{}", handler.addr),
        projections_url: format!("http://{}", opts.projections),
        executor_url: format!("http://{}", executor.addr),
        psp_url: psp.base_url(),
        psp_key,
        handler,
        executor,
        projections,
        psp,
        stop,
    })
}

impl Pipeline {
    /// Stops every component and waits until each has.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.handler.wait().await?;
        self.executor.wait().await?;
        self.projections.await??;
        self.psp.stop().await?;
        // How this process's SQLite writers queued (all zero on PostgreSQL).
        let lock = storage::lock_wait::stats();
        if lock.commits > 0 {
            tracing::info!(
                commits = lock.commits,
                waits = lock.waits,
                woken_by_commit = lock.woken,
                polls = lock.polled,
                timeouts = lock.timeouts,
                checkpoints = lock.checkpoints,
                "SQLite write lock"
            );
        }
        Ok(())
    }
}

/// Registers an API client (a new key each call) and returns its key.
pub async fn new_client(database_url: &str, name: &str) -> anyhow::Result<String> {
    let db = storage::Db::connect(database_url).await?;
    let client = events::ClientId::parse(name)?;
    Ok(payment_handler::store::create_client(&db, &client).await?)
}
