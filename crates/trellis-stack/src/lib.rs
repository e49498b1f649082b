//! Trellis' default stacks: what every service puts in front of its
//! handlers, and what every client puts in front of its upstreams — each
//! one [`tower::Layer`], written top-down in one function with a comment
//! per layer saying why it sits there, and built from typed settings (the
//! `server` and `client` sections of a service's config) or from code.
//!
//! | stack | a request passes |
//! |---|---|
//! | [`ServerStack`] | server span → RED metrics → rate limit → queueing-delay shedding → [concurrency limit] → [CPU shedding] → (the server: request timeout → handler) |
//! | [`ClientStack`] | deadline → retries (budget) → client span and metrics → circuit breaker per method → (the balancer) |
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use trellis_stack::{ServerSettings, ServerStack};
//! use trellis_transport::{GrpcHttpServer, ServerConfig};
//!
//! let settings = ServerSettings::default();
//! let stack = ServerStack::new("hello", &settings);
//! let server = GrpcHttpServer::builder(ServerConfig::default())
//!     .http_router(axum::Router::new().route("/hello", axum::routing::get(|| async { "hi" })))
//!     .layer(stack)
//!     .bind()
//!     .await?;
//! # let _ = server; Ok(()) }
//! ```

#![warn(missing_docs)]

mod client;
mod server;
mod tls;

pub use client::{
    BalancerSettings, BreakerSettings, ClientBreaker, ClientSettings, ClientStack,
    ClientStackService, RetrySettings,
};
pub use server::{
    RateLimitSettings, ServerSettings, ServerStack, ServerStackService, SheddingSettings,
};
pub use tls::{ClientTlsSettings, ServerTlsSettings};
