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
//! A balancer prepares each endpoint set once ([`PickSet`]: the ring, the
//! weighted schedule, per-thread counters), so a pick takes no lock and
//! costs tens of nanoseconds with every core picking.
//!
//! [`Balanced`] puts it together over any endpoint service: it follows a
//! service through [`trellis_registry::Discovery`], makes one service per
//! endpoint with a connector you give it (a tonic channel, an HTTP client
//! aimed at the endpoint — this crate knows no transport), filters by zone
//! (preferred) and version/metadata (required), ejects endpoints that keep
//! failing by what their responses say, trailers included
//! ([`OutlierDetection`]), and is itself a tower service.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use trellis_balance::{BalanceConfig, Balanced, Endpoint};
//!
//! // Any service per endpoint; here a stand-in that answers 204 itself.
//! let registry = trellis_registry::connect("memory://").await?;
//! let pool = Balanced::discover(registry.as_ref(), "user", BalanceConfig::default(), |e: &Endpoint| {
//!     let address = e.address().to_owned();
//!     Ok(tower::service_fn(move |_: http::Request<String>| {
//!         let _ = &address;
//!         std::future::ready(Ok::<_, std::convert::Infallible>(
//!             http::Response::builder().status(204).body(String::new()).unwrap(),
//!         ))
//!     }))
//! })
//! .await?;
//! # let _ = pool; Ok(()) }
//! ```

#![warn(missing_docs)]

mod balancer;
mod endpoint;
mod hash;
mod outlier;
mod pool;
mod rng;

pub use balancer::{
    Balancer, ConsistentHash, LeastRequest, MAX_RING_POINTS, MAX_SCHEDULE, P2cEwma, PickSet,
    Picker, RandomPick, RoundRobin, SmoothWeightedRoundRobin,
};
pub use endpoint::{Endpoint, MAX_WEIGHT, now_ns};
pub use hash::hash_key;
pub use outlier::OutlierDetection;
pub use pool::{
    AvoidEndpoint, BalanceConfig, BalanceError, Balanced, BalancedBody, Connect, EndpointFailed,
    Filter, Outcome, Policy,
};
