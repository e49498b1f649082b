//! A service, defined once.
//!
//! A service implements [`Service`]: its name, its place in `trellis up`,
//! its protos, its settings type, and how to build its handlers from its
//! settings. [`bind`] is the one path from there to a bound server, and it
//! gives every service the same things: the REST face of its protos (with
//! validation and OpenAPI), the default server stack from
//! `server.*` (tracing, RED metrics, rate limit, shedding, timeouts),
//! limits, health, reflection, `/metrics` and `/debug/config` on the admin
//! listener, live settings followed. [`Bound::into_app`] adds lifecycle,
//! registration and graceful shutdown.
//!
//! The `trellis` command runs services through [`Definition`], the same
//! thing as an object: `trellis up`, `serve`, `openapi` and `config set`
//! read one list of them, so adding a service is implementing [`Service`]
//! and adding one line there.
//!
//! ```no_run
//! use std::path::Path;
//! use serde::{Deserialize, Serialize};
//! use trellis::{
//!     App,
//!     config::{Config, Invalid, Validate},
//!     core::BoxError,
//!     service::{Context, Service, ServiceSettings, bind},
//!     settings::{LogSettings, OtlpSettings, ServerSettings},
//!     transport::{GrpcHttpServerBuilder, ServerConfig},
//! };
//!
//! #[derive(Debug, Clone, Default, Serialize, Deserialize)]
//! #[serde(default)]
//! struct HelloSettings {
//!     server: ServerSettings,
//!     log: LogSettings,
//!     otlp: OtlpSettings,
//! }
//! impl Validate for HelloSettings {
//!     fn validate(&self) -> Result<(), Invalid> {
//!         self.server.validate("server")
//!     }
//! }
//! impl ServiceSettings for HelloSettings {
//!     fn server(&self) -> &ServerSettings { &self.server }
//!     fn log(&self) -> &LogSettings { &self.log }
//!     fn otlp(&self) -> &OtlpSettings { &self.otlp }
//! }
//!
//! struct Hello;
//! impl Service for Hello {
//!     type Settings = HelloSettings;
//!     const NAME: &'static str = "hello";
//!     const PORT_OFFSET: u16 = 9;
//!     const DESCRIPTORS: &'static [u8] = &[]; // the encoded descriptor set of its protos
//!     const GRPC_SERVICES: &'static [&'static str] = &[];
//!
//!     async fn build(
//!         _: Context<'_, HelloSettings>,
//!         server: GrpcHttpServerBuilder,
//!     ) -> Result<(Hello, GrpcHttpServerBuilder), BoxError> {
//!         let routes = axum::Router::new().route("/hello", axum::routing::get(|| async { "hi" }));
//!         Ok((Hello, server.http_router(routes)))
//!     }
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::<HelloSettings>::builder().env("TRELLIS").build().await?;
//! let bound = bind::<Hello>(config, Path::new("./.trellis"), ServerConfig::default()).await?;
//! bound.into_app(App::builder(Hello::NAME)).run().await?;
//! # Ok(()) }
//! ```

use std::{
    future::Future,
    marker::PhantomData,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::watch;
use trellis_config::{Config, ConfigError, Invalid, Validate};
use trellis_core::BoxError;
use trellis_registry::ServiceRegistry;
use trellis_transport::{GrpcHttpServer, GrpcHttpServerBuilder, ServerConfig, TransportError};

use crate::{
    App, AppBuilder,
    settings::{LogSettings, OtlpSettings, ServerSettings},
};

/// A boxed future, for [`Definition`] as an object.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A service's settings type: its own sections, and the ones every
/// service has (`server`, `log`, `otlp`), which [`bind`] and the `trellis`
/// command read.
pub trait ServiceSettings: DeserializeOwned + Serialize + Validate + Send + Sync + 'static {
    /// Limits, timeouts, rate limit, shedding.
    fn server(&self) -> &ServerSettings;
    /// Logging.
    fn log(&self) -> &LogSettings;
    /// OTLP export and trace sampling.
    fn otlp(&self) -> &OtlpSettings;
}

