//! The API gateway: routes from a configuration document, reloaded live,
//! in front of discovered services and static upstreams.
//!
//! It is composed from the platform's parts, not copies of them: the
//! serving core (`trellis_transport::serve`: accept loop, HTTP/1.1 + h2c,
//! limits, drain), the transcoder's route trie (`trellis_transcode::RouteTable`),
//! the generic balancer (`trellis_balance::Balanced`, with outlier
//! ejection) over one shared HTTP client, the config store
//! (`trellis_config::Config`: files or etcd, validated as a whole before it
//! is published, the last good document kept) and RED metrics
//! (`trellis_telemetry::red`, labelled by route name).
//!
//! A reload builds a new table and swaps it atomically: requests in flight
//! finish on the table they started with, kept-alive connections stay
//! open, and upstreams whose settings did not change keep their pools.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use trellis_config::Config;
//! use trellis_gateway::{Gateway, GatewayConfig};
//!
//! let config = Config::<GatewayConfig>::builder().file("gateway.toml").build().await?;
//! let gateway = Gateway::new(config, None).await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! let stop = tokio_util::sync::CancellationToken::new();
//! gateway
//!     .serve(listener, &Default::default(), trellis_core::Drain::new(stop, Duration::from_secs(10)))
//!     .await;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod config;
mod generate;
mod grpc_web;
mod h1;
mod health;
mod jwt;
mod plugin;
mod proxy;
mod reflect;
mod table;
mod upstream;

use std::{cell::Cell, net::SocketAddr, sync::Arc};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tracing::{info, warn};
use trellis_config::{Config, Snapshot};
use trellis_core::Drain;
use trellis_registry::ServiceRegistry;
use trellis_telemetry::{Red, RedLayer, ServerTrace, ServerTraceLayer};
use trellis_transport::Limits;

pub use config::{GatewayConfig, JwtConfig, RouteJwtConfig};
pub use generate::{document_source, routes_for};
pub use plugin::{Plugin, Plugins};
pub use proxy::{Body, Proxy};

use table::Table;
use upstream::{Clients, Upstreams};

/// Why the gateway could not start or apply a document.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    /// The document does not compile (the message names the key).
    #[error("{0}")]
    Config(String),
    /// A discovered upstream could not be followed.
    #[error("registry: {0}")]
    Registry(String),
}

/// A document compiled and running: the table and the upstreams it names.
pub(crate) struct State {
    pub(crate) table: Table,
    pub(crate) upstreams: Upstreams,
    /// `[audit]`, when on.
    pub(crate) audit: Option<Arc<trellis_auth::audit::Recorder>>,
    /// The config version it came from.
    version: String,
}

/// What every connection's [`Proxy`] shares.
pub(crate) struct Shared {
    pub(crate) state: ArcSwap<State>,
    /// The config version in force, published after each swap.
    applied: tokio::sync::watch::Sender<String>,
    /// The last reloads, newest last.
    history: std::sync::Mutex<std::collections::VecDeque<serde_json::Value>>,
    /// Reloads decided (applied or rejected), the first load included.
    decided: tokio::sync::watch::Sender<u64>,
}

/// Reloads remembered for the admin view.
const HISTORY: usize = 32;

impl Shared {
    fn record(&self, entry: serde_json::Value) {
        let mut history = self
            .history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if history.len() == HISTORY {
            history.pop_front();
        }
        history.push_back(entry);
        drop(history);
        self.decided.send_modify(|n| *n += 1);
    }
}

/// A uniform random number from a per-thread xorshift (weighted splits,
/// request ids): no shared state and no syscall on the request path.
pub(crate) fn random_u32() -> u32 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            // Distinct per thread: a random key, the thread's id, the clock.
            use std::hash::{BuildHasher, Hash, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            std::thread::current().id().hash(&mut h);
            std::time::SystemTime::now().hash(&mut h);
            h.finish() | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x >> 32) as u32
    })
}

/// The running gateway. Cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
    /// The certificate in force, when the gateway serves HTTPS.
    tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
    /// `[listener]` as the gateway started.
    listener: config::ListenerConfig,
    trace: ServerTraceLayer,
    red: RedLayer,
}

impl Gateway {
    /// Compiles the current document and follows the store: each new
    /// (already validated) version is built and swapped in. A version
    /// whose upstreams cannot be built (a registry that refuses) is
    /// rejected and counted (`gateway_reloads_total{result="rejected"}`);
    /// the running table stays.
    pub async fn new(
        config: Config<GatewayConfig>,
        registry: Option<Arc<dyn ServiceRegistry>>,
    ) -> Result<Gateway, GatewayError> {
        Self::with_plugins(config, registry, Plugins::new()).await
    }

