//! The service runtime: runs servers through the instance lifecycle.
//!
//! Shutdown order matters more than anything else here. Readiness goes false
//! first (probes and gRPC health flip, `before_stop` hooks deregister the
//! instance), then an optional pre-stop delay lets load balancers and
//! discovery catch up, and only then do listeners close and in-flight
//! requests drain, up to the shutdown deadline. Reversing any two of these
//! steps turns a deploy into failed requests.

use std::{
    collections::BTreeMap, future::Future, net::IpAddr, net::SocketAddr, pin::Pin, sync::Arc,
    time::Duration,
};

use tokio::{sync::watch, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use trellis_core::{BoxError, Drain, Lifecycle, Server, State};
use trellis_registry::{Instance, Registration, Registry};

/// The pre-stop delay used when a registry is set and none was chosen:
/// long enough for a deregistration to reach watching clients.
const DEFAULT_REGISTERED_PRE_STOP_DELAY: Duration = Duration::from_secs(1);

type Hook = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>> + Send>;

/// Who this instance is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppInfo {
    /// The service name, e.g. `user`.
    pub name: String,
    /// The service version, e.g. `1.4.2`.
    pub version: String,
    /// Unique per running instance; generated (UUIDv7) when not given.
    pub instance_id: String,
}

/// Why an app stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A hook failed; `stage` names which (`before_start`, `after_stop`, ...).
    #[error("{stage} hook failed: {source}")]
    Hook {
        /// The hook stage.
        stage: &'static str,
        /// The hook's error.
        #[source]
        source: BoxError,
    },
    /// A server stopped on its own with an error.
    #[error("server {server} failed: {source}")]
    Server {
        /// The server's description.
        server: String,
        /// Its error.
        #[source]
        source: BoxError,
    },
    /// The signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signal(#[from] std::io::Error),
}

/// Builds an [`App`].
pub struct AppBuilder {
    info: AppInfo,
    servers: Vec<Box<dyn Server>>,
    before_start: Vec<Hook>,
    after_start: Vec<Hook>,
    before_stop: Vec<Hook>,
    after_stop: Vec<Hook>,
    pre_stop_delay: Option<Duration>,
    shutdown_timeout: Duration,
    lifecycle: Lifecycle,
    registry: Option<Arc<dyn Registry>>,
    registration: RegistrationInfo,
}

/// What an app publishes about itself besides its name, version and endpoints.
#[derive(Debug, Clone, Default)]
struct RegistrationInfo {
    zone: String,
    weight: Option<u32>,
    metadata: BTreeMap<String, String>,
    advertise_host: Option<IpAddr>,
}

fn hook<F, Fut, E>(f: F) -> Hook
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError>,
{
    Box::new(move || Box::pin(async move { f().await.map_err(Into::into) }))
}

