//! Serving a component's HTTP API until shutdown.

use anyhow::Context;
use std::net::SocketAddr;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Binds `addr` (port 0: a free port) and serves `router` in a task until
/// `shutdown`, finishing in-flight requests. Returns the bound address.
pub async fn spawn_server(
    addr: SocketAddr,
    router: axum::Router,
    what: &'static str,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, JoinHandle<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "{what} listening");
    let task = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    });
    Ok((bound, task))
}
