//! Serving a component's HTTP API until shutdown, with limits that hold
//! under abuse.
//!
//! Every server (handler, executor, projections' queries) goes through
//! [`serve`], which adds:
//!
//! - a **header read timeout** ([`HttpLimits::header_read_timeout`]): a
//!   client that opens a connection and sends its request head slowly (or
//!   not at all) is disconnected, so idle or trickling connections cannot
//!   pile up (slowloris). `axum::serve` sets no timer, so hyper's timeout
//!   would never fire there: this is why we run our own accept loop;
//! - a **body read timeout** ([`HttpLimits::body_read_timeout`]) and size
//!   bound ([`HttpLimits::max_body_bytes`]): the body is read (within both)
//!   before the handler runs; too slow → 408, too large → 413;
//! - a **global concurrency limit** ([`HttpLimits::max_concurrent_requests`]):
//!   requests beyond it are answered at once with 503 and `Retry-After`
//!   (load shedding) instead of queueing without bound.
//!
//! The limits run before the router, so a refused request does no database
//! work.

use anyhow::Context;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Limits of one HTTP server (see the module docs).
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Longest a client may take to send a request's head (also bounds an
    /// idle keep-alive connection waiting for its next request).
    pub header_read_timeout: Duration,
    /// Longest a client may take to send a request's body.
    pub body_read_timeout: Duration,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Requests handled at once; more are answered 503.
    pub max_concurrent_requests: usize,
    /// `Retry-After` (seconds) of a 503 for saturation.
    pub retry_after_secs: u64,
}

impl Default for HttpLimits {
    /// Sized for JSON APIs with small bodies: 10 s for the head and for the
    /// body, 1 MiB bodies, 256 requests at once (well above what one
    /// component's database pool serves), retry after 1 s.
    fn default() -> Self {
        HttpLimits {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            max_body_bytes: crate::limits::HTTP_BODY_BYTES_MAX_DEFAULT,
            max_concurrent_requests: crate::limits::HTTP_CONCURRENT_REQUESTS_MAX_DEFAULT,
            retry_after_secs: 1,
        }
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(serde_json::json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

/// Wraps `router` with the body and concurrency limits (the header
/// timeout is the connection's, see [`serve`]).
pub fn limit(router: axum::Router, limits: &HttpLimits) -> axum::Router {
    let permits = Arc::new(Semaphore::new(limits.max_concurrent_requests));
    let limits = limits.clone();
    router.layer(axum::middleware::from_fn(
        move |req: Request, next: axum::middleware::Next| {
            let (permits, limits) = (permits.clone(), limits.clone());
            async move {
                // Load shedding: never queue behind a saturated server.
                let Ok(_permit) = permits.try_acquire_owned() else {
                    let mut r = error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "overloaded",
                        "too many requests in progress; retry later",
                    );
                    r.headers_mut().insert(
                        header::RETRY_AFTER,
                        HeaderValue::from(limits.retry_after_secs),
                    );
                    return r;
                };
                let (parts, body) = req.into_parts();
                let read = axum::body::to_bytes(body, limits.max_body_bytes);
                let bytes = match tokio::time::timeout(limits.body_read_timeout, read).await {
                    Ok(Ok(b)) => b,
                    Ok(Err(_)) => {
                        return error(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "body_too_large",
                            &format!(
                                "the request body is larger than {} bytes (or was cut off)",
                                limits.max_body_bytes
                            ),
                        );
                    }
                    Err(_) => {
                        let mut r = error(
                            StatusCode::REQUEST_TIMEOUT,
                            "body_timeout",
                            "the request body did not arrive in time",
                        );
                        r.headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                        return r;
                    }
                };
                next.run(Request::from_parts(parts, Body::from(bytes)))
                    .await
            }
        },
    ))
}

/// Serves `router` on `listener` with `limits` until `shutdown`, then
/// stops accepting, lets in-flight requests finish and closes idle
/// connections.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = limit(router, &limits);
    let mut conns = JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off, go on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Reap finished connections so the set does not grow.
        while conns.try_join_next().is_some() {}
        let svc = TowerToHyperService::new(
            app.clone()
                .map_request(|req: Request<hyper::body::Incoming>| req.map(Body::new)),
        );
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout);
        let shutdown = shutdown.clone();
        conns.spawn(async move {
            let conn = http.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    return;
                }
                _ = shutdown.cancelled() => conn.as_mut().graceful_shutdown(),
            }
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
    Ok(())
}

