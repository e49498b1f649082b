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
//! The server stack, outermost first: a server span (child of the caller's
//! `traceparent`) → RED metrics → rate limit (per key, off until `rate`
//! is set) → queueing-delay shedding (on: sheds only while a standing queue
//! holds requests longer than 5 ms) → concurrency limit (off unless
//! configured: a fixed cap or adaptive) → CPU shedding (off unless
//! `cpu_threshold` is set) → the request timeout → the handler. The
//! concurrency and CPU shedders are off by default because they cost a
//! saturated but healthy service a third of its requests (docs/resilience.md). Health, reflection
//! and probes are outside it.

use std::{sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use trellis_config::{Config, Invalid};
use trellis_resilience::{
    ConcurrencyLimit, ConcurrencyLimitLayer, CpuShedLayer, CpuShedder, DelayShedLayer,
    DelayShedder, KeyBy, LimitKind, LocalLimiter, ProcessCpu, Quota, RateLimitLayer,
};
use trellis_transport::{GrpcHttpServerBuilder, Limits, RequestTimeout};

pub use trellis_telemetry::OtlpSettings;

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
    /// Open connections per listener; past it the listener stops accepting
    /// until one closes. Restart. Default: 10 000.
    pub max_connections: usize,
    /// How long in-flight requests may take on shutdown. Restart. Default: 10s.
    #[serde(with = "trellis_config::duration")]
    pub shutdown_timeout: Duration,
    /// Serving time after deregistration, before listeners close. Restart.
    /// Default: unset (1s with a registry, else 0).
    #[serde(with = "trellis_config::duration::option")]
    pub pre_stop_delay: Option<Duration>,
    /// Per-key request rate limits.
    pub rate_limit: RateLimitSettings,
    /// Load shedding.
    pub shedding: SheddingSettings,
    /// Whether gRPC reflection (v1 and v1alpha) is served. Restart.
    /// Default: true (it is for clients: grpcurl, Postman, gateways).
    pub reflection: bool,
}

/// A local rate limit (GCRA) in front of the service's own routes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RateLimitSettings {
    /// Requests per second per key; 0 means no limit. Live. Default: 0.
    pub rate: u32,
    /// Requests allowed at once after idleness; 0 means `rate`. Live.
    pub burst: u32,
    /// What a key is: `global`, `route`, `client_ip` or `header:NAME`.
    /// Restart. Default: `client_ip`.
    pub key: String,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        RateLimitSettings {
            rate: 0,
            burst: 0,
            key: "client_ip".into(),
        }
    }
}

impl RateLimitSettings {
    fn quota(&self) -> Option<Quota> {
        (self.rate > 0).then(|| {
            Quota::per_second(self.rate).with_burst(if self.burst == 0 {
                self.rate
            } else {
                self.burst
            })
        })
    }

    fn key_by(&self) -> Option<KeyBy> {
        match self.key.as_str() {
            "global" => Some(KeyBy::Global),
            "route" => Some(KeyBy::Route),
            "client_ip" => Some(KeyBy::ClientIp),
            other => other
                .strip_prefix("header:")
                .filter(|h| !h.is_empty())
                .map(|h| KeyBy::Header(h.to_ascii_lowercase())),
        }
    }
}

/// When to shed load instead of queueing it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SheddingSettings {
    /// Shed while requests wait in a standing queue longer than this (the
    /// minimum latency over 100 ms minus the no-load latency); `null`
    /// disables. Leaves a merely busy service alone. Restart. Default: 5ms.
    #[serde(with = "trellis_config::duration::option")]
    pub queue_delay: Option<Duration>,
    /// `adaptive` (Vegas, between 10 and `max_concurrency`), `off`, or a
    /// number for a fixed cap. Restart. Default: `off`: a latency-based
    /// limit trades throughput for latency (measured: 0.77× goodput on a
    /// saturated service), a choice to make with a latency objective in mind.
    pub concurrency: String,
    /// The adaptive limit's ceiling. Restart. Default: 1000.
    pub max_concurrency: usize,
    /// Shed when the process uses more than this per mille of the CPUs it
    /// may use and is over its proven capacity; 0 disables. Restart.
    /// Default: 0 (off; Kratos uses 800): on a saturated but healthy service
    /// it shed a third of requests (docs/resilience.md).
    pub cpu_threshold: u32,
    /// How far over its proven capacity (max throughput × min latency) a
    /// hot service may go before shedding. Restart. Default: 2.
    pub cpu_headroom: f64,
}

impl Default for SheddingSettings {
    fn default() -> Self {
        SheddingSettings {
            queue_delay: Some(Duration::from_millis(5)),
            concurrency: "off".into(),
            max_concurrency: 1000,
            cpu_threshold: 0,
            cpu_headroom: 2.0,
        }
    }
}

