//! The balancing algorithms. Each picks an index into a slice of endpoints;
//! the slice is whatever the caller considers eligible (zone-filtered,
//! without ejected endpoints), so algorithms stay about choice only.

mod consistent_hash;
mod least_request;
mod p2c;
mod random;
mod round_robin;
mod weighted;

use std::sync::Arc;

pub use consistent_hash::ConsistentHash;
pub use least_request::LeastRequest;
pub use p2c::P2cEwma;
pub use random::RandomPick;
pub use round_robin::RoundRobin;
pub use weighted::SmoothWeightedRoundRobin;

use crate::Endpoint;

/// A load-balancing algorithm.
pub trait Balancer: Send + Sync + 'static {
    /// A short name for logs and metrics.
    fn name(&self) -> &'static str;

    /// Called when the endpoint set changes, with the whole new set, for
    /// algorithms that precompute (the consistent-hash ring).
    fn rebuild(&self, _endpoints: &[Arc<Endpoint>]) {}

    /// Picks one of `endpoints`; `key` is the request's hash key, if any.
    /// `None` only when `endpoints` is empty.
    fn pick(&self, endpoints: &[Arc<Endpoint>], key: Option<u64>) -> Option<usize>;
}
