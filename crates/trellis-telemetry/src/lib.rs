//! Telemetry for Trellis services. Today: Prometheus metrics.
//!
//! [`prometheus`] installs one process-wide recorder (the `metrics` crate's
//! facade, rendered by `metrics-exporter-prometheus`) and returns a handle;
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
//!
//! Also, read at each scrape: the standard process metrics
//! (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds`,
//! `process_start_time_seconds`) and `trellis_build_info{version}`; and what
//! other crates count through the `metrics` facade:
//! `config_reload_failures_total`, `rate_limit_rejections_total`,
//! `load_shed_total{reason}`.
//!
//! Label values are bounded by what the server registered: HTTP routes are
//! the matched route templates, and a gRPC method that turns out not to
//! exist (UNIMPLEMENTED) is counted as `rpc_method="unknown"`, so callers
//! cannot grow the registry by inventing names.
//!
//! ```no_run
//! # fn run() -> Result<(), trellis_telemetry::TelemetryError> {
//! let handle = trellis_telemetry::prometheus()?;
//! let admin = trellis_telemetry::metrics_router(handle);
//! // server_builder.debug_router(admin).layer(trellis_telemetry::RedLayer::new())
//! # let _ = admin; Ok(()) }
//! ```

#![warn(missing_docs)]

mod process;
mod red;

use std::{sync::OnceLock, time::Duration};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub use red::{Red, RedLayer};

/// Why telemetry could not be set up.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TelemetryError {
    /// The Prometheus recorder could not be installed (another recorder owns
    /// the `metrics` facade).
    #[error("cannot install the Prometheus recorder: {0}")]
    Recorder(String),
}

/// The OpenTelemetry default buckets for request durations (seconds).
const DURATION_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0];

/// Installs the process-wide Prometheus recorder (once) and returns its handle.
pub fn prometheus() -> Result<PrometheusHandle, TelemetryError> {
    static HANDLE: OnceLock<Result<PrometheusHandle, TelemetryError>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("duration_seconds".into()), DURATION_BUCKETS)
                .map_err(|e| TelemetryError::Recorder(e.to_string()))?
                .install_recorder()
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
                ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text)
            }
        }),
    )
}
