//! The shop's user service: user accounts over gRPC, stored in SQLite (the
//! embedded default) or PostgreSQL.
//!
//! Laid out like a Kratos service: [`api`] is generated from
//! `proto/shop/user/v1/user.proto`, [`service`] adapts gRPC to the domain,
//! [`biz`] holds the rules (validation, paging, concurrency), [`data`] the
//! repository over sqlx.
//!
//! It is a [`trellis::service::Service`]: [`trellis::service::bind`] gives
//! it its REST face, validation, the default server stack, health,
//! `/metrics` and `/debug/config`; `trellis up` and `trellis serve user`
//! run it through the same path.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use shop_user::{UserService, UserSettings};
//! use trellis::{App, config::Config, service::bind, transport::ServerConfig};
//!
//! let config = Config::<UserSettings>::builder().file("user.toml").env("TRELLIS").build().await?;
//! let service = bind::<UserService>(config, "./.trellis".as_ref(), ServerConfig::default()).await?;
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
pub mod cached;
pub mod data;
pub mod notify;
pub mod service;

use serde::{Deserialize, Serialize};
use trellis::{
    config::{Invalid, Validate},
    core::BoxError,
    service::{Context, Service},
    settings::{LogSettings, OtlpSettings, ServerSettings},
    transport::GrpcHttpServerBuilder,
};

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
    pub database: trellis_store::DatabaseSettings,
    /// GetUser's two-level cache (`cache.redis` shares it across
    /// instances and broadcasts invalidations).
    pub cache: trellis_cache::CacheSettings,
    /// The event bus the notifications are read from (default: the
    /// embedded log).
    pub events: trellis_events::EventsSettings,
}

impl Validate for UserSettings {
    fn validate(&self) -> Result<(), Invalid> {
        trellis::service::check_common(&self.server, &self.otlp)?;
        self.database.validate("database")?;
        self.cache.validate("cache")?;
        self.events.validate("events")?;
        Ok(())
    }
}

trellis::service_settings!(UserSettings);

/// The service's name: in the registry, on its spans and log lines.
pub const SERVICE: &str = "user";

/// The user service: its store and its notifications consumer, while it
/// runs.
pub struct UserService {
    store: data::SqlUserRepo,
    notifications: tokio::task::JoinHandle<()>,
}

impl Service for UserService {
    type Settings = UserSettings;
    const NAME: &'static str = SERVICE;
    const PORT_OFFSET: u16 = 2;
    const DESCRIPTORS: &'static [u8] = api::FILE_DESCRIPTOR_SET;
    const GRPC_SERVICES: &'static [&'static str] = &["shop.user.v1.UserService"];
    const IDEMPOTENT: &'static [&'static str] = &["/shop.user.v1.UserService/CreateUser"];

    /// Opens (and migrates) the store — `database.url`, or SQLite in the
    /// data dir —, starts the notifications consumer on the bus and adds
    /// the gRPC service.
    async fn build(
        ctx: Context<'_, UserSettings>,
        server: GrpcHttpServerBuilder,
    ) -> Result<(UserService, GrpcHttpServerBuilder), BoxError> {
        let store =
            data::SqlUserRepo::open(&ctx.settings.database, &ctx.data_dir.join("user.db")).await?;
        let cache = match ctx.settings.cache.enabled {
            true => Some(trellis_cache::Cache::new(SERVICE, &ctx.settings.cache).await?),
            false => None,
        };
        let bus = trellis_events::Bus::connect(&ctx.settings.events, ctx.data_dir).await?;
        let notifications = tokio::spawn(notify::run(store.pool().clone(), bus));
        let repo = cached::CachedRepo::new(store.clone(), cache);
        let handler = service::UserServiceHandler::new(biz::Users::new(repo))
            .with_notifications(store.pool().clone());
        let server = server.grpc_service(api::v1::user_service_server::UserServiceServer::new(
            handler,
        ));
        Ok((
            UserService {
                store,
                notifications,
            },
            server,
        ))
    }

    /// Stops the consumer and closes the store.
    async fn stop(self) {
        self.notifications.abort();
        self.store.close().await;
    }
}
