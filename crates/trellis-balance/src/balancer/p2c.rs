//! Power of two choices over peak-EWMA latency × requests in flight.
//!
//! Two random endpoints, keep the cheaper: nearly as good as comparing all
//! of them, O(1), and no herd effect (go-zero, linkerd and Finagle use the
//! same scheme).

use std::sync::Arc;

use super::{Balancer, Picker, two_eligible};
use crate::Endpoint;

/// The cheaper of two random endpoints, cost = latency EWMA × (in flight + 1).
#[derive(Debug, Default, Clone, Copy)]
pub struct P2cEwma;

impl Balancer for P2cEwma {
    fn name(&self) -> &'static str {
        "p2c_ewma"
    }

    fn prepare(&self, _endpoints: &[Arc<Endpoint>]) -> Box<dyn Picker> {
        Box::new(P2cEwma)
    }
}

impl Picker for P2cEwma {
    fn pick(&self, endpoints: &[Arc<Endpoint>], _key: Option<u64>, now: u64) -> Option<usize> {
        match two_eligible(endpoints, now)? {
            (a, None) => Some(a),
            (a, Some(b)) => {
                // Weight divides cost so that a heavier endpoint looks cheaper.
                let cost = |i: usize| endpoints[i].cost() / f64::from(endpoints[i].weight());
                Some(if cost(a) <= cost(b) { a } else { b })
            }
        }
    }
}
