//! Telemetry for Trellis services: JSON logs that carry trace ids,
//! OpenTelemetry traces exported over OTLP, W3C propagation, and Prometheus
//! RED metrics — one pipeline, set up by one call.
//!
//! ```no_run
//! # async fn run() -> Result<(), trellis_telemetry::TelemetryError> {
//! use trellis_telemetry::{Telemetry, OtlpSettings};
//!
//! let telemetry = Telemetry::builder("user")
//!     .version("1.2.0")
//!     .otlp(OtlpSettings { endpoint: Some("http://127.0.0.1:4317".into()), ..Default::default() })
//!     .init()?;
//! // servers: .layer(ServerTraceLayer::new()).layer(RedLayer::new()); clients: ClientTelemetryLayer
//! telemetry.shutdown().await; // flush before exit
//! # Ok(()) }
//! ```
//!
//! **Logs.** [`Telemetry::builder`] installs the process-wide `tracing`
//! subscriber: one JSON object per line (the default when stderr is not a
//! terminal) with `timestamp`, `level`, `target`, the message and fields,
//! `service`, `instance`, and — inside a request — `trace_id`, `span_id`
//! and the request's baggage entries (`request_id`, `tenant`, business
//! tags). The filter follows `RUST_LOG`, else `log.level` from config, live
//! ([`LogControl`]).
//!
//! **Traces.** Spans go through the OpenTelemetry SDK and, when an endpoint
//! is configured ([`OtlpSettings`], or `OTEL_EXPORTER_OTLP_ENDPOINT`), out
//! over OTLP/gRPC in batches. The sampler is parent-based with a ratio for
//! new traces; the resource carries `service.name`, `service.version`,
//! `service.instance.id` and `deployment.environment.name`. Without an
//! endpoint nothing is recorded, yet every request still gets a trace id
//! (in its logs and passed downstream) and a caller's sampled decision is
//! passed on. Endpoint and ratio change live through [`Telemetry::apply`].
//!
//! **Propagation.** [`ServerTraceLayer`] opens a server span per request
//! as the child of the caller's `traceparent`, with the caller's
//! `tracestate` and `baggage` (baggage entries become span attributes);
//! [`ClientTelemetryLayer`] opens a client span per outbound call and
//! writes the headers from it. gRPC metadata are HTTP/2 headers, so one
//! implementation serves both faces ([`propagation`]).
//!
//! **Metrics.** [`prometheus`] installs one process-wide recorder (the
//! `metrics` crate's facade, rendered by `metrics-exporter-prometheus`) and
//! [`metrics_router`] serves it at `/metrics`. [`RedLayer`] records, for
//! every request it sees, the RED metrics the OpenTelemetry semantic
//! conventions name, in their Prometheus form:
//!
//! | metric | labels |
//! |---|---|
//! | `rpc_server_duration_seconds` (histogram) | `rpc_system="grpc"`, `rpc_service`, `rpc_method`, `rpc_grpc_status_code` |
//! | `http_server_request_duration_seconds` (histogram) | `http_request_method`, `http_route`, `http_response_status_code` |
//! | `rpc_server_active_requests` (gauge) | `rpc_system`, `rpc_service` |
//! | `http_server_active_requests` (gauge) | `http_request_method`, `http_route` |
//! | `rpc_client_duration_seconds` (histogram, [`ClientTelemetryLayer`]) | `rpc_system`, `rpc_service`, `rpc_method`, `rpc_grpc_status_code` |
//! | `http_client_request_duration_seconds` (histogram, [`ClientTelemetryLayer`]) | `http_request_method`, `server_address`, `http_response_status_code` |
//!
//! Also, read at each scrape: the standard process metrics
//! (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds`,
//! `process_start_time_seconds`) and `trellis_build_info{version}`; and what
//! other crates count through the `metrics` facade:
//! `config_reload_failures_total`, `rate_limit_rejections_total`,
//! `load_shed_total{reason}`, `circuit_breaker_transitions_total{to}`,
//! `registry_events_total{event}`.
//!
//! Label values are bounded by what the server registered: HTTP routes are
//! the matched route templates, and a gRPC method that turns out not to
//! exist (UNIMPLEMENTED) is counted as `rpc_method="unknown"`, so callers
//! cannot grow the registry by inventing names.

#![warn(missing_docs)]

mod bridge;
mod client;
mod init;
mod logs;
pub use logs::rfc3339;
mod pipeline;
mod process;
pub mod propagation;
mod red;
mod series;
mod server;
mod settings;

use std::{sync::OnceLock, time::Duration};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub use client::{ClientTelemetry, ClientTelemetryLayer, may_record_current};
pub use init::{LogControl, LogFormat, Telemetry, TelemetryBuilder, check_log_filter};
pub use red::{InFlight, Red, RedFuture, RedLayer, RedSeries};
pub use server::{AccessLogged, ServerTrace, ServerTraceLayer};
pub use settings::{Effective, EnvError, OtlpSettings, OtlpTls};

/// Why telemetry could not be set up.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TelemetryError {
    /// The Prometheus recorder could not be installed (another recorder owns
    /// the `metrics` facade).
    #[error("cannot install the Prometheus recorder: {0}")]
    Recorder(String),
    /// A `tracing` subscriber is already installed in this process.
    #[error("cannot install the log and trace subscriber: {0}")]
    Subscriber(String),
    /// The log filter does not parse.
    #[error("log level {0:?} is not a valid filter: {1}")]
    LogLevel(String, String),
    /// An `OTEL_*` variable has a value we cannot use.
    #[error(transparent)]
    Env(#[from] EnvError),
    /// The OTLP exporter could not be built for this endpoint.
    #[error("cannot export traces to {0}: {1}")]
    Exporter(String, String),
}

/// The OpenTelemetry default buckets for request durations (seconds).
pub(crate) const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// Installs the process-wide Prometheus recorder (once) and returns its handle.
pub fn prometheus() -> Result<PrometheusHandle, TelemetryError> {
    static HANDLE: OnceLock<Result<PrometheusHandle, TelemetryError>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let prometheus = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("duration_seconds".into()), DURATION_BUCKETS)
                .map_err(|e| TelemetryError::Recorder(e.to_string()))?
                .build_recorder();
            let handle = prometheus.handle();
            metrics::set_global_recorder(bridge::Recorder { prometheus })
                .map_err(|e| TelemetryError::Recorder(e.to_string()))?;
            red::describe();
            // Histograms need periodic upkeep to drain their buffers.
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new().name("trellis-metrics".into()).spawn(move || loop {
                std::thread::sleep(Duration::from_secs(5));
                upkeep.run_upkeep();
            });
            if let Err(err) = spawned {
                tracing::warn!(error = %err, "cannot start metrics upkeep; histograms are drained on scrape only");
            }
            Ok(handle)
        })
        .clone()
}

/// `GET /metrics` in the Prometheus text format.
pub fn metrics_router(handle: PrometheusHandle) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move {
                handle.run_upkeep();
                let mut text = handle.render();
                process::render(&mut text);
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    text,
                )
            }
        }),
    )
}
