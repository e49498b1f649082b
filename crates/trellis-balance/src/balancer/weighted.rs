//! nginx's smooth weighted round robin, as a precomputed schedule.
//!
//! nginx's rule: every pick adds each endpoint's weight to its current
//! weight, takes the endpoint with the largest current weight and subtracts
//! the total from it. Over a cycle of `sum(weights)` picks each endpoint is
//! chosen exactly `weight` times, and heavy endpoints are interleaved with
//! light ones rather than picked in a burst.
//!
//! The sequence is periodic, so it is computed once per endpoint set (off
//! the request path) and a pick is one per-thread counter increment and an
//! array read — no lock around current weights. Weights are divided by
//! their greatest common divisor first; a cycle longer than
//! [`MAX_SCHEDULE`] is scaled down to it (proportions then hold to within
//! one pick per endpoint per cycle). Very large sets, where nginx's rule
//! would cost `endpoints × cycle` steps to run, are scheduled by earliest
//! deadline first with midpoint deadlines instead: the same exact
//! proportions per cycle, interleaved almost as smoothly.

use std::{
    cmp::{Ordering, Reverse},
    collections::BinaryHeap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
};

use trellis_core::stripe::Striped;

use super::{Balancer, Picker, first_eligible};
use crate::Endpoint;

/// The longest schedule kept per endpoint set (64 KiB of indices).
pub const MAX_SCHEDULE: usize = 16_384;

/// Up to this many steps (endpoints × cycle) the schedule follows nginx's
/// rule exactly; past it, earliest deadline first.
const EXACT_STEPS: usize = 1 << 22;

/// Smooth weighted round robin (exact proportions, interleaved), per
/// thread: each thread walks the schedule from its start, as each nginx
/// worker keeps its own.
#[derive(Debug, Default, Clone, Copy)]
pub struct SmoothWeightedRoundRobin;

impl Balancer for SmoothWeightedRoundRobin {
    fn name(&self) -> &'static str {
        "smooth_weighted_round_robin"
    }

    fn prepare(&self, endpoints: &[Arc<Endpoint>]) -> Box<dyn Picker> {
        let weights: Vec<u32> = endpoints.iter().map(|e| e.weight()).collect();
        Box::new(Schedule {
            order: schedule(&weights).into_boxed_slice(),
            next: Striped::default(),
        })
    }
}

struct Schedule {
    order: Box<[u32]>,
    next: Striped<AtomicUsize>,
}

impl Picker for Schedule {
    fn pick(&self, endpoints: &[Arc<Endpoint>], _key: Option<u64>, now: u64) -> Option<usize> {
        let turn = self.next.local().fetch_add(1, Relaxed);
        first_eligible(endpoints, self.order.len(), turn, now, |p| {
            self.order[p] as usize
        })
    }
}

/// One cycle of picks (indices into `weights`) for these weights.
pub(crate) fn schedule(weights: &[u32]) -> Vec<u32> {
    if weights.is_empty() {
        return Vec::new();
    }
    let divisor = weights.iter().fold(0, |g, w| gcd(g, (*w).max(1)));
    let mut weights: Vec<u64> = weights
        .iter()
        .map(|w| u64::from((*w).max(1) / divisor))
        .collect();
    let total: u64 = weights.iter().sum();
    let limit = MAX_SCHEDULE.max(weights.len()) as u64;
    if total > limit {
        for w in &mut weights {
            *w = (*w * limit / total).max(1);
        }
    }
    let cycle = weights.iter().sum::<u64>() as usize;
    if weights.len().saturating_mul(cycle) <= EXACT_STEPS {
        nginx(&weights, cycle)
    } else {
        earliest_deadline_first(&weights, cycle)
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn nginx(weights: &[u64], cycle: usize) -> Vec<u32> {
    let total = cycle as i64;
    let mut current = vec![0i64; weights.len()];
    let mut order = Vec::with_capacity(cycle);
    for _ in 0..cycle {
        let (mut best, mut best_weight) = (0usize, i64::MIN);
        for (i, (c, w)) in current.iter_mut().zip(weights).enumerate() {
            *c += *w as i64;
            if *c > best_weight {
                best_weight = *c;
                best = i;
            }
        }
        current[best] -= total;
        order.push(best as u32);
    }
    order
}

/// The `k`-th pick (from 1) of an endpoint of weight `w` is due at
/// `(2k - 1) / 2w` of the cycle; picks go in order of due time, ties to
/// the lower index. All `w` picks of every endpoint fall due within one
/// cycle, so proportions are exact.
fn earliest_deadline_first(weights: &[u64], cycle: usize) -> Vec<u32> {
    #[derive(PartialEq, Eq)]
    struct Due {
        k: u64,
        w: u64,
        i: u32,
    }
    impl Ord for Due {
        fn cmp(&self, other: &Self) -> Ordering {
            ((2 * self.k - 1) * other.w)
                .cmp(&((2 * other.k - 1) * self.w))
                .then(self.i.cmp(&other.i))
        }
    }
    impl PartialOrd for Due {
        fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
            Some(self.cmp(other))
        }
    }
    let mut heap: BinaryHeap<Reverse<Due>> = weights
        .iter()
        .enumerate()
        .map(|(i, w)| {
            Reverse(Due {
                k: 1,
                w: *w,
                i: i as u32,
            })
        })
        .collect();
    let mut order = Vec::with_capacity(cycle);
    while order.len() < cycle {
        let Some(Reverse(due)) = heap.pop() else {
            break;
        };
        order.push(due.i);
        if due.k < due.w {
            heap.push(Reverse(Due {
                k: due.k + 1,
                ..due
            }));
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(order: &[u32], n: usize) -> Vec<u64> {
        let mut c = vec![0u64; n];
        for i in order {
            c[*i as usize] += 1;
        }
        c
    }

    #[test]
    fn weights_share_a_divisor_before_the_cycle_is_built() {
        assert_eq!(schedule(&[500, 100, 100]), [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn long_cycles_are_scaled_and_keep_their_proportions() {
        let weights = [10_000, 9_999, 1, 5_000];
        let order = schedule(&weights);
        assert!(order.len() <= MAX_SCHEDULE + weights.len());
        let c = counts(&order, weights.len());
        let total: u64 = c.iter().sum();
        for (w, got) in weights.iter().zip(&c) {
            let want = *w as f64 / 25_000.0 * total as f64;
            assert!((*got as f64 - want).abs() <= 1.0 + want * 0.001, "{c:?}");
        }
        assert!(c[2] >= 1, "the lightest endpoint keeps a place");
    }

    #[test]
    fn large_sets_are_scheduled_by_deadline_with_exact_proportions() {
        // 3 000 endpoints × a cycle of ~9 000 is past the exact-steps bound.
        let weights: Vec<u32> = (0..3_000).map(|i| 1 + i % 5).collect();
        let order = schedule(&weights);
        assert_eq!(order.len(), weights.iter().sum::<u32>() as usize);
        let c = counts(&order, weights.len());
        for (w, got) in weights.iter().zip(&c) {
            assert_eq!(u64::from(*w), *got);
        }
        // Interleaved: the first 3 000 picks reach every endpoint of
        // weight ≥ 2 (a burst would serve the heaviest first).
        let early = counts(&order[..3_000], weights.len());
        let missed = weights
            .iter()
            .zip(&early)
            .filter(|(w, e)| **w >= 2 && **e == 0)
            .count();
        assert_eq!(missed, 0);
    }
}
