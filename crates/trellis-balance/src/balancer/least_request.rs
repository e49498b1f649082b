//! Least request: of two random endpoints, the one with fewer requests in
//! flight per unit of weight (Envoy's default least-request choice count).

use std::sync::Arc;

use super::{Balancer, Picker, two_eligible};
use crate::Endpoint;

/// Fewer requests in flight (per weight) of two random endpoints.
#[derive(Debug, Default, Clone, Copy)]
pub struct LeastRequest;

impl Balancer for LeastRequest {
    fn name(&self) -> &'static str {
        "least_request"
    }

    fn prepare(&self, _endpoints: &[Arc<Endpoint>]) -> Box<dyn Picker> {
        Box::new(LeastRequest)
    }
}

impl Picker for LeastRequest {
    fn pick(&self, endpoints: &[Arc<Endpoint>], _key: Option<u64>, now: u64) -> Option<usize> {
        match two_eligible(endpoints, now)? {
            (a, None) => Some(a),
            (a, Some(b)) => {
                let (ea, eb) = (&endpoints[a], &endpoints[b]);
                // Compare (in_flight + 1) / weight without division.
                let load_a = u64::from(ea.in_flight() + 1) * u64::from(eb.weight());
                let load_b = u64::from(eb.in_flight() + 1) * u64::from(ea.weight());
                Some(if load_a <= load_b { a } else { b })
            }
        }
    }
}
