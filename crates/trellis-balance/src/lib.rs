//! Client-side load balancing over discovered endpoints.
//!
//! A [`Balancer`] picks one of a set of [`Endpoint`]s, each carrying live
//! statistics (requests in flight, a peak-EWMA of latency, consecutive
//! failures). The algorithms:
//!
//! | balancer | picks | good for |
//! |---|---|---|
//! | [`P2cEwma`] (default) | the cheaper of two random endpoints, cost = latency EWMA × (in flight + 1) | uneven or changing backends |
//! | [`RoundRobin`] | each endpoint in turn | identical backends |
//! | [`SmoothWeightedRoundRobin`] | nginx's smooth weighted round robin: exact proportions, interleaved | weighted fleets |
//! | [`LeastRequest`] | the one of two random endpoints with fewer requests in flight (per weight) | long or uneven requests |
//! | [`ConsistentHash`] | by a key (header or metadata), a ring with virtual nodes | affinity, caches |
//! | [`RandomPick`] | uniformly at random | baselines |
//!
//! [`BalancedChannel`] puts it together for tonic: it follows a service
//! through [`trellis_registry::Discovery`], keeps a lazily-connected channel
//! per endpoint, filters by zone (preferred) and version/metadata
//! (required), ejects endpoints that keep failing ([`OutlierDetection`]),
//! and is itself a tower service usable by any generated client.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use trellis_balance::{BalanceConfig, BalancedChannel};
//!
//! let registry = trellis_registry::connect("memory://").await?;
//! let channel = BalancedChannel::discover(registry.as_ref(), "user", BalanceConfig::default()).await?;
//! // let mut users = UserServiceClient::new(channel);
//! # let _ = channel; Ok(()) }
//! ```

#![warn(missing_docs)]

mod balancer;
mod channel;
mod endpoint;
mod hash;
mod outlier;
mod rng;

pub use balancer::{
    Balancer, ConsistentHash, LeastRequest, P2cEwma, RandomPick, RoundRobin,
    SmoothWeightedRoundRobin,
};
pub use channel::{BalanceConfig, BalanceError, BalancedChannel, Filter, Policy};
pub use endpoint::{Endpoint, MAX_WEIGHT};
pub use hash::hash_key;
pub use outlier::OutlierDetection;
