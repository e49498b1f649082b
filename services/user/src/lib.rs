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

use std::{net::SocketAddr, path::Path};

use trellis::{
    App, AppBuilder,
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
}

impl Default for UserConfig {
    fn default() -> Self {
        UserConfig::embedded(Path::new("./.trellis"))
    }
}

impl UserConfig {
    /// SQLite in `data_dir/user.db`: the one-machine default.
    pub fn embedded(data_dir: &Path) -> Self {
        UserConfig { database_url: format!("sqlite://{}", data_dir.join("user.db").display()), max_connections: 8 }
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

/// A bound, ready-to-run user service.
pub struct UserService {
    server: GrpcHttpServer,
    store: data::SqlUserRepo,
}

impl UserService {
    /// Opens (and migrates) the store and binds the server.
    pub async fn bind(config: &UserConfig, server: ServerConfig) -> Result<UserService, BuildError> {
        let store = data::SqlUserRepo::open(&config.database_url, config.max_connections).await?;
        let handler = service::UserServiceHandler::new(biz::Users::new(store.clone()));
        let server = GrpcHttpServer::builder(server)
            .grpc_service(api::v1::user_service_server::UserServiceServer::new(handler))
            .file_descriptor_set(api::FILE_DESCRIPTOR_SET)
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
