//! The CLI's side of telemetry: the `--log-format` flag, and starting logs
//! and traces before anything else runs.

use trellis::telemetry::{self, Telemetry, TelemetryError};

/// Output format.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// JSON when stderr is not a terminal, pretty otherwise.
    Auto,
    /// One JSON object per line.
    Json,
    /// Human-readable.
    Pretty,
}

/// Installs logs and traces for a process named `name`. OTLP settings come
/// from the `OTEL_*` environment now and from each service's `otlp`
/// section once its config is loaded.
pub fn init(name: &str, instance: &str, format: LogFormat) -> Result<Telemetry, TelemetryError> {
    let format = match format {
        LogFormat::Auto => telemetry::LogFormat::Auto,
        LogFormat::Json => telemetry::LogFormat::Json,
        LogFormat::Pretty => telemetry::LogFormat::Pretty,
    };
    Telemetry::builder(name)
        .version(env!("CARGO_PKG_VERSION"))
        .instance(instance)
        .log_format(format)
        .init()
}
