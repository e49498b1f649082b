//! Trellis is a Rust microservice platform. This facade crate gives a service
//! its [`App`]: the lifecycle (Starting → Ready → Draining → Stopped),
//! start/stop hooks, signal handling and graceful shutdown; and it re-exports
//! the platform's crates so a service depends on `trellis` alone.
//!
//! ```no_run
//! use trellis::{App, transport::{GrpcHttpServer, ServerConfig}};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let router = axum::Router::new().route("/hello", axum::routing::get(|| async { "hi" }));
//!     let server = GrpcHttpServer::builder(ServerConfig::default())
//!         .http_router(router)
//!         .bind()
//!         .await?;
//!     App::builder("hello")
//!         .version(env!("CARGO_PKG_VERSION"))
//!         .server(server)
//!         .build()
//!         .run() // until SIGINT/SIGTERM, then drains and returns
//!         .await?;
//!     Ok(())
//! }
//! ```
//!
//! | crate | re-exported as | what it owns |
//! |---|---|---|
//! | `trellis-core` | [`Error`], [`Code`], [`State`], [`Lifecycle`], [`core`] | error model, lifecycle, the `Server` contract |
//! | `trellis-transport` | [`transport`] | gRPC + HTTP on one port, health, probes, clients |
//! | `trellis-transcode` | [`transcode`] | REST/JSON from `google.api.http`, the route table, validation, OpenAPI |
//! | `trellis-stack` | [`stack`], [`resilient_client_with`] | the default server and client stacks, from typed settings |
//! | `trellis-registry` | [`registry`] | registration and discovery (memory, etcd with feature `etcd`) |
//! | `trellis-balance` | [`balance`], [`client`] | client-side load balancing over discovered endpoints |
//! | `trellis-config` | [`config`], [`settings`] | typed layered config with hot reload (files, env, etcd) |
//! | `trellis-resilience` | [`resilience`], [`resilient_client`] | deadlines, retries, breakers, rate limits, load shedding |
//! | `trellis-telemetry` | [`telemetry`], [`http_client`] | JSON logs, OpenTelemetry traces, W3C propagation, Prometheus metrics |

#![warn(missing_docs)]

mod app;
pub mod service;
pub mod settings;
mod signal;

pub use app::{App, AppBuilder, AppError, AppInfo};
pub use signal::{ShutdownSignal, shutdown_signal};
pub use trellis_auth as auth;
pub use trellis_balance as balance;
pub use trellis_config as config;
pub use trellis_core::{self as core, Code, Error, Lifecycle, State};
pub use trellis_gateway as gateway;
pub use trellis_registry as registry;
pub use trellis_resilience as resilience;
pub use trellis_stack as stack;
pub use trellis_telemetry as telemetry;
pub use trellis_transcode as transcode;

/// A balanced channel to `service`, discovered through `discovery`, with the
/// default policy (p2c-EWMA), outlier detection and timeouts; hand it to a
/// generated tonic client:
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let registry = trellis::registry::connect("memory://").await?;
/// let channel = trellis::client(registry.as_ref(), "user").await?;
/// // let mut users = UserServiceClient::new(channel);
/// # let _ = channel; Ok(()) }
/// ```
///
/// Every call is traced and measured ([`telemetry::ClientTelemetryLayer`]):
/// a client span under the current one, W3C `traceparent`/`baggage` sent
/// along, `rpc_client_duration_seconds` recorded.
pub async fn client(
    discovery: &dyn registry::Discovery,
    service: &str,
) -> Result<TracedChannel, registry::RegistryError> {
    use tower::Layer;
    let channel = balanced_channel(discovery, service, balance::BalanceConfig::default()).await?;
    Ok(telemetry::ClientTelemetryLayer::new().layer(channel))
}

/// A balanced pool of tonic channels, one per endpoint of a service.
pub type BalancedChannel = balance::Balanced<tonic::transport::Channel>;

/// A balanced channel whose calls are traced and measured.
pub type TracedChannel = telemetry::ClientTelemetry<BalancedChannel>;

/// Follows `service` through `discovery` with one lazily-connected HTTP/2
/// channel per endpoint ([`transport::connect_lazy`], default timeouts and
/// keep-alive), balanced as `config` says.
pub async fn balanced_channel(
    discovery: &dyn registry::Discovery,
    service: &str,
    config: balance::BalanceConfig,
) -> Result<BalancedChannel, registry::RegistryError> {
    balanced_channel_with(
        discovery,
        service,
        config,
        transport::ClientConfig::default(),
    )
    .await
}

