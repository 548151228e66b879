//! Logging: human-readable or JSON lines, filtered by `RUST_LOG`
//! (default `info`); optionally, the same spans exported as OpenTelemetry
//! traces over OTLP/HTTP (protobuf) when an endpoint is configured.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line, with span fields (event_id, payment_id, ...).
    Json,
}

/// Where to send traces, if anywhere.
#[derive(Debug, Clone, Default)]
pub struct Otlp {
    /// Base URL of an OTLP/HTTP collector (e.g. `http://otel-collector:4318`);
    /// spans are posted to `{endpoint}/v1/traces`.
    pub endpoint: Option<String>,
    /// `service.name` of the exported spans (e.g. `paystream-executor`).
    pub service_name: String,
}

/// Keeps the trace exporter alive; dropping it flushes the spans still
/// buffered (so hold it until the process ends).
#[derive(Debug, Default)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("warning: flushing OpenTelemetry spans failed: {e}");
        }
    }
}

/// Installs the global subscriber. Logs go to stderr so stdout stays clean
/// for data (replays, reports). `default_filter` applies when `RUST_LOG` is
/// not set (e.g. `"info"`, or `"warn"` for interactive commands). With an
/// OTLP endpoint, spans that pass the filter (the per-message span with
/// event and payment ids, the components' own spans) are exported too.
pub fn init(format: LogFormat, default_filter: &str, otlp: &Otlp) -> TelemetryGuard {
    let filter =
        || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let provider = match otlp.endpoint.as_deref().filter(|e| !e.is_empty()) {
        None => None,
        Some(endpoint) => match tracer_provider(endpoint, &otlp.service_name) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("warning: OpenTelemetry export disabled: {e:#}");
                None
            }
        },
    };
    // Traces keep info-level spans even where the terminal shows only
    // warnings (interactive commands); RUST_LOG governs both when set.
    let otel = provider.as_ref().map(|p| {
        let f = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("paystream"))
            .with_filter(f)
    });
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(otel);
    let _ = match format {
        LogFormat::Human => registry.with(fmt.with_filter(filter())).try_init(),
        LogFormat::Json => registry
            .with(
                fmt.json()
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_filter(filter()),
            )
            .try_init(),
    };
    TelemetryGuard { provider }
}

fn tracer_provider(endpoint: &str, service: &str) -> anyhow::Result<SdkTracerProvider> {
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(url)
        .build()?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service.to_owned())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}
