//! Uniform random choice.

use std::sync::Arc;

use super::{Balancer, Picker, random_eligible};
use crate::Endpoint;

/// Uniformly at random; the baseline the others are compared with.
#[derive(Debug, Default, Clone, Copy)]
pub struct RandomPick;

impl Balancer for RandomPick {
    fn name(&self) -> &'static str {
        "random"
    }

    fn prepare(&self, _endpoints: &[Arc<Endpoint>]) -> Box<dyn Picker> {
        Box::new(RandomPick)
    }
}

impl Picker for RandomPick {
    fn pick(&self, endpoints: &[Arc<Endpoint>], _key: Option<u64>, now: u64) -> Option<usize> {
        random_eligible(endpoints, now, None)
    }
}
