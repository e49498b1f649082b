//! The shop's order service: places orders and checks each out with a saga
//! across inventory and payment, over gRPC and REST, in SQLite (the
//! embedded default) or PostgreSQL; publishes its events through a
//! transactional outbox and keeps every order's history, a projection of
//! the shop's events ([`history`]).
//!
//! Laid out like the other shop services: [`api`] is generated from
//! `proto/shop/order/v1/order.proto`, [`service`] adapts gRPC to the
//! domain, [`biz`] holds the rules and the checkout saga, [`data`] the
//! store. `CreateOrder` prices the lines from the inventory, records the
//! order PENDING and submits its saga to the coordinator (`saga`, found
//! through the registry) with `trellis_saga::client`; the saga's branches
//! on the order (`OrderBranches`) confirm it or fail it with the reason.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use shop_order::{OrderService, OrderSettings};
//! use trellis::{App, config::Config, service::bind_with, transport::ServerConfig};
//!
//! let registry = trellis::registry::connect("memory://").await?;
//! let config = Config::<OrderSettings>::builder().file("order.toml").build().await?;
//! let service = bind_with::<OrderService>(config, "./.trellis".as_ref(), ServerConfig::default(), Some(&registry)).await?;
//! service.into_app(App::builder("order").registry(registry)).run().await?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod api;
pub mod biz;
pub mod data;
pub mod history;
pub mod service;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use trellis::{
    config::{Invalid, Validate},
    core::BoxError,
    service::{Context, Service},
    settings::{ClientSettings, LogSettings, OtlpSettings, ServerSettings},
    transport::GrpcHttpServerBuilder,
};

/// The order service's configuration (`order.toml`, `TRELLIS_*`, etcd).
///
/// ```toml
/// checkout_timeout = "60s"   # a checkout's steps may keep failing retryably this long
/// resubmit_after = "10s"     # sagas whose submit failed are submitted again after this
///
/// [database]
/// url = "postgres://order:${DB_PASSWORD}@db:5432/shop"   # default: SQLite in the data dir
///
/// locks = "memory://"          # the resubmit sweep's lock: redis://, etcd://, redlock://
///
/// [client]                   # to inventory and the saga coordinator
/// timeout = "5s"
///
/// [events]                   # the outbox's bus, the order history's source
/// url = "nats://nats:4222"   # default: the embedded log in the data dir
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OrderSettings {
    /// Server limits and timeouts.
    pub server: ServerSettings,
    /// Logging.
    pub log: LogSettings,
    /// OTLP export of traces, metrics and logs; trace sampling.
    pub otlp: OtlpSettings,
    /// Where orders are stored.
    pub database: trellis_store::DatabaseSettings,
    /// The checkout saga's `timeout_to_fail`. Default 60s.
    #[serde(with = "trellis::config::duration")]
    pub checkout_timeout: Duration,
    /// Orders whose saga could not be submitted are submitted again once
    /// this old (checked as often). Default 10s.
    #[serde(with = "trellis::config::duration")]
    pub resubmit_after: Duration,
    /// The client to inventory and to the coordinator: timeout, retries,
    /// breaker, balancer, TLS.
    pub client: ClientSettings,
    /// Where the resubmit sweep's lock lives: `memory://` (one process;
    /// the default), `redis://…`, `redlock://h1,h2,h3`, `etcd://…`
    /// (`trellis up/serve --redis` or `--registry etcd://` set it).
    pub locks: trellis::core::Secret<String>,
    /// The event bus: its outbox publishes to it, the order history is
    /// fed from it (default: the embedded log in the data dir).
    pub events: trellis_events::EventsSettings,
}

impl Default for OrderSettings {
    fn default() -> Self {
        OrderSettings {
            server: ServerSettings::default(),
            log: LogSettings::default(),
            otlp: OtlpSettings::default(),
            database: Default::default(),
            checkout_timeout: Duration::from_secs(60),
            resubmit_after: Duration::from_secs(10),
            client: ClientSettings::default(),
            locks: trellis::core::Secret::new("memory://".into()),
            events: Default::default(),
        }
    }
}

impl Validate for OrderSettings {
    fn validate(&self) -> Result<(), Invalid> {
        trellis::service::check_common(&self.server, &self.otlp)?;
        self.database.validate("database")?;
        self.events.validate("events")?;
        self.client.validate("client")?;
        let within = Invalid::check_range::<Duration>;
        within(
            "checkout_timeout",
            self.checkout_timeout,
            Duration::from_millis(100),
            trellis_saga::service::MAX_TIMEOUT_TO_FAIL,
        )?;
        within(
            "resubmit_after",
            self.resubmit_after,
            Duration::from_millis(100),
            Duration::from_secs(3600),
        )
    }
}

