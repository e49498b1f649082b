//! gRPC and HTTP on one port, with health, probes, limits and graceful drain.
//!
//! [`GrpcHttpServer`] accepts HTTP/1.1 and HTTP/2 (h2c) on one listener and
//! steers each request by content type: `application/grpc*` goes to the tonic
//! services, everything else to the axum router. Every server also serves:
//!
//! - `grpc.health.v1.Health` (Check and Watch), per service and for the whole
//!   server (`""`), NOT_SERVING until the instance is Ready and again from
//!   the moment it starts draining;
//! - gRPC server reflection, both `v1` and `v1alpha`;
//! - `/livez`, `/readyz` and `/startupz` with Kubernetes probe semantics, on
//!   the main port and on the optional admin port.
//!
//! Errors use [`trellis_core::Error`]: a handler returning one gives gRPC
//! clients a `Status` with details and HTTP clients a JSON body.
//!
//! ```no_run
//! use trellis_transport::{GrpcHttpServer, ServerConfig};
//! # async fn run() -> Result<(), trellis_transport::TransportError> {
//! let router = axum::Router::new().route("/hello", axum::routing::get(|| async { "hi" }));
//! let server = GrpcHttpServer::builder(ServerConfig::default())
//!     .http_router(router)
//!     // .grpc_service(MyServiceServer::new(my_service))
//!     // .file_descriptor_set(MY_FILE_DESCRIPTOR_SET)
//!     .bind()
//!     .await?;
//! println!("listening on {}", server.local_addr());
//! // Hand `server` to `trellis::App`, which runs and drains it.
//! # Ok(()) }
//! ```
//!
//! [`trellis_transcode`] gives every gRPC method a REST/JSON face from its
//! `google.api.http` annotation (and `POST /package.Service/Method`);
//! [`GrpcHttpServerBuilder::rest`] serves it on the same port.
//!
//! [`connect`] opens a client channel with connect and request timeouts;
//! discovery and load balancing build on it.

#![warn(missing_docs)]

#[cfg(feature = "dev-certs")]
pub mod certs;
mod client;
mod config;
mod error;
mod health;
pub mod serve;
mod server;
mod steer;
mod timeout;
#[cfg(feature = "tls")]
pub mod tls;

pub use client::{ClientConfig, connect, connect_lazy};
pub use config::{Limits, ServerConfig};
pub use error::TransportError;
pub use health::probe_router;
pub use server::{GrpcHttpServer, GrpcHttpServerBuilder, GrpcRoute, RouteService};
pub use steer::is_grpc;
pub use timeout::{RequestTimeout, ServerTimeout, ServerTimeoutLayer, TimeoutFuture};
