//! The default server stack, written top-down in one place, and the
//! settings it is built from (the `server` section of a service's config).
//!
//! A request passes, in order:
//!
//! 1. the server span — first, so everything below, rejections included,
//!    happens inside the caller's trace;
//! 2. RED metrics — before any limit, so limited and shed requests are
//!    counted with their 429 / 503;
//! 3. the rate limit (per key; off until `rate` is set) — cheapest refusal
//!    first;
//! 4. queueing-delay shedding (on: sheds only while a standing queue holds
//!    requests longer than 5 ms);
//! 5. the concurrency limit (off unless configured: a fixed cap or adaptive);
//! 6. CPU shedding (off unless `cpu_threshold` is set);
//!
//! then, inside the server itself, the request timeout (nearest the handler,
//! so every layer above sees a timed-out request answered), gRPC validation
//! and message size, and the handler. Health, reflection and probes are
//! outside the stack.

use std::{sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use tower::{Layer, ServiceBuilder, util::Either};
use trellis_config::Invalid;
use trellis_resilience::{
    ConcurrencyLimit, ConcurrencyLimitLayer, CpuShedLayer, CpuShedder, DelayShedLayer,
    DelayShedder, KeyBy, LimitKind, LocalLimiter, ProcessCpu, Quota, RateLimit, RateLimitLayer,
    Shed,
};
use trellis_telemetry::{Red, RedLayer, ServerTrace, ServerTraceLayer};
use trellis_transport::Limits;

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
    /// Bearer tokens and access rules for the service's own routes
    /// (`server.auth.tokens`, `server.auth.access`; see docs/auth.md).
    /// Restart. Default: none (no token checked).
    pub auth: Option<trellis_auth::AuthSettings>,
    /// TLS on the main and admin listeners; with `client_ca_file`, mutual
    /// TLS. Restart to turn on; certificate files are followed. Default:
    /// none (plaintext).
    pub tls: Option<crate::ServerTlsSettings>,
    /// Idempotent routes (`Idempotency-Key`, fingerprints) and where keys
    /// live (`server.idempotency.routes`, `.store`; see docs/idempotency.md).
    /// Restart. Default: no route.
    pub idempotency: trellis_lock::idempotency::IdempotencySettings,
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
    /// The quota `rate` and `burst` describe; `None` when there is no limit.
    pub fn quota(&self) -> Option<Quota> {
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
            auth: None,
            tls: None,
            idempotency: Default::default(),
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
        self.idempotency
            .validate(&format!("{prefix}.idempotency"))?;
        if let Some(tls) = &self.tls {
            tls.validate(&format!("{prefix}.tls"))?;
        }
        if let Some(auth) = &self.auth {
            auth.tokens
                .build()
                .map_err(|(key, e)| Invalid::new(format!("{prefix}.auth.tokens.{key}"), e))?;
            auth.access
                .build()
                .map_err(|(key, e)| Invalid::new(format!("{prefix}.auth.access.{key}"), e))?;
        }
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
}

/// The default server stack (see the module docs), for one service.
#[derive(Clone)]
pub struct ServerStack {
    trace: ServerTraceLayer,
    red: RedLayer,
    rate_limit: RateLimitLayer,
    queue_delay: Option<DelayShedLayer>,
    concurrency: Option<ConcurrencyLimitLayer>,
    cpu: Option<CpuShedLayer>,
    limiter: Arc<LocalLimiter>,
}

/// The service the default server stack makes of `S`.
pub type ServerStackService<S> = ServerTrace<
    Red<
        RateLimit<
            Either<
                Shed<
                    Either<
                        Shed<Either<Shed<S, CpuShedder>, S>, ConcurrencyLimit>,
                        Either<Shed<S, CpuShedder>, S>,
                    >,
                    DelayShedder,
                >,
                Either<
                    Shed<Either<Shed<S, CpuShedder>, S>, ConcurrencyLimit>,
                    Either<Shed<S, CpuShedder>, S>,
                >,
            >,
        >,
    >,
>;

impl ServerStack {
    /// The stack `settings` describe, for the service `service` (named on
    /// its spans and log lines).
    pub fn new(service: &str, settings: &ServerSettings) -> ServerStack {
        let limiter = Arc::new(LocalLimiter::unlimited(100_000));
        limiter.set_quota(settings.rate_limit.quota());
        // Validation guarantees a key; settings built without it limit per client.
        let key = settings.rate_limit.key_by().unwrap_or(KeyBy::ClientIp);
        let shedding = &settings.shedding;
        ServerStack {
            trace: ServerTraceLayer::new().service(service),
            red: RedLayer::new(),
            rate_limit: RateLimitLayer::new(limiter.clone(), key),
            queue_delay: shedding
                .queue_delay
                .map(|target| DelayShedLayer::new(DelayShedder::new(target))),
            concurrency: shedding
                .limit()
                .map(|kind| ConcurrencyLimitLayer::new(ConcurrencyLimit::new(kind))),
            cpu: (shedding.cpu_threshold > 0).then(|| {
                CpuShedLayer::new(CpuShedder::with_headroom(
                    ProcessCpu::global(),
                    shedding.cpu_threshold,
                    shedding.cpu_headroom,
                ))
            }),
            limiter,
        }
    }

    /// The rate limiter, whose quota can follow the config
    /// (`trellis::settings::follow_rate_limit`).
    pub fn limiter(&self) -> Arc<LocalLimiter> {
        self.limiter.clone()
    }
}

impl<S> Layer<S> for ServerStack {
    type Service = ServerStackService<S>;

    fn layer(&self, handler: S) -> Self::Service {
        ServiceBuilder::new()
            // A span per request, child of the caller's traceparent: first,
            // so everything below happens inside the caller's trace.
            .layer(self.trace.clone())
            // Rate, errors, duration: before any limit, so refused requests
            // are counted with their 429 / 503 too.
            .layer(self.red.clone())
            // The cheapest refusal first: a rate limit per key.
            .layer(self.rate_limit.clone())
            // Shed while a standing queue holds requests too long.
            .option_layer(self.queue_delay.clone())
            // A cap on requests in flight, fixed or adaptive.
            .option_layer(self.concurrency.clone())
            // Shed when the CPU is hot and the service is past its capacity.
            .option_layer(self.cpu.clone())
            .service(handler)
    }
}
