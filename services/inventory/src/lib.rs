//! The shop's inventory service: products and their stock, over gRPC and
//! REST, in SQLite (the embedded default) or PostgreSQL.
//!
//! Laid out like the other shop services: [`api`] is generated from
//! `proto/shop/inventory/v1/inventory.proto`, [`service`] adapts gRPC to
//! the domain, [`biz`] holds the rules, [`data`] the store. Stock moves
//! only in the checkout saga's branches (`StockBranches`: Reserve, Release,
//! Commit), each run once per saga behind `trellis_saga::barrier`.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use shop_inventory::{InventoryService, InventorySettings};
//! use trellis::{App, config::Config, service::bind, transport::ServerConfig};
//!
//! let config = Config::<InventorySettings>::builder().file("inventory.toml").build().await?;
//! let service = bind::<InventoryService>(config, "./.trellis".as_ref(), ServerConfig::default()).await?;
//! service.into_app(App::builder("inventory")).run().await?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod api;
pub mod biz;
pub mod data;
pub mod service;

use serde::{Deserialize, Serialize};
use trellis::{
    config::{Invalid, Validate},
    core::BoxError,
    service::{Context, Service},
    settings::{LogSettings, OtlpSettings, ServerSettings},
    transport::GrpcHttpServerBuilder,
};

/// The inventory's configuration (`inventory.toml`, `TRELLIS_*`, etcd).
///
/// ```toml
/// [database]
/// url = "postgres://inventory:${DB_PASSWORD}@db:5432/shop"   # default: SQLite in the data dir
///
/// [[seed]]                # the catalogue of a new shop (used while no product exists)
/// sku = "tea"
/// name = "Green tea"
/// price_cents = 450
/// stock = 100
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct InventorySettings {
    /// Server limits and timeouts.
    pub server: ServerSettings,
    /// Logging.
    pub log: LogSettings,
    /// OTLP export of traces, metrics and logs; trace sampling.
    pub otlp: OtlpSettings,
    /// Where products are stored.
    pub database: trellis_store::DatabaseSettings,
    /// Products added when the store has none. Default: three teas and
    /// tea things, for `trellis up`.
    pub seed: Vec<SeedProduct>,
    /// The event bus its outbox publishes to (default: the embedded log).
    pub events: trellis_events::EventsSettings,
}

/// A product of the seed catalogue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedProduct {
    /// Its SKU (`[a-z0-9_-]`).
    pub sku: String,
    /// Its name.
    pub name: String,
    /// Price per unit, in cents.
    pub price_cents: i64,
    /// Units in stock.
    pub stock: i64,
}

impl Default for InventorySettings {
    fn default() -> Self {
        let seed = |sku: &str, name: &str, price_cents, stock| SeedProduct {
            sku: sku.into(),
            name: name.into(),
            price_cents,
            stock,
        };
        InventorySettings {
            server: ServerSettings::default(),
            log: LogSettings::default(),
            otlp: OtlpSettings::default(),
            database: Default::default(),
            events: Default::default(),
            seed: vec![
                seed("tea", "Green tea, 100 g", 450, 100),
                seed("cups", "Set of four cups", 2400, 50),
                seed("teapot", "Cast-iron teapot", 8900, 10),
            ],
        }
    }
}

impl Validate for InventorySettings {
    fn validate(&self) -> Result<(), Invalid> {
        trellis::service::check_common(&self.server, &self.otlp)?;
        self.database.validate("database")?;
        self.events.validate("events")?;
        for (i, p) in self.seed.iter().enumerate() {
            if !biz::valid_sku(&p.sku) {
                return Err(Invalid::new(
                    format!("seed[{i}].sku"),
                    "1 to 64 of [a-z0-9_-]",
                ));
            }
            if p.price_cents < 0 || p.stock < 0 {
                return Err(Invalid::new(
                    format!("seed[{i}]"),
                    "price_cents and stock must not be negative",
                ));
            }
        }
        Ok(())
    }
}

trellis::service_settings!(InventorySettings);

/// The service's name: in the registry, on spans and log lines.
pub const SERVICE: &str = "inventory";

/// The inventory service: its store and outbox, open while it runs.
pub struct InventoryService {
    store: data::Inventory,
    outbox: trellis_events::outbox::Outbox,
}

impl Service for InventoryService {
    type Settings = InventorySettings;
    const NAME: &'static str = SERVICE;
    const PORT_OFFSET: u16 = 5;
    const DESCRIPTORS: &'static [u8] = api::FILE_DESCRIPTOR_SET;
    // The saga branches (`StockBranches`) are served, not routed: the
    // gateway publishes only these.
    const GRPC_SERVICES: &'static [&'static str] = &["shop.inventory.v1.InventoryService"];

    /// Opens (and migrates) the store, adds the seed catalogue to an empty
    /// one, and adds both gRPC services.
    async fn build(
        ctx: Context<'_, InventorySettings>,
        server: GrpcHttpServerBuilder,
    ) -> Result<(InventoryService, GrpcHttpServerBuilder), BoxError> {
        let store =
            data::Inventory::open(&ctx.settings.database, &ctx.data_dir.join("inventory.db"))
                .await?;
        let seed: Vec<biz::Product> = ctx
            .settings
            .seed
            .iter()
            .map(|p| biz::Product {
                sku: p.sku.clone(),
                name: p.name.clone(),
                price_cents: p.price_cents,
                stock: p.stock,
            })
            .collect();
        store.seed(&seed).await?;
        let outbox =
            trellis_events::outbox::Outbox::start(store.pool(), &ctx.settings.events, ctx.data_dir)
                .await?;
        let handler = service::InventoryHandler::new(store.clone());
        let server = server
            .grpc_service(
                api::v1::inventory_service_server::InventoryServiceServer::new(handler.clone()),
            )
            .grpc_service(api::v1::stock_branches_server::StockBranchesServer::new(
                handler,
            ));
        Ok((InventoryService { store, outbox }, server))
    }

    /// Stops the relay and closes the store.
    async fn stop(self) {
        self.outbox.stop();
        self.store.close().await;
    }
}