    /// [`new`](Self::new) with plugins routes can name (see [`Plugin`]).
    /// A document naming a plugin that is not here fails to start, or is
    /// refused on reload.
    pub async fn with_plugins(
        config: Config<GatewayConfig>,
        registry: Option<Arc<dyn ServiceRegistry>>,
        plugins: Plugins,
    ) -> Result<Gateway, GatewayError> {
        describe_metrics();
        let clients = Clients::new();
        let mut rx = config.subscribe();
        let first = rx.borrow_and_update().clone();
        let state = build(
            &first,
            None,
            None,
            None,
            &clients,
            registry.as_ref(),
            &plugins,
        )
        .await?;
        let tls = match &first.config.tls {
            Some(t) => Some(Arc::new(ArcSwap::new(
                trellis_transport::tls::load(&t.cert_file, &t.key_file)
                    .map_err(|e| GatewayError::Config(format!("tls: {e}")))?,
            ))),
            None => None,
        };
        let follow_tls = tls.clone();
        metrics::gauge!("gateway_routes").set(state.table.len() as f64);
        info!(routes = state.table.len(), version = %state.version, "gateway routes loaded");
        let (applied, _) = tokio::sync::watch::channel(state.version.clone());
        let shared = Arc::new(Shared {
            state: ArcSwap::from_pointee(state),
            applied,
            history: Default::default(),
            decided: tokio::sync::watch::Sender::new(0),
        });
        shared.record(serde_json::json!({
            "version": first.version,
            "at": unix_ms(),
            "result": "applied",
        }));
        let weak = Arc::downgrade(&shared);
        tokio::spawn(async move {
            // The store lives as long as this task follows it.
            let _config = config;
            while rx.changed().await.is_ok() {
                let Some(shared) = weak.upgrade() else { return };
                let snapshot = rx.borrow_and_update().clone();
                let previous = shared.state.load_full();
                match build(
                    &snapshot,
                    Some(&previous.table),
                    Some(&previous.upstreams),
                    previous.audit.as_ref(),
                    &clients,
                    registry.as_ref(),
                    &plugins,
                )
                .await
                {
                    Ok(state) => {
                        // Certificates renewed on disk are picked up here.
                        match (&follow_tls, &snapshot.config.tls) {
                            (Some(current), Some(t)) => {
                                match trellis_transport::tls::load(&t.cert_file, &t.key_file) {
                                    Ok(config) => current.store(config),
                                    Err(e) => {
                                        warn!(error = %e, "the new certificate is refused; the old one stays")
                                    }
                                }
                            }
                            (None, Some(_)) | (Some(_), None) => warn!(
                                "turning TLS on or off takes a restart; the listener stays as it started"
                            ),
                            (None, None) => {}
                        }
                        let routes = state.table.len();
                        let version = state.version.clone();
                        shared.state.store(Arc::new(state));
                        shared.applied.send_replace(version.clone());
                        shared.record(serde_json::json!({
                            "version": version,
                            "at": unix_ms(),
                            "result": "applied",
                            "routes": routes,
                        }));
                        metrics::gauge!("gateway_routes").set(routes as f64);
                        metrics::counter!("gateway_reloads_total", "result" => "applied")
                            .increment(1);
                        info!(routes, version = %snapshot.version, "gateway routes reloaded");
                    }
                    Err(e) => {
                        metrics::counter!("gateway_reloads_total", "result" => "rejected")
                            .increment(1);
                        shared.record(serde_json::json!({
                            "version": snapshot.version,
                            "at": unix_ms(),
                            "result": "rejected",
                            "error": e.to_string(),
                        }));
                        warn!(error = %e, version = %snapshot.version, "gateway routes rejected; the running ones stay");
                    }
                }
            }
        });
        Ok(Gateway {
            shared,
            tls,
            listener: first.config.listener.clone(),
            trace: ServerTraceLayer::new().service("gateway"),
            red: RedLayer::new(),
        })
    }

    /// The service for one client connection from `peer`, top-down: the
    /// server span (continuing the caller's `traceparent`/`baggage`, and the
    /// access log line), RED metrics by route name, the proxy (which sends
    /// its span's context upstream).
    pub fn service(&self, peer: Option<SocketAddr>) -> ServerTrace<Red<Proxy>> {
        tower::ServiceBuilder::new()
            .layer(self.trace.clone())
            .layer(self.red.clone())
            .service(Proxy::new(self.shared.clone(), peer, self.tls.is_some()))
    }