impl AppBuilder {
    /// The service version (default: empty).
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.info.version = version.into();
        self
    }

    /// A fixed instance id instead of a generated one.
    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.info.instance_id = id.into();
        self
    }

    /// Adds a server; every server is served for the life of the app.
    pub fn server(mut self, server: impl Server) -> Self {
        self.servers.push(Box::new(server));
        self
    }

    /// Runs before servers start; a failure aborts the start.
    pub fn before_start<F, Fut, E>(mut self, f: F) -> Self
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        self.before_start.push(hook(f));
        self
    }

    /// Runs once servers are serving, before the instance is Ready.
    pub fn after_start<F, Fut, E>(mut self, f: F) -> Self
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        self.after_start.push(hook(f));
        self
    }

    /// Runs when draining begins, before the pre-stop delay (deregister here).
    pub fn before_stop<F, Fut, E>(mut self, f: F) -> Self
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        self.before_stop.push(hook(f));
        self
    }

    /// Runs after every server has stopped (close pools, flush buffers).
    pub fn after_stop<F, Fut, E>(mut self, f: F) -> Self
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        self.after_stop.push(hook(f));
        self
    }

    /// How long to keep serving after readiness goes false and before
    /// listeners close, so that deregistration reaches clients. Default: 1 s
    /// when a registry is set, otherwise 0.
    pub fn pre_stop_delay(mut self, delay: Duration) -> Self {
        self.pre_stop_delay = Some(delay);
        self
    }

    /// Registers the instance in `registry` once Ready, and deregisters it
    /// first thing when draining.
    pub fn registry(mut self, registry: Arc<dyn Registry>) -> Self {
        self.registry = Some(registry);
        self
    }

    /// The zone published with the instance (for zone-aware balancing).
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.registration.zone = zone.into();
        self
    }

    /// The weight published with the instance (default 100).
    pub fn weight(mut self, weight: u32) -> Self {
        self.registration.weight = Some(weight);
        self
    }

    /// A metadata entry published with the instance.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.registration.metadata.insert(key.into(), value.into());
        self
    }

    /// The host published for servers that listen on an unspecified address
    /// (`0.0.0.0`, `::`). Without it such servers are published as 127.0.0.1.
    pub fn advertise_host(mut self, host: IpAddr) -> Self {
        self.registration.advertise_host = Some(host);
        self
    }

    /// How long in-flight requests may take to finish once listeners close;
    /// connections still open after it are cut. Default: 10 s.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Finishes the app.
    pub fn build(self) -> App {
        App { builder: self }
    }
}

/// A service instance: its servers, hooks and lifecycle.
pub struct App {
    builder: AppBuilder,
}

impl App {
    /// Starts building an app for the service `name`.
    pub fn builder(name: impl Into<String>) -> AppBuilder {
        AppBuilder {
            info: AppInfo {
                name: name.into(),
                version: String::new(),
                instance_id: uuid::Uuid::now_v7().to_string(),
            },
            servers: Vec::new(),
            before_start: Vec::new(),
            after_start: Vec::new(),
            before_stop: Vec::new(),
            after_stop: Vec::new(),
            pre_stop_delay: None,
            shutdown_timeout: Duration::from_secs(10),
            lifecycle: Lifecycle::new(),
            registry: None,
            registration: RegistrationInfo::default(),
        }
    }

    /// Who this instance is.
    pub fn info(&self) -> &AppInfo {
        &self.builder.info
    }

    /// Observes the lifecycle (for registration, telemetry, tests).
    pub fn lifecycle(&self) -> watch::Receiver<State> {
        self.builder.lifecycle.subscribe()
    }

    /// Runs until SIGINT or SIGTERM, then shuts down gracefully. A second
    /// signal exits at once.
    pub async fn run(self) -> Result<(), AppError> {
        let signal = crate::ShutdownSignal::install()?;
        self.run_until(signal.recv()).await
    }

    /// Runs until `shutdown` resolves (or a server fails), then shuts down
    /// gracefully. For tests and for several apps in one process.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), AppError> {
        let AppBuilder {
            info,
            servers,
            before_start,
            after_start,
            before_stop,
            after_stop,
            pre_stop_delay,
            shutdown_timeout,
            lifecycle,
            registry,
            registration,
        } = self.builder;
        let pre_stop_delay = pre_stop_delay.unwrap_or(if registry.is_some() {
            DEFAULT_REGISTERED_PRE_STOP_DELAY
        } else {
            Duration::ZERO
        });
        let endpoints: Vec<(String, SocketAddr)> =
            servers.iter().flat_map(|s| s.endpoints()).collect();
        run_hooks("before_start", before_start).await?;

        let token = CancellationToken::new();
        let drain = Drain::new(token.clone(), shutdown_timeout);
        let mut running = JoinSet::new();
        for server in servers {
            let name = server.describe();
            info!(service = %info.name, server = %name, "serving");
            let fut = server.serve(lifecycle.subscribe(), drain.clone());
            running.spawn(async move { (name, fut.await) });
        }

