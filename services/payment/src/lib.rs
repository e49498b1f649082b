//! The shop's payment service: customer accounts and their balances, over
//! gRPC and REST, in SQLite (the embedded default) or PostgreSQL.
//!
//! Laid out like the other shop services: [`api`] is generated from
//! `proto/shop/payment/v1/payment.proto`, [`service`] adapts gRPC to the
//! domain, [`biz`] holds the rules, [`ledger`] the event-sourced account,
//! [`data`] the store. Balances move only in the checkout saga's branches
//! (`PaymentBranches`: Charge, Refund), each run once per saga behind
//! `trellis_saga::barrier`, or in a direct Charge, once per order.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use shop_payment::{PaymentService, PaymentSettings};
//! use trellis::{App, config::Config, service::bind, transport::ServerConfig};
//!
//! let config = Config::<PaymentSettings>::builder().file("payment.toml").build().await?;
//! let service = bind::<PaymentService>(config, "./.trellis".as_ref(), ServerConfig::default()).await?;
//! service.into_app(App::builder("payment")).run().await?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod api;
pub mod biz;
pub mod data;
pub mod ledger;
pub mod service;

use serde::{Deserialize, Serialize};
use trellis::{
    config::{Invalid, Validate},
    core::BoxError,
    service::{Context, Service},
    settings::{LogSettings, OtlpSettings, ServerSettings},
    transport::GrpcHttpServerBuilder,
};

/// The payment service's configuration (`payment.toml`, `TRELLIS_*`, etcd).
///
/// ```toml
/// opening_balance_cents = 10000   # what a new account starts with
///
/// [database]
/// url = "postgres://payment:${DB_PASSWORD}@db:5432/shop"   # default: SQLite in the data dir
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PaymentSettings {
    /// Server limits and timeouts.
    pub server: ServerSettings,
    /// Logging.
    pub log: LogSettings,
    /// OTLP export of traces, metrics and logs; trace sampling.
    pub otlp: OtlpSettings,
    /// Where accounts are stored.
    pub database: trellis_store::DatabaseSettings,
    /// What an account starts with when it is first used, in cents (the
    /// shop's seed funds). Default 10000.
    pub opening_balance_cents: i64,
    /// The event bus its outbox publishes to (default: the embedded log).
    pub events: trellis_events::EventsSettings,
}

impl Default for PaymentSettings {
    fn default() -> Self {
        PaymentSettings {
            server: ServerSettings::default(),
            log: LogSettings::default(),
            otlp: OtlpSettings::default(),
            database: Default::default(),
            opening_balance_cents: 10_000,
            events: Default::default(),
        }
    }
}

impl Validate for PaymentSettings {
    fn validate(&self) -> Result<(), Invalid> {
        trellis::service::check_common(&self.server, &self.otlp)?;
        self.database.validate("database")?;
        self.events.validate("events")?;
        if !(0..=biz::MAX_AMOUNT_CENTS).contains(&self.opening_balance_cents) {
            return Err(Invalid::new(
                "opening_balance_cents",
                format!("0 to {}", biz::MAX_AMOUNT_CENTS),
            ));
        }
        Ok(())
    }
}

trellis::service_settings!(PaymentSettings);

/// The service's name: in the registry, on spans and log lines.
pub const SERVICE: &str = "payment";

/// The payment service: its store and outbox, open while it runs.
pub struct PaymentService {
    store: data::Payments,
    outbox: trellis_events::outbox::Outbox,
}

impl Service for PaymentService {
    type Settings = PaymentSettings;
    const NAME: &'static str = SERVICE;
    const PORT_OFFSET: u16 = 6;
    const DESCRIPTORS: &'static [u8] = api::FILE_DESCRIPTOR_SET;
    // The saga branches (`PaymentBranches`) are served, not routed: the
    // gateway publishes only these.
    const GRPC_SERVICES: &'static [&'static str] = &["shop.payment.v1.PaymentService"];
    const IDEMPOTENT: &'static [&'static str] = &["/shop.payment.v1.PaymentBranches/Charge"];

    /// Opens (and migrates) the store and adds both gRPC services.
    async fn build(
        ctx: Context<'_, PaymentSettings>,
        server: GrpcHttpServerBuilder,
    ) -> Result<(PaymentService, GrpcHttpServerBuilder), BoxError> {
        let store = data::Payments::open(
            &ctx.settings.database,
            &ctx.data_dir.join("payment.db"),
            ctx.settings.opening_balance_cents,
        )
        .await?;
        let outbox =
            trellis_events::outbox::Outbox::start(store.pool(), &ctx.settings.events, ctx.data_dir)
                .await?;
        let handler = service::PaymentHandler::new(store.clone());
        let server = server
            .grpc_service(api::v1::payment_service_server::PaymentServiceServer::new(
                handler.clone(),
            ))
            .grpc_service(api::v1::payment_branches_server::PaymentBranchesServer::new(handler));
        Ok((PaymentService { store, outbox }, server))
    }

    /// Stops the relay and closes the store.
    async fn stop(self) {
        self.outbox.stop();
        self.store.close().await;
    }
}
