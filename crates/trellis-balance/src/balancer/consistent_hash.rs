//! Consistent hashing on a ring with virtual nodes.
//!
//! Each endpoint owns `replicas × weight / 100` points on a 64-bit ring; a
//! key goes to the first point at or after its hash. When an endpoint joins
//! or leaves, only the keys on its arcs move: about 1/n of them. The ring
//! is built once per endpoint set and read without a lock.

use std::sync::Arc;

use super::{Balancer, Picker, first_eligible, random_eligible};
use crate::{Endpoint, hash::hash_key};

/// The most points a ring holds (4 MiB), whatever the set: past it, every
/// endpoint's share of points is scaled down alike.
pub const MAX_RING_POINTS: u64 = 1 << 18;

/// Consistent hashing by request key; requests without a key go to a random endpoint.
#[derive(Debug, Clone, Copy)]
pub struct ConsistentHash {
    replicas: u32,
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
        }
    }
}

impl Balancer for ConsistentHash {
    fn name(&self) -> &'static str {
        "consistent_hash"
    }

    fn prepare(&self, endpoints: &[Arc<Endpoint>]) -> Box<dyn Picker> {
        Box::new(self.ring(endpoints))
    }
}

impl ConsistentHash {
    fn ring(&self, endpoints: &[Arc<Endpoint>]) -> Ring {
        let points = |e: &Endpoint| (u64::from(self.replicas) * u64::from(e.weight()) / 100).max(1);
        let total: u64 = endpoints.iter().map(|e| points(e)).sum();
        let mut ring = Vec::with_capacity(total.min(MAX_RING_POINTS) as usize);
        for (index, e) in endpoints.iter().enumerate() {
            let mut own = points(e);
            if total > MAX_RING_POINTS {
                own = (own * MAX_RING_POINTS / total).max(1);
            }
            for i in 0..own {
                let hash = hash_key(format!("{}#{i}", e.address()).as_bytes());
                ring.push((hash, index as u32));
            }
        }
        ring.sort_unstable_by_key(|(h, _)| *h);
        Ring {
            points: ring.into_boxed_slice(),
        }
    }
}

struct Ring {
    points: Box<[(u64, u32)]>,
}

impl Picker for Ring {
    fn pick(&self, endpoints: &[Arc<Endpoint>], key: Option<u64>, now: u64) -> Option<usize> {
        let Some(key) = key else {
            return random_eligible(endpoints, now, None);
        };
        let start = self.points.partition_point(|(h, _)| *h < key);
        // Clockwise to the first point whose endpoint is not ejected.
        first_eligible(endpoints, self.points.len(), start, now, |p| {
            self.points[p].1 as usize
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(n: usize, weight: u32) -> Vec<Arc<Endpoint>> {
        (0..n)
            .map(|i| {
                Arc::new(Endpoint::new(
                    format!("e{i}"),
                    format!("10.0.{}.{}:80", i / 256, i % 256),
                    weight,
                    "",
                ))
            })
            .collect()
    }

    #[test]
    fn ring_points_are_bounded_whatever_the_weight() {
        let ring = ConsistentHash::new(u32::MAX).ring(&endpoints(1, u32::MAX));
        assert_eq!(
            ring.points.len(),
            1000 * crate::endpoint::MAX_WEIGHT as usize / 100
        );
    }

    #[test]
    fn a_large_set_is_scaled_into_the_ring_and_keeps_every_endpoint() {
        let set = endpoints(3_000, 1_000);
        let ring = ConsistentHash::default().ring(&set);
        // 3 000 × 1 600 points would be 4.8 M.
        assert!(
            ring.points.len() as u64 <= MAX_RING_POINTS,
            "{}",
            ring.points.len()
        );
        let mut owners: Vec<u32> = ring.points.iter().map(|(_, i)| *i).collect();
        owners.sort_unstable();
        owners.dedup();
        assert_eq!(owners.len(), set.len());
    }
}
