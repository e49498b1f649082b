//! Least request: of two random endpoints, the one with fewer requests in
//! flight per unit of weight (Envoy's default least-request choice count).

use std::sync::Arc;

use crate::{Balancer, Endpoint, rng};

/// Fewer requests in flight (per weight) of two random endpoints.
#[derive(Debug, Default)]
pub struct LeastRequest;

impl Balancer for LeastRequest {
    fn name(&self) -> &'static str {
        "least_request"
    }

    fn pick(&self, endpoints: &[Arc<Endpoint>], _key: Option<u64>) -> Option<usize> {
        match endpoints.len() {
            0 => None,
            1 => Some(0),
            n => {
                let (a, b) = rng::two_below(n);
                let (ea, eb) = (&endpoints[a], &endpoints[b]);
                // Compare (in_flight + 1) / weight without division.
                let load_a = u64::from(ea.in_flight() + 1) * u64::from(eb.weight());
                let load_b = u64::from(eb.in_flight() + 1) * u64::from(ea.weight());
                Some(if load_a <= load_b { a } else { b })
            }
        }
    }
}
