//! Resilience as tower layers, usable on clients and servers, in Trellis'
//! own stacks and in plain axum or tonic ones.
//!
//! | layer | what it does |
//! |---|---|
//! | [`DeadlineLayer`] | sends the smaller of its own timeout and what is left of the inbound request's deadline downstream (`grpc-timeout` / `x-request-timeout-ms`), fails fast once nothing is left, and enforces it locally |
//! | [`RateLimitLayer`] | GCRA per route and per key (client IP, header): [`LocalLimiter`] in process, bounded memory; [`RedisLimiter`] shared by all instances (feature `redis`) with a fallback when Redis is down; 429 + `Retry-After` / RESOURCE_EXHAUSTED + `grpc-retry-pushback-ms` |
//! | [`RetryLayer`] | retries what is safe to retry (connect errors, UNAVAILABLE, RESOURCE_EXHAUSTED with pushback, 502–504 on idempotent HTTP) with fixed, exponential or jittered backoff, within the caller's deadline and a [`RetryBudget`] |
//! | [`ConcurrencyLimitLayer`] | sheds requests above a concurrency limit with 503 / UNAVAILABLE: fixed (a bulkhead per dependency) or adaptive (Vegas) |
//! | [`DelayShedLayer`] | sheds while the standing queueing delay (min latency over 100 ms minus the no-load latency) exceeds a target, down to the in-flight Little's law allows; leaves a merely busy service alone (on by default) |
//! | [`CpuShedLayer`] | when the CPU is hot, sheds requests beyond what the service has shown it completes (max throughput × min latency), as Kratos' BBR does |
//! | [`CircuitBreakerLayer`] | fails fast while the downstream is failing: a classic Closed/Open/HalfOpen breaker over a time window ([`Breaker`]), or Google SRE adaptive throttling ([`SreBreaker`]) |
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use tower::ServiceBuilder;
//! use trellis_resilience::{Breaker, BreakerConfig, CircuitBreakerLayer, DeadlineLayer};
//!
//! let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:8082").connect_lazy();
//! let stack = ServiceBuilder::new()
//!     .layer(DeadlineLayer::new(Some(Duration::from_secs(2))))
//!     .layer(CircuitBreakerLayer::new(Breaker::new(BreakerConfig::default())))
//!     .service(channel);
//! // let mut users = UserServiceClient::new(stack);
//! # let _ = stack; Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod breaker;
mod clock;
pub mod codel;
pub mod concurrency;
pub mod cpu_shed;
pub mod deadline;
pub mod rate_limit;
#[cfg(feature = "redis")]
pub mod redis_limit;
mod reject;
pub mod retry;
mod rng;

pub use breaker::{
    Breaker, BreakerConfig, BreakerPolicy, BreakerState, CircuitBreaker, CircuitBreakerLayer,
    Outcome, Permit, SreBreaker, SreConfig, Trip,
};
pub use clock::Clock;
pub use codel::{DelayAdmitted, DelayShedder, DelayState};
pub use concurrency::{
    Admission, Admitted, ConcurrencyLimit, ConcurrencyLimitLayer, CpuShedLayer, DelayShedLayer,
    Held, LimitKind, Shed, ShedFuture, ShedLayer,
};
pub use cpu_shed::{CpuAdmitted, CpuShedder, CpuSource, ProcessCpu};
pub use deadline::{Deadline, DeadlineLayer};
pub use rate_limit::{
    Decision, KeyBy, Limiter, LocalLimiter, PeerAddr, Quota, RateLimit, RateLimitLayer,
};
#[cfg(feature = "redis")]
pub use redis_limit::{RedisFallback, RedisLimiter, redis_client, redis_connection};
pub use retry::{Backoff, Retry, RetryBudget, RetryLayer, RetryPolicy};
pub use trellis_core::future::EitherFuture;

/// The error type of Trellis' layers: boxed, with a `tonic::Status` inside
/// for rejections, so generated clients report the right code.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