/// Checks the sections every service's settings have: `server` and
/// `otlp` (named by those keys).
pub fn check_common(server: &ServerSettings, otlp: &OtlpSettings) -> Result<(), Invalid> {
    server.validate("server")?;
    otlp.check()
        .map_err(|(key, message)| Invalid::new(format!("otlp.{key}"), message))
}

/// The header the gateway puts the verified token's subject in.
pub const USER_HEADER: &str = "x-user-id";

/// The caller the gateway vouches for ([`USER_HEADER`]); `None` for calls
/// inside the mesh, which carry none (or a value that is not text).
pub fn caller(metadata: &tonic::metadata::MetadataMap) -> Option<&str> {
    metadata.get(USER_HEADER).and_then(|v| v.to_str().ok())
}

/// Lets a call through only if its caller ([`caller`]) is `owner`, or it
/// has none (inside the mesh); else PERMISSION_DENIED with `reason` and
/// `message`.
pub fn owner_only(
    metadata: &tonic::metadata::MetadataMap,
    owner: &str,
    reason: &'static str,
    message: &str,
) -> Result<(), trellis_core::Error> {
    match metadata.get(USER_HEADER) {
        Some(caller) if caller.as_bytes() != owner.as_bytes() => Err(trellis_core::Error::new(
            trellis_core::Code::PermissionDenied,
            reason,
            message,
        )),
        _ => Ok(()),
    }
}

/// Implements [`ServiceSettings`] for a settings struct whose `server`,
/// `log` and `otlp` fields are the shared sections:
///
/// ```ignore
/// trellis::service_settings!(UserSettings);
/// ```
#[macro_export]
macro_rules! service_settings {
    ($settings:ty) => {
        impl $crate::service::ServiceSettings for $settings {
            fn server(&self) -> &$crate::settings::ServerSettings {
                &self.server
            }

            fn log(&self) -> &$crate::settings::LogSettings {
                &self.log
            }

            fn otlp(&self) -> &$crate::settings::OtlpSettings {
                &self.otlp
            }
        }
    };
}

/// What a service's [`Service::build`] is given.
pub struct Context<'a, T> {
    /// The live config (for sections the service follows itself).
    pub config: &'a Config<T>,
    /// The settings in force as it starts.
    pub settings: &'a T,
    /// Where it keeps local data (SQLite files and the like).
    pub data_dir: &'a Path,
    /// Where it finds the services it calls (`trellis serve` and `trellis
    /// up` pass their registry; [`bind`] alone has none).
    pub discovery: Option<&'a Arc<dyn ServiceRegistry>>,
}