impl SheddingSettings {
    fn limit(&self) -> Option<LimitKind> {
        match self.concurrency.as_str() {
            "off" => None,
            "adaptive" => Some(LimitKind::Adaptive {
                initial: 100,
                min: 10,
                max: self.max_concurrency.max(10),
            }),
            n => n.parse::<usize>().ok().map(LimitKind::Fixed),
        }
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        let limits = Limits::default();
        ServerSettings {
            request_timeout: limits.request_timeout,
            max_body_bytes: limits.max_body_bytes,
            max_header_bytes: limits.max_header_bytes,
            max_concurrent_streams: limits.max_concurrent_streams,
            max_connections: limits.max_connections,
            shutdown_timeout: Duration::from_secs(10),
            pre_stop_delay: None,
            rate_limit: RateLimitSettings::default(),
            shedding: SheddingSettings::default(),
            reflection: true,
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
            max_connections: self.max_connections,
            request_timeout: self.request_timeout,
            ..Limits::default()
        }
    }

    /// Checks ranges; `prefix` is where these settings sit (e.g. `server`).
    pub fn validate(&self, prefix: &str) -> Result<(), Invalid> {
        if self
            .request_timeout
            .is_some_and(|t| t < Duration::from_millis(1))
        {
            return Err(Invalid::new(
                format!("{prefix}.request_timeout"),
                "must be at least 1ms (or null to disable)",
            ));
        }
        if self.max_body_bytes == 0 {
            return Err(Invalid::new(
                format!("{prefix}.max_body_bytes"),
                "must be positive",
            ));
        }
        if self.max_header_bytes < 1024 {
            return Err(Invalid::new(
                format!("{prefix}.max_header_bytes"),
                "must be at least 1024",
            ));
        }
        if self.max_concurrent_streams == 0 {
            return Err(Invalid::new(
                format!("{prefix}.max_concurrent_streams"),
                "must be positive",
            ));
        }
        if self.max_connections == 0 {
            return Err(Invalid::new(
                format!("{prefix}.max_connections"),
                "must be positive",
            ));
        }
        if self.rate_limit.key_by().is_none() {
            return Err(Invalid::new(
                format!("{prefix}.rate_limit.key"),
                "must be global, route, client_ip or header:NAME",
            ));
        }
        if self.shedding.concurrency != "off"
            && self
                .shedding
                .limit()
                .is_none_or(|l| matches!(l, LimitKind::Fixed(0)))
        {
            return Err(Invalid::new(
                format!("{prefix}.shedding.concurrency"),
                "must be adaptive, off or a positive number",
            ));
        }
        if !(1.0..=100.0).contains(&self.shedding.cpu_headroom) {
            return Err(Invalid::new(
                format!("{prefix}.shedding.cpu_headroom"),
                "must be between 1 and 100",
            ));
        }
        if self.shedding.cpu_threshold > 1000 {
            return Err(Invalid::new(
                format!("{prefix}.shedding.cpu_threshold"),
                "is per mille: 0 to 1000",
            ));
        }
        Ok(())
    }

    /// Adds the default server stack these settings describe to `builder`
    /// (after the service's routes): rate limit, adaptive concurrency, CPU
    /// shedding. Returns the rate limiter, whose quota can follow the config
    /// ([`follow_rate_limit`]).
    pub fn apply_stack(
        &self,
        service: &str,
        mut builder: GrpcHttpServerBuilder,
    ) -> (GrpcHttpServerBuilder, Arc<LocalLimiter>) {
        let limiter = Arc::new(LocalLimiter::unlimited(100_000));
        limiter.set_quota(self.rate_limit.quota());
        // Validation guarantees a key; a config built without it limits per client.
        let key = self.rate_limit.key_by().unwrap_or(KeyBy::ClientIp);
        // `layer` wraps from the inside out: the last added runs first.
        if self.shedding.cpu_threshold > 0 {
            let shedder = CpuShedder::with_headroom(
                ProcessCpu::global(),
                self.shedding.cpu_threshold,
                self.shedding.cpu_headroom,
            );
            builder = builder.layer(CpuShedLayer::new(shedder));
        }
        if let Some(kind) = self.shedding.limit() {
            builder = builder.layer(ConcurrencyLimitLayer::new(ConcurrencyLimit::new(kind)));
        }
        if let Some(target) = self.shedding.queue_delay {
            builder = builder.layer(DelayShedLayer::new(DelayShedder::new(target)));
        }
        builder = builder.layer(RateLimitLayer::new(limiter.clone(), key));
        // Outermost: limited and shed requests are measured and traced too.
        builder = builder.layer(trellis_telemetry::RedLayer::new());
        builder = builder.layer(trellis_telemetry::ServerTraceLayer::new().service(service));
        (builder, limiter)
    }
}

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