/// [`balanced_channel`] with each endpoint's channel made as `client`
/// says (timeouts, keep-alive, TLS).
pub async fn balanced_channel_with(
    discovery: &dyn registry::Discovery,
    service: &str,
    config: balance::BalanceConfig,
    client: transport::ClientConfig,
) -> Result<BalancedChannel, registry::RegistryError> {
    let connect = move |endpoint: &balance::Endpoint| {
        transport::connect_lazy(endpoint.address(), &client).map_err(core::BoxError::from)
    };
    balance::Balanced::discover(discovery, service, config, connect).await
}

/// A balanced, discovered channel behind the default client stack
/// ([`trellis_stack::ClientStack`]: deadline → retries within a budget →
/// client span and metrics → circuit breaker per method → the balancer).
/// Hand it to a generated tonic client.
#[derive(Clone)]
pub struct ResilientChannel {
    stack: trellis_stack::ClientStackService<BalancedChannel>,
    balanced: BalancedChannel,
}

impl ResilientChannel {
    /// The balanced channel under the stack (its endpoints, its policy).
    pub fn balanced(&self) -> &BalancedChannel {
        &self.balanced
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for ResilientChannel {
    type Response = <trellis_stack::ClientStackService<BalancedChannel> as tower::Service<
        http::Request<tonic::body::Body>,
    >>::Response;
    type Error = resilience::BoxError;
    type Future = <trellis_stack::ClientStackService<BalancedChannel> as tower::Service<
        http::Request<tonic::body::Body>,
    >>::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.stack.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        self.stack.call(request)
    }
}

/// [`client`] behind the default client stack, with the default settings.
pub async fn resilient_client(
    discovery: &dyn registry::Discovery,
    service: &str,
) -> Result<ResilientChannel, ClientError> {
    resilient_client_with(discovery, service, &settings::ClientSettings::default()).await
}

/// Why a client could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The service could not be followed in the registry.
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    /// `tls` names certificate files that could not be used.
    #[error("client tls: {0}")]
    Tls(#[from] transport::tls::TlsError),
}

/// [`client`] behind the client stack `settings` describe: timeout,
/// retries, breaker, balancer and TLS, from typed config or code.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use trellis::settings::ClientSettings;
/// let registry = trellis::registry::connect("memory://").await?;
/// let mut settings = ClientSettings::default();
/// settings.retry.attempts = 5;
/// settings.balancer.policy = "round_robin".into();
/// let channel = trellis::resilient_client_with(registry.as_ref(), "user", &settings).await?;
/// # let _ = channel; Ok(()) }
/// ```
pub async fn resilient_client_with(
    discovery: &dyn registry::Discovery,
    service: &str,
    settings: &settings::ClientSettings,
) -> Result<ResilientChannel, ClientError> {
    use tower::Layer;
    let mut client = transport::ClientConfig::default();
    if let Some(tls) = &settings.tls {
        client.tls = Some(tls.follow()?);
    }
    let balanced =
        balanced_channel_with(discovery, service, settings.balance_config(), client).await?;
    let stack = trellis_stack::ClientStack::new(settings).layer(balanced.clone());
    Ok(ResilientChannel { stack, balanced })
}

/// An HTTP client (HTTP/1.1, pooled) for REST calls from one service to
/// another: traced and measured like [`client`], with the deadline of the
/// request being handled (or 10 s) sent as `x-request-timeout-ms`.
pub type HttpClient = resilience::Deadline<
    telemetry::ClientTelemetry<
        hyper_util::client::legacy::Client<
            hyper_util::client::legacy::connect::HttpConnector,
            axum::body::Body,
        >,
    >,
>;

/// A new [`HttpClient`]. Build one per upstream and clone it: clones share
/// its connection pool (a fresh client per call would open a connection per
/// call).
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// use tower::ServiceExt;
/// let request = http::Request::get("http://127.0.0.1:8082/readyz").body(axum::body::Body::empty())?;
/// let response = trellis::http_client().oneshot(request).await?;
/// assert!(response.status().is_success());
/// # Ok(()) }
/// ```
pub fn http_client() -> HttpClient {
    use tower::Layer;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let deadline = resilience::DeadlineLayer::new(Some(std::time::Duration::from_secs(10)));
    deadline.layer(telemetry::ClientTelemetryLayer::new().layer(client))
}
pub use trellis_transport as transport;