/// A Trellis service.
pub trait Service: Sized + Send + 'static {
    /// Its settings type.
    type Settings: ServiceSettings;
    /// Its name: in the registry, on spans, logs and metrics, and where its
    /// config lives (`{name}.toml`, etcd `{prefix}{name}/`).
    const NAME: &'static str;
    /// Its port in `trellis up`: the base port plus this.
    const PORT_OFFSET: u16;
    /// The encoded descriptor set of its protos: reflection, the REST face,
    /// validation rules and OpenAPI come from it.
    const DESCRIPTORS: &'static [u8];
    /// The full names of the gRPC services it serves (`shop.user.v1.UserService`).
    const GRPC_SERVICES: &'static [&'static str];
    /// The methods (`/pkg.Service/Method`, covering their REST face too)
    /// that honour an `Idempotency-Key`: a repeated request gets the first
    /// answer instead of running again. `server.idempotency.routes` adds
    /// more; `server.idempotency.store` says where keys live.
    const IDEMPOTENT: &'static [&'static str] = &[];

    /// Opens what the service needs (stores, clients) and adds its gRPC
    /// services and HTTP routes to `server`.
    fn build(
        ctx: Context<'_, Self::Settings>,
        server: GrpcHttpServerBuilder,
    ) -> impl Future<Output = Result<(Self, GrpcHttpServerBuilder), BoxError>> + Send;

    /// Called once the server has stopped and drained: close stores.
    fn stop(self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Why a service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Its config could not be loaded.
    #[error("config: {0}")]
    Config(#[from] ConfigError),
    /// Its listener could not be bound.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Its own build failed (a store would not open, ...).
    #[error("{0}")]
    Build(BoxError),
}

impl StartError {
    /// The address that was taken, if that is what went wrong.
    pub fn port_in_use(&self) -> Option<SocketAddr> {
        match self {
            StartError::Transport(t @ TransportError::Bind { addr, .. }) if t.is_addr_in_use() => {
                Some(*addr)
            }
            _ => None,
        }
    }
}

/// A bound service: listening, not yet serving.
pub struct Bound<S: Service> {
    service: S,
    server: GrpcHttpServer,
    config: Config<S::Settings>,
}

/// Builds `S` from `config` and binds its server with everything a
/// service gets by default (see the module docs). `server` gives the
/// addresses; its limits and reflection come from `server.*` in `config`.
pub async fn bind<S: Service>(
    config: Config<S::Settings>,
    data_dir: &Path,
    server: ServerConfig,
) -> Result<Bound<S>, StartError> {
    bind_with(config, data_dir, server, None).await
}

/// [`bind`], with a registry the service finds its peers in.
pub async fn bind_with<S: Service>(
    config: Config<S::Settings>,
    data_dir: &Path,
    mut server: ServerConfig,
    discovery: Option<&Arc<dyn ServiceRegistry>>,
) -> Result<Bound<S>, StartError> {
    let current = config.current();
    let settings = &current.config;
    server.limits = settings.server().limits();
    server.reflection = settings.server().reflection;
    if let Some(tls) = &settings.server().tls {
        server.tls = Some(tls.follow().map_err(|e| {
            StartError::Config(ConfigError::Read {
                source_name: "server.tls".into(),
                reason: e.to_string(),
            })
        })?);
    }
    let builder = GrpcHttpServer::builder(server);
    let context = Context {
        config: &config,
        settings,
        data_dir,
        discovery,
    };
    let (service, builder) = S::build(context, builder)
        .await
        .map_err(StartError::Build)?;
    let mut builder = builder
        .file_descriptor_set(S::DESCRIPTORS)
        .rest(Default::default())
        .debug_router(crate::settings::debug_router(config.clone()));
    match trellis_telemetry::prometheus() {
        Ok(handle) => builder = builder.debug_router(trellis_telemetry::metrics_router(handle)),
        Err(err) => tracing::warn!(error = %err, "serving without /metrics"),
    }
    let stack = trellis_stack::ServerStack::new(S::NAME, settings.server());
    let limiter = stack.limiter();
    // Tokens and access rules, inside the stack: refusals are traced and
    // counted like any answer.
    let auth = match &settings.server().auth {
        Some(auth) => Some(auth.layer().map_err(|e| StartError::Build(e.into()))?),
        None => None,
    };
    // Idempotent routes, inside auth: keys are scoped to the caller.
    let mut idempotency = settings.server().idempotency.clone();
    idempotency
        .routes
        .extend(S::IDEMPOTENT.iter().map(|r| (*r).to_owned()));
    let idempotency = if idempotency.enabled() {
        let store = trellis_lock::idempotency::connect(idempotency.store.expose(), data_dir)
            .await
            .map_err(|e| StartError::Build(format!("server.idempotency.store: {e}").into()))?;
        let layer = trellis_lock::idempotency::IdempotencyLayer::new(S::NAME, store, &idempotency)
            .route_with(rpc_of)
            .principal_with(principal_of);
        Some(tower::layer::util::Stack::new(
            layer,
            tower::util::MapResponseLayer::new(
                |r: http::Response<trellis_lock::idempotency::Replayable<axum::body::Body>>| {
                    r.map(axum::body::Body::new)
                },
            ),
        ))
    } else {
        None
    };
    let server = builder
        .layer(stack)
        .layer(tower::util::option_layer(auth))
        .layer(tower::util::option_layer(idempotency))
        .bind()
        .await?;
    crate::settings::follow_request_timeout(&config, server_of::<S>, server.request_timeout());
    crate::settings::follow_rate_limit(&config, server_of::<S>, limiter);
    Ok(Bound {
        service,
        server,
        config,
    })
}

/// A request's route for idempotency: the gRPC method its REST face calls,
/// or its path.
fn rpc_of(parts: &http::request::Parts) -> std::borrow::Cow<'_, str> {
    match parts.extensions.get::<trellis_transcode::MatchedRoute>() {
        Some(route) => format!(
            "/{}/{}",
            route.rpc().parent_service().full_name(),
            route.rpc().name()
        )
        .into(),
        None => parts.uri.path().into(),
    }
}

