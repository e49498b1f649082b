//! Consistent hashing on a ring with virtual nodes.
//!
//! Each endpoint owns `replicas × weight / 100` points on a 64-bit ring; a
//! key goes to the first point at or after its hash. When an endpoint joins
//! or leaves, only the keys on its arcs move: about 1/n of them.

use std::sync::{Arc, PoisonError, RwLock};

use crate::{Balancer, Endpoint, hash::hash_key, rng};

/// Consistent hashing by request key; requests without a key go to a random endpoint.
#[derive(Debug)]
pub struct ConsistentHash {
    replicas: u32,
    ring: RwLock<Vec<(u64, Arc<Endpoint>)>>,
}

impl Default for ConsistentHash {
    fn default() -> Self {
        Self::new(160)
    }
}

impl ConsistentHash {
    /// A ring with `replicas` virtual nodes per endpoint of weight 100
    /// (clamped into 1..=1000, so an endpoint has at most 100 000 points).
    pub fn new(replicas: u32) -> Self {
        ConsistentHash {
            replicas: replicas.clamp(1, 1000),
            ring: RwLock::new(Vec::new()),
        }
    }
}

impl Balancer for ConsistentHash {
    fn name(&self) -> &'static str {
        "consistent_hash"
    }

    fn rebuild(&self, endpoints: &[Arc<Endpoint>]) {
        let mut ring = Vec::new();
        for e in endpoints {
            let points = (u64::from(self.replicas) * u64::from(e.weight()) / 100).max(1);
            for i in 0..points {
                ring.push((
                    hash_key(format!("{}#{i}", e.address()).as_bytes()),
                    e.clone(),
                ));
            }
        }
        ring.sort_unstable_by_key(|(h, _)| *h);
        *self.ring.write().unwrap_or_else(PoisonError::into_inner) = ring;
    }

    fn pick(&self, endpoints: &[Arc<Endpoint>], key: Option<u64>) -> Option<usize> {
        if endpoints.is_empty() {
            return None;
        }
        let Some(key) = key else {
            return Some(rng::below(endpoints.len()));
        };
        let ring = self.ring.read().unwrap_or_else(PoisonError::into_inner);
        if ring.is_empty() {
            return Some((key % endpoints.len() as u64) as usize);
        }
        let start = ring.partition_point(|(h, _)| *h < key);
        // Walk clockwise to the first point whose endpoint is eligible (it
        // may be ejected or in another zone).
        for step in 0..ring.len() {
            let (_, owner) = &ring[(start + step) % ring.len()];
            if let Some(i) = endpoints.iter().position(|e| Arc::ptr_eq(e, owner)) {
                return Some(i);
            }
        }
        Some((key % endpoints.len() as u64) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_points_are_bounded_whatever_the_weight() {
        let ring = ConsistentHash::new(u32::MAX);
        let endpoints = [Arc::new(Endpoint::new("a", "127.0.0.1:1", u32::MAX, ""))];
        ring.rebuild(&endpoints);
        let points = ring.ring.read().unwrap().len();
        assert_eq!(points, 1000 * crate::endpoint::MAX_WEIGHT as usize / 100);
    }
}
