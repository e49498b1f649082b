//! nginx's smooth weighted round robin.
//!
//! Every pick adds each endpoint's weight to its current weight, takes the
//! endpoint with the largest current weight and subtracts the total from
//! it. Over a cycle of `sum(weights)` picks each endpoint is chosen exactly
//! `weight` times, and heavy endpoints are interleaved with light ones
//! rather than picked in a burst.

use std::sync::{Arc, Mutex, PoisonError, atomic::Ordering::Relaxed};

use crate::{Balancer, Endpoint};

/// Smooth weighted round robin (exact proportions, interleaved).
#[derive(Debug, Default)]
pub struct SmoothWeightedRoundRobin {
    // The update touches every endpoint's current weight; a pick must see
    // and leave them consistent, so picks are serialised.
    lock: Mutex<()>,
}

impl SmoothWeightedRoundRobin {
    /// A new balancer; current weights live on the endpoints.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Balancer for SmoothWeightedRoundRobin {
    fn name(&self) -> &'static str {
        "smooth_weighted_round_robin"
    }

    fn rebuild(&self, endpoints: &[Arc<Endpoint>]) {
        let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        for e in endpoints {
            e.current_weight.store(0, Relaxed);
        }
    }

    fn pick(&self, endpoints: &[Arc<Endpoint>], _key: Option<u64>) -> Option<usize> {
        if endpoints.is_empty() {
            return None;
        }
        let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut total, mut best, mut best_weight) = (0i64, 0usize, i64::MIN);
        for (i, e) in endpoints.iter().enumerate() {
            let w = i64::from(e.weight());
            total += w;
            let current = e.current_weight.fetch_add(w, Relaxed) + w;
            if current > best_weight {
                best_weight = current;
                best = i;
            }
        }
        endpoints[best].current_weight.fetch_sub(total, Relaxed);
        Some(best)
    }
}