/// Who is calling, for idempotency keys: the token's subject, else the
/// gateway's `x-user-id` or the mutual TLS peer.
fn principal_of(parts: &http::request::Parts) -> Option<String> {
    match parts.extensions.get::<trellis_auth::Claims>() {
        Some(claims) => Some(format!("sub:{}", claims.sub)),
        None => trellis_lock::idempotency::default_principal(parts),
    }
}

fn server_of<S: Service>(settings: &S::Settings) -> &ServerSettings {
    settings.server()
}

impl<S: Service> Bound<S> {
    /// Where it serves gRPC and HTTP.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Its admin listener, if any.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.server.admin_addr()
    }

    /// Its live config.
    pub fn config(&self) -> &Config<S::Settings> {
        &self.config
    }

    /// The app that runs it: the server, `server.shutdown_timeout` and
    /// `server.pre_stop_delay` from config, and the service's
    /// [`stop`](Service::stop) after the drain. Add a registry, version and
    /// zone to `app` first.
    pub fn into_app(self, app: AppBuilder) -> App {
        self.app_with(app, None, None)
    }

    /// [`into_app`](Self::into_app), with a shutdown timeout or pre-stop
    /// delay given (from flags) winning over the config's.
    pub fn app_with(
        self,
        app: AppBuilder,
        shutdown_timeout: Option<Duration>,
        pre_stop_delay: Option<Duration>,
    ) -> App {
        let settings = self.config.current();
        let server = settings.config.server();
        let mut app = app.shutdown_timeout(shutdown_timeout.unwrap_or(server.shutdown_timeout));
        if let Some(delay) = pre_stop_delay.or(server.pre_stop_delay) {
            app = app.pre_stop_delay(delay);
        }
        let service = self.service;
        app.server(self.server)
            .after_stop(move || async move {
                service.stop().await;
                Ok::<(), std::convert::Infallible>(())
            })
            .build()
    }
}

/// Where a service's config comes from, as the `trellis` command finds it.
#[derive(Debug, Clone, Default)]
pub struct ConfigSources {
    /// Files and directories, lowest first.
    pub files: Vec<PathBuf>,
    /// `etcd://host:port[,host:port]/prefix`: the service reads
    /// `{prefix}{name}/` (feature `etcd`).
    pub etcd: Option<String>,
    /// Fixed settings over the environment (command-line flags), with the
    /// flag that set them.
    pub set: Vec<(String, String, String)>,
}

impl ConfigSources {
    /// The config of the service called `name`: defaults, the files, the
    /// `TRELLIS_*` environment, the fixed settings, then etcd.
    pub async fn load<T>(&self, name: &str) -> Result<Config<T>, ConfigError>
    where
        T: DeserializeOwned + Validate + Send + Sync + 'static,
    {
        let mut builder = Config::<T>::builder().env("TRELLIS");
        for f in &self.files {
            builder = builder.file(f);
        }
        for (flag, key, value) in &self.set {
            builder = builder.set(flag.clone(), [(key, value)]);
        }
        if let Some(url) = &self.etcd {
            builder = with_etcd(builder, url, name)?;
        }
        builder.build().await
    }
}

#[cfg(feature = "etcd")]
fn with_etcd<T>(
    builder: trellis_config::ConfigBuilder<T>,
    url: &str,
    name: &str,
) -> Result<trellis_config::ConfigBuilder<T>, ConfigError>
where
    T: DeserializeOwned + Validate + Send + Sync + 'static,
{
    let (endpoints, prefix, tls) =
        trellis_config::parse_etcd_url_tls(url).map_err(|reason| ConfigError::Unavailable {
            source_name: format!("--config-source {url}"),
            reason,
        })?;
    Ok(builder.etcd_tls(endpoints, format!("{prefix}{name}/"), tls))
}

