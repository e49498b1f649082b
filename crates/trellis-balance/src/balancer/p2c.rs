//! Power of two choices over peak-EWMA latency × requests in flight.
//!
//! Two random endpoints, keep the cheaper: nearly as good as comparing all
//! of them, O(1), and no herd effect (go-zero, linkerd and Finagle use the
//! same scheme).

use std::sync::Arc;

use crate::{Balancer, Endpoint, rng};

/// The cheaper of two random endpoints, cost = latency EWMA × (in flight + 1).
#[derive(Debug, Default)]
pub struct P2cEwma;

impl Balancer for P2cEwma {
    fn name(&self) -> &'static str {
        "p2c_ewma"
    }

    fn pick(&self, endpoints: &[Arc<Endpoint>], _key: Option<u64>) -> Option<usize> {
        match endpoints.len() {
            0 => None,
            1 => Some(0),
            n => {
                let (a, b) = rng::two_below(n);
                // Weight divides cost so that a heavier endpoint looks cheaper.
                let cost = |i: usize| endpoints[i].cost() / f64::from(endpoints[i].weight());
                Some(if cost(a) <= cost(b) { a } else { b })
            }
        }
    }
}
