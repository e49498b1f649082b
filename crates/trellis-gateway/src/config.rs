//! The gateway's configuration: upstreams and routes, as a
//! `trellis-config` document (TOML, YAML or JSON; files, environment,
//! etcd). Routes and upstreams are maps keyed by name, so a layer can
//! change one route, and an error names the route and the field
//! (`routes.users.path: ...`).
//!
//! ```toml
//! [upstreams.user]
//! discover = "user"                    # a service in the registry
//!
//! [upstreams.legacy]
//! targets = [{ url = "http://127.0.0.1:9000", weight = 3 }, { url = "http://127.0.0.1:9001" }]
//!
//! [routes.users]
//! prefix = "/v1/users"
//! upstream = "user"
//!
//! [routes.legacy]
//! hosts = ["legacy.example.com"]
//! prefix = "/"
//! strip_prefix = "/old"
//! split = [{ upstream = "legacy", weight = 90 }, { upstream = "user", weight = 10 }]
//! ```
//!
//! [`GatewayConfig::validate`] compiles the whole document — templates,
//! header names, URLs, splits — so a change that would not compile is
//! rejected by the config store with the route and field named, and the
//! last good routes stay in force.

use std::{collections::BTreeMap, time::Duration};

use http::{HeaderName, HeaderValue, Method};
use serde::{Deserialize, Serialize};
use trellis_config::{Invalid, Validate};

/// The whole gateway document.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Where requests go, by name.
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// Which requests go where, by name.
    pub routes: BTreeMap<String, RouteConfig>,
    /// Settings for every route.
    pub defaults: Defaults,
    /// Serve HTTPS (HTTP/1.1 and HTTP/2 by ALPN) with this certificate.
    /// Whether the gateway speaks TLS is fixed when it starts; the files
    /// are read again on every reload, so certificates can be renewed live.
    pub tls: Option<TlsConfig>,
    /// How bearer tokens are verified on routes with `jwt`.
    pub jwt: Option<JwtConfig>,
    /// The client-facing listener's limits, over those the gateway was
    /// started with. Fixed when it starts, like `tls`.
    pub listener: ListenerConfig,
    /// The audit trail of `jwt` routes: every token refused (401/403) and
    /// every mutating call (POST, PUT, PATCH, DELETE) through a `jwt`
    /// route, appended to a hash-chained file (`trellis audit verify`).
    pub audit: Option<trellis_auth::audit::AuditSettings>,
}

/// `[listener]`: connections from clients.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerConfig {
    /// Open connections at most (past it, new ones wait in the kernel's
    /// backlog). Default: 10 000.
    pub max_connections: Option<usize>,
    /// Open connections per client address; past it a new one is closed at
    /// once, so one client cannot take every slot. Default: no cap (set it
    /// at the edge; not behind a load balancer that is every client).
    pub max_connections_per_client: Option<usize>,
    /// How long a client may take to send a request head (slowloris).
    /// Default: 10 s.
    #[serde(with = "trellis_config::duration::option")]
    pub header_read_timeout: Option<Duration>,
    /// Proxies in front of the gateway (`10.0.0.0/8`, a load balancer's
    /// address): from a connection of theirs, the client is the nearest
    /// address in `X-Forwarded-For` that is not one of them — for address
    /// rules and per-client rate limits. From anyone else the header is not
    /// believed. Applied on reload. Default: none.
    pub trusted_proxies: Vec<String>,
}

