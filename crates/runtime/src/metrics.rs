//! Prometheus metrics. Every name paystream exports is listed in [`NAMES`]
//! (the Grafana dashboard in deploy/ is checked against it), and every label
//! takes values from a bounded set: components, groups, topics, partitions,
//! route templates, status codes and stable outcome/error codes. Never ids,
//! amounts or error messages.

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::time::Instant;

pub mod events;

/// Consumer lag per partition: high watermark minus the next offset to read.
pub const CONSUMER_LAG: &str = "paystream_consumer_lag";
/// Events a consumer group handled, by outcome (applied, duplicate, ignored, dead_lettered).
pub const EVENTS: &str = "paystream_events_total";
/// Dead letters written, by group and error kind.
pub const DEAD_LETTERS: &str = "paystream_dead_letters_total";
/// Batches whose handler failed, by group and whether they are retried
/// (`retry`: yes for transient failures, no for deterministic ones, which
/// are narrowed down to the message that causes them).
pub const BATCH_FAILURES: &str = "paystream_batch_failures_total";
/// Rebalance callbacks a consumer member went through, by group and kind
/// (assigned, revoked, error).
pub const REBALANCES: &str = "paystream_rebalances_total";
/// HTTP requests, by component, route template and status.
pub const HTTP_REQUESTS: &str = "paystream_http_requests_total";
/// HTTP latency, by component and route template.
pub const HTTP_DURATION: &str = "paystream_http_request_duration_seconds";
/// Idempotency-Key outcomes at the handler (owned, replay, mismatch, in_flight).
pub const IDEMPOTENCY: &str = "paystream_idempotency_total";
/// PSP calls by operation and outcome (ok, transient, final).
pub const PSP_REQUESTS: &str = "paystream_psp_requests_total";
/// PSP latency by operation.
pub const PSP_DURATION: &str = "paystream_psp_request_duration_seconds";
/// Batches the payment handler's group commit ran.
pub const GROUP_COMMIT_BATCHES: &str = "paystream_handler_group_commit_batches_total";
/// Orders parked for a retry (transient PSP failures).
pub const PSP_RETRIES: &str = "paystream_psp_retries_total";
/// Correctly signed PSP webhooks refused because their charge id, amount or
/// currency differ from the order's, by field (charge_id, amount, currency).
pub const WEBHOOK_MISMATCHES: &str = "paystream_webhook_mismatches_total";

/// Webhook delivery attempts of the PSP simulator, by result (delivered, failed).
pub const PSP_SIM_WEBHOOKS: &str = "paystream_psp_sim_webhook_deliveries_total";
/// Charges the PSP simulator created, by outcome (succeeded, declined, pending).
pub const PSP_SIM_CHARGES: &str = "paystream_psp_sim_charges_total";

/// Every metric name paystream exports.
pub const NAMES: &[&str] = &[
    CONSUMER_LAG,
    EVENTS,
    DEAD_LETTERS,
    BATCH_FAILURES,
    REBALANCES,
    HTTP_REQUESTS,
    HTTP_DURATION,
    IDEMPOTENCY,
    GROUP_COMMIT_BATCHES,
    PSP_REQUESTS,
    PSP_DURATION,
    PSP_RETRIES,
    WEBHOOK_MISMATCHES,
    PSP_SIM_WEBHOOKS,
    PSP_SIM_CHARGES,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder (once; later calls reuse it).
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let buckets = [
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        let recorder = PrometheusBuilder::new()
            .set_buckets(&buckets)
            .expect("static buckets are valid")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder already installed (a test harness): keep ours for
        // rendering anyway; its numbers stay empty.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// The Prometheus text exposition of everything recorded so far.
pub fn render() -> String {
    install().render()
}

/// `GET /metrics` handler.
pub async fn metrics_endpoint() -> ([(axum::http::HeaderName, &'static str); 1], String) {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        render(),
    )
}

/// Axum middleware recording request counts and latency per route template.
pub async fn track_http(component: &'static str, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let started = Instant::now();
    let span = tracing::info_span!(
        "http",
        component,
        method = %req.method(),
        route = %route,
        status = tracing::field::Empty,
    );
    let resp = tracing::Instrument::instrument(next.run(req), span.clone()).await;
    span.record("status", resp.status().as_u16());
    let status = resp.status().as_u16().to_string();
    metrics::counter!(HTTP_REQUESTS, "component" => component, "route" => route.clone(), "status" => status).increment(1);
    metrics::histogram!(HTTP_DURATION, "component" => component, "route" => route)
        .record(started.elapsed().as_secs_f64());
    resp
}

/// Adds `/metrics` and request tracking to a component's router.
pub fn instrument<S: Clone + Send + Sync + 'static>(
    router: axum::Router<S>,
    component: &'static str,
) -> axum::Router<S> {
    install();
    router
        .route("/metrics", axum::routing::get(metrics_endpoint))
        .layer(axum::middleware::from_fn(move |req, next| {
            track_http(component, req, next)
        }))
}
