//! Settings every service shares, in the shape the config centre loads.
//!
//! Which settings apply live and which need a restart:
//!
//! | key | applies |
//! |---|---|
//! | `server.request_timeout` | live: requests that start after the change |
//! | `log.level` | live (when the binary wires it, as `trellis` does) |
//! | `otlp.endpoint`, `otlp.sample_ratio`, `otlp.traces`, `otlp.metrics`, `otlp.logs`, `otlp.metrics_interval` | live (likewise); `OTEL_*` variables win |
//! | `otlp.environment` | on restart |
//! | `server.max_body_bytes`, `server.max_header_bytes`, `server.max_concurrent_streams`, `server.max_connections` | on restart |
//! | `server.shutdown_timeout`, `server.pre_stop_delay` | on restart |
//! | `server.rate_limit.rate`, `server.rate_limit.burst` | live |
//! | `server.rate_limit.key`, `server.shedding.*`, `server.reflection` | on restart |
//!
//! The server stack these settings build is [`trellis_stack::ServerStack`]
//! (written top-down there, one comment per layer); the client stack is
//! [`trellis_stack::ClientStack`], from [`ClientSettings`]. The concurrency
//! and CPU shedders are off by default because they cost a saturated but
//! healthy service a third of its requests (docs/resilience.md).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use trellis_config::Config;
use trellis_resilience::LocalLimiter;
use trellis_transport::RequestTimeout;

pub use trellis_stack::{
    BalancerSettings, BreakerSettings, ClientSettings, RateLimitSettings, RetrySettings,
    ServerSettings, SheddingSettings,
};
pub use trellis_telemetry::OtlpSettings;

/// Keeps a running rate limiter's quota in step with the config.
pub fn follow_rate_limit<T: Send + Sync + 'static>(
    config: &Config<T>,
    select: fn(&T) -> &ServerSettings,
    limiter: Arc<LocalLimiter>,
) {
    let mut section = config.section(move |c| select(c).rate_limit.quota());
    tokio::spawn(async move {
        loop {
            limiter.set_quota(*section.borrow_and_update());
            if section.changed().await.is_err() {
                return;
            }
        }
    });
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LogSettings {
    /// A `RUST_LOG`-style filter, e.g. `info` or `info,shop_user=debug`;
    /// every directive names a level ([`trellis_telemetry::check_log_filter`],
    /// checked as the value is read, so `trellis config set` and the running
    /// service refuse the same values). Live. Default: `info`.
    #[serde(deserialize_with = "log_filter")]
    pub level: String,
}

fn log_filter<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let filter = String::deserialize(d)?;
    trellis_telemetry::check_log_filter(&filter).map_err(serde::de::Error::custom)?;
    Ok(filter)
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            level: "info".into(),
        }
    }
}

/// Keeps a running server's request timeout in step with the config.
pub fn follow_request_timeout<T: Send + Sync + 'static>(
    config: &Config<T>,
    select: fn(&T) -> &ServerSettings,
    timeout: RequestTimeout,
) {
    let mut section = config.section(move |c| select(c).request_timeout);
    tokio::spawn(async move {
        loop {
            timeout.set(*section.borrow_and_update());
            if section.changed().await.is_err() {
                return;
            }
        }
    });
}

/// `GET /debug/config`: the config in force (secrets redacted), its version,
/// when it was applied, its sources and the reload failures.
pub fn debug_router<T: Serialize + Send + Sync + 'static>(config: Config<T>) -> axum::Router {
    axum::Router::new().route(
        "/debug/config",
        axum::routing::get(move || {
            let view = config.debug_view();
            async move { axum::Json(view) }
        }),
    )
}