/// `[jwt]`: the key set and what a token must say, for every route that
/// has `jwt = { ... }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// The key set's URL (`https://auth.example.com/.well-known/jwks.json`;
    /// `http://` for a local one). One of this and `jwks_file`.
    pub jwks_url: Option<String>,
    /// A key set file, read again on every refetch.
    pub jwks_file: Option<std::path::PathBuf>,
    /// PEM: the authorities trusted for an `https://` key set. Default: the
    /// system's roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM: a client certificate for a key set served over mutual TLS
    /// (with `key_file`).
    pub cert_file: Option<std::path::PathBuf>,
    /// PEM: its private key.
    pub key_file: Option<std::path::PathBuf>,
    /// The accepted `iss` (required).
    pub issuer: String,
    /// Accepted audiences: a token's `aud` must name one (required).
    pub audience: Vec<String>,
    /// The algorithm allowlist. Default: `EdDSA`, `ES256`, `RS256`.
    pub algorithms: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`. Default 30 s.
    #[serde(with = "trellis_config::duration")]
    pub leeway: Duration,
    /// A key set older than this is fetched again. Default 5 min.
    #[serde(with = "trellis_config::duration")]
    pub refresh: Duration,
    /// At most one fetch per this long for tokens naming an unknown `kid`.
    /// Default 10 s.
    #[serde(with = "trellis_config::duration")]
    pub cooldown: Duration,
    /// The `realm` of `WWW-Authenticate` challenges. Default `gateway`.
    pub realm: String,
    /// Claims sent upstream as headers: `sub`, `tenant`, `roles`
    /// (comma-separated), `permissions`, `scope`, `iss`, `jti` → a header
    /// name. A client's own copies of these headers are always removed
    /// first on `jwt` routes.
    pub claims_to_headers: BTreeMap<String, String>,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            jwks_url: None,
            jwks_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            issuer: String::new(),
            audience: Vec::new(),
            algorithms: vec!["EdDSA".into(), "ES256".into(), "RS256".into()],
            leeway: Duration::from_secs(30),
            refresh: Duration::from_secs(300),
            cooldown: Duration::from_secs(10),
            realm: "gateway".into(),
            claims_to_headers: BTreeMap::new(),
        }
    }
}

/// A route's token check.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteJwtConfig {
    /// Roles, permissions or scopes the token must grant, all of them
    /// (403 naming the first missing).
    pub require: Vec<String>,
    /// Let requests without a token through (a token that comes is still
    /// verified, and a bad one refused).
    pub optional: bool,
}

/// The gateway's certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM: the certificate chain, leaf first.
    pub cert_file: std::path::PathBuf,
    /// PEM: its private key.
    pub key_file: std::path::PathBuf,
}

/// Settings every route has unless it says otherwise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Defaults {
    /// The time from sending the request to the upstream's response head
    /// (504 past it). Streams may run longer once the head has arrived.
    #[serde(with = "trellis_config::duration")]
    pub timeout: Duration,
    /// How long an upgraded connection (WebSocket) may carry nothing in
    /// either direction before both sides are closed.
    #[serde(with = "trellis_config::duration")]
    pub idle_timeout: Duration,
    /// Requests declaring a larger body (`Content-Length`) are refused with
    /// 413 before anything is read or sent upstream.
    pub max_body_bytes: u64,
    /// Requests whose path and query are longer are refused with 414.
    pub max_uri_bytes: usize,
    /// The longest the client may keep the gateway waiting for the next
    /// bytes of a request body (slow-body attacks): past it, 408.
    #[serde(with = "trellis_config::duration")]
    pub body_timeout: Duration,
    /// Give every request an `X-Request-Id` (a UUID) unless it has one,
    /// sent upstream and back to the client.
    pub request_id: bool,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(300),
            max_body_bytes: 16 << 20,
            max_uri_bytes: 8 << 10,
            body_timeout: Duration::from_secs(60),
            request_id: true,
        }
    }
}

/// A route's rate limit (GCRA, in this process).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Requests per `period` on average.
    pub rate: u32,
    /// The period `rate` is counted over. Default: 1 s.
    #[serde(default = "one_second", with = "trellis_config::duration")]
    pub period: Duration,
    /// Requests allowed at once after a quiet spell. Default: `rate`.
    #[serde(default)]
    pub burst: Option<u32>,
    /// Whose budget: `route` (one for the route, default), `client_ip`,
    /// `subject` (the verified token's `sub`; the client's address without
    /// one — needs `jwt` on the route), or `header:NAME` (an API key, a
    /// tenant).
    #[serde(default = "by_route")]
    pub by: String,
    /// Share the budget through Redis (`redis://host:port`) across every
    /// gateway instance; GCRA on Redis' clock. Needs the `redis` feature
    /// (on in the `trellis` binary).
    #[serde(default)]
    pub redis: Option<String>,
    /// When Redis does not answer: `local` (this process's own budget,
    /// default), `allow` or `deny`.
    #[serde(default = "local_fallback")]
    pub fallback: String,
}

