//! Uniform random choice.

use std::sync::Arc;

use crate::{Balancer, Endpoint, rng};

/// Uniformly at random; the baseline the others are compared with.
#[derive(Debug, Default)]
pub struct RandomPick;

impl Balancer for RandomPick {
    fn name(&self) -> &'static str {
        "random"
    }

    fn pick(&self, endpoints: &[Arc<Endpoint>], _key: Option<u64>) -> Option<usize> {
        (!endpoints.is_empty()).then(|| rng::below(endpoints.len()))
    }
}