#[cfg(not(feature = "etcd"))]
fn with_etcd<T>(
    _: trellis_config::ConfigBuilder<T>,
    url: &str,
    _: &str,
) -> Result<trellis_config::ConfigBuilder<T>, ConfigError>
where
    T: DeserializeOwned + Validate + Send + Sync + 'static,
{
    Err(ConfigError::Unavailable {
        source_name: format!("--config-source {url}"),
        reason: "this build has no etcd support (cargo feature `etcd`)".into(),
    })
}

/// A service as the `trellis` command sees it: [`Service`] as an object,
/// so one list holds every service. Made with [`Definition::of`].
pub trait Definition: Send + Sync {
    /// [`Service::NAME`].
    fn name(&self) -> &'static str;
    /// [`Service::PORT_OFFSET`].
    fn port_offset(&self) -> u16;
    /// [`Service::DESCRIPTORS`] and [`Service::GRPC_SERVICES`].
    fn descriptors(&self) -> (&'static [u8], &'static [&'static str]);
    /// Checks `key = value` against the settings type (`trellis config set`).
    fn check_setting(&self, key: &str, value: &str) -> Result<(), ConfigError>;
    /// Whether `key` is a secret in the settings (shown redacted).
    fn is_secret(&self, key: &str) -> bool;
    /// Loads the config from `sources` and [`bind_with`]s the service, its
    /// peers found through `discovery`.
    fn start<'a>(
        &'a self,
        sources: &'a ConfigSources,
        data_dir: &'a Path,
        server: ServerConfig,
        discovery: Option<&'a Arc<dyn ServiceRegistry>>,
    ) -> BoxFuture<'a, Result<Started, StartError>>;
}

impl dyn Definition {
    /// The definition of `S`.
    pub const fn of<S: Service>() -> &'static dyn Definition {
        &Of::<S>(PhantomData)
    }
}

struct Of<S>(PhantomData<fn() -> S>);

impl<S: Service> Definition for Of<S> {
    fn name(&self) -> &'static str {
        S::NAME
    }

    fn port_offset(&self) -> u16 {
        S::PORT_OFFSET
    }

    fn descriptors(&self) -> (&'static [u8], &'static [&'static str]) {
        (S::DESCRIPTORS, S::GRPC_SERVICES)
    }

    fn check_setting(&self, key: &str, value: &str) -> Result<(), ConfigError> {
        trellis_config::check_setting::<S::Settings>(key, value)
    }

    fn is_secret(&self, key: &str) -> bool {
        trellis_config::is_secret::<S::Settings>(key)
    }

    fn start<'a>(
        &'a self,
        sources: &'a ConfigSources,
        data_dir: &'a Path,
        server: ServerConfig,
        discovery: Option<&'a Arc<dyn ServiceRegistry>>,
    ) -> BoxFuture<'a, Result<Started, StartError>> {
        Box::pin(async move {
            let config = sources.load::<S::Settings>(S::NAME).await?;
            let log_level = config.section(|s| s.log().level.clone());
            let otlp = config.section(|s| s.otlp().clone());
            let bound = bind_with::<S>(config, data_dir, server, discovery).await?;
            Ok(Started {
                addr: bound.local_addr(),
                admin: bound.admin_addr(),
                log_level,
                otlp,
                app: Box::new(move |app, timeout, delay| bound.app_with(app, timeout, delay)),
            })
        })
    }
}

/// A service bound by [`Definition::start`], its type forgotten.
pub struct Started {
    /// Where it serves gRPC and HTTP.
    pub addr: SocketAddr,
    /// Its admin listener, if any.
    pub admin: Option<SocketAddr>,
    /// `log.level`, followed (the process's filter is the command's to set).
    pub log_level: watch::Receiver<String>,
    /// `otlp.*`, followed.
    pub otlp: watch::Receiver<OtlpSettings>,
    app: StartApp,
}

type StartApp = Box<dyn FnOnce(AppBuilder, Option<Duration>, Option<Duration>) -> App + Send>;

impl Started {
    /// The app that runs it; a given `shutdown_timeout` or
    /// `pre_stop_delay` (from flags) overrides the config's.
    pub fn into_app(
        self,
        app: AppBuilder,
        shutdown_timeout: Option<Duration>,
        pre_stop_delay: Option<Duration>,
    ) -> App {
        (self.app)(app, shutdown_timeout, pre_stop_delay)
    }
}