fn local_fallback() -> String {
    "local".into()
}

fn one_second() -> Duration {
    Duration::from_secs(1)
}

fn by_route() -> String {
    "route".into()
}

/// An upstream: a discovered service or static targets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// A service name followed in the registry (`--registry`).
    pub discover: Option<String>,
    /// Which of a discovered instance's endpoints to call: `http`
    /// (default) or `grpc`.
    pub endpoint: Option<String>,
    /// Static targets: `http://host:port`, with weights.
    pub targets: Vec<Target>,
    /// Speak HTTP/2 without TLS (prior knowledge) to the upstream, as gRPC
    /// servers expect. Default: HTTP/1.1 (and gRPC requests are sent over
    /// HTTP/2 whatever this says).
    pub h2c: bool,
    /// How long connecting (and a TLS handshake) may take. Default: 5 s.
    #[serde(with = "trellis_config::duration::option")]
    pub connect_timeout: Option<Duration>,
    /// TLS to the upstream: whom to trust. `https://` targets without it
    /// trust the system's roots.
    pub tls: Option<UpstreamTlsConfig>,
    /// Probe every endpoint and balance over those that answer.
    pub health_check: Option<HealthCheckConfig>,
    /// How endpoints are picked: `p2c_ewma` (default for discovered
    /// services), `weighted_round_robin` (default for targets),
    /// `round_robin`, `least_request`, `random`, or a header name to hash
    /// on (consistent hashing).
    pub balance: Option<String>,
}

/// How the gateway trusts an upstream's certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// PEM: the certificate authorities to trust (your internal CA).
    /// Default: the system's roots (a public upstream).
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    /// The name to verify, when the endpoints are reached by address.
    /// Default: the target's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// PEM: the gateway's certificate for upstreams that ask for one
    /// (mutual TLS), with `key_file`.
    #[serde(default)]
    pub cert_file: Option<std::path::PathBuf>,
    /// PEM: its private key.
    #[serde(default)]
    pub key_file: Option<std::path::PathBuf>,
}

/// An upstream's active health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// `GET` this path; a 2xx is healthy. Default `/readyz`.
    pub path: String,
    /// How often. Default 5 s.
    #[serde(with = "trellis_config::duration")]
    pub interval: Duration,
    /// How long a probe may take. Default 1 s.
    #[serde(with = "trellis_config::duration")]
    pub timeout: Duration,
    /// Failed probes in a row that take an endpoint out. Default 2.
    pub unhealthy_after: u32,
    /// Good probes in a row that bring it back. Default 2.
    pub healthy_after: u32,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            path: "/readyz".into(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            unhealthy_after: 2,
            healthy_after: 2,
        }
    }
}