/// Binds `addr` (port 0: a free port) and serves `router` in a task until
/// `shutdown` with the default [`HttpLimits`], finishing in-flight
/// requests. Returns the bound address.
pub async fn spawn_server(
    addr: SocketAddr,
    router: axum::Router,
    what: &'static str,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, JoinHandle<std::io::Result<()>>)> {
    spawn_server_with(addr, router, what, HttpLimits::default(), shutdown).await
}

/// [`spawn_server`] with explicit limits.
pub async fn spawn_server_with(
    addr: SocketAddr,
    router: axum::Router,
    what: &'static str,
    limits: HttpLimits,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, JoinHandle<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "{what} listening");
    let task = tokio::spawn(serve(listener, router, limits, shutdown));
    Ok((bound, task))
}

/// Declares the closed enum of an HTTP API's error codes: the enum (each
/// variant with its code on the wire), `ALL` (every variant, in
/// declaration order, generated so it cannot miss one), `as_str`,
/// `Display` and comparison with a `&str`. The payment handler, the query
/// API and the PSP simulator each declare theirs with it and add what is
/// their own (statuses, the document their tests check the codes against).
///
/// ```
/// runtime::error_codes! {
///     /// The codes of an API.
///     pub enum Code {
///         /// 404: no such thing.
///         NotFound = "not_found",
///         Unavailable = "unavailable",
///     }
/// }
/// assert_eq!(Code::ALL, &[Code::NotFound, Code::Unavailable]);
/// assert_eq!(Code::NotFound.as_str(), "not_found");
/// assert_eq!(Code::Unavailable, "unavailable");
/// ```
///
/// Codes are checked at compile time: non-empty `snake_case`, each spelled
/// once.
///
/// ```compile_fail
/// runtime::error_codes! {
///     pub enum Code {
///         NotFound = "not_found",
///         Missing = "not_found",
///     }
/// }
/// ```
///
/// ```compile_fail
/// runtime::error_codes! {
///     pub enum Code {
///         NotFound = "Not-Found",
///     }
/// }
/// ```
#[macro_export]
macro_rules! error_codes {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $code:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        const _: () = {
            let codes: &[&str] = &[$($code,)+];
            assert!(
                $crate::http::codes_are_snake_case(codes),
                "an error code is not non-empty snake_case"
            );
            assert!(
                $crate::http::codes_are_distinct(codes),
                "an error code is spelled twice"
            );
        };

        impl $name {
            /// Every code, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The code on the wire.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $code, )+
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::std::cmp::PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    };
}

/// Whether every code is non-empty and only `a`-`z` and `_` (checked at
/// compile time by [`error_codes!`]).
#[doc(hidden)]
pub const fn codes_are_snake_case(codes: &[&str]) -> bool {
    let mut i = 0;
    while i < codes.len() {
        let c = codes[i].as_bytes();
        if c.is_empty() {
            return false;
        }
        let mut k = 0;
        while k < c.len() {
            if !(c[k].is_ascii_lowercase() || c[k] == b'_') {
                return false;
            }
            k += 1;
        }
        i += 1;
    }
    true
}

/// Whether no code is spelled twice (checked at compile time by
/// [`error_codes!`]).
#[doc(hidden)]
pub const fn codes_are_distinct(codes: &[&str]) -> bool {
    let mut i = 0;
    while i < codes.len() {
        let mut j = 0;
        while j < i {
            let (a, b) = (codes[i].as_bytes(), codes[j].as_bytes());
            if a.len() == b.len() {
                let mut k = 0;
                while k < a.len() && a[k] == b[k] {
                    k += 1;
                }
                if k == a.len() {
                    return false;
                }
            }
            j += 1;
        }
        i += 1;
    }
    true
}