trellis::service_settings!(OrderSettings);

/// The service's name: in the registry, on spans and log lines.
pub const SERVICE: &str = "order";

/// The lock the resubmit sweep holds (one instance sweeps at a time).
pub const RESUBMIT_LOCK: &str = "order:resubmit";

/// The order service: its store, outbox, and the resubmitting and
/// history tasks, while it runs.
pub struct OrderService {
    store: data::Orders,
    outbox: trellis_events::outbox::Outbox,
    resubmitting: tokio::task::JoinHandle<()>,
    history: tokio::task::JoinHandle<()>,
}

impl Service for OrderService {
    type Settings = OrderSettings;
    const NAME: &'static str = SERVICE;
    const PORT_OFFSET: u16 = 4;
    const DESCRIPTORS: &'static [u8] = api::FILE_DESCRIPTOR_SET;
    // The saga branches (`OrderBranches`) are served, not routed: the
    // gateway publishes only these.
    const GRPC_SERVICES: &'static [&'static str] = &["shop.order.v1.OrderService"];
    const IDEMPOTENT: &'static [&'static str] = &["/shop.order.v1.OrderService/CreateOrder"];

    /// Opens (and migrates) the store, follows inventory and the
    /// coordinator through the registry, and adds both gRPC services.
    async fn build(
        ctx: Context<'_, OrderSettings>,
        server: GrpcHttpServerBuilder,
    ) -> Result<(OrderService, GrpcHttpServerBuilder), BoxError> {
        let settings = ctx.settings;
        let discovery = ctx
            .discovery
            .ok_or("the order service finds inventory and the saga coordinator through a registry; none was given")?;
        let store = data::Orders::open(&settings.database, &ctx.data_dir.join("order.db")).await?;
        let outbox =
            trellis_events::outbox::Outbox::start(store.pool(), &settings.events, ctx.data_dir)
                .await?;
        let history = tokio::spawn({
            let (pool, bus) = (store.pool().clone(), outbox.bus().clone());
            async move {
                trellis_events::projection::run(
                    &pool,
                    &bus,
                    &history::OrderHistory,
                    std::future::pending(),
                )
                .await
            }
        });
        let inventory = trellis::resilient_client_with(
            discovery.as_ref(),
            shop_inventory::SERVICE,
            &settings.client,
        )
        .await?;
        let saga = trellis::resilient_client_with(
            discovery.as_ref(),
            trellis_saga::service::SERVICE,
            &settings.client,
        )
        .await?;
        let handler =
            service::OrderHandler::new(store.clone(), inventory, saga, settings.checkout_timeout);
        let every = settings.resubmit_after;
        let sweeper = handler.clone();
        let locks = trellis_lock::connect(
            settings.locks.expose(),
            "shop:",
            trellis_lock::LockConfig::default(),
        )
        .await
        .map_err(|e| format!("locks: {e}"))?;
        let resubmitting = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // One instance sweeps; the others find the lock taken.
                let guard = match locks.try_lock(RESUBMIT_LOCK).await {
                    Ok(Some(guard)) => guard,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::debug!(error = %e, "resubmit sweep skipped: locks unavailable");
                        continue;
                    }
                };
                match sweeper.resubmit(every, &guard).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(orders = n, "checkout sagas submitted late"),
                    Err(e) => {
                        tracing::debug!(error = %e.message(), "checkout sagas still not submitted")
                    }
                }
                if let Err(e) = guard.release().await {
                    tracing::debug!(error = %e, "resubmit lock not released: it expires");
                }
            }
        });
        let server = server
            .grpc_service(api::v1::order_service_server::OrderServiceServer::new(
                handler.clone(),
            ))
            .grpc_service(api::v1::order_branches_server::OrderBranchesServer::new(
                handler,
            ));
        Ok((
            OrderService {
                store,
                outbox,
                resubmitting,
                history,
            },
            server,
        ))
    }

    /// Stops resubmitting, relaying and projecting, and closes the store.
    async fn stop(self) {
        self.resubmitting.abort();
        self.history.abort();
        self.outbox.stop();
        self.store.close().await;
    }
}