/// A static upstream target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// `http://host:port`.
    pub url: String,
    /// Relative weight, 1..=10000. Default: 1.
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// A route: what it matches, where it goes, and what changes on the way.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteConfig {
    /// Host names (`api.example.com`, or `*.example.com` for any
    /// subdomain); empty: any host.
    pub hosts: Vec<String>,
    /// The path, exactly.
    pub path: Option<String>,
    /// A path prefix, on segment boundaries: `/v1/users` matches
    /// `/v1/users` and `/v1/users/7`, not `/v1/usersx`.
    pub prefix: Option<String>,
    /// A path template with variables (`/v1/users/{id}`, `/v1/{name=shelves/*}`).
    pub template: Option<String>,
    /// Methods; empty: any.
    pub methods: Vec<String>,
    /// Request headers that must be present with these values.
    pub headers: BTreeMap<String, String>,
    /// Query parameters that must be present with these values.
    pub query: BTreeMap<String, String>,
    /// Cookies that must be present with these values (a canary a user
    /// opts into).
    pub cookies: BTreeMap<String, String>,
    /// Higher wins among routes that match; equal priorities go to the
    /// more specific path, then the name. Default: 0.
    pub priority: i32,
    /// The upstream (or use `split`).
    pub upstream: Option<String>,
    /// A weighted split between upstreams (canaries).
    pub split: Vec<SplitConfig>,
    /// Taken off the front of the path before it is sent upstream.
    pub strip_prefix: Option<String>,
    /// Put in front of the (stripped) path.
    pub add_prefix: Option<String>,
    /// Send the client's `Host` rather than the upstream's.
    pub preserve_host: bool,
    /// Changes to the request's headers.
    pub request_headers: HeaderRules,
    /// Changes to the response's headers.
    pub response_headers: HeaderRules,
    /// Overrides `defaults.timeout` (sent → response head: 504 past it).
    #[serde(with = "trellis_config::duration::option")]
    pub timeout: Option<Duration>,
    /// The whole exchange, the response body included: past it the
    /// response is cut (a head not yet come is a 504). Default: none.
    #[serde(with = "trellis_config::duration::option")]
    pub total_timeout: Option<Duration>,
    /// Overrides `defaults.idle_timeout`.
    #[serde(with = "trellis_config::duration::option")]
    pub idle_timeout: Option<Duration>,
    /// Limits requests: over it, 429 with `Retry-After` (gRPC:
    /// RESOURCE_EXHAUSTED with a retry hint).
    pub rate_limit: Option<RateLimitConfig>,
    /// Cross-origin requests from browsers: preflights answered here, the
    /// `Access-Control-*` headers added to answers for allowed origins.
    pub cors: Option<CorsConfig>,
    /// Client addresses (`10.0.0.0/8`, `2001:db8::/32`, `127.0.0.1`)
    /// allowed; empty allows any. Others get 403.
    pub allow_ips: Vec<String>,
    /// Client addresses refused with 403 (checked before `allow_ips`).
    pub deny_ips: Vec<String>,
    /// JSON → gRPC: REST calls (the `google.api.http` routes of these
    /// services, and `POST /package.Service/Method` with a JSON body) are
    /// transcoded and sent to a gRPC upstream; gRPC calls pass as they are.
    pub transcode: Option<TranscodeConfig>,
    /// Plugins of your own (registered with `Gateway::with_plugins`), by
    /// name, run in this order.
    pub plugins: Vec<String>,
    /// Verify bearer tokens (against `[jwt]`): 401 with
    /// `WWW-Authenticate` without a valid one, 403 without the permissions
    /// `require` names.
    pub jwt: Option<RouteJwtConfig>,
    /// Fail fast while the upstream fails: open after too many failures
    /// (5xx, no connection, timeouts), probe after `open_duration`.
    pub circuit_breaker: Option<CircuitBreakerConfig>,
    /// Sending a request again. Default: one more attempt for a request
    /// without a body whose method may be repeated (GET, HEAD, OPTIONS,
    /// PUT, DELETE), when the upstream could not take it.
    pub retries: RetryConfig,
}

/// A route's CORS policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CorsConfig {
    /// Origins allowed (`https://app.example.com`), or `["*"]` for any.
    pub allow_origins: Vec<String>,
    /// Methods a preflight allows. Default: GET, HEAD, POST, PUT, PATCH,
    /// DELETE.
    pub allow_methods: Vec<String>,
    /// Request headers a preflight allows; empty: those the browser asks
    /// for.
    pub allow_headers: Vec<String>,
    /// Response headers the browser's script may read. Default: the gRPC
    /// status headers (`grpc-status`, `grpc-message`), for gRPC-Web.
    pub expose_headers: Vec<String>,
    /// Allow cookies and credentials (then the origin is echoed, never `*`).
    pub allow_credentials: bool,
    /// How long a browser may cache a preflight.
    #[serde(with = "trellis_config::duration")]
    pub max_age: Duration,
}