    /// How many documents the gateway has decided on — applied or
    /// rejected, the first included — as it changes (each decision is in
    /// [`admin_view`](Self::admin_view)'s `reloads` before this moves).
    pub fn reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.decided.subscribe()
    }

    /// The endpoint-set updates of upstream `name` as they happen (see
    /// `trellis_balance::Balanced::updates`); `None` for an unknown name.
    pub fn upstream_updates(&self, name: &str) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.shared
            .state
            .load()
            .upstreams
            .get(name)
            .map(|u| u.pool.updates())
    }

    /// What the gateway is running, as JSON for the admin listener
    /// (`GET /gateway`): the config version, every route with its targets,
    /// every upstream with its endpoints (weight, in flight, latency,
    /// ejected), and the last reloads with their errors.
    pub fn admin_view(&self) -> serde_json::Value {
        let state = self.shared.state.load();
        let history: Vec<serde_json::Value> = self
            .shared
            .history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .cloned()
            .collect();
        serde_json::json!({
            "version": state.version,
            "routes": state.table.describe(),
            "upstreams": state.upstreams.describe(),
            "reloads": history,
        })
    }

    /// `GET /gateway` with [`admin_view`](Self::admin_view), for the admin
    /// listener only.
    pub fn admin_router(&self) -> axum::Router {
        let gateway = self.clone();
        axum::Router::new().route(
            "/gateway",
            axum::routing::get(move || {
                let view = gateway.admin_view();
                async move { axum::Json(view) }
            }),
        )
    }

    /// The number of routes in force.
    pub fn routes(&self) -> usize {
        self.shared.state.load().table.len()
    }

    /// The config version of the routes in force.
    pub fn version(&self) -> String {
        self.shared.state.load().version.clone()
    }

    /// The config version in force, as it changes: a new value once a
    /// reload has been swapped in (for admin views and tests).
    pub fn applied(&self) -> tokio::sync::watch::Receiver<String> {
        self.shared.applied.subscribe()
    }

    /// `limits` with the document's `[listener]` settings over them.
    pub fn listener_limits(&self, limits: &Limits) -> Limits {
        let listener = &self.listener;
        Limits {
            max_connections: listener.max_connections.unwrap_or(limits.max_connections),
            max_connections_per_client: listener
                .max_connections_per_client
                .or(limits.max_connections_per_client),
            header_read_timeout: listener
                .header_read_timeout
                .unwrap_or(limits.header_read_timeout),
            ..limits.clone()
        }
    }

    /// Whether the gateway serves HTTPS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Serves on `listener` with the serving core until `drain` starts:
    /// HTTPS when the document has `[tls]`, else plain HTTP (and h2c).
    pub async fn serve(&self, listener: TcpListener, limits: &Limits, drain: Drain) {
        let limits = &self.listener_limits(limits);
        let gateway = self.clone();
        let make = move |peer| gateway.service(Some(peer));
        match &self.tls {
            Some(tls) => {
                trellis_transport::serve::serve_tls(listener, make, limits, drain, tls.clone())
                    .await
            }
            None => trellis_transport::serve::serve(listener, make, limits, drain).await,
        }
    }
}

async fn build(
    snapshot: &Snapshot<GatewayConfig>,
    previous_table: Option<&Table>,
    previous: Option<&Upstreams>,
    previous_audit: Option<&Arc<trellis_auth::audit::Recorder>>,
    clients: &Clients,
    registry: Option<&Arc<dyn ServiceRegistry>>,
    plugins: &Plugins,
) -> Result<State, GatewayError> {
    let config = &snapshot.config;
    let mut table = Table::compile(config)
        .map_err(|e| GatewayError::Config(format!("{}: {}", e.key, e.message)))?;
    table
        .resolve_plugins(plugins)
        .map_err(|e| GatewayError::Config(format!("{}: {}", e.key, e.message)))?;
    if let Some(previous) = previous_table {
        table.keep_limiters(previous);
    }
    if let Some(jwt) = &table.jwt {
        jwt.warm();
    }
    let upstreams = Upstreams::build(&config.upstreams, previous, clients, registry).await?;
    table
        .resolve_reflection(previous_table, &upstreams)
        .await
        .map_err(|e| GatewayError::Config(format!("{}: {}", e.key, e.message)))?;
    // The same trail file keeps its log (and its place in the chain).
    let audit = match (&config.audit, previous_audit) {
        (None, _) => None,
        (Some(c), Some(before)) if before.settings() == c => Some(before.clone()),
        (Some(c), _) => Some(Arc::new(
            trellis_auth::audit::Recorder::open(c)
                .map_err(|e| GatewayError::Config(format!("audit.file: {e}")))?,
        )),
    };
    Ok(State {
        table,
        upstreams,
        audit,
        version: snapshot.version.clone(),
    })
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn describe_metrics() {
    metrics::describe_counter!(
        "gateway_reloads_total",
        "Gateway route documents applied or rejected after validation"
    );
    metrics::describe_gauge!("gateway_routes", "Gateway routes in force");
    metrics::describe_counter!(
        "gateway_upstream_requests_total",
        "Requests sent upstream, by whether their connection was reused or new (the reuse ratio)"
    );
    metrics::describe_counter!(
        "gateway_retries_total",
        "Requests the gateway sent again after an attempt failed, by route"
    );
    metrics::describe_counter!(
        "gateway_upstream_responses_total",
        "Attempts sent to each upstream, by the class of its answer (error: none came)"
    );
    metrics::describe_histogram!(
        "gateway_upstream_duration_seconds",
        metrics::Unit::Seconds,
        "Time from sending an attempt to its response head, by upstream"
    );
}
