//! The shop's user service: user accounts over gRPC, stored in SQLite (the
//! embedded default) or PostgreSQL.
//!
//! Laid out like a Kratos service: [`api`] is generated from
//! `proto/shop/user/v1/user.proto`, [`service`] adapts gRPC to the domain,
//! [`biz`] holds the rules (validation, paging, concurrency), [`data`] the
//! repository over sqlx.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use shop_user::{UserConfig, UserService};
//! use trellis::{App, transport::ServerConfig};
//!
//! let config = UserConfig::embedded(std::path::Path::new("./.trellis"));
//! let service = UserService::bind(&config, ServerConfig::default()).await?;
//! println!("user service on {}", service.local_addr());
//! service.into_app(App::builder("user")).run().await?;
//! # Ok(()) }
//! ```
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `sqlite` | yes | the embedded store (`sqlite://PATH`) |
//! | `postgres` | yes | PostgreSQL (`postgres://...`) |

#![warn(missing_docs)]

pub mod api;
pub mod biz;
pub mod data;
pub mod service;

use std::{net::SocketAddr, path::Path, time::Duration};

use serde::{Deserialize, Serialize};
use trellis::{
    App, AppBuilder,
    config::{Config, Invalid, Secret, Validate},
    settings::{LogSettings, OtlpSettings, ServerSettings},
    transport::{GrpcHttpServer, ServerConfig, TransportError},
};

/// The user service's settings.
#[derive(Debug, Clone)]
pub struct UserConfig {
    /// Where users are stored: `sqlite://PATH` (created if missing) or
    /// `postgres://USER@HOST:PORT/DB`. Default: `sqlite://./.trellis/user.db`.
    pub database_url: String,
    /// The most database connections the service holds. Default: 8.
    pub max_connections: u32,
    /// How long a call waits for a connection before it fails UNAVAILABLE
    /// (the database is down or every connection is busy). Default: 5 s.
    pub acquire_timeout: Duration,
}

impl Default for UserConfig {
    fn default() -> Self {
        UserConfig::embedded(Path::new("./.trellis"))
    }
}

