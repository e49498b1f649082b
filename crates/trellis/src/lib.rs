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
//! | `trellis-registry` | [`registry`] | registration and discovery (memory, etcd with feature `etcd`) |

#![warn(missing_docs)]

mod app;
mod signal;

pub use app::{App, AppBuilder, AppError, AppInfo};
pub use signal::{ShutdownSignal, shutdown_signal};
pub use trellis_core::{self as core, Code, Error, Lifecycle, State};
pub use trellis_registry as registry;
pub use trellis_transport as transport;