impl Default for CorsConfig {
    fn default() -> Self {
        CorsConfig {
            allow_origins: Vec::new(),
            allow_methods: ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
                .map(str::to_owned)
                .to_vec(),
            allow_headers: Vec::new(),
            expose_headers: vec!["grpc-status".into(), "grpc-message".into()],
            allow_credentials: false,
            max_age: Duration::from_secs(600),
        }
    }
}

/// A route's circuit breaker (the classic one of trellis-resilience).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    /// Open when failures reach this share of the window's calls. Default 0.5.
    pub failure_ratio: f64,
    /// No ratio opens the breaker before this many calls. Default 20.
    pub min_calls: u32,
    /// Open after this many failures in a row (0: never). Default 10.
    pub consecutive_failures: u32,
    /// The window the ratio is over. Default 10 s.
    #[serde(with = "trellis_config::duration")]
    pub window: Duration,
    /// How long it stays open before probing. Default 5 s.
    #[serde(with = "trellis_config::duration")]
    pub open_duration: Duration,
    /// Probes let through when half-open; all must succeed. Default 3.
    pub half_open_probes: u32,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        CircuitBreakerConfig {
            failure_ratio: 0.5,
            min_calls: 20,
            consecutive_failures: 10,
            window: Duration::from_secs(10),
            open_duration: Duration::from_secs(5),
            half_open_probes: 3,
        }
    }
}

/// Which protos a transcoding route reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TranscodeConfig {
    /// A file descriptor set (`protoc --include_imports -o`, or protox).
    /// One of this and `reflection`.
    #[serde(default)]
    pub descriptor_set: Option<std::path::PathBuf>,
    /// Ask the upstream's gRPC server reflection for the descriptors when
    /// the document is applied (the route's one upstream must answer then).
    #[serde(default)]
    pub reflection: bool,
    /// The gRPC services (full names) whose methods are served.
    pub services: Vec<String>,
}

/// When a request is sent again (to an endpoint the balancer picks anew).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in all, the first included: 1 turns retries off. Default 2.
    pub attempts: u32,
    /// Upstream statuses that are retried too (e.g. `[502, 503]`); a
    /// connection that failed or closed before answering always is.
    pub on_status: Vec<u16>,
    /// Retries may add at most this share to the route's requests (a
    /// failing upstream is not hit with every request twice). Default 0.2.
    pub budget: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: 2,
            on_status: Vec::new(),
            budget: 0.2,
        }
    }
}

/// One side of a weighted split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitConfig {
    /// The upstream.
    pub upstream: String,
    /// Relative weight, 0..=10000 (0 sends nothing).
    pub weight: u32,
}

/// Header changes, applied in the order: remove, rename, set, add.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeaderRules {
    /// Headers taken out.
    pub remove: Vec<String>,
    /// Headers moved to another name (`{ "x-old" = "x-new" }`), every
    /// value in order; what the new name held goes.
    pub rename: BTreeMap<String, String>,
    /// Headers set, replacing any value.
    pub set: BTreeMap<String, String>,
    /// Headers added next to any value already there.
    pub add: BTreeMap<String, String>,
}

/// The largest number of routes (and of upstreams) a document may hold.
pub const MAX_ROUTES: usize = 100_000;

impl Validate for GatewayConfig {
    fn validate(&self) -> Result<(), Invalid> {
        if self.routes.len() > MAX_ROUTES || self.upstreams.len() > MAX_ROUTES {
            return Err(Invalid::new(
                "routes",
                format!("at most {MAX_ROUTES} routes and {MAX_ROUTES} upstreams"),
            ));
        }
        for (name, upstream) in &self.upstreams {
            upstream.check(name)?;
        }
        if let Some(tls) = &self.tls {
            trellis_transport::tls::load(&tls.cert_file, &tls.key_file)
                .map_err(|e| Invalid::new("tls", e.to_string()))?;
        }
        // Compiling is the check: whatever would fail to build fails here,
        // naming the route and field.
        crate::table::Table::compile(self).map(drop)
    }
}

