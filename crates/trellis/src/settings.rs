//! Settings every service shares, in the shape the config centre loads.
//!
//! Which settings apply live and which need a restart:
//!
//! | key | applies |
//! |---|---|
//! | `server.request_timeout` | live: requests that start after the change |
//! | `log.level` | live (when the binary wires it, as `trellis` does) |
//! | `server.max_body_bytes`, `server.max_header_bytes`, `server.max_concurrent_streams` | on restart |
//! | `server.shutdown_timeout`, `server.pre_stop_delay` | on restart |

use std::time::Duration;

use serde::{Deserialize, Serialize};
use trellis_config::{Config, Invalid};
use trellis_transport::{Limits, RequestTimeout};

/// The server part of a service's config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServerSettings {
    /// How long a request may take to produce its response head; for gRPC
    /// the smaller of this and the caller's deadline. Live. Default: 30s.
    #[serde(with = "trellis_config::duration::option")]
    pub request_timeout: Option<Duration>,
    /// The largest HTTP body read by extractors (bytes). Restart. Default: 4 MiB.
    pub max_body_bytes: usize,
    /// The largest request head (bytes). Restart. Default: 64 KiB.
    pub max_header_bytes: usize,
    /// HTTP/2 streams per connection. Restart. Default: 256.
    pub max_concurrent_streams: u32,
    /// How long in-flight requests may take on shutdown. Restart. Default: 10s.
    #[serde(with = "trellis_config::duration")]
    pub shutdown_timeout: Duration,
    /// Serving time after deregistration, before listeners close. Restart.
    /// Default: unset (1s with a registry, else 0).
    #[serde(with = "trellis_config::duration::option")]
    pub pre_stop_delay: Option<Duration>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        let limits = Limits::default();
        ServerSettings {
            request_timeout: limits.request_timeout,
            max_body_bytes: limits.max_body_bytes,
            max_header_bytes: limits.max_header_bytes,
            max_concurrent_streams: limits.max_concurrent_streams,
            shutdown_timeout: Duration::from_secs(10),
            pre_stop_delay: None,
        }
    }
}

impl ServerSettings {
    /// The transport limits these settings describe.
    pub fn limits(&self) -> Limits {
        Limits {
            max_body_bytes: self.max_body_bytes,
            max_header_bytes: self.max_header_bytes,
            max_concurrent_streams: self.max_concurrent_streams,
            request_timeout: self.request_timeout,
            ..Limits::default()
        }
    }

    /// Checks ranges; `prefix` is where these settings sit (e.g. `server`).
    pub fn validate(&self, prefix: &str) -> Result<(), Invalid> {
        if self.request_timeout.is_some_and(|t| t < Duration::from_millis(1)) {
            return Err(Invalid::new(format!("{prefix}.request_timeout"), "must be at least 1ms (or null to disable)"));
        }
        if self.max_body_bytes == 0 {
            return Err(Invalid::new(format!("{prefix}.max_body_bytes"), "must be positive"));
        }
        if self.max_header_bytes < 1024 {
            return Err(Invalid::new(format!("{prefix}.max_header_bytes"), "must be at least 1024"));
        }
        if self.max_concurrent_streams == 0 {
            return Err(Invalid::new(format!("{prefix}.max_concurrent_streams"), "must be positive"));
        }
        Ok(())
    }
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LogSettings {
    /// A `RUST_LOG`-style filter, e.g. `info` or `info,shop_user=debug`. Live.
    /// Default: `info`.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings { level: "info".into() }
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