        let mut failure = None;
        let mut registered: Option<Registration> = None;
        if let Err(err) = run_hooks("after_start", after_start).await {
            failure = Some(err);
        } else {
            lifecycle.advance(State::Ready);
            info!(service = %info.name, version = %info.version, instance = %info.instance_id, "ready");
            if let Some(registry) = &registry {
                let instance = instance(&info, &registration, &endpoints);
                match registry.register(instance).await {
                    Ok(r) => registered = Some(r),
                    Err(err) => {
                        error!(service = %info.name, error = %err, "registration failed; serving unregistered")
                    }
                }
            }
            tokio::pin!(shutdown);
            tokio::select! {
                _ = &mut shutdown => {}
                Some(joined) = running.join_next() => match server_exit(joined) {
                    Err(err) => failure = Some(err),
                    Ok(()) => warn!(service = %info.name, "a server stopped on its own; shutting down"),
                },
            }
        }

        // Draining: readiness false first, then deregistration hooks, then
        // the pre-stop delay, and only then stop accepting.
        lifecycle.advance(State::Draining);
        info!(service = %info.name, "draining");
        // Deregister before anything else, so clients stop picking this
        // instance while it can still serve what they already sent.
        if let Some(registration) = registered.take()
            && let Err(err) = registration.deregister().await
        {
            warn!(service = %info.name, error = %err, "deregistration failed; the lease will expire");
        }
        if let Err(err) = run_hooks("before_stop", before_stop).await {
            error!(service = %info.name, error = %err, "continuing shutdown");
            failure.get_or_insert(err);
        }
        if !pre_stop_delay.is_zero() {
            tokio::time::sleep(pre_stop_delay).await;
        }
        token.cancel();
        // Servers enforce the grace period themselves; the margin covers a
        // server that ignores it.
        let margin = shutdown_timeout + Duration::from_secs(1);
        let all_stopped = async {
            while let Some(joined) = running.join_next().await {
                if let Err(err) = server_exit(joined) {
                    failure.get_or_insert(err);
                }
            }
        };
        if tokio::time::timeout(margin, all_stopped).await.is_err() {
            warn!(service = %info.name, "servers did not stop within the shutdown timeout; aborting them");
            running.abort_all();
        }
        if let Err(err) = run_hooks("after_stop", after_stop).await {
            failure.get_or_insert(err);
        }
        lifecycle.advance(State::Stopped);
        info!(service = %info.name, "stopped");
        match failure {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }
}

/// The instance an app publishes: its identity, endpoints and labels.
fn instance(
    info: &AppInfo,
    registration: &RegistrationInfo,
    endpoints: &[(String, SocketAddr)],
) -> Instance {
    let mut instance = Instance::new(&info.name, &info.instance_id)
        .with_version(&info.version)
        .with_zone(&registration.zone);
    if let Some(weight) = registration.weight {
        instance = instance.with_weight(weight);
    }
    instance.metadata = registration.metadata.clone();
    for (protocol, addr) in endpoints {
        let mut addr = *addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(
                registration
                    .advertise_host
                    .unwrap_or(IpAddr::from([127, 0, 0, 1])),
            );
        }
        instance
            .endpoints
            .insert(protocol.clone(), addr.to_string());
    }
    instance
}

fn server_exit(
    joined: Result<(String, Result<(), BoxError>), tokio::task::JoinError>,
) -> Result<(), AppError> {
    match joined {
        Ok((_, Ok(()))) => Ok(()),
        Ok((server, Err(source))) => Err(AppError::Server { server, source }),
        Err(join) => Err(AppError::Server {
            server: "task".into(),
            source: Box::new(join),
        }),
    }
}

async fn run_hooks(stage: &'static str, hooks: Vec<Hook>) -> Result<(), AppError> {
    for hook in hooks {
        hook()
            .await
            .map_err(|source| AppError::Hook { stage, source })?;
    }
    Ok(())
}