impl GatewayConfig {
    /// The name of the route that would serve a request, or `None` (a 404):
    /// for checking a document before it goes live, and for tests. Fails
    /// as [`Validate::validate`] does when the document does not compile.
    pub fn route_for(
        &self,
        method: &Method,
        host: Option<&str>,
        path_and_query: &str,
        headers: &http::HeaderMap,
    ) -> Result<Option<String>, Invalid> {
        let table = crate::table::Table::compile(self)?;
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        Ok(table
            .find(host, method, path, headers, query)
            .map(|m| m.route.name.to_string()))
    }
}

impl UpstreamConfig {
    fn check(&self, name: &str) -> Result<(), Invalid> {
        let key = |field: &str| format!("upstreams.{name}.{field}");
        match (&self.discover, self.targets.is_empty()) {
            (Some(_), false) => {
                return Err(Invalid::new(
                    key("targets"),
                    "an upstream is either discovered or has targets, not both",
                ));
            }
            (None, true) => {
                return Err(Invalid::new(
                    key("targets"),
                    "name a service to `discover` or give `targets`",
                ));
            }
            _ => {}
        }
        if let Some(endpoint) = &self.endpoint
            && endpoint != "http"
            && endpoint != "grpc"
        {
            return Err(Invalid::new(key("endpoint"), "must be http or grpc"));
        }
        let https = self.targets.iter().any(|t| t.url.starts_with("https://"));
        if https && self.targets.iter().any(|t| t.url.starts_with("http://")) {
            return Err(Invalid::new(key("targets"), "all http:// or all https://"));
        }
        if let Some(tls) = &self.tls {
            crate::upstream::tls_connector(tls, self.h2c)
                .map_err(|e| Invalid::new(key("tls.ca_file"), e))?;
        }
        for (i, target) in self.targets.iter().enumerate() {
            parse_target(&target.url)
                .map_err(|e| Invalid::new(key(&format!("targets.{i}.url")), e))?;
            if !(1..=10_000).contains(&target.weight) {
                return Err(Invalid::new(
                    key(&format!("targets.{i}.weight")),
                    "must be 1..=10000",
                ));
            }
        }
        if let Some(balance) = &self.balance {
            crate::upstream::policy(balance).map_err(|e| Invalid::new(key("balance"), e))?;
        }
        if let Some(h) = &self.health_check {
            if !h.path.starts_with('/') || h.path.parse::<http::uri::PathAndQuery>().is_err() {
                return Err(Invalid::new(
                    key("health_check.path"),
                    "must be a path starting with /",
                ));
            }
            if h.interval.is_zero() || h.timeout.is_zero() {
                return Err(Invalid::new(
                    key("health_check"),
                    "interval and timeout must be more than 0",
                ));
            }
        }
        Ok(())
    }
}

/// `http://host:port` → (scheme, authority); paths, queries and other
/// schemes are refused.
pub(crate) fn parse_target(url: &str) -> Result<http::uri::Authority, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(format!("{url}: targets are http:// or https://"));
    }
    if uri
        .path_and_query()
        .is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty())
    {
        return Err(format!(
            "{url}: a target is scheme://host:port, without a path"
        ));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("{url}: no host"))?;
    if authority.port_u16().is_none() {
        return Err(format!("{url}: give the port"));
    }
    Ok(authority)
}

/// A header name from config, or why not.
pub(crate) fn header_name(text: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(text.as_bytes()).map_err(|_| format!("{text:?} is not a header name"))
}

/// A header value from config, or why not.
pub(crate) fn header_value(text: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(text).map_err(|_| format!("{text:?} is not a valid header value"))
}

/// A method from config, or why not.
pub(crate) fn method(text: &str) -> Result<Method, String> {
    Method::from_bytes(text.to_ascii_uppercase().as_bytes())
        .map_err(|_| format!("{text:?} is not an HTTP method"))
}