impl UserConfig {
    /// SQLite in `data_dir/user.db`: the one-machine default.
    pub fn embedded(data_dir: &Path) -> Self {
        UserConfig {
            database_url: format!("sqlite://{}", data_dir.join("user.db").display()),
            max_connections: 8,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

/// The user service's configuration, as loaded by the config centre
/// (`user.toml`, `TRELLIS_*`, etcd `{prefix}user/`).
///
/// ```toml
/// [server]
/// request_timeout = "5s"   # live
///
/// [log]
/// level = "info"           # live
///
/// [otlp]
/// endpoint = "http://otel-collector:4317"   # live; OTEL_EXPORTER_OTLP_ENDPOINT wins
/// sample_ratio = 0.1                        # live
///
/// [database]
/// url = "postgres://app:${DB_PASSWORD}@db:5432/shop"   # restart
/// max_connections = 16                                  # restart
/// acquire_timeout = "5s"                                # restart
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UserSettings {
    /// Server limits and timeouts.
    pub server: ServerSettings,
    /// Logging.
    pub log: LogSettings,
    /// OTLP export of traces, metrics and logs; trace sampling.
    pub otlp: OtlpSettings,
    /// Where users are stored.
    pub database: DatabaseSettings,
}

/// The user store's settings (applied on restart).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DatabaseSettings {
    /// `sqlite://PATH` or `postgres://...`; unset means SQLite in the data dir.
    pub url: Option<Secret<String>>,
    /// The most connections to hold. Default: 8.
    pub max_connections: u32,
    /// How long a call waits for a connection before it fails UNAVAILABLE.
    /// Default: 5s.
    #[serde(with = "trellis::config::duration")]
    pub acquire_timeout: Duration,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        DatabaseSettings {
            url: None,
            max_connections: 8,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

impl Validate for UserSettings {
    fn validate(&self) -> Result<(), Invalid> {
        self.server.validate("server")?;
        self.otlp
            .check()
            .map_err(|(key, message)| Invalid::new(format!("otlp.{key}"), message))?;
        if !(1..=1000).contains(&self.database.max_connections) {
            return Err(Invalid::new(
                "database.max_connections",
                "must be between 1 and 1000",
            ));
        }
        if !(Duration::from_millis(10)..=Duration::from_secs(600))
            .contains(&self.database.acquire_timeout)
        {
            return Err(Invalid::new(
                "database.acquire_timeout",
                "must be between 10ms and 10m",
            ));
        }
        if let Some(url) = &self.database.url {
            let url = url.expose();
            if !["sqlite:", "postgres://", "postgresql://"]
                .iter()
                .any(|p| url.starts_with(p))
            {
                return Err(Invalid::new(
                    "database.url",
                    "must start with sqlite:, postgres:// or postgresql://",
                ));
            }
        }
        Ok(())
    }
}

impl UserSettings {
    /// The store settings these describe, SQLite under `data_dir` unless a URL is set.
    pub fn store(&self, data_dir: &Path) -> UserConfig {
        let mut config = UserConfig::embedded(data_dir);
        if let Some(url) = &self.database.url {
            config.database_url = url.expose().clone();
        }
        config.max_connections = self.database.max_connections;
        config.acquire_timeout = self.database.acquire_timeout;
        config
    }
}

/// Why the service could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The store could not be opened or migrated.
    #[error(transparent)]
    Store(#[from] data::StoreError),
    /// The listener could not be bound.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// The service's name: in the registry, on its spans and log lines.
pub const SERVICE: &str = "user";

/// A bound, ready-to-run user service.
pub struct UserService {
    server: GrpcHttpServer,
    store: data::SqlUserRepo,
}

impl UserService {
    /// Opens (and migrates) the store and binds the server.
    pub async fn bind(
        config: &UserConfig,
        server: ServerConfig,
    ) -> Result<UserService, BuildError> {
        let store = data::SqlUserRepo::open(
            &config.database_url,
            config.max_connections,
            config.acquire_timeout,
        )
        .await?;
        let handler = service::UserServiceHandler::new(biz::Users::new(store.clone()));
        let server = GrpcHttpServer::builder(server)
            .grpc_service(api::v1::user_service_server::UserServiceServer::new(
                handler,
            ))
            .file_descriptor_set(api::FILE_DESCRIPTOR_SET)
            .rest(Default::default())
            .bind()
            .await?;
        Ok(UserService { server, store })
    }

    /// The address serving gRPC and HTTP.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// The admin address, if configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.server.admin_addr()
    }

    /// Opens the store and binds the server from a loaded config, and keeps
    /// the live settings (request timeout) following it. `/debug/config`
    /// is served on the admin listener (or the main port without one).
    pub async fn bind_with_config(
        config: Config<UserSettings>,
        data_dir: &Path,
        database_url: Option<String>,
        mut server: ServerConfig,
    ) -> Result<UserService, BuildError> {
        let settings = config.current();
        let mut store_config = settings.config.store(data_dir);
        if let Some(url) = database_url {
            store_config.database_url = url;
        }
        server.limits = settings.config.server.limits();
        server.reflection = settings.config.server.reflection;
        let store = data::SqlUserRepo::open(
            &store_config.database_url,
            store_config.max_connections,
            store_config.acquire_timeout,
        )
        .await?;
        let handler = service::UserServiceHandler::new(biz::Users::new(store.clone()));
        let mut builder = GrpcHttpServer::builder(server)
            .grpc_service(api::v1::user_service_server::UserServiceServer::new(
                handler,
            ))
            .file_descriptor_set(api::FILE_DESCRIPTOR_SET)
            .rest(Default::default())
            .debug_router(trellis::settings::debug_router(config.clone()));
        match trellis::telemetry::prometheus() {
            Ok(handle) => {
                builder = builder.debug_router(trellis::telemetry::metrics_router(handle))
            }
            Err(err) => tracing::warn!(error = %err, "serving without /metrics"),
        }
        let stack = trellis::stack::ServerStack::new(SERVICE, &settings.config.server);
        let limiter = stack.limiter();
        let server = builder.layer(stack).bind().await?;
        trellis::settings::follow_request_timeout(
            &config,
            |s: &UserSettings| &s.server,
            server.request_timeout(),
        );
        trellis::settings::follow_rate_limit(&config, |s: &UserSettings| &s.server, limiter);
        Ok(UserService { server, store })
    }

    /// Adds the server to `app` and closes the store after it stops.
    pub fn into_app(self, app: AppBuilder) -> App {
        let store = self.store;
        app.server(self.server)
            .after_stop(move || async move {
                store.close().await;
                Ok::<(), std::convert::Infallible>(())
            })
            .build()
    }
}
